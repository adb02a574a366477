"""WordNet 3.0 as real English text: definitions and example sentences, split and batched.

  synsets = wordnet.read()                         # every synset with a gloss (117,659)
  calibration, held_out = wordnet.split(synsets)   # disjoint by synset, seeded
  texts = wordnet.texts(calibration)               # definitions and example sentences
  pairs = wordnet.pairs(held_out)                  # (example sentence, definition)
  batches = wordnet.token_batches(texts, tokenizer.encode, batch_size=8, max_tokens=32, seed=1)

Source: the Debian package `wordnet-base` (`apt-get install wordnet-base`), files
`/usr/share/wordnet/data.{noun,verb,adj,adv}`; `OBA_WORDNET_DIR` or `directory=` points elsewhere.
Licence "WordNet 3.0" (Princeton; redistribution allowed with the notice kept).

A synset's gloss is "definition; "example one"; "example two"": the quoted parts are the
example sentences, the text before the first quote (trailing ';' removed) the definition.

**The split** (`split`) is by synset, so a definition and its examples never fall on both sides:
synsets are ordered by id ("n00001740", ...), permuted by `numpy.random.default_rng(split_seed)`,
and the first `held_out` of the permutation (a fraction, or a count) form the held-out part, the
rest the calibration part. The held-out part depends only on `split_seed` and `held_out`, never
on the calibration seed, so every calibration seed is evaluated on the same held-out text.
Calibration seeds choose and order batches *within* the calibration part (`token_batches`).

Batches are plain numpy dicts: `{"tokens": int32 (batch, max_tokens), "mask": int32 (...)}`,
right-padded with `pad_id` (mask 0) and truncated to `max_tokens`, so that every batch has one
shape (one compilation). `pair_batches` gives `{"query_tokens", "query_mask", "key_tokens",
"key_mask"}` for retrieval and in-batch contrastive losses.
"""

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from oba_jax import files

DEFAULT_DIRECTORY = "/usr/share/wordnet"
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
_QUOTED = re.compile(r'"([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Synset:
  """One WordNet synset: id ('n' + offset for nouns, 'v', 'a', 'r'), lemmas, gloss parts."""

  id: str
  lemmas: tuple[str, ...]
  definition: str
  examples: tuple[str, ...]


def directory_or_default(directory: str | os.PathLike | None = None) -> str:
  directory = os.fspath(directory or os.environ.get("OBA_WORDNET_DIR") or DEFAULT_DIRECTORY)
  missing = [p for p in PARTS_OF_SPEECH if not os.path.exists(os.path.join(directory, f"data.{p}"))]
  if missing:
    raise FileNotFoundError(
        f"WordNet data files {[f'data.{p}' for p in missing]} are not in {directory!r}: install "
        "them with `apt-get install wordnet-base`, or set OBA_WORDNET_DIR to a directory holding "
        "data.noun, data.verb, data.adj and data.adv.")
  return directory


def available(directory: str | os.PathLike | None = None) -> bool:
  try:
    directory_or_default(directory)
  except FileNotFoundError:
    return False
  return True


def fingerprint(directory: str | os.PathLike | None = None) -> dict[str, dict]:
  """{"data.noun": `files.fingerprint`, ...} of the files `read` reads (a run's identity)."""
  directory = directory_or_default(directory)
  return {f"data.{p}": files.fingerprint(os.path.join(directory, f"data.{p}"))
          for p in PARTS_OF_SPEECH}


def parse_line(line: str) -> Synset | None:
  """The synset of one `data.*` line, or None for the licence header and glossless lines."""
  if line.startswith(" ") or " | " not in line:
    return None
  head, gloss = line.rstrip().split(" | ", 1)
  fields = head.split()
  offset, pos, count = fields[0], fields[2], int(fields[3], 16)
  lemmas = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(count))
  pos = "a" if pos == "s" else pos  # satellite adjectives are adjectives
  examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
  definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
  if not definition:
    return None
  return Synset(f"{pos}{offset}", lemmas, definition, examples)


def read(directory: str | os.PathLike | None = None,
         parts_of_speech: Sequence[str] = PARTS_OF_SPEECH) -> list[Synset]:
  """Every synset with a definition, ordered by id."""
  directory = directory_or_default(directory)
  unknown = sorted(set(parts_of_speech) - set(PARTS_OF_SPEECH))
  if unknown:
    raise ValueError(f"parts_of_speech {unknown} unknown; accepted: {list(PARTS_OF_SPEECH)}.")
  synsets = []
  for pos in parts_of_speech:
    path = os.path.join(directory, f"data.{pos}")
    with open(path, encoding="utf-8", errors="replace") as f:
      for number, line in enumerate(f, start=1):
        try:
          synset = parse_line(line)
        except (ValueError, IndexError) as error:
          raise files.damaged(path, "a WordNet data file", f"line {number}: {line[:60]!r}, "
                              f"{type(error).__name__}: {error}", "Reinstall it (apt-get "
                              "install --reinstall wordnet-base), or set OBA_WORDNET_DIR to "
                              "an intact copy.") from None
        if synset is not None:
          synsets.append(synset)
  return sorted(synsets, key=lambda s: s.id)


def split(synsets: Sequence[Synset], *, held_out: float | int = 0.2,
          split_seed: int = 0) -> tuple[list[Synset], list[Synset]]:
  """(calibration, held_out): disjoint by synset; see the module docstring for the rule."""
  ordered = sorted(synsets, key=lambda s: s.id)
  if len({s.id for s in ordered}) != len(ordered):
    raise ValueError("synset ids are not unique.")
  count = (int(held_out) if isinstance(held_out, int) and not isinstance(held_out, bool)
           else int(round(float(held_out) * len(ordered))))
  if not 0 < count < len(ordered):
    raise ValueError(f"held_out={held_out!r} must leave both parts non-empty ({len(ordered)} "
                     "synsets): a fraction in (0, 1) or a count.")
  order = np.random.default_rng(split_seed).permutation(len(ordered))
  held = sorted(order[:count])
  rest = sorted(order[count:])
  return [ordered[i] for i in rest], [ordered[i] for i in held]


def texts(synsets: Sequence[Synset], *, definitions: bool = True,
          examples: bool = True) -> list[str]:
  """The definitions (capitalised, with a full stop) and example sentences, in synset order."""
  out = []
  for s in synsets:
    if definitions:
      out.append(s.definition[:1].upper() + s.definition[1:] + ".")
    if examples:
      out.extend(s.examples)
  return out


def pairs(synsets: Sequence[Synset]) -> list[tuple[str, str]]:
  """(first example sentence, definition) of every synset that has an example."""
  return [(s.examples[0], s.definition) for s in synsets if s.examples]


Encode = Callable[[str], Sequence[int]]


def encode_padded(texts_: Sequence[str], encode: Encode, *, max_tokens: int, pad_id: int = 0,
                  prefix: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask), int32 arrays (len(texts), max_tokens): `prefix` + ids, truncated, padded."""
  if max_tokens < 2:
    raise ValueError(f"max_tokens={max_tokens} must be at least 2.")
  tokens = np.full((len(texts_), max_tokens), pad_id, np.int32)
  mask = np.zeros((len(texts_), max_tokens), np.int32)
  for i, text in enumerate(texts_):
    ids = (list(prefix) + list(encode(text)))[:max_tokens]
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  return tokens, mask


def _full_batches(size: int, batch_size: int, seed: int | None, num_batches: int | None,
                  what: str) -> list[np.ndarray]:
  """Indices of each full batch of `size` items, in order or permuted by `seed`."""
  order = _order(size, seed)
  count = len(order) // batch_size
  count = count if num_batches is None else min(count, num_batches)
  if count < 1:
    raise ValueError(f"{size} {what} make no full batch of {batch_size}.")
  return [order[b * batch_size:(b + 1) * batch_size] for b in range(count)]


def _order(n: int, seed: int | None) -> np.ndarray:
  return np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)


def token_batches(texts_: Sequence[str], encode: Encode, *, batch_size: int, max_tokens: int,
                  seed: int | None = None, num_batches: int | None = None, pad_id: int = 0,
                  prefix: Sequence[int] = ()) -> list[dict[str, np.ndarray]]:
  """Full batches `{"tokens", "mask"}` of the texts, in order (seed None) or permuted by `seed`;
  at most `num_batches` of them. The incomplete last batch is dropped."""
  out = []
  for batch in _full_batches(len(texts_), batch_size, seed, num_batches, "texts"):
    chosen = [texts_[i] for i in batch]
    tokens, mask = encode_padded(chosen, encode, max_tokens=max_tokens, pad_id=pad_id,
                                 prefix=prefix)
    out.append({"tokens": tokens, "mask": mask})
  return out


def pair_batches(pairs_: Sequence[tuple[str, str]], encode: Encode, *, batch_size: int,
                 max_tokens: int, seed: int | None = None, num_batches: int | None = None,
                 pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """Full batches `{"query_tokens", "query_mask", "key_tokens", "key_mask"}` of (query, key)
  pairs, in order (seed None) or permuted by `seed`."""
  out = []
  for batch in _full_batches(len(pairs_), batch_size, seed, num_batches, "pairs"):
    chosen = [pairs_[i] for i in batch]
    batch = {}
    for side, index in (("query", 0), ("key", 1)):
      tokens, mask = encode_padded([p[index] for p in chosen], encode, max_tokens=max_tokens,
                                   pad_id=pad_id)
      batch[f"{side}_tokens"], batch[f"{side}_mask"] = tokens, mask
    out.append(batch)
  return out


def iterate(batches: Sequence[dict]) -> Iterator[dict]:
  """The batches again and again (for `scores.accumulate(num_batches=...)`)."""
  while True:
    yield from batches
