"""oba_jax: Hessian-based neural-network pruning in JAX (Optimal Brain Apoptosis).

Modules, one concept each:
  scores      per-parameter importance: oba, taylor, obd, magnitude, random, accumulate
  curvature   exact Hessian / Gauss-Newton / residual / bilinear products, diagonal estimates
  bilinear    the official OBA curvature H_bil, from the product equations of the jaxpr
  delta       which parameters a pruning step moves, and by how much
  estimate    averaging scores over batches, data-parallel over devices and hosts
  functional  pure functions from Flax NNX modules; the classification and next-token objectives
  structure   coupled groups traced from the jaxpr, the cost model, group scores
  flops       MACs and parameter counts from the jaxpr
  plan        targets (KeptFlops, KeptParams, Density), global/local selection, schedules
  masks       structured and unstructured masks, the keep_pruned optax wrapper
  surgery     physical compaction into a smaller NNX module; BatchNorm folding (fold)
  kfac        Kronecker-factored (K-FAC) Fisher blocks of dense and conv layers, from the jaxpr
  criteria    criteria by name (CRITERIA) and their mean score over batches (importance)
  prune       the pruning pipelines: StructuredConfig, one_shot, iterative; UnstructuredConfig,
              unstructured
  oracle      removal studies: true loss change of single removals against every criterion
  train       fine-tuning: TrainConfig, finetune (resumable, masks kept)
  evaluation  accuracy and loss over every example, on any mesh: evaluate
  batchnorm   running statistics re-estimated after pruning: recalibrate
  runs        a run's workdir: identity, orbax checkpoints, metrics history, resumption
  models      the paper's networks in Flax NNX
  weights     torchvision/timm state dicts into and out of the ImageNet models
"""

from oba_jax import (batchnorm, criteria, curvature, delta, estimate, evaluation, flops, masks,
                     models, oracle, plan, prune, runs, scores, structure, surgery, train,
                     weights)
from oba_jax.functional import (Objective, classification, functional, next_token,
                                softmax_cross_entropy)

__version__ = "0.1.0"

__all__ = [
    "Objective",
    "batchnorm",
    "classification",
    "criteria",
    "curvature",
    "delta",
    "estimate",
    "evaluation",
    "flops",
    "functional",
    "masks",
    "models",
    "next_token",
    "oracle",
    "plan",
    "prune",
    "runs",
    "scores",
    "softmax_cross_entropy",
    "structure",
    "surgery",
    "train",
    "weights",
]
