"""Skip markers shared by the test modules."""

import pytest

from oba_jax.data import fashion_mnist


def fashion_mnist_available() -> bool:
  try:
    fashion_mnist.find_idx_dir()
    return True
  except FileNotFoundError:
    return False


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist")
