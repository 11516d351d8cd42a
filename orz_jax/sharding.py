"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters and key activations are annotated with *logical* axis names (``batch``, ``seq``,
``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``layers``, ...). Only this
module knows how those names land on the mesh axes (``data``, ``fsdp``, ``tensor``):

* ``fsdp`` shards parameters and optimizer state along ``embed`` (ZeRO-3 style) and also splits the
  batch, so a 32B model never sits whole on one device;
* ``tensor`` shards the heads / MLP / vocab dimensions (Megatron style);
* ``data`` replicates parameters and splits the batch.

``logical_to_spec(("embed", "mlp"))`` -> ``PartitionSpec("fsdp", "tensor")``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orz_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). The single rules table.
LOGICAL_RULES: dict[str, Any] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    # the residual stream between sublayers under model.sequence_parallel (Megatron SP): split along seq over
    # tensor, so the per-layer activations remat keeps are 1/tensor per device
    "act_seq": "tensor",
    "cache_seq": None,
    "slots": ("data", "fsdp"),
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    # the KV cache's folded kv_heads x head_dim dim (head-major): sharded by whole kv heads over tensor
    "kv_fold": "tensor",
    "mlp": "tensor",
    "layers": None,  # the stacked decoder blocks' leading axis: every device holds every layer's shard
    "value": None,
    # activation-only names for tensors whose embed dim is not sharded
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

# The rollout engine's layout of its own (compute-dtype) copy of the policy: the same table with the parameter
# axes' ``fsdp`` removed, so ``embed`` is replicated and heads / kv_heads / mlp / vocab stay on ``tensor``.
# Why: a decode step reads every weight once for a few tokens per slot; with ``embed`` on ``fsdp`` each step
# all-gathers the whole policy over the mesh (the training layout trades that gather for memory, which pays off
# only over a long packed batch). Slots (``slots``/``batch``) stay over (data, fsdp), so a serving device holds
# params / tensor and its own slots' KV cache.
SERVING_RULES: dict[str, Any] = {**LOGICAL_RULES, "embed": None}


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Build a ``Mesh`` with axes (data, fsdp, tensor) from the config; -1 takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known != 0:
            raise ConfigError(
                f"mesh: {n} devices cannot be split with data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor} "
                f"({n} is not divisible by {known})")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {n} are available ({jax.default_backend()})")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules: Optional[dict] = None) -> PartitionSpec:
    """Map a tuple of logical axis names to a mesh PartitionSpec via the rules table."""
    rules = LOGICAL_RULES if rules is None else rules
    out, used = [], set()
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may shard only one dimension of a tensor; later uses fall back to replication.
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def axis_size(mesh: Mesh, target: Any) -> int:
    """Devices along ``target``: a mesh axis name, a tuple of them, or None (1)."""
    if target is None:
        return 1
    names = (target,) if isinstance(target, str) else target
    return math.prod(mesh.shape[a] for a in names)


def named_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                   name: str = "array", rules: Optional[dict] = None) -> NamedSharding:
    """NamedSharding for ``logical_axes`` on ``mesh`` (``rules``: default ``LOGICAL_RULES``); with ``shape``,
    checks every dim divides."""
    spec = logical_to_spec(logical_axes, rules)
    if shape is not None:
        if len(shape) != len(spec):
            raise ValueError(f"{name}: shape {tuple(shape)} has {len(shape)} dims but logical axes {tuple(logical_axes)}")
        for dim, (size, target, logical) in enumerate(zip(shape, spec, logical_axes)):
            k = axis_size(mesh, target)
            if size % k != 0:
                raise ConfigError(
                    f"mesh: {name} dimension {dim} ('{logical}', size {size}) does not divide over mesh axis "
                    f"{target} of size {k}; choose a mesh whose {target} size divides {size}")
    return NamedSharding(mesh, spec)


def state_shardings(mesh: Mesh, abstract_state: Any, rules: Optional[dict] = None) -> Any:
    """Shardings for an ``nnx.State`` (or any pytree of nnx Variables) from their ``sharding_names``
    metadata and ``rules`` (default ``LOGICAL_RULES``; ``SERVING_RULES`` for the rollout engine's copy).
    Leaves without metadata are replicated."""
    from flax import nnx

    def one(path, var):
        names = None
        if isinstance(var, nnx.Variable):
            meta = var.get_metadata()
            names = meta.get("sharding_names") or meta.get("out_sharding") or meta.get("sharding")
            value = var.get_value() if hasattr(var, "get_value") else var.value
        else:
            value = var
        shape = getattr(value, "shape", ())
        if not names:
            return NamedSharding(mesh, PartitionSpec())
        pname = "/".join(str(getattr(p, "key", p)) for p in path)
        return named_sharding(mesh, names, shape, name=pname, rules=rules)

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------------------------
# Activation constraints. Layers call ``constrain(x, ("batch", "seq", "act_embed"))``; it is a
# no-op unless a mesh was activated with ``use_mesh`` (so single-device code pays nothing).
# ----------------------------------------------------------------------------------------------

_CTX = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Optional[Mesh]):
    prev = getattr(_CTX, "mesh", None)
    _CTX.mesh = mesh
    try:
        yield mesh
    finally:
        _CTX.mesh = prev


def current_mesh() -> Optional[Mesh]:
    return getattr(_CTX, "mesh", None)


def kv_fold_shards(kv_heads: int) -> int:
    """Shards of the KV cache's folded (``kv_fold``) dim under the current mesh: the size of its mesh axis
    when that divides ``kv_heads`` (each shard then holds whole heads), else 1 (not sharded by head)."""
    mesh = current_mesh()
    if mesh is None:
        return 1
    n = axis_size(mesh, logical_to_spec(("kv_fold",))[0])
    return n if kv_heads % n == 0 else 1


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes)
    # Drop mesh axes that do not divide this dim (e.g. a batch of 1 during prefill).
    fixed = [t if x.shape[i] % axis_size(mesh, t) == 0 else None for i, t in enumerate(spec)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fixed)))
