"""Packing of tokenized texts into fixed-length sequences, for any corpus.

  sequences = text.pack(texts, tokenizer.encode, length=128, separator=eos_id, seed=1,
                        num_sequences=128)                  # int32 (128, 128)
  batches = text.batches(sequences, batch_size=8)            # [{"tokens", "mask"}, ...]

The texts are taken in order (seed None) or in the order of a permutation drawn from `seed`,
each encoded and followed by `separator`, and the stream is cut into consecutive sequences of
exactly `length` tokens; the incomplete tail is dropped. Texts are encoded only until
`num_sequences` sequences are full, so a few sequences from a large corpus cost little. Every
position is a real token (mask 1): the sequences have no padding, and a text may continue from
one sequence into the next. The result depends only on the texts, `encode`, `length`,
`separator`, `seed` and `num_sequences`.
"""

from collections.abc import Callable, Sequence

import numpy as np

Encode = Callable[[str], Sequence[int]]


def pack(texts: Sequence[str], encode: Encode, *, length: int, separator: int,
         seed: int | None = None, num_sequences: int | None = None) -> np.ndarray:
  """int32 (count, length): the texts' tokens, each text followed by `separator`, in sequences
  of `length` (count = `num_sequences`, or as many as the texts fill)."""
  if isinstance(length, bool) or not isinstance(length, int) or length < 2:
    raise ValueError(f"length={length!r} must be an integer >= 2.")
  if num_sequences is not None and (isinstance(num_sequences, bool)
                                    or not isinstance(num_sequences, int) or num_sequences < 1):
    raise ValueError(f"num_sequences={num_sequences!r} must be a positive integer or None.")
  order = np.arange(len(texts)) if seed is None else np.random.default_rng(seed).permutation(
      len(texts))
  needed = None if num_sequences is None else num_sequences * length
  stream: list[int] = []
  for i in order:
    stream.extend(encode(texts[i]))
    stream.append(separator)
    if needed is not None and len(stream) >= needed:
      break
  count = len(stream) // length
  if num_sequences is not None and count >= num_sequences:
    count = num_sequences
  elif num_sequences is not None:
    raise ValueError(f"{len(texts)} texts make {len(stream)} tokens: {count} sequences of "
                     f"{length}, fewer than num_sequences={num_sequences}; ask for fewer or "
                     "shorter sequences, or use more text.")
  if count < 1:
    raise ValueError(f"{len(texts)} texts make {len(stream)} tokens, not one sequence of "
                     f"{length}.")
  return np.asarray(stream[:count * length], np.int32).reshape(count, length)


def batches(sequences: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Consecutive full batches `{"tokens", "mask"}` (mask all ones) of the packed sequences; the
  incomplete last batch is dropped."""
  count = len(sequences) // batch_size
  if count < 1:
    raise ValueError(f"{len(sequences)} sequences make no full batch of {batch_size}.")
  return [{"tokens": sequences[b * batch_size:(b + 1) * batch_size],
           "mask": np.ones((batch_size, sequences.shape[1]), np.int32)} for b in range(count)]


def sequences_for(tokens: int, length: int, batch_size: int = 1) -> int:
  """The fewest sequences of `length`, a multiple of `batch_size`, that hold at least `tokens`
  next-token targets (length - 1 per sequence: the first token of each has no context)."""
  count = -(-tokens // (length - 1))
  return -(-count // batch_size) * batch_size
