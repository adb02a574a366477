"""The Python 3.11 documentation as English prose: paragraphs of its reStructuredText sources.

  documents = python_docs.read()                              # {relative path: [paragraphs]}
  calibration, held_out = python_docs.split(documents)        # disjoint by file, seeded
  texts = python_docs.texts(held_out)                         # the paragraphs, in file order

Source: the Debian package `python3.11-doc` (`apt-get install python3.11-doc`), files
`/usr/share/doc/python3.11/html/_sources/<section>/**/*.rst.txt`; `OBA_PYTHON_DOCS_DIR` or
`directory=` points elsewhere. Licence: PSF License Version 2 (the documentation's). By default
the sections that are mostly prose are read: tutorial, faq, howto and reference (57 files,
1.56 MB of reStructuredText, 4,182 paragraphs and 0.88 M characters of prose after extraction);
`sections=` chooses others (library, whatsnew, ...).

**Extraction** (`paragraphs`) keeps running text and drops what is not prose: blocks are
separated by blank lines; directives and comments (`.. name::`, `..`) and everything indented
under them, literal blocks after a paragraph ending in `::` (the paragraph keeps one `:`),
doctest blocks (`>>>`), headings (a line with an under- or overline of punctuation), tables
(`+---+`, `=== ===`, `|` rows), and blocks with no word of three letters are dropped. Inline
markup is reduced to its text: :role:`!if` and :role:`title <target>` -> if / title,
:role:`~a.b.c` -> c, ``literal`` -> literal, `text <url>`_ -> text, *emphasis* -> emphasis. A
list item's marker is removed. The lines of a paragraph are joined with single spaces.

**The split** (`split`) is by file, so a page is never on both sides: the files are ordered by
path, permuted by `numpy.random.default_rng(split_seed)`, and the first `held_out` of the
permutation (a fraction, or a count) are held out.
"""

import glob
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from oba_jax import files

DEFAULT_DIRECTORY = "/usr/share/doc/python3.11/html/_sources"
SECTIONS = ("tutorial", "faq", "howto", "reference")
SUFFIX = ".rst.txt"

_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+_.:<>])\1{2,}\s*$")
_TABLE = re.compile(r"^\s*(\+[-=+]+\+?|=+( +=+)+|\|.*)\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.(\s|$)")
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REFERENCE = re.compile(r"`([^`]+)`__?")
_INTERPRETED = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_BULLET = re.compile(r"^\s*([-*+\u2022]|#\.|\d+[.)]|\(\d+\))\s+")
_WORD = re.compile(r"[A-Za-z]{3,}")


def directory_or_default(directory: str | os.PathLike | None = None) -> str:
  directory = os.fspath(directory or os.environ.get("OBA_PYTHON_DOCS_DIR") or DEFAULT_DIRECTORY)
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"the Python documentation sources are not in {directory!r}: install them with "
        "`apt-get install python3.11-doc`, or set OBA_PYTHON_DOCS_DIR to a directory holding "
        f"<section>/*{SUFFIX} files (the html/_sources of a Sphinx build).")
  return directory


def available(directory: str | os.PathLike | None = None) -> bool:
  try:
    directory_or_default(directory)
  except FileNotFoundError:
    return False
  return True


def source_files(directory: str | os.PathLike | None = None,
                 sections: Sequence[str] = SECTIONS) -> list[str]:
  """The `*.rst.txt` files of `sections`, as paths relative to the directory, sorted."""
  directory = directory_or_default(directory)
  if isinstance(sections, str) or not sections:
    raise ValueError(f"sections={sections!r} must be a non-empty list of section names, e.g. "
                     f"{list(SECTIONS)}.")
  found, missing = [], []
  for section in sections:
    paths = glob.glob(os.path.join(directory, section, "**", f"*{SUFFIX}"), recursive=True)
    if not paths:
      missing.append(section)
    found.extend(os.path.relpath(p, directory) for p in paths)
  if missing:
    raise FileNotFoundError(f"no {SUFFIX} files under sections {missing} of {directory!r}; "
                            f"the sections there: {sorted(os.listdir(directory))}.")
  return sorted(found)


def fingerprint(directory: str | os.PathLike | None = None,
                sections: Sequence[str] = SECTIONS) -> dict[str, dict]:
  """{relative path: `files.fingerprint`} of the files `read` reads (a run's identity)."""
  directory = directory_or_default(directory)
  return {p: files.fingerprint(os.path.join(directory, p))
          for p in source_files(directory, sections)}


def read(directory: str | os.PathLike | None = None,
         sections: Sequence[str] = SECTIONS) -> dict[str, list[str]]:
  """{relative path: its prose paragraphs}, every file of `sections`, ordered by path."""
  directory = directory_or_default(directory)
  out = {}
  for path in source_files(directory, sections):
    with open(os.path.join(directory, path), encoding="utf-8", errors="replace") as f:
      out[path] = paragraphs(f.read())
  return out


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def paragraphs(source: str) -> list[str]:
  """The prose paragraphs of one reStructuredText source (see the module docstring)."""
  lines = source.expandtabs(8).splitlines()
  out = []
  i = 0
  while i < len(lines):
    if not lines[i].strip():
      i += 1
      continue
    directive = _DIRECTIVE.match(lines[i])
    if directive:  # skip the directive and its indented body
      i = _skip_indented(lines, i + 1, _indent(lines[i]))
      continue
    start = i
    while i < len(lines) and lines[i].strip() and not _DIRECTIVE.match(lines[i]):
      i += 1
    block = lines[start:i]
    literal = block[-1].rstrip().endswith("::")
    text = _prose(block)
    if text is not None:
      out.append(text)
    if literal:  # the indented literal block that follows
      i = _skip_indented(lines, i, min(_indent(line) for line in block))
  return out


def _skip_indented(lines: list[str], i: int, indent: int) -> int:
  """The index of the first line from `i` on that is not blank and not indented past
  `indent`."""
  while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
    i += 1
  return i


def _prose(block: list[str]) -> str | None:
  """One block's text with inline markup reduced, or None if it is not prose."""
  stripped = [line.strip() for line in block]
  if stripped[0].startswith(">>>"):
    return None
  if any(_ADORNMENT.match(line) or _TABLE.match(line) for line in stripped):
    return None
  text = " ".join(stripped)
  text = _BULLET.sub("", text)
  if text.endswith("::"):
    text = text[:-2].rstrip()
    text = text + ":" if text else text
  text = _inline(text)
  text = re.sub(r"\s+", " ", text).strip()
  if not _WORD.search(text):
    return None
  return text


def _role_text(match: re.Match) -> str:
  inner = match.group(1)
  titled = re.match(r"^(.*?)\s*<[^<>]*>$", inner, re.S)
  if titled and titled.group(1):
    return titled.group(1)
  inner = inner.lstrip("!")
  if inner.startswith("~"):
    inner = inner[1:].rsplit(".", 1)[-1]
  return inner


def _inline(text: str) -> str:
  text = _ROLE.sub(_role_text, text)
  text = _LITERAL.sub(r"\1", text)
  text = _LINK.sub(r"\1", text)
  text = _REFERENCE.sub(r"\1", text)
  text = _INTERPRETED.sub(r"\1", text)
  text = _STRONG.sub(r"\1", text)
  text = _EMPHASIS.sub(r"\1", text)
  return text.replace("\\", "")


def split(documents: Mapping[str, list[str]], *, held_out: float | int = 0.2,
          split_seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """(calibration, held_out): disjoint by file; see the module docstring for the rule."""
  ordered = sorted(documents)
  count = (int(held_out) if isinstance(held_out, int) and not isinstance(held_out, bool)
           else int(round(float(held_out) * len(ordered))))
  if not 0 < count < len(ordered):
    raise ValueError(f"held_out={held_out!r} must leave both parts non-empty ({len(ordered)} "
                     "files): a fraction in (0, 1) or a count.")
  order = np.random.default_rng(split_seed).permutation(len(ordered))
  held = {ordered[i] for i in order[:count]}
  return ({p: documents[p] for p in ordered if p not in held},
          {p: documents[p] for p in ordered if p in held})


def texts(documents: Mapping[str, list[str]]) -> list[str]:
  """Every paragraph, files in path order."""
  return [p for path in sorted(documents) for p in documents[path]]
