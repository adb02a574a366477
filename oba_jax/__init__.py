"""oba_jax: Hessian-based neural-network pruning in JAX (Optimal Brain Apoptosis).

Modules, one concept each:
  scores      per-parameter importance: oba, taylor, obd, magnitude, random, accumulate
  curvature   exact Hessian / Gauss-Newton / residual products and diagonal estimates
  delta       which parameters a pruning step moves, and by how much
  estimate    averaging scores over batches, data-parallel over devices and hosts
  functional  pure functions from Flax NNX modules; the classification objective
  structure   coupled groups traced from the jaxpr, the cost model, group scores
  flops       MACs and parameter counts from the jaxpr
  plan        targets (KeptFlops, KeptParams, Density), global/local selection, schedules
  masks       structured and unstructured masks, the keep_pruned optax wrapper
  surgery     physical compaction into a smaller NNX module
  prune       the pruning pipelines: criteria by name, one_shot, iterative, unstructured
  train       fine-tuning and evaluation: TrainConfig, finetune (resumable), evaluate
  models      the paper's networks in Flax NNX
  weights     torchvision/timm state dicts into and out of the ImageNet models
"""

from oba_jax import (curvature, delta, estimate, flops, masks, models, plan, prune, scores,
                     structure, surgery, train, weights)
from oba_jax.functional import Objective, classification, functional, softmax_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "Objective",
    "classification",
    "curvature",
    "delta",
    "estimate",
    "flops",
    "functional",
    "masks",
    "models",
    "plan",
    "prune",
    "scores",
    "softmax_cross_entropy",
    "structure",
    "surgery",
    "train",
    "weights",
]
