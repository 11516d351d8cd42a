"""Fused training attention: Pallas splash attention on TPU, cuDNN on GPU (``model.attention_impl``).

Both kernels replace the full-row (training / scoring) branch of ``orz_jax.models.transformer.Attention``:
causal attention inside each segment of a packed row, ``segment_ids == 0`` marking padding. They take the
operands in the heads-major layout that branch already builds and return its output layout:

    qh  [batch, kv_heads, group, seq, head_dim]      (group = num_heads // num_kv_heads, GQA)
    kh  [batch, kv_heads, seq, head_dim]
    vh  [batch, kv_heads, seq, head_dim]
    segment_ids [batch, seq] int32
    ->  [batch, kv_heads, group, seq, head_dim]

Masking, as the XLA path: a real token (segment != 0) attends to the earlier tokens of its own segment only,
so packed samples never see each other or the padding. Padding tokens (segment 0) attend causally to the
padding before them: every row of the mask keeps its diagonal, so their outputs stay finite (the XLA path
gives them a uniform average instead; nothing reads them, and no real token attends to them in either).

The XLA path (``_causal_blocked_attention``) stays the reference every kernel is tested against
(tests/test_fused_attention.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from orz_jax.config import DECODE_BLOCK_KV, SPLASH_BLOCK, ModelConfig, resolve_attention_impl, \
    resolve_decode_attention_impl, splash_blocks, splash_blocks_problem, splash_tiles
from orz_jax.sharding import LOGICAL_RULES, axis_size, current_mesh, logical_to_spec

# Process-wide, not per thread: JetStream's orchestrator traces the decode step in its own threads, and a test
# that enters pallas_interpret() must reach those traces too.
_STATE = types.SimpleNamespace(interpret=False, decode_kernel="tpu")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What the full-row attention runs: ``impl`` (``model.attention_impl``: auto / xla / splash / cudnn, resolved
    at trace time against the mesh's platform) and the splash tiles (block_q, block_kv, block_kv_compute).
    Frozen (hashable): modules keep it as a static attribute."""

    impl: str = "xla"
    splash_tiles: tuple[int, int, int] = (SPLASH_BLOCK, SPLASH_BLOCK, SPLASH_BLOCK)
    # the decode step's attention (``model.decode_attention_impl``: auto / xla / pallas) and its kv block
    decode_impl: str = "xla"
    decode_block_kv: int = DECODE_BLOCK_KV

    @classmethod
    def from_config(cls, m: ModelConfig) -> "AttentionSpec":
        return cls(impl=m.attention_impl, splash_tiles=splash_tiles(m), decode_impl=m.decode_attention_impl,
                   decode_block_kv=m.decode_block_kv)

    def resolve_decode(self, seq: int, mesh: Optional[Mesh] = None) -> str:
        """The KV-cache path's implementation for ``seq`` new tokens per row on ``mesh`` (default: the one traced
        under): "pallas" (orz_jax.models.decode_attention, TPU) or "pallas_gpu" (orz_jax.models.gpu_decode_attention)
        for one token per row when it resolves so, else "xla" (prefill keeps the XLA path)."""
        mesh = current_mesh() if mesh is None else mesh
        impl = resolve_decode_attention_impl(self.decode_impl, mesh_platform(mesh),
                                             interpret=_STATE.decode_kernel if interpreting() else None)
        return impl if seq == 1 else "xla"

    def resolve(self, seq: int, mesh: Optional[Mesh] = None) -> str:
        """The implementation for rows of ``seq`` tokens on ``mesh`` (default: the one traced under). ``auto``
        takes the XLA path for rows the splash tiles do not divide; a named ``splash`` raises there instead."""
        impl = resolve_impl(self.impl, mesh)
        if impl == "splash" and self.impl == "auto" and splash_blocks(self.splash_tiles, seq) is None:
            return "xla"
        return impl


@contextlib.contextmanager
def pallas_interpret(decode_kernel: str = "tpu"):
    """Tests only: run the splash and decode kernels in Pallas interpret mode (on any platform, e.g. the CPU). Not a
    config key on purpose: interpret mode is orders of magnitude slower than the compiled kernel. ``decode_kernel``:
    which decode kernel ``model.decode_attention_impl: pallas`` interprets on a CPU, "tpu" or "gpu"."""
    prev = (_STATE.interpret, _STATE.decode_kernel)
    _STATE.interpret, _STATE.decode_kernel = True, decode_kernel
    try:
        yield
    finally:
        _STATE.interpret, _STATE.decode_kernel = prev


def interpreting() -> bool:
    return _STATE.interpret


def mesh_platform(mesh: Optional[Mesh]) -> str:
    """The platform ("tpu", "gpu", "cpu") of ``mesh``'s devices, else of JAX's default devices. The mesh's, not
    ``jax.default_backend()``: the compile tool traces on a CPU host for compile-only TPU devices."""
    devices = mesh.devices.flat if mesh is not None else jax.devices()
    return next(iter(devices)).platform


def resolve_impl(impl: str, mesh: Optional[Mesh] = None) -> str:
    """``model.attention_impl`` for the mesh being traced under (``orz_jax.sharding.use_mesh``; none: the default
    devices). ConfigError naming the key for a kernel on the wrong platform (see ``config.resolve_attention_impl``)."""
    mesh = current_mesh() if mesh is None else mesh
    return resolve_attention_impl(impl, mesh_platform(mesh), interpret=interpreting())


# ----------------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU)
# ----------------------------------------------------------------------------------------------


def _specs(mesh: Mesh, b: int, kv_heads: int):
    """shard_map specs of (q [b, heads, seq, d], k / v [b, kv_heads, seq, d], segment_ids [b, seq]) from the
    rules table. A mesh axis that does not divide its dimension is dropped (computed redundantly), as
    ``sharding.constrain`` does; heads shard only when the kv heads do, so each shard keeps whole GQA groups."""
    if LOGICAL_RULES.get("seq") is not None:
        raise ValueError("splash attention: the rules table shards 'seq'; the kernel needs whole rows per device")

    batch = logical_to_spec(("batch",))[0]
    heads = logical_to_spec(("act_kv_heads",))[0]
    batch = batch if b % axis_size(mesh, batch) == 0 else None
    heads = heads if kv_heads % axis_size(mesh, heads) == 0 else None
    q = PartitionSpec(batch, heads, None, None)
    return q, q, PartitionSpec(batch, None)


# The splash kernels carry no Pallas CostEstimate (jax 0.10.2's splash_attention_kernel passes none), so XLA and
# orz_jax.hlo_cost would see ~0 FLOPs for them. splash_attention wraps each call in a named scope holding its exact
# matmul FLOPs per kernel; the scope reaches the tpu_custom_calls' op_name metadata (forward and the backward
# kernels, which run under transpose(jvp(...)) of it), where hlo_cost reads it.
SPLASH_FLOPS_SCOPE = "splash_flops"
SPLASH_FLOPS_RE = re.compile(r"splash_flops\[fwd=(\d+),dq=(\d+),dkv=(\d+)\]")
# matmuls per visited (q block, kv block) pair and head, each 2 x bq x bkv x head_dim flops (read from jax
# 0.10.2's splash_attention_kernel.py): fwd QK^T, PV; dq kernel QK^T, dO V^T, dS K; dkv kernel QK^T (as K Q^T),
# P^T dO, V dO^T, dS^T Q, plus dS K when use_fused_bwd_kernel (then no dq kernel runs).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "dkv_fused": 5}


def causal_block_pairs(seq: int, block_q: int, block_kv: int) -> int:
    """(q block, kv block) pairs of a causal [seq, seq] mask that are not fully masked: the pairs the splash
    kernels visit (their ``block_mask`` is nonzero; the rest are skipped by ``should_run``). Query block i covers
    rows [i bq, (i + 1) bq); kv block j is needed iff its first column j bkv <= the block's last row (i + 1) bq - 1.
    Equals the nonzero count of jax's ``process_mask`` tables (tests/test_fused_attention.py)."""
    nkv = seq // block_kv
    return sum(min(nkv, ((i + 1) * block_q - 1) // block_kv + 1) for i in range(seq // block_q))


def splash_kernel_flops(rows: int, heads: int, seq: int, head_dim: int, sizes) -> dict[str, int]:
    """Exact matmul FLOPs of one call of each splash kernel over ``rows`` rows x ``heads`` query heads of causal
    [seq, seq] attention with ``head_dim``, for ``sizes`` (splash ``BlockSizes``): {"fwd", "dq", "dkv"} (dq is 0
    with the fused backward kernel). Per visited block pair and head: matmuls x 2 x bq x bkv x head_dim."""
    def kernel(bq, bkv, matmuls):
        return rows * heads * causal_block_pairs(seq, bq, bkv) * matmuls * 2 * bq * bkv * head_dim

    fused = sizes.use_fused_bwd_kernel
    return {"fwd": kernel(sizes.block_q, sizes.block_kv, SPLASH_MATMULS["fwd"]),
            "dq": 0 if fused else kernel(sizes.block_q_dq, sizes.block_kv_dq, SPLASH_MATMULS["dq"]),
            "dkv": kernel(sizes.block_q_dkv, sizes.block_kv_dkv,
                          SPLASH_MATMULS["dkv_fused" if fused else "dkv"])}


def splash_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, segment_ids: jax.Array, *,
                     tiles: tuple[int, int, int] = (SPLASH_BLOCK,) * 3, mesh: Optional[Mesh] = None,
                     interpret: Optional[bool] = None) -> jax.Array:
    """Causal, segment-masked attention with the splash kernel. Shapes as the module docstring.

    ``tiles``: (block_q, block_kv, block_kv_compute), ``model.splash_block_*``, each cut to the row length.
    ``mesh`` (default: the one traced under): Mosaic kernels cannot be auto-partitioned, so on a mesh the kernel
    runs inside ``shard_map`` over the batch (data, fsdp) and head (tensor) axes of the rules table, each device
    on its rows and heads.
    ``interpret`` (default: inside :func:`pallas_interpret`): Pallas interpret mode, for CPU tests.

    GQA without repeated K/V: the MHA kernel maps query head h to kv head h // group in its index maps
    (jax's splash_attention_kernel), so K / V stay [kv_heads, seq, head_dim] and no repeated copy exists.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, kvh, g, s, d = qh.shape
    blocks = splash_blocks(tiles, s)
    if blocks is None:
        raise ValueError(splash_blocks_problem(tiles, s, "the row length"))
    block_q, block_kv, block_kv_compute = blocks
    sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv_compute,
                          block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv_compute,
                          block_q_dq=block_q, block_kv_dq=block_kv)
    interpret = interpreting() if interpret is None else interpret
    mesh = current_mesh() if mesh is None else mesh
    # the XLA path divides the scores by sqrt(head_dim); the kernel takes pre-scaled queries (as MaxText does)
    q = (qh.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(qh.dtype).reshape(b, kvh * g, s, d)  # [b, heads, s, d]

    def local(q, k, v, seg):
        """One device's rows and heads: q [b', h', s, d], k / v [b', kvh', s, d], seg [b', s]."""
        # built per trace from the local shapes: the mask tables are host constants (numpy) of [h', s/bq, s/bkv]
        mask = sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(q.shape[1])])
        kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        # local shapes: the FLOPs of this device's call (hlo_cost reads them from the op_name)
        f = splash_kernel_flops(q.shape[0], q.shape[1], s, d, sizes)
        with jax.named_scope(f"{SPLASH_FLOPS_SCOPE}[fwd={f['fwd']},dq={f['dq']},dkv={f['dkv']}]"):
            return jax.vmap(kernel)(q, k, v, sk.SegmentIds(q=seg, kv=seg))  # the kernel takes one row

    if mesh is None or mesh.size == 1:
        out = local(q, kh, vh, segment_ids)
    else:
        q_spec, kv_spec, seg_spec = _specs(mesh, b, kvh)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                            check_vma=False)(q, kh, vh, segment_ids)
    return out.reshape(b, kvh, g, s, d)


# ----------------------------------------------------------------------------------------------
# cuDNN (GPU)
# ----------------------------------------------------------------------------------------------


def cudnn_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, segment_ids: jax.Array, *,
                    implementation: Optional[str] = "cudnn") -> jax.Array:
    """Causal, segment-masked attention through ``jax.nn.dot_product_attention``. Shapes as the module docstring.

    ``implementation``: "cudnn" (cuDNN's fused flash attention: bf16 / fp16 only, GPU only) or "xla" / None (the
    same masks through jax's XLA implementation; how the CPU tests exercise this wrapper). jax 0.10.2 has no
    segment ids for cuDNN: the segment mask goes in as a boolean ``mask`` [batch, 1, q, k] (cuDNN takes it as a
    bias), ``is_causal`` adds the causal part (cuDNN skips the blocks above the diagonal). Cost of that choice: the
    bias is a dense [batch, 1, q, k] tensor (512 MiB per 16384-token row in bf16), shared by all heads. cuDNN's
    packed layout (per-row segment offsets and lengths) would avoid it, but jax exposes it only in the private
    ``jax._src.cudnn.fused_attention_stablehlo``; not used, as nothing here can test it without a GPU.
    """
    b, kvh, g, s, d = qh.shape
    q = qh.reshape(b, kvh * g, s, d).transpose(0, 2, 1, 3)  # [batch, seq, heads, head_dim] (BTNH)
    k, v = kh.transpose(0, 2, 1, 3), vh.transpose(0, 2, 1, 3)  # [batch, seq, kv_heads, head_dim]
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [batch, 1, q, k]
    out = jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation=implementation)
    return out.transpose(0, 2, 1, 3).reshape(b, kvh, g, s, d)
