"""The finished cells of a pruning run (one criterion at one target), kept so a resumed run
skips them, in this workdir or in another session's.

`workdir/cells/<criterion>/<target>.json` holds a cell's measured row, or the reason its
target was unreachable, under the key of what it was computed from: the run's settings
and a digest of the dense model's parameters and statistics. A cell of another key (a
changed setting, a dense model trained again to other values) is recomputed and
replaced, never mixed in. A cell also records how many importance batches its criterion
had drawn when it finished, so the next target of a one-shot run reads the same batches
whether or not the targets before it were recomputed (`Drawn`).

The files are small JSON: copied into a new workdir (`experiments/compare_fashion_mnist.sh`
keeps them under RECORD), they let a comparison that spans several machines or sessions
go on where it stopped, with the same pairing as a run never interrupted.
"""

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import ml_collections
from flax import nnx

from oba_jax import runs
from oba_jax.experiments import cli

CELLS_DIR = "cells"


class Cells:
  """The cells of one run under `directory`, keyed by `config` and the `dense` model."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict, dense: nnx.Module):
    self.directory = directory
    dense_arrays = nnx.to_pure_dict(nnx.state(dense, nnx.Any(nnx.Param, nnx.BatchStat)))
    identity = {"config": cli.comparable(config.to_dict()), "dense": runs.digest(dense_arrays)}
    self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    self._told = set()  # stale cells already reported

  def _path(self, criterion: str, target: float) -> str:
    return os.path.join(self.directory, criterion, f"{target}.json")

  def get(self, criterion: str, target: float) -> dict | None:
    """The cell's record ({"row": ...} or {"unreachable": ...}, and "drawn"), or None when it
    was not finished with this run's key."""
    path = self._path(criterion, target)
    if not os.path.exists(path):
      return None
    cell = cli.read_json(path, what=f"the finished cell {criterion} at {target}")
    if cell.get("key") != self.key:
      if path not in self._told:
        self._told.add(path)
        cli.say(f"{criterion} at {target}: the cell in {path} was computed from other settings "
                "or another dense model; computing it again")
      return None
    return cell

  def put(self, criterion: str, target: float, record: dict[str, Any], drawn: int = 0) -> None:
    """Writes the cell (atomically): `record` is {"row": ...} or {"unreachable": ...}."""
    cli.write_json(self._path(criterion, target), {"key": self.key, "drawn": drawn, **record})


class Drawn(Iterator):
  """An iterator that counts what was drawn from it, and can skip to a count."""

  def __init__(self, items: Iterable):
    self._items = iter(items)
    self.count = 0

  def __next__(self):
    item = next(self._items)
    self.count += 1
    return item

  def skip_to(self, count: int) -> None:
    """Draws and drops items until `count` have been drawn in all."""
    while self.count < count:
      next(self)
