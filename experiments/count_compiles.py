"""XLA compilations of `prune.one_shot` on a tiny ResNet-8, per jitted function.

  python experiments/count_compiles.py --steps 2 5     # one run per count, in one process
"""

import argparse

import jax
import numpy as np
from flax import nnx

from oba_jax import prune, runtime
from oba_jax.models import ResNetCIFAR


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, nargs="+", default=[2, 5])
  parser.add_argument("--criterion", default="oba")
  args = parser.parse_args()
  model = ResNetCIFAR(8, width=4, in_channels=1, num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(2)]
  for steps in args.steps:
    config = prune.StructuredConfig(criterion=args.criterion, targets=0.5, steps=steps,
                                    num_batches=2)
    with runtime.Compilations() as compiled:
      prune.one_shot(model, batches[0]["image"][:1], batches, config, key=jax.random.key(0))
    print(f"{steps} steps: {sum(compiled.counts.values())} compilations, score step "
          f"{compiled.counts['jit(score_step)']}, most: {compiled.counts.most_common(3)}")


if __name__ == "__main__":
  main()
