"""Input pipelines: TFDS datasets, CIFAR pickle folders, image-class folders or generated
data (`sources`), read, augmented and batched by grain.

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
from oba_jax.data.pipeline import DatasetInfo, dataset_info, load, open_source, resolve_format
from oba_jax.data.sources import FORMATS

__all__ = ["DATASETS", "FORMATS", "DatasetInfo", "dataset_info", "load", "open_source",
           "resolve_format", "wordnet"]
