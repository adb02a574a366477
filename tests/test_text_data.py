"""Packing of tokenized texts, and the Python documentation corpus (on a fixture directory)."""

import numpy as np
import pytest

from oba_jax.data import python_docs, text


def encode(s):
  return list(s.encode("utf-8"))


TEXTS = [f"text number {i} " + "word " * (i % 5) for i in range(40)]


def test_pack_makes_exact_sequences_with_separators():
  sequences = text.pack(TEXTS, encode, length=16, separator=0)
  stream = [t for s in TEXTS for t in encode(s) + [0]]
  assert sequences.dtype == np.int32 and sequences.shape == (len(stream) // 16, 16)
  np.testing.assert_array_equal(sequences.ravel(), stream[:sequences.size])


def test_pack_is_deterministic_given_the_seed_and_stops_early():
  a = text.pack(TEXTS, encode, length=8, separator=0, seed=3, num_sequences=5)
  b = text.pack(TEXTS, encode, length=8, separator=0, seed=3, num_sequences=5)
  c = text.pack(TEXTS, encode, length=8, separator=0, seed=4, num_sequences=5)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (5, 8) and not np.array_equal(a, c)
  seen = []
  text.pack(TEXTS, lambda s: seen.append(s) or encode(s), length=8, separator=0, num_sequences=1)
  assert len(seen) == 1  # the first text alone fills one sequence
  with pytest.raises(ValueError, match="num_sequences=1000"):
    text.pack(TEXTS, encode, length=8, separator=0, num_sequences=1000)
  with pytest.raises(ValueError, match="length"):
    text.pack(TEXTS, encode, length=1, separator=0)


def test_batches_and_sequence_counts():
  sequences = text.pack(TEXTS, encode, length=8, separator=0, num_sequences=10)
  batches = text.batches(sequences, batch_size=4)
  assert len(batches) == 2 and batches[0]["tokens"].shape == (4, 8)
  assert batches[1]["mask"].sum() == 32
  count = text.sequences_for(100, 8, batch_size=4)
  assert count % 4 == 0 and count * 7 >= 100 and (count - 4) * 7 < 100


SOURCE = """\
.. _tut-if:

:keyword:`!if` Statements
=========================

Perhaps the most well-known statement is the :keyword:`if` statement, see
:ref:`the tutorial <tut-intro>` and :func:`~os.path.join`.  For
example::

   >>> x = int(input("Please enter an integer: "))
   >>> if x < 0:
   ...     x = 0

There can be ``elif`` parts, and *emphasis* and **strong** words; read
`the guide <https://example.org/guide>`_.

.. note::

   A note body that is dropped with its directive.

* A list item with a marker.

>>> print("doctest")
doctest

+------+------+
| a    | b    |
+------+------+

A paragraph ending the file.
"""


def test_paragraphs_keep_prose_and_drop_code_directives_and_markup():
  got = python_docs.paragraphs(SOURCE)
  assert got == [
      "Perhaps the most well-known statement is the if statement, see the tutorial and "
      "join. For example:",
      "There can be elif parts, and emphasis and strong words; read the guide.",
      "A list item with a marker.",
      "A paragraph ending the file.",
  ]


def write_docs(root, count=10):
  for i in range(count):
    section = "tutorial" if i % 2 else "faq"
    path = root / section / f"page{i}.rst.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"Title {i}\n=======\n\nParagraph {i} of the page with words.\n\n"
                    "Code follows::\n\n   x = 1\n")
  (root / "library").mkdir()
  (root / "library" / "os.rst.txt").write_text("Not read by default.\n")


def test_read_split_by_file_and_fingerprint(tmp_path):
  write_docs(tmp_path)
  documents = python_docs.read(tmp_path, sections=("tutorial", "faq"))
  assert len(documents) == 10 and "library/os.rst.txt" not in documents
  assert documents["faq/page0.rst.txt"] == ["Paragraph 0 of the page with words.",
                                            "Code follows:"]
  calibration, held_out = python_docs.split(documents, held_out=0.3, split_seed=1)
  assert len(held_out) == 3 and not set(calibration) & set(held_out)
  assert set(calibration) | set(held_out) == set(documents)
  again = python_docs.split(documents, held_out=0.3, split_seed=1)[1]
  assert again == held_out and python_docs.split(documents, held_out=0.3, split_seed=2)[1] != \
      held_out
  assert python_docs.texts(held_out)[0].startswith("Paragraph")
  assert set(python_docs.fingerprint(tmp_path, ("faq",))) == {
      f"faq/page{i}.rst.txt" for i in range(0, 10, 2)}
  with pytest.raises(ValueError, match="held_out"):
    python_docs.split(documents, held_out=1.0)
  with pytest.raises(FileNotFoundError, match="sections"):
    python_docs.read(tmp_path, sections=("nope",))


def test_missing_docs_say_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
    python_docs.read(tmp_path / "absent")
  assert not python_docs.available(tmp_path / "absent")
