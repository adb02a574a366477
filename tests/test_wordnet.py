"""WordNet text source: parsing, the disjoint seeded split, padded token batches."""

import numpy as np
import pytest

from oba_jax.data import wordnet

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
LINES = {
    "noun": [
        '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist; '
        '"a thing of beauty"  \n',
        "00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept formed by "
        "extracting common features  \n",
    ],
    "verb": ['00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 000 | draw air '
             'into, and expel out of, the lungs; "I can breathe better"; "The patient is '
             'respiring"  \n'],
    "adj": ['00001740 00 a 01 able 0 000 | having the necessary means; "able to swim"  \n',
            "00002000 00 s 01 tall 0 000 | great in height  \n"],
    "adv": ["00001740 02 r 01 very 0 000 | to a high degree  \n"],
}


@pytest.fixture
def tiny_wordnet(tmp_path):
  for pos, lines in LINES.items():
    (tmp_path / f"data.{pos}").write_text(HEADER + "".join(lines))
  return tmp_path


def test_parse_definitions_examples_and_lemmas(tiny_wordnet):
  synsets = wordnet.read(tiny_wordnet)
  by_id = {s.id: s for s in synsets}
  assert len(synsets) == 6 and "a00002000" in by_id  # satellite adjective counted as 'a'
  breathe = by_id["v00001740"]
  assert breathe.lemmas == ("breathe", "take a breath", "respire", "suspire")
  assert breathe.definition == "draw air into, and expel out of, the lungs"
  assert breathe.examples == ("I can breathe better", "The patient is respiring")
  assert wordnet.texts([breathe]) == ["Draw air into, and expel out of, the lungs.",
                                      "I can breathe better", "The patient is respiring"]
  assert wordnet.pairs([breathe]) == [("I can breathe better",
                                       "draw air into, and expel out of, the lungs")]


def test_missing_directory_says_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
    wordnet.read(tmp_path)


def test_split_is_disjoint_seeded_and_independent_of_calibration_seed(tiny_wordnet):
  synsets = wordnet.read(tiny_wordnet)
  calibration, held_out = wordnet.split(synsets, held_out=2, split_seed=3)
  assert len(held_out) == 2 and len(calibration) == 4
  assert not {s.id for s in calibration} & {s.id for s in held_out}
  again = wordnet.split(list(reversed(synsets)), held_out=2, split_seed=3)
  assert again == (calibration, held_out)  # input order does not matter
  with pytest.raises(ValueError, match="held_out"):
    wordnet.split(synsets, held_out=1.0)


def test_token_batches_pad_truncate_and_mask():
  encode = lambda text: [len(w) for w in text.split()]
  texts = ["a bb ccc", "dddd", "e ff ggg hhhh iiiii", "jj"]
  batches = wordnet.token_batches(texts, encode, batch_size=2, max_tokens=4, pad_id=9,
                                  prefix=[7])
  assert len(batches) == 2
  np.testing.assert_array_equal(batches[0]["tokens"], [[7, 1, 2, 3], [7, 4, 9, 9]])
  np.testing.assert_array_equal(batches[0]["mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(batches[1]["tokens"], [[7, 1, 2, 3], [7, 2, 9, 9]])
  shuffled = wordnet.token_batches(texts, encode, batch_size=2, max_tokens=4, seed=1)
  again = wordnet.token_batches(texts, encode, batch_size=2, max_tokens=4, seed=1)
  for a, b in zip(shuffled, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  pair = wordnet.pair_batches([("a b", "ccc"), ("dd", "e")], encode, batch_size=2, max_tokens=3)
  np.testing.assert_array_equal(pair[0]["query_tokens"], [[1, 1, 0], [2, 0, 0]])
  np.testing.assert_array_equal(pair[0]["key_mask"], [[1, 0, 0], [1, 0, 0]])
  with pytest.raises(ValueError, match="no full batch"):
    wordnet.token_batches(texts, encode, batch_size=5, max_tokens=4)


@pytest.mark.skipif(not wordnet.available(), reason="wordnet-base is not installed")
def test_real_wordnet_counts_and_split():
  synsets = wordnet.read()
  assert len(synsets) == 117_659
  assert sum(1 for s in synsets if s.examples) == 32_923
  calibration, held_out = wordnet.split(synsets, held_out=0.2, split_seed=0)
  assert len(held_out) == 23_532
  assert not {s.id for s in calibration} & {s.id for s in held_out}
