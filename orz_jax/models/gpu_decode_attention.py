"""Decode attention on a GPU that reads each slot's live KV only: a Pallas (Triton) kernel over the folded cache.

The engine's KV cache is ``[layers, slots, max_len, kv_heads * head_dim]`` (``KVCache``, folded) and one decode step
attends one query per slot to that slot's first ``lengths[slot]`` positions. The XLA path
(``transformer.folded_attention``) reads a static window of every slot: the longest live slot's, for all of them.
This kernel reads, per (slot, kv head, split of the positions), only the key / value blocks that hold live
positions of that slot: the loop over blocks stops at the slot's length, so a slot 300 tokens in reads 300
positions while its neighbour reads 8,000.

Design (the structure of jax's ``pallas.ops.gpu.decode_attention``, written for this cache):

* Grid ``(slots, kv_heads, k_splits)``: splitting the positions keeps the GPU busy when slots x kv heads is small
  (a few slots at the end of a wave); the splits are merged afterwards with their log-sum-exp, as flash-decoding
  does.
* The cache is passed whole and read in place: the layer index and the slot's length are scalars the kernel reads,
  and kv head h is the column range ``[h * head_dim, (h + 1) * head_dim)`` of the folded dim. No window slice,
  no transposed or head-split copy of the cache exists.
* The GQA group (query heads per kv head) is padded to 16 rows, the smallest tile Triton's ``dot`` takes.
* The last block of a window that ``block_k`` does not divide is read shifted back to end at ``max_len`` (no
  out-of-bounds read, no masked load); the positions it re-reads are masked out.

Inputs / outputs (``gpu_decode_attention``): q ``[slots, kv_heads, group, head_dim]``, the caches, ``layer`` int32
[], ``lengths`` int32 [slots] (keys ``[0, lengths)`` are attended) -> ``[slots, kv_heads, group, head_dim]``.
Tested in Pallas interpret mode on the CPU against a float64 reference (tests/test_gpu_decode_attention.py);
compiling it needs a GPU, which no session of this project has had while writing it: unmeasured on a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from orz_jax.sharding import axis_size, current_mesh, logical_to_spec

_MIN_ROWS = 16  # Triton's dot needs tiles of at least 16 x 16
_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) is 0 without inf - inf = nan


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _kernel(layer_ref, len_ref, q_ref, k_ref, v_ref, o_ref, l_ref, m_ref, *, block_k: int, split_len: int,
            head_dim: int, max_len: int, scale: float):
    """One (slot i, kv head h, split j): online softmax over the live blocks of positions
    [j split_len, min((j + 1) split_len, length_i)).

    q_ref [rows, head_dim] (this slot and head's padded group); k_ref / v_ref the whole cache
    [layers, slots, max_len, kv_heads * head_dim]; o_ref [rows, head_dim] (normalised within the split),
    l_ref / m_ref [rows] (softmax denominator and max of the split)."""
    from jax.experimental import pallas as pl

    i, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    start = j * split_len
    stop = jnp.minimum(len_ref[i], start + split_len)  # live positions of this split: [start, stop)
    num_blocks = jnp.maximum(stop - start + block_k - 1, 0) // block_k  # the loop reads these blocks only
    q = q_ref[...].astype(jnp.float32) * scale  # [rows, head_dim]
    cols = pl.ds(h * head_dim, head_dim)

    def body(t, carry):
        o, m, l = carry
        first = start + t * block_k
        base = jnp.minimum(first, max_len - block_k)  # the window's last block, shifted back to stay in bounds
        k = k_ref[layer, i, pl.ds(base, block_k), cols]  # [block_k, head_dim]
        v = v_ref[layer, i, pl.ds(base, block_k), cols]
        s = pl.dot(q, k.astype(jnp.float32), trans_b=True)  # [rows, block_k]
        pos = base + jnp.arange(block_k)
        s = jnp.where(((pos >= first) & (pos < stop))[None, :], s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])  # [rows, block_k]
        corr = jnp.exp(m - m_new)
        return (o * corr[:, None] + pl.dot(p, v.astype(jnp.float32)), m_new, l * corr + p.sum(axis=1))

    rows = q.shape[0]
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = (o / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)
    l_ref[...] = l
    m_ref[...] = m


def _local(q, k_cache, v_cache, layer, lengths, *, block_k: int, k_splits: int, interpret: bool,
           num_warps: int, num_stages: int):
    """One device's slots and kv heads (shapes as ``gpu_decode_attention``, local)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    slots, kvh, g, d = q.shape
    t = k_cache.shape[2]
    if k_cache.shape[3] != kvh * d:
        raise ValueError(f"cache minor dim {k_cache.shape[3]} != kv_heads x head_dim = {kvh} x {d}")
    bk = min(block_k, _pow2_floor(t))  # a power of two (Triton's arange), at most the window
    split = -(-t // k_splits)
    split = -(-split // bk) * bk  # whole blocks per split
    splits = -(-t // split)
    rows = max(_MIN_ROWS, 1 << (g - 1).bit_length())
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, rows - g), (0, 0)))  # [slots, kvh, rows, d]
    kernel = functools.partial(_kernel, block_k=bk, split_len=split, head_dim=d, max_len=t,
                               scale=1.0 / math.sqrt(d))
    o, l, m = pl.pallas_call(
        kernel,
        grid=(slots, kvh, splits),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec((None, None, rows, d), lambda i, h, j: (i, h, 0, 0)),
                  pl.BlockSpec(), pl.BlockSpec()],  # no block shape: the whole array (read in place)
        out_specs=[pl.BlockSpec((None, None, None, rows, d), lambda i, h, j: (i, h, j, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda i, h, j: (i, h, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((slots, kvh, splits, rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((slots, kvh, splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((slots, kvh, splits, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="orz_decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), lengths.astype(jnp.int32), qp, k_cache, v_cache)
    # merge the splits by their log-sum-exp (a split with no live position has l = 0: weight 0)
    m_all = m.max(axis=2, keepdims=True)  # [slots, kvh, 1, rows]
    # jax's gpu decode_attention puts a barrier here: without it XLA's GPU fusion gave NaNs (b/389925439)
    m_all = jax.lax.optimization_barrier(m_all)
    w = l * jnp.exp(m - m_all)  # [slots, kvh, splits, rows]
    out = (o * w[..., None]).sum(axis=2) / jnp.maximum(w.sum(axis=2), 1e-30)[..., None]
    return out[:, :, :g].astype(q.dtype)


def gpu_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
                         lengths: jax.Array, *, block_k: int = 64, k_splits: int = 8, mesh: Optional[Mesh] = None,
                         interpret: bool = False, num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Attention of one query per slot over that slot's live cache positions.

    q: [slots, kv_heads, group, head_dim]; k_cache, v_cache: [layers, slots, max_len, kv_heads * head_dim] (read in
    place); layer: int32 []; lengths: int32 [slots], positions [0, length) attended (a slot with length 0 gives
    zeros) -> [slots, kv_heads, group, head_dim] in q's dtype.

    ``block_k``: positions per loaded block (64: two 64 x 128 bf16 tiles, K and V, in shared memory per stage);
    ``k_splits``: position splits per (slot, head), merged by log-sum-exp. ``mesh`` (default: the one traced
    under): Pallas kernels cannot be auto-partitioned, so on a mesh the kernel runs in ``shard_map`` over the
    slots (the rules table's ``slots``) and kv heads (``kv_fold``), each device on its own part of the cache.
    ``interpret``: Pallas interpret mode (CPU tests).
    """
    kw = dict(block_k=block_k, k_splits=k_splits, interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None or mesh.size == 1:
        return _local(q, k_cache, v_cache, layer, lengths, **kw)
    slots_ax = logical_to_spec(("slots",))[0]
    heads_ax = logical_to_spec(("kv_fold",))[0]

    slots_ax = slots_ax if q.shape[0] % axis_size(mesh, slots_ax) == 0 else None
    heads_ax = heads_ax if q.shape[1] % axis_size(mesh, heads_ax) == 0 else None
    q_spec = PartitionSpec(slots_ax, heads_ax, None, None)
    cache_spec = PartitionSpec(None, slots_ax, None, heads_ax)
    return jax.shard_map(functools.partial(_local, **kw), mesh=mesh,
                         in_specs=(q_spec, cache_spec, cache_spec, PartitionSpec(), PartitionSpec(slots_ax)),
                         out_specs=q_spec, check_vma=False)(q, k_cache, v_cache, layer, lengths)
