"""The layout algebra of the structure tracer: axes as products and concatenations of atoms.

An *atom* is an index space (the channels of a conv, the heads of an attention,
a batch). A *layout* describes one array axis as a concatenation of segments,
each a row-major product of atoms:

  a conv's output channels           ((c,),)
  a flatten of (H, W, C)              ((h, w, c),)
  a projection split into heads       ((heads, head_dim),)
  a concatenation of 6 and 4 channels ((a,), (b,))
  an axis of size 1                   ((),)

`Atoms.unify` declares two axes to be the same index space. When their
factorisations differ, the coarser atoms are *refined*, into a product
((6,) = (2, 3)) or a concatenation ((10,) = (6,) ++ (4,)), until they align.
"""

import math
from collections.abc import Sequence

import numpy as np

Segment = tuple[int, ...]  # atoms, row-major
Layout = tuple[Segment, ...]  # segments, concatenated
ONE: Layout = ((),)  # an axis of size 1


class UnsupportedLayoutError(NotImplementedError):
  """Two axes cannot be aligned, or an operation interleaves channels."""


class Atoms:
  """Union-find over index spaces, with refinement into finer ones.

  Besides its size, an atom is `fixed` (it carries data: batch, space, tokens,
  inputs, outputs; never prunable) and `reduced` (some operation sums or
  normalises over it). Both flags spread through unions and refinements.
  """

  def __init__(self):
    self.size: list[int] = []
    self.parent: list[int] = []
    self.fixed: list[bool] = []
    self.reduced: list[bool] = []
    self.definition: dict[int, Layout] = {}

  def new(self, size: int, fixed: bool) -> Layout:
    """A fresh axis of `size`: one new atom, or no atom for size 1."""
    if size == 1:
      return ONE
    self.size.append(size)
    self.parent.append(len(self.parent))
    self.fixed.append(fixed)
    self.reduced.append(False)
    return ((len(self.size) - 1,),)

  def atom(self, size: int) -> int:
    return self.new(size, False)[0][0]

  def find(self, a: int) -> int:
    root = a
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[a] != root:
      self.parent[a], a = root, self.parent[a]
    return root

  def expand(self, layout: Layout) -> Layout:
    """The layout in finest atoms (roots without definitions)."""
    segments: list[Segment] = []
    for segment in layout:
      parts: list[Segment] = [()]  # the segment may become a concatenation
      for a in segment:
        r = self.find(a)
        if r not in self.definition:
          parts = [p + (r,) for p in parts]
          continue
        inner = self.expand(self.definition[r])
        if len(inner) == 1:
          parts = [p + inner[0] for p in parts]
        elif parts == [()]:  # a concatenated leading factor distributes over the rest
          parts = list(inner)
        else:
          raise UnsupportedLayoutError(
              "a concatenated axis is used as a minor factor of a reshaped axis; the channels "
              "it holds are interleaved and cannot be tracked as contiguous slices.")
      segments.extend(parts)
    return tuple(segments)

  def segment_size(self, segment: Segment) -> int:
    return math.prod(self.size[a] for a in segment)

  def layout_size(self, layout: Layout) -> int:
    return sum(self.segment_size(s) for s in self.expand(layout))

  def refine(self, a: int, layout: Layout) -> None:
    a = self.find(a)
    self.definition[a] = layout
    for segment in layout:
      for b in segment:
        self.fixed[b] |= self.fixed[a]
        self.reduced[b] |= self.reduced[a]

  def split_product(self, a: int, leading: int) -> tuple[int, int]:
    """Refines atom `a` into a product (leading, size/leading); returns the two atoms."""
    first, second = self.atom(leading), self.atom(self.size[a] // leading)
    self.refine(a, ((first, second),))
    return first, second

  def fix(self, layout: Layout) -> None:
    """Marks an axis as data: it and everything unified with it is never pruned."""
    for segment in self.expand(layout):
      for a in segment:
        self.fixed[self.find(a)] = True

  def mark_reduced(self, layout: Layout) -> None:
    for segment in self.expand(layout):
      for a in segment:
        self.reduced[self.find(a)] = True

  def slice(self, axis: Layout, start: int, stop: int, size: int) -> Layout:
    """The layout of axis[start:stop]: refines the axis so that the slice is a segment."""
    sizes = (start, stop - start, size - stop)
    pieces = [(self.atom(n),) if n > 1 else () for n in sizes]
    whole = self.atom(size)
    self.refine(whole, tuple(piece for piece, n in zip(pieces, sizes) if n))
    self.unify(((whole,),), axis)
    return (pieces[1],)

  def take(self, pending: list[int], size: int) -> list[int]:
    """Pops leading atoms of `pending` making up `size`, splitting one atom if it is larger."""
    taken = []
    while size > 1:
      a = pending.pop(0)
      n = self.size[a]
      if size % n == 0:
        taken.append(a)
        size //= n
      elif n % size == 0:
        first, rest = self.split_product(a, size)
        taken.append(first)
        pending.insert(0, rest)
        size = 1
      else:
        raise UnsupportedLayoutError(
            f"an axis of size {n} would be split into pieces of {size}: no common refinement.")
    return taken

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra
      self.fixed[ra] |= self.fixed[rb]
      self.reduced[ra] |= self.reduced[rb]

  def unify(self, x: Layout, y: Layout) -> None:
    """Declares two axes (of equal size) to be the same index space."""
    x, y = self.expand(x), self.expand(y)
    if x == y:
      return
    if len(x) == 1 and len(y) == 1:
      self._unify_products(list(x[0]), list(y[0]))
      return
    # Concatenations: split segments at each other's boundaries, then pair them.
    bounds = sorted(set(self._bounds(x)) | set(self._bounds(y)))
    if self._split_at(x, bounds) or self._split_at(y, bounds):
      self.unify(x, y)
      return
    for sx, sy in zip(x, y, strict=True):
      self._unify_products(list(sx), list(sy))

  def _bounds(self, layout: Layout) -> list[int]:
    return list(np.cumsum([self.segment_size(s) for s in layout]))

  def _split_at(self, layout: Layout, bounds: Sequence[int]) -> bool:
    """Splits the leading atom of a segment that straddles a boundary; True if it did."""
    start = 0
    for segment in layout:
      size = self.segment_size(segment)
      inside = [b - start for b in bounds if start < b < start + size]
      if inside:
        lead, minor = segment[0], self.segment_size(segment[1:])
        if any(cut % minor for cut in inside):
          raise UnsupportedLayoutError("concatenation boundaries cut through a product axis.")
        cuts = [c // minor for c in inside]
        pieces = np.diff([0, *cuts, self.size[lead]])
        self.refine(lead, tuple((self.atom(int(p)),) if p > 1 else () for p in pieces))
        return True
      start += size
    return False

  def _unify_products(self, xs: list[int], ys: list[int]) -> None:
    while xs and ys:
      a, b = xs.pop(0), ys.pop(0)
      sa, sb = self.size[a], self.size[b]
      if sa == sb:
        self.union(a, b)
      elif sa < sb and sb % sa == 0:
        first, rest = self.split_product(b, sa)
        self.union(a, first)
        ys.insert(0, rest)
      elif sb < sa and sa % sb == 0:
        first, rest = self.split_product(a, sb)
        self.union(first, b)
        xs.insert(0, rest)
      else:
        raise UnsupportedLayoutError(
            f"axes factorised as {sa}x... and {sb}x... cannot be aligned (no common refinement).")
    if xs or ys:
      raise AssertionError("unify: sizes differ")  # a tracer bug, never user input
