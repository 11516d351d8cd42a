"""Ragged decode attention on TPU: a Pallas kernel that reads only the live part of each slot's KV cache.

The XLA decode path (``orz_jax.models.transformer.folded_attention``) reads a static window of the cache, the
same for every slot: under continuous batching every slot pays the longest live slot's window. This kernel
reads, per slot, only the KV blocks holding that slot's live positions; the window is only the static upper
bound of its grid.

Layout, as the engine keeps the cache (``KVCache``, folded, updated in place by the layer scan):

    q           [slots, shards, rows, fold]   block-diagonal queries (see below), rows = local kv heads x GQA group
    k_cache     [layers, slots, max_len, kv_heads * head_dim]   the whole stacked cache, read in place
    v_cache     [layers, slots, max_len, kv_heads * head_dim]
    lengths     [slots] int32: live positions per slot (0: a done / empty slot, nothing read)
    layer       [1] int32: which layer's slice to read (the layer scan's index; no dynamic_slice copy)
    ->          [slots, shards, rows, fold]   attention output per query row over the whole local fold

Grid (slot group, kv block), ``PrefetchScalarGridSpec`` with ``lengths`` and ``layer`` as scalar prefetch. Each
slot of a group (up to 8 slots per grid step, :func:`slot_group`) has its own K and V input (the same cache array)
whose ``BlockSpec`` index map clamps the kv-block index to that slot's last live block (:func:`kv_block_index`):
for the dead tail of a slot's window the pipeline sees the same block index again and issues no new DMA, and the
kernel body skips the compute (``pl.when``). That clamp is why the bytes read are the live KV only; grouping slots
divides the grid steps (each with a fixed cost) without giving a short slot the reads of a long one. An online
softmax carries the running max / sum / output over the kv blocks of each slot in VMEM scratch.

Folded minor dim, no 64-lane layout: as ``folded_attention``, the query of head h (kv head j = h // group) is
spread block-diagonally over the local fold (its vector in block j, zeros elsewhere), so both matmuls contract
over / produce the whole stored minor dim (128 lanes for Qwen2.5-0.5B's 2 x 64) and the cache is never reshaped
into head_dim-wide tiles the TPU would pad. The wrapper keeps only the diagonal blocks of the output.

Sharding: Mosaic kernels cannot be auto-partitioned, so on a mesh the kernel runs inside ``shard_map`` over the
slots (``slots`` -> data, fsdp) and the folded kv dim (``kv_fold`` -> tensor) of the rules table, each device on
its own slots and kv heads (the engine's cache layout, so nothing moves).

The XLA path stays the reference (CPU default; tests/test_decode_attention.py runs this kernel in Pallas
interpret mode against it and against float64).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec

from orz_jax.sharding import axis_size, current_mesh, logical_to_spec

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, as the XLA path's: no inf - inf in the rescale
_LANES = 128  # the running max / sum are kept lane-replicated ([rows, 128]), the TPU's native f32 tile
# VMEM budget of a slot group's double-buffered K / V blocks: with it the v5p compiles (7B, 0.5B, the tests' tiny
# models) fit the compiler's default scoped VMEM, no CompilerParams.vmem_limit_bytes needed
_GROUP_VMEM_BYTES = 8 << 20


def block_for(block_kv: int, read_len: int, max_len: int) -> int:
    """The kv block the kernel uses for a window of ``read_len`` positions of a ``max_len`` cache: the configured
    ``block_kv`` (``model.decode_block_kv``), cut to the window rounded up to 128 lanes when the window is
    smaller, and to the whole cache dim when that is smaller still (a block equal to the array dim is always a
    legal TPU block)."""
    b = min(block_kv, -(-read_len // _LANES) * _LANES)
    return max_len if b >= max_len else b


def kv_block_index(j, length, block: int):
    """The kv block the K / V index map fetches at grid step ``j`` for a slot with ``length`` live positions:
    ``j`` clamped to the slot's last live block (block 0 for an empty slot). Past it the index repeats, so
    the Pallas pipeline skips the copy: the dead tail of the window is never read from HBM."""
    last = jnp.maximum((length + block - 1) // block - 1, 0)
    return jnp.minimum(j, last)


def slot_group(slots: int, block: int, fold: int, itemsize: int) -> int:
    """Slots per grid step: the largest of 8, 4, 2, 1 that divides ``slots`` and keeps the double-buffered K / V
    blocks of the group (2 x 2 x group x block x fold x itemsize) within 8 MiB of VMEM. Each grid step has a fixed
    cost however little it moves; a group of slots per step divides the steps (slots x window blocks per layer)
    by the group while each slot keeps its own clamped K / V inputs (its own live blocks only)."""
    for g in (8, 4, 2):
        if slots % g == 0 and 2 * 2 * g * block * fold * itemsize <= _GROUP_VMEM_BYTES:
            return g
    return 1


def decode_grid_spec(slots: int, rows: int, fold: int, num_blocks: int, block: int,
                     group: int = 1) -> pltpu.PrefetchScalarGridSpec:
    """The kernel's grid spec for ``slots`` local slots in groups of ``group`` per grid step, ``rows`` query rows,
    a local ``fold`` of ``fold`` lanes and ``num_blocks`` kv blocks of ``block`` positions (the window's static
    bound). Inputs: q, then one K input per slot of a group, then one V input per slot of a group (the same cache
    array each time, each with its own slot's clamped index map)."""
    q_spec = pl.BlockSpec((group, None, rows, fold), lambda i, j, lengths, layer: (i, 0, 0, 0))

    def kv_spec(t):
        def index(i, j, lengths, layer):
            s = i * group + t
            return layer[0], s, kv_block_index(j, lengths[s], block), 0
        return pl.BlockSpec((None, None, block, fold), index)

    kv = [kv_spec(t) for t in range(group)]
    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(slots // group, num_blocks), in_specs=[q_spec, *kv, *kv], out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((group, rows, _LANES), jnp.float32),  # running max
                        pltpu.VMEM((group, rows, _LANES), jnp.float32),  # running sum
                        pltpu.VMEM((group, rows, fold), jnp.float32)])  # running output


def _kernel(lengths_ref, layer_ref, q_ref, *refs, block: int, group: int, scale: float):
    """One (slot group, kv block) step. q_ref / o_ref [group, rows, fold]; refs: ``group`` K blocks, ``group`` V
    blocks ([block, fold] each), o_ref, then the scratch m / l [group, rows, 128] and acc [group, rows, fold]."""
    del layer_ref  # used by the index maps only
    k_refs, v_refs = refs[:group], refs[group:2 * group]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * group:]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for t in range(group):  # static: one online-softmax update per slot of the group
        length = lengths_ref[i * group + t]

        @pl.when(j * block < length)  # a block with live positions (the clamp re-serves the last one: skip it)
        def _step(t=t, length=length):
            q = q_ref[t]  # [rows, fold]
            k = k_refs[t][...]  # [block, fold]
            v = v_refs[t][...]
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * scale  # [rows, block]
            pos = j * block + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
            scores = jnp.where(pos < length, scores, _MASK_VALUE)
            # positions past the array's end in a partial last block hold unspecified bits: zero them so that
            # 0-weight x NaN cannot leak into the output
            vpos = j * block + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where(vpos < length, v, jnp.zeros((), v.dtype))
            m_prev = m_ref[t]  # [rows, 128]
            m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))  # [rows, 128]
            p = jnp.exp(scores - m_new[:, :1])  # [rows, block]
            alpha = jnp.exp(m_prev - m_new)  # [rows, 128]
            l_ref[t] = alpha * l_ref[t] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[t] = m_new
            pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [rows, fold]
            acc_ref[t] = acc_ref[t] * alpha[:, :1] + pv

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        l = l_ref[...][:, :, :1]
        # an empty slot (length 0) visited nothing: output zeros, not 0 / 0
        o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def ragged_decode_call(q, k_cache, v_cache, lengths, layer, *, read_len: int, block_kv: int, head_dim: int,
                       interpret: bool = False) -> jax.Array:
    """The kernel on one device's shard. q [slots, 1, rows, fold] (block-diagonal, see the module docstring);
    k_cache, v_cache [layers, slots, max_len, fold]; lengths [slots] int32; layer [1] int32 ->
    [slots, 1, rows, fold] in q's dtype. ``read_len``: the static bound of every slot's length (the window)."""
    slots, _, rows, fold = q.shape
    max_len = k_cache.shape[2]
    block = block_for(block_kv, read_len, max_len)
    num_blocks = -(-min(read_len, max_len) // block)
    itemsize = jnp.dtype(k_cache.dtype).itemsize
    group = slot_group(slots, block, fold, itemsize)
    # What the step reads at most (the static bound the compile tool prices): each slot's window of K and V once,
    # plus the queries and outputs. At run time the clamp cuts it to each slot's live blocks.
    read = min(num_blocks * block, max_len)
    cost = pl.CostEstimate(
        flops=int(2 * 2 * slots * rows * read * fold),  # q k^T and p v, contracted over the whole local fold
        transcendentals=int(slots * rows * read),
        bytes_accessed=int(2 * slots * read * fold * itemsize + 2 * q.size * jnp.dtype(q.dtype).itemsize
                           + lengths.size * 4 + 4))
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, group=group, scale=1.0 / math.sqrt(head_dim)),
        grid_spec=decode_grid_spec(slots, rows, fold, num_blocks, block, group),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret, name="ragged_decode_attention",
    )(lengths.astype(jnp.int32), layer.astype(jnp.int32), q, *([k_cache] * group), *([v_cache] * group))
    return out


def ragged_decode_attention(qg: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                            layer: jax.Array, *, read_len: int, block_kv: int, shards: int,
                            mesh: Optional[Mesh] = None, interpret: bool = False) -> jax.Array:
    """Decode attention of one new token per slot against the stacked folded cache, live positions only.

    qg: [slots, 1, kv_heads, group, head_dim] (RoPE applied); k_cache, v_cache: [layers, slots, max_len,
    kv_heads * head_dim] (this step's token already written); lengths: [slots] int32, positions each slot
    attends to (its filled length + 1 for the new token; 0 for a done / empty slot, whose output is zeros);
    layer: int32 [] index into the stack; ``read_len``: static bound of every length (the decode window);
    ``block_kv``: ``model.decode_block_kv``; ``shards``: the folded dim's tensor shards
    (``sharding.kv_fold_shards``) -> [slots, 1, kv_heads, group, head_dim] in qg's dtype.
    """
    b, s, kvh, g, d = qg.shape
    if s != 1:
        raise ValueError(f"ragged decode attention takes one query per slot, got {s}")
    local = kvh // shards  # kv heads per shard
    q6 = qg.reshape(b, shards, local, g, d)
    eye = jnp.eye(local, dtype=bool)[:, None, :, None]  # [local, 1, local, 1]
    qbd = jnp.where(eye, q6[:, :, :, :, None, :], jnp.zeros((), qg.dtype))  # [b, shards, local, g, local, d]
    qbd = qbd.reshape(b, shards, local * g, local * d)  # rows: (kv head, group) pairs; lanes: the local fold
    qbd = qbd.astype(k_cache.dtype)  # the MXU takes both operands in the cache's dtype (bf16 on TPU)
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    mesh = current_mesh() if mesh is None else mesh
    call = functools.partial(ragged_decode_call, read_len=read_len, block_kv=block_kv, head_dim=d,
                             interpret=interpret)
    if mesh is None or mesh.size == 1:
        if shards != 1:
            raise ValueError(f"ragged decode attention: {shards} kv shards need a mesh with a tensor axis")
        out = call(qbd, k_cache, v_cache, lengths, layer)
    else:
        # the engine's cache layout (rules table), so the cache is read where it lives; a mesh axis that does not
        # divide its dim is dropped, as sharding.constrain does
        slot_axes = logical_to_spec(("slots",))[0]
        slot_axes = slot_axes if b % axis_size(mesh, slot_axes) == 0 else None
        fold_axis = logical_to_spec(("kv_fold",))[0] if shards > 1 else None
        q_spec = PartitionSpec(slot_axes, fold_axis, None, None)
        kv_spec = PartitionSpec(None, slot_axes, None, fold_axis)
        out = jax.shard_map(call, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(slot_axes),
                                                       PartitionSpec()),
                            out_specs=q_spec, check_vma=False)(qbd, k_cache, v_cache, lengths, layer)
    out = out.reshape(b, shards, local, g, local, d)  # [.., kv head j, group, block m, head_dim]
    out = jnp.diagonal(out, axis1=2, axis2=4)  # block m == head j: [b, shards, g, d, local]
    return out.transpose(0, 1, 4, 2, 3).reshape(b, 1, kvh, g, d).astype(qg.dtype)
