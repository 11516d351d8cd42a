"""What the training loop needs to run as several JAX processes (TPU pod slices, multi-node GPU).

The division of work:

* **rollouts and rewards are per host**: every process samples its own shard of the prompts
  (``orz_jax.data.pipeline`` shards by process) with a rollout engine on its *own* devices, and scores
  them. Generation is a host-driven loop (stop strings are checked on the host between device calls), so
  it cannot run as one SPMD program over the global mesh: the hosts would leave the loop at different
  times. The engine therefore serves from a process-local mesh and a host-gathered copy of the policy
  parameters (:func:`serving_mesh`, :func:`to_serving`).
* **the rollout buffer is then all-gathered** (:func:`gather_rollouts`; token ids and a few numbers per
  sample, small next to the model), so every process holds the same global buffer in process order and
  packs it identically; the PPO update runs as one SPMD program over the global mesh on global arrays built
  from those identical host copies (:func:`to_global`).

With one process every function here is the identity (or close to it), so the single-host path is
unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from orz_jax.config import MeshConfig
from orz_jax.sharding import make_mesh

__all__ = ["is_multiprocess", "serving_mesh", "serving_model", "to_serving", "to_global", "gather_rollouts"]


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def serving_mesh(cfg: MeshConfig, mesh: Mesh) -> Mesh:
    """The rollout engine's mesh: the training mesh with one process; with several, this process's own
    devices: ``tensor`` = the largest common divisor of ``mesh.tensor`` and the local device count, the rest on
    ``fsdp``. (Falling back to tensor 1 put 32B's float32 weights on fsdp, which gathers the whole policy every
    decode step: 64 GB per device per step on v5p-128, compiled by ``python -m orz_jax.compile``.)"""
    if not is_multiprocess():
        return mesh
    local = jax.local_devices()
    tensor = math.gcd(cfg.tensor, len(local)) if cfg.tensor > 0 else 1
    return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=tensor), devices=local)


# Largest piece of one parameter gathered onto every device at once by :func:`to_serving`. Since the decoder
# layers are stacked, a leaf is a whole [layers, ...] stack: 32B's MLP stack is 64 x 5120 x 27648 (36 GB in
# float32), which gathered whole would not fit next to the train states on a 95 GiB v5p chip.
SYNC_PIECE_BYTES = 1 << 30


@functools.lru_cache(maxsize=None)
def _cast_fn(dtype):
    # one jitted function per dtype: a fresh lambda per call would retrace and recompile at every sync
    return jax.jit(lambda a: a.astype(dtype))  # keeps the input's sharding: each device casts its own shard


def _cast_on_device(x: jax.Array, dtype) -> jax.Array:
    return _cast_fn(jnp.dtype(dtype))(x)


def to_serving(params: Any, dtype: Any = None, piece_bytes: int = SYNC_PIECE_BYTES) -> Any:
    """Parameters (global arrays, possibly spread over other hosts' devices) as host numpy copies that a
    process-local engine can place. One process: returned unchanged (the engine reshards on device).

    ``dtype``: the engine's serving (compute) dtype. Floating leaves are cast to it on the devices that hold
    them *before* the gather, so half the bytes of a float32 policy cross the hosts.
    Leaves larger than ``piece_bytes`` are gathered in slices along their first axis (the layers of a stacked
    leaf): the device peak of a sync is one piece, not the largest leaf."""
    if not is_multiprocess():
        return params

    def one(x):
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(dtype):
            x = _cast_on_device(x, dtype)
        nbytes = x.size * x.dtype.itemsize
        # tiled=True: each global array comes back whole (not stacked per process)
        if x.ndim == 0 or x.shape[0] == 1 or nbytes <= piece_bytes:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        out = np.empty(x.shape, x.dtype)
        step = max(1, x.shape[0] * piece_bytes // nbytes)
        for i in range(0, x.shape[0], step):
            out[i:i + step] = np.asarray(multihost_utils.process_allgather(x[i:i + step], tiled=True))
        return out

    # One leaf (or piece) at a time: a gather of the whole tree replicates every parameter on every device at
    # once (7B float32: 28 GiB per device, 32B: 122 GiB; measured by python -m orz_jax.compile).
    return jax.tree.map(one, params)


def to_global(tree: Any, sharding: Any) -> Any:
    """Host numpy arrays that are *identical on every process* -> global jax.Arrays with ``sharding``
    (a sharding or a matching pytree of them); each process fills only its own shards. One process: plain
    ``device_put``."""
    if not is_multiprocess():
        return jax.device_put(tree, sharding)

    def one(x, s: NamedSharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, sharding), tree)
    return jax.tree.map(one, tree, sharding)


def _allgather_rows(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate every process's ``x`` ([count_p, ...]) in process order; counts may differ."""
    pad = int(counts.max()) - x.shape[0]
    padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max_count, ...]
    return np.concatenate([stacked[p, :int(c)] for p, c in enumerate(counts)])


def _allgather_strings(texts: list[str], counts: np.ndarray) -> list[str]:
    """Strings as UTF-8 bytes in a [n, width] uint8 array, width the longest on any process."""
    data = [t.encode("utf-8") for t in texts]
    lens = np.asarray([len(d) for d in data], np.int32)
    local_max = np.int32(lens.max() if lens.size else 0)
    width = max(int(np.max(multihost_utils.process_allgather(local_max))), 1)
    buf = np.zeros((len(data), width), np.uint8)
    for i, d in enumerate(data):
        buf[i, :len(d)] = np.frombuffer(d, np.uint8)
    all_buf, all_lens = _allgather_rows(buf, counts), _allgather_rows(lens, counts)
    return [bytes(all_buf[i, :int(n)]).decode("utf-8") for i, n in enumerate(all_lens)]


def serving_model(policy):
    """The policy module the rollout engine is built from: ``policy`` itself with one process; with several,
    a copy holding host-gathered parameters (see :func:`to_serving`)."""
    if not is_multiprocess():
        return policy
    from flax import nnx

    graphdef, state = nnx.split(policy)
    return nnx.merge(graphdef, to_serving(state))


def gather_rollouts(ro, rewards: np.ndarray, num_prompts: int):
    """All-gather this process's rollouts and rewards into the global buffer, identical on every process.

    Args:
      ro: this process's ``RolloutBatch`` (prompt_index into its own ``num_prompts`` prompts).
      rewards: [n_local] float32.
      num_prompts: prompts per process (``data.prompts_per_iter // process_count``), the same on every one.
    Returns:
      (global RolloutBatch in process order, prompt_index offset by ``process * num_prompts`` so groups stay
      distinct; global rewards [n_global]). One process: the inputs unchanged.
    """
    if not is_multiprocess():
        return ro, rewards
    counts = np.asarray(multihost_utils.process_allgather(np.int32(ro.num_samples))).reshape(-1)
    # Every process must have padded its buffers to the same widths (they come from one config).
    multihost_utils.assert_equal(np.asarray(ro.response_ids.shape[1:] + ro.prompt_ids.shape[1:]),
                                 "rollout buffer widths differ between processes")
    offsets = np.repeat(np.arange(jax.process_count(), dtype=np.int32) * num_prompts, counts)
    g = lambda x: _allgather_rows(np.asarray(x), counts)  # noqa: E731
    out = ro.replace(
        prompt_ids=g(ro.prompt_ids), prompt_lens=g(ro.prompt_lens), response_ids=g(ro.response_ids),
        response_mask=g(ro.response_mask), logprobs=g(ro.logprobs),
        prompt_index=g(ro.prompt_index) + offsets,
        stop_reason=_allgather_strings(list(ro.stop_reason), counts),
        texts=_allgather_strings(list(ro.texts), counts))
    return out, g(np.asarray(rewards, np.float32))
