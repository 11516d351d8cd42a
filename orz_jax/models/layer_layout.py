"""The decoder layers as one array per layer: the ``per_layer`` layout of the serving copy and the train states.

A model stores the blocks' parameters stacked, ``transformer/layers/...: [layers, ...]``, and the trunk runs them with
a ``lax.scan``. XLA:CPU (and XLA:GPU without its dynamic-slice fusion) copies each layer's slice of a stacked weight
out of the stack before the matmul that reads it, every time the scan body runs. Where that copy costs more than the
matmul (decode steps, short micro-batches), the rollout engine (``rollout.serving_layers``) and the PPO train states
(``ppo.train_layers``) hold :class:`PerLayerParams` instead and the trunk runs an unrolled loop over them
(``Transformer.__call__(..., layer_params=...)``).

Checkpoints, exports and the model module always see the stacked layout: :func:`stacked_tree` /
:func:`per_layer_like` convert whole trees (a train state's parameters and optimizer moments) at those boundaries.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

_LAYERS = nnx.PathContains("layers")  # the stacked blocks: transformer/layers/...


@flax.struct.dataclass
class PerLayerParams:
    """A model state with its decoder layers as one state per layer (leaves without the leading ``layers`` axis);
    everything else (embeddings, final norm, heads) as in the stacked state."""

    trunk: Any  # nnx.State: every leaf outside transformer/layers
    layers: tuple  # num_layers x nnx.State of one Block


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _names(var: nnx.Variable) -> Optional[tuple]:
    meta = var.get_metadata()
    names = meta.get("sharding_names") or meta.get("out_sharding")
    return tuple(names) if names else None


def split_layers(tree: Any, num_layers: Optional[int] = None,
                 take: Callable[[Any, int], Any] = lambda x, i: x[i]) -> PerLayerParams:
    """A model state (or a tree of the same structure: shardings, host arrays) -> :class:`PerLayerParams`.

    ``num_layers``: the stack's depth (default: the leading dimension of the stacked leaves, for a tree of arrays).
    ``take(leaf, i)``: layer ``i``'s part of a stacked leaf (default: ``leaf[i]``, a copy of the slice). A
    ``nnx.Variable`` keeps its logical axis names minus the leading ``layers``, so the per-layer state shards by the
    same rules (``orz_jax.sharding.state_shardings``)."""
    layers, trunk = nnx.split_state(tree, _LAYERS, ...)
    if num_layers is None:
        num_layers = jax.tree.leaves(layers)[0].shape[0]

    def one(x, i):
        if not _is_var(x):
            return take(x, i)
        names = _names(x)
        return x.replace(take(x.get_value(), i), **({"out_sharding": names[1:]} if names else {}))

    return PerLayerParams(trunk=trunk, layers=tuple(jax.tree.map(lambda x: one(x, i), layers, is_leaf=_is_var)
                                                    for i in range(num_layers)))


def stack_layers(params: PerLayerParams, stack: Callable[..., Any] = lambda *xs: jnp.stack(xs)) -> Any:
    """Inverse of :func:`split_layers`: one state with the layers stacked again ([layers, ...] leaves), the
    structure of the state that was split (same paths, same order, the ``layers`` axis name back in front).
    ``stack(*per_layer_leaves)``: how one stacked leaf is made (default ``jnp.stack``)."""
    def one(*xs):
        if not _is_var(xs[0]):
            return stack(*xs)
        names = _names(xs[0])
        return xs[0].replace(stack(*[x.get_value() for x in xs]),
                             **({"out_sharding": ("layers",) + names} if names else {}))

    return nnx.merge_state(params.trunk, jax.tree.map(one, *params.layers, is_leaf=_is_var))


def merge_model(graphdef: Any, params: Any, *rest: Any) -> tuple[nnx.Module, Optional[tuple]]:
    """-> (module, per-layer states or None) for ``module(..., layer_params=that)``.

    With :class:`PerLayerParams`, the module still needs stacked layers to merge: they are stacked from the
    per-layer states and never read (the forward loops over ``params.layers``), so XLA removes the stack, and
    under ``jax.grad`` its cotangent is a symbolic zero."""
    if isinstance(params, PerLayerParams):
        return nnx.merge(graphdef, stack_layers(params), *rest), params.layers
    return nnx.merge(graphdef, params, *rest), None


# ----------------------------------------------------------------------------------------------
# Whole trees (a train state's params and optimizer state): the stacked form at checkpoint / export boundaries
# ----------------------------------------------------------------------------------------------


def _is_per_layer(x) -> bool:
    return isinstance(x, PerLayerParams)


def has_per_layer(tree: Any) -> bool:
    """Whether ``tree`` holds a :class:`PerLayerParams` anywhere."""
    return any(map(_is_per_layer, jax.tree.leaves(tree, is_leaf=_is_per_layer)))


def stacked_tree(tree: Any, stack: Callable[..., Any] = lambda *xs: jnp.stack(xs)) -> Any:
    """``tree`` with every :class:`PerLayerParams` in it (the parameters, the optimizer's moments) stacked: the
    layout checkpoints hold whatever layout the run trains in."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_per_layer)
    return treedef.unflatten([stack_layers(x, stack) if _is_per_layer(x) else x for x in leaves])


def per_layer_like(template: Any, tree: Any) -> Any:
    """Inverse of :func:`stacked_tree`: ``tree`` (stacked) split wherever ``template`` holds a
    :class:`PerLayerParams`."""
    leaves, treedef = jax.tree.flatten(template, is_leaf=_is_per_layer)
    parts = treedef.flatten_up_to(tree)
    return treedef.unflatten([split_layers(p, len(t.layers)) if _is_per_layer(t) else p for t, p in zip(leaves, parts)])


def layer_sharding(sharding: NamedSharding, i: int) -> NamedSharding:
    """The sharding of layer i's slice of a stacked leaf: the leading ``layers`` dim dropped (the ``take`` of
    :func:`split_layers` for shardings; :func:`stack_abstract` is its inverse)."""
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def stack_abstract(*xs: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The ``stack`` of :func:`stacked_tree` for ShapeDtypeStructs with shardings (a restore target): the
    stacked leaf's shape, with the per-layer sharding and the ``layers`` dim unsharded in front."""
    x, s = xs[0], xs[0].sharding
    if isinstance(s, NamedSharding):
        s = NamedSharding(s.mesh, PartitionSpec(None, *s.spec))
    return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=s)
