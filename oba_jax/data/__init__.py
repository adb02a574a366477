"""Input pipelines: TFDS array_record datasets read, augmented and batched by grain.

from oba_jax import data

info = data.dataset_info("fashion_mnist", "train")  # num_examples, num_classes, image_shape
batches = data.load("fashion_mnist", "train", batch_size=128, train=True, seed=0)
batch = next(batches)  # {"image": float32 (128, 28, 28, 1), "label": int32 (128,)}
state = batches.get_state()  # a checkpointable dict; resume with batches.set_state(state)

Text: `data.wordnet` reads WordNet 3.0 definitions and example sentences (Debian `wordnet-base`),
splits them by synset into calibration and held-out parts, and pads token batches.
"""

from oba_jax.data import wordnet
from oba_jax.data.datasets import DATASETS
from oba_jax.data.pipeline import DatasetInfo, dataset_info, load

__all__ = ["wordnet", "DATASETS", "DatasetInfo", "dataset_info", "load"]
