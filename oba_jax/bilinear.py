"""The official OBA curvature H_bil, found in the jaxpr of the loss.

The official OBA code keeps only the second-order terms that come from
*products* in the network, with every output gradient held fixed and every other
operation taken to first order. Write each product as y = b(u, v), bilinear in
its operands u and v, let g = ∂L/∂y be the exact gradient at its output and
u̇ = (∂u/∂θ)δ, v̇ = (∂v/∂θ)δ the exact forward tangents along δ. Then

    H_bil δ = ∇_θ Σ_products ⟨sg(g), b(u(θ), sg(v̇)) + b(sg(u̇), v(θ))⟩
            = Σ_products J_uᵀ (∂b/∂u)ᵀ[g, v̇] + J_vᵀ (∂b/∂v)ᵀ[g, u̇],

(sg = stop-gradient), i.e. the curvature ∇²⟨g, b(u, v)⟩ of each product node,
pulled back by the exact Jacobians J_u, J_v of its operands. For a parameter
layer y = x * W this is the "upward" term J_xᵀ(δW ⊛ g) and the "downward" term
g ⊛ ẋ of the paper's code; for attention's q·kᵀ and A·v the "parallel" terms.
It is what the official code means, without its defects (no tangent used as a
primal (D1), no double counting after residual merges (D2), no BatchNorm
running statistics touched (D3)). H_bil is symmetric. Its diagonal block of a
layer is zero unless the layer's output reaches both operands of one product
(attention's q·kᵀ meets the layer that feeds q and k): a kernel never meets itself.

Which equations are products. Values are *activations* when they depend on the
`batch` argument and on the parameters, *parameter values* when they depend on
the parameters only (a kernel, a transposed or cast kernel, rsqrt(running var)
· BN scale). Then
  - `dot_general` / `conv_general_dilated` of a parameter value and an
    activation (a parameter layer), or of two activations (a parallel term,
    e.g. attention's q·kᵀ and A·v);
  - `mul` of a parameter value and an activation (e.g. a normalisation's scale,
    eval-mode BatchNorm's (x - mean)·(rsqrt(var)·γ)).
An elementwise `mul` of two activations (inside GELU, SiLU, batch-statistics
BatchNorm, LayerNorm) is a nonlinearity, as in the official code, and so are
functions of the parameters alone (a weight penalty); a product with an operand
that does not depend on the parameters is linear. Note that for the rows of
normalisation parameters the answer depends on how the model factors its
normalisation (flax multiplies γ into rsqrt(var) first); the official code
never moves those parameters, and the default `delta` does not either.

How it is computed. Differentiating the backward pass along δ gives, node by
node, ċ_in = J_nodeᵀ ċ_out + (d/dδ J_node)ᵀ g_node; the exact Hessian keeps the
second part at every node (and at the loss), H_bil only at products, where
(d/dδ J_node)ᵀ g = [(∂b/∂u)ᵀ[g, v̇], (∂b/∂v)ᵀ[g, u̇]] is exactly the formula above.
So `first_order_loss(loss_fn, params, batch)` re-evaluates the jaxpr of
`loss_fn` with every operation that is not a product replaced by its first-order
version: the same value and the same (exact) first derivative, but no second
derivative (a `jax.custom_jvp` whose tangent rule linearises at stop-gradient
inputs). The loss itself is one of those operations, so its curvature goes too.
Then `jax.jvp(jax.grad(·))` of it is (∇L, H_bil δ), exactly, in one
forward-over-reverse pass (`oba_jax.curvature.bilinear_vp`): the cost of one
Hessian-vector product, about two gradients, instead of the three passes (one
jvp for u̇, v̇, one backward for g, one backward of the sum above) of computing
the formula literally. Linear and piecewise-linear operations (add, reshape,
max, ReLU's custom rule) have no curvature and are bound as they are.

Sub-jaxprs: `jit`, `closed_call`, `remat` and `custom_vjp_call` bodies are
inlined (a custom VJP is replaced by its primal body, whose derivatives are the
true ones). A `custom_jvp_call` (ReLU, softmax, logsumexp) is one first-order
operation that keeps its custom rule (so relu'(0) stays 0), unless its body holds
a product, in which case it is inlined too. Other higher-order primitives
(`scan`, `while`, `cond`) are first-order operations; if a product hides inside
one, a `NotImplementedError` says so. Equations whose outputs the loss does not
use (BatchNorm's running-average updates, debug callbacks) are not evaluated.

Limits: activations are recognised by their dependence on `batch`, so data that
`loss_fn` closes over instead counts as a constant; a layer applied twice (weight
sharing) meets itself, so its diagonal block is not zero.

This module owns the jaxpr interpreter and imports nothing else from oba_jax.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core as jcore

from oba_jax.jaxpr_calls import CUSTOM_JVP, INLINED, bind, call_body, is_float, live_equations

PyTree = Any

# Primitives linear in all their (floating) inputs together: no curvature, bound as they are.
LINEAR = frozenset({
    "add", "add_any", "sub", "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze",
    "expand_dims", "reduce_sum", "slice", "dynamic_slice", "dynamic_update_slice", "gather",
    "scatter", "scatter-add", "scatter_add", "pad", "concatenate", "select_n",
    "convert_element_type", "copy", "copy_p", "rev", "cumsum", "reduce_window_sum", "real",
    "imag", "conj", "complex", "split", "sharding_constraint", "reduce_precision",
    "optimization_barrier",
})
# Piecewise-linear primitives: JAX's derivatives of them have no curvature already
# (their Jacobians are selections by comparisons), so they are bound as they are.
PIECEWISE_LINEAR = frozenset({
    "max", "min", "abs", "sign", "floor", "ceil", "round", "clamp", "reduce_max", "reduce_min",
    "reduce_window_max", "reduce_window_min", "argmax", "argmin", "sort",
})
PRODUCTS = frozenset({"dot_general", "conv_general_dilated", "mul"})
MATRIX_PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})


class Flags(NamedTuple):
  """Static dependence of a value: on the parameters (differentiably) and on the batch."""

  params: bool
  data: bool


CONSTANT = Flags(False, False)


class Product(NamedTuple):
  """One product equation whose curvature H_bil keeps (see `products`)."""

  primitive: str
  kind: str  # "parameter" (parameter value x activation) or "parallel" (two activations)
  shapes: tuple[tuple[int, ...], ...]  # operand shapes


def _product_kind(name: str, flags: Sequence[Flags]) -> str | None:
  """'parameter', 'parallel' or None (not a product term) for an equation's operands."""
  if name not in PRODUCTS or len(flags) != 2:
    return None
  a, b = flags
  is_param = lambda f: f.params and not f.data
  is_act = lambda f: f.params and f.data
  if (is_param(a) and is_act(b)) or (is_act(a) and is_param(b)):
    return "parameter"
  if name in MATRIX_PRODUCTS and is_act(a) and is_act(b):
    return "parallel"
  return None


def _out_flags(eqn, flags: Sequence[Flags]) -> list[Flags]:
  params = any(f.params for f in flags) and eqn.primitive.name != "stop_gradient"
  data = any(f.data for f in flags)
  return [Flags(params and is_float(v.aval), data) for v in eqn.outvars]


def _sub_jaxprs(eqn) -> list:
  return [getattr(j, "jaxpr", j) for j in jcore.jaxprs_in_params(eqn.params)]


def _find_products(jaxpr, in_flags: Sequence[Flags], found: list) -> list[Flags]:
  """Appends the product terms of `jaxpr` (recursively) to `found`; returns the output flags."""
  env = dict(zip(jaxpr.invars, in_flags))
  read = lambda v: CONSTANT if isinstance(v, jcore.Literal) else env.get(v, CONSTANT)
  for eqn in live_equations(jaxpr):
    flags = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in INLINED or name == CUSTOM_JVP:
      outs = _find_products(call_body(eqn)[0], flags, found)
    else:
      kind = _product_kind(name, flags)
      if kind is not None:
        found.append(Product(name, kind, tuple(tuple(v.aval.shape) for v in eqn.invars)))
      if any(f.params for f in flags):
        merged = Flags(True, any(f.data for f in flags))  # conservative inside loops and branches
        for sub in _sub_jaxprs(eqn):
          _find_products(sub, [merged] * len(sub.invars), found)
      outs = _out_flags(eqn, flags)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _has_products(jaxpr, in_flags: Sequence[Flags]) -> bool:
  found: list = []
  _find_products(jaxpr, in_flags, found)
  return bool(found)


def _is_curvature_free(jaxpr) -> bool:
  """True when every equation of `jaxpr` is linear or piecewise linear in its inputs.

  Such a body (ReLU's) has no second derivative whatever its custom rule does,
  so it is bound as it is, custom rule and all, rather than wrapped.
  """
  env = {v: Flags(True, True) for v in jaxpr.invars}
  read = lambda v: CONSTANT if isinstance(v, jcore.Literal) else env.get(v, CONSTANT)
  for eqn in jaxpr.eqns:
    flags = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in INLINED or name == CUSTOM_JVP:
      if any(f.params for f in flags) and not _is_curvature_free(call_body(eqn)[0]):
        return False
    elif any(f.params for f in flags) and any(is_float(v.aval) for v in eqn.outvars) \
        and not _binds_as_is(name, flags):
      return False
    env.update(zip(eqn.outvars, _out_flags(eqn, flags)))
  return True


def _binds_as_is(name: str, flags: Sequence[Flags]) -> bool:
  """Whether an equation with parameter-dependent inputs keeps its own derivatives."""
  return (name in LINEAR or name in PIECEWISE_LINEAR or name == "stop_gradient"
          or _product_kind(name, flags) is not None
          or (name in PRODUCTS and sum(f.params for f in flags) == 1))  # linear in the parameters


def _first_order(fn: Callable[..., list]) -> Callable[..., list]:
  """`fn` with its exact value and first derivative but no second derivative.

  The tangent rule linearises `fn` at stop-gradient inputs: under an outer
  derivative the primal output still moves exactly (it is `fn` itself), while the
  Jacobian that multiplies the inner tangents does not.
  """
  wrapped = jax.custom_jvp(fn)

  def rule(primals, tangents):
    frozen = tuple(jax.lax.stop_gradient(p) for p in primals)
    return fn(*primals), jax.jvp(fn, frozen, tuple(tangents))[1]

  wrapped.defjvp(rule)
  return wrapped


def _eval_first_order(eqn, values, flags) -> list:
  """Binds `eqn` as one first-order operation."""
  if not any(is_float(v.aval) for v in eqn.outvars):
    return bind(eqn, values)  # integer or boolean results carry no derivative
  return list(_first_order(lambda *xs: bind(eqn, xs))(*values))


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any], in_flags: Sequence[Flags]):
  """Evaluates `jaxpr` with non-product operations to first order; returns (outputs, flags)."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  flag_env = dict(zip(jaxpr.invars, in_flags))
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  read_flags = lambda v: CONSTANT if isinstance(v, jcore.Literal) else flag_env.get(v, CONSTANT)

  for eqn in live_equations(jaxpr):
    values = [read(v) for v in eqn.invars]
    flags = [read_flags(v) for v in eqn.invars]
    name = eqn.primitive.name
    if not any(f.params for f in flags):  # constant in the parameters: nothing to change
      outs, out_flags = bind(eqn, values), _out_flags(eqn, flags)
    elif name in INLINED or (name == CUSTOM_JVP and _has_products(call_body(eqn)[0], flags)):
      body, body_consts = call_body(eqn)
      outs, out_flags = _eval(body, body_consts, values, flags)
    elif _binds_as_is(name, flags) or (
        name == CUSTOM_JVP and _is_curvature_free(call_body(eqn)[0])):
      outs, out_flags = bind(eqn, values), _out_flags(eqn, flags)
    else:
      if name != CUSTOM_JVP and _sub_jaxprs(eqn):
        _check_no_hidden_products(eqn, flags)
      outs, out_flags = _eval_first_order(eqn, values, flags), _out_flags(eqn, flags)
    env.update(zip(eqn.outvars, outs))
    flag_env.update(zip(eqn.outvars, out_flags))
  return [read(v) for v in jaxpr.outvars], [read_flags(v) for v in jaxpr.outvars]


def _check_no_hidden_products(eqn, flags: Sequence[Flags]) -> None:
  found: list = []
  merged = Flags(True, any(f.data for f in flags))  # conservative inside loops and branches
  for sub in _sub_jaxprs(eqn):
    _find_products(sub, [merged] * len(sub.invars), found)
  if found:
    raise NotImplementedError(
        f"curvature='bilinear' cannot look inside `{eqn.primitive.name}`, which holds "
        f"{len(found)} product(s) of the parameters ({found[0].primitive} of shapes "
        f"{found[0].shapes}); their curvature would be lost. Unroll the loop or branch "
        "(e.g. a Python loop instead of nnx.scan / lax.scan), or use curvature='residual'.")


def _trace(loss_fn: Callable, params: PyTree, batch: PyTree):
  """The closed jaxpr of `loss_fn` and the flags of its flat inputs (params, then batch)."""
  closed = jax.make_jaxpr(loss_fn)(params, batch)
  param_leaves = jax.tree.leaves(params)
  batch_leaves = jax.tree.leaves(batch)
  flags = ([Flags(is_float(jax.typeof(x)), False) for x in param_leaves]
           + [Flags(False, True)] * len(batch_leaves))
  return closed, flags


def first_order_loss(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                     batch: PyTree) -> Callable[[PyTree], jax.Array]:
  """θ ↦ L̃(θ): the loss with every non-product operation taken to first order.

  L̃ equals `loss_fn(θ, batch)` in value and gradient at every θ of the shapes of
  `params`, and its Hessian is H_bil (module docstring). `params` fixes the
  structure and shapes the jaxpr is traced with.
  """
  closed, flags = _trace(loss_fn, params, batch)
  treedef = jax.tree.structure(params)
  batch_leaves = jax.tree.leaves(batch)
  outs = [v.aval for v in closed.jaxpr.outvars]
  if len(outs) != 1 or outs[0].shape != () or not is_float(outs[0]):
    raise TypeError("loss_fn(params, batch) must return one real scalar, got "
                    f"{', '.join(o.str_short() for o in outs) or 'nothing'}.")

  def loss(p: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(p)
    if jax.tree.structure(p) != treedef:
      raise ValueError(f"params have structure {jax.tree.structure(p)}, traced with {treedef}.")
    return _eval(closed.jaxpr, closed.consts, leaves + batch_leaves, flags)[0][0]

  return loss


def products(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
             batch: PyTree) -> tuple[Product, ...]:
  """The product equations whose curvature H_bil keeps, in evaluation order.

  For inspection and tests: a plain CNN lists one "parameter" product per
  layer whose input depends on the parameters (not the first one, whose input is
  the data); an attention block adds two "parallel" products (q·kᵀ and A·v).
  """
  closed, flags = _trace(loss_fn, params, batch)
  found: list = []
  _find_products(closed.jaxpr, flags, found)
  return tuple(found)

