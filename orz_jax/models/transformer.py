"""Qwen2 / Llama-family decoder in Flax NNX: the policy (``CausalLM``) and the critic (``Critic``).

One trunk serves both: token embedding -> N x [RMSNorm -> GQA attention with RoPE -> residual ->
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm. Weights are stored in "head-split" layouts
(``q: [embed, heads, head_dim]``) so that heads shard cleanly; every parameter carries logical axis
names (``sharding_names``) that ``orz_jax.sharding`` maps to mesh axes.

Two forward modes share the same code:
* full sequence (training, scoring): ``cache=None``; attention is causal inside each segment of a
  (possibly packed) row, ``segment_ids == 0`` marks padding;
* KV cache (prefill / decode): rows are right-padded; new keys/values are written at each row's
  ``cache.lengths`` and queries attend to everything written so far (see docs/INTERFACES.md).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from orz_jax.config import DEFAULT_ATTENTION_BLOCK, ArchConfig
from orz_jax.models.attention import AttentionSpec, cudnn_attention, interpreting, splash_attention
from orz_jax.models.decode_attention import ragged_decode_attention
from orz_jax.models.gpu_decode_attention import gpu_decode_attention
from orz_jax.models.layer_scan import scan_layers_accumulating
from orz_jax.models.mlp import swiglu_chunked
from orz_jax.sharding import constrain, kv_fold_shards

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully-masked (padding) rows stay NaN-free


def _stacked(shape, axes, stack: int):
    """Prepend the ``layers`` axis when ``stack`` > 0 (the decoder blocks' parameters are stacked)."""
    return ((stack,) + tuple(shape), ("layers",) + tuple(axes)) if stack else (tuple(shape), tuple(axes))


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype, stack: int = 0) -> nnx.Param:
    """Normal(0, std) parameter annotated with logical axes (sharded later, by the caller's mesh).
    ``stack`` > 0: shape ``[stack, *shape]`` with a leading ``layers`` axis."""
    shape, axes = _stacked(shape, axes, stack)
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype) if std > 0 else \
        jnp.zeros(shape, dtype)
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


def _ones(shape, axes, dtype, stack: int = 0) -> nnx.Param:
    shape, axes = _stacked(shape, axes, stack)
    return nnx.Param(jnp.ones(shape, dtype), sharding_names=axes, eager_sharding=False)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, heads folded into one minor dimension.

    ``kv_heads x head_dim`` is stored as one ``kv_fold`` dimension (head-major): the TPU tiles the two
    minor dimensions of an array in (8, 128) tiles, so a separate ``head_dim`` of 64 (Qwen2.5-0.5B) was
    padded to 128 lanes and the decode step materialised padded copies of the whole cache (docs/tpu,
    issue #13). Folded, the minor dimension is ``kv_heads * head_dim`` (128 for 0.5B) and decode attention
    contracts over it directly (``folded_decode_attention``).
    """

    k: jax.Array  # [layers, batch, max_len, kv_heads * head_dim]
    v: jax.Array  # [layers, batch, max_len, kv_heads * head_dim]
    lengths: jax.Array  # [batch] int32: filled positions per row
    # Static: attention reads only positions [0, window) of the cache (0: all of it). The rollout engine
    # sets it per decode program to the smallest window holding every live row (decode reads live KV only).
    window: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def init(cls, arch: ArchConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (arch.num_layers, batch, max_len, arch.num_kv_heads * arch.resolved_head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def read_len(self) -> int:
        """Positions attention reads: the window, or the whole cache."""
        return self.max_len if self.window <= 0 else min(self.window, self.max_len)


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(arch: ArchConfig) -> jax.Array:
    """Inverse frequencies [head_dim // 2], with the HF ``rope_scaling`` variants we support."""
    d = arch.resolved_head_dim
    # Computed on host the way the HF reference does it (float32 exponent, float32 power, float32
    # reciprocal). A one-ulp difference in a frequency moves logits by ~1e-4 at position ~250.
    exponent = np.arange(0, d, 2).astype(np.float32) / np.float32(d)
    power = (np.float64(arch.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv = jnp.asarray(np.float32(1.0) / power)
    sc = arch.rope_scaling
    kind = (sc or {}).get("rope_type", (sc or {}).get("type", "default"))
    if sc is None or kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = jnp.where(wavelen > lo_wavelen, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        return jnp.where(is_mid, mid, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; positions: [batch, seq]. Half-split (GPT-NeoX / HF) rotation."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, dtype, stack: int = 0):
        self.scale = _ones((dim,), ("embed",), param_dtype, stack)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32, cast back, then scale (the order HF uses, which matters in bf16).
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale.value.astype(self.dtype) * y.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, arch: ArchConfig, *, param_dtype, dtype, block: int = DEFAULT_ATTENTION_BLOCK,
                 stack: int = 0, attention: AttentionSpec = AttentionSpec(), rngs: nnx.Rngs):
        e, h, kvh, d = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.resolved_head_dim
        std = arch.initializer_range
        self.q = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), std, param_dtype, stack)
        self.k = _param(rngs, (e, kvh, d), ("embed", "kv_heads", "head_dim"), std, param_dtype, stack)
        self.v = _param(rngs, (e, kvh, d), ("embed", "kv_heads", "head_dim"), std, param_dtype, stack)
        self.o = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), std, param_dtype, stack)
        if arch.attention_bias:
            self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), 0.0, param_dtype, stack)
            self.k_bias = _param(rngs, (kvh, d), ("kv_heads", "head_dim"), 0.0, param_dtype, stack)
            self.v_bias = _param(rngs, (kvh, d), ("kv_heads", "head_dim"), 0.0, param_dtype, stack)
        self.has_bias = arch.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.dtype, self.block = dtype, block  # block: causal query block of the full-sequence path (0: dense)
        self.attention = attention  # the full-sequence path's implementation (orz_jax/models/attention.py)

    def _proj(self, x, w, b):
        y = jnp.einsum("bse,ehd->bshd", x, w.value.astype(self.dtype))
        return y + b.value.astype(self.dtype) if b is not None else y

    def __call__(self, x, positions, segment_ids, inv_freq, layer, cache: Optional[KVCache]):
        """x: [batch, seq, embed] -> ([batch, seq, embed], cache). ``layer``: int32 [] (traced under the
        layer scan) index of this block's slice of the stacked cache."""
        bias = (self.q_bias, self.k_bias, self.v_bias) if self.has_bias else (None, None, None)
        q = self._proj(x, self.q, bias[0])  # [batch, seq, heads, head_dim]
        k = self._proj(x, self.k, bias[1])  # [batch, seq, kv_heads, head_dim]
        v = self._proj(x, self.v, bias[2])
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "seq", "act_heads", "head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "seq", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "act_kv_heads", "head_dim"))

        b, s = x.shape[:2]
        q_idx = jnp.arange(s)[None, :]  # [1, seq]
        if cache is None:
            keys, values = k, v
            k_idx = q_idx
            # same non-padding segment, causal by row index: packed samples never see each other
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
            mask &= k_idx[:, None, :] <= q_idx[:, :, None]  # [batch, q, k]
        else:
            # One scatter of the s new positions per row straight into the (donated) 5-D cache, which
            # the layer scan carries: in a loop carry the scatter updates in place. A per-row
            # dynamic_update_slice of the layer followed by .at[layer].set copied the whole layer slice
            # every decode step.
            rows = jnp.arange(b)[:, None]  # [batch, 1]
            cols = cache.lengths[:, None] + q_idx  # [batch, seq]
            fold = self.num_kv_heads * self.head_dim  # the cache's folded minor dim (see KVCache)
            k_all = cache.k.at[layer, rows, cols].set(k.reshape(b, s, fold).astype(cache.k.dtype), mode="drop")
            v_all = cache.v.at[layer, rows, cols].set(v.reshape(b, s, fold).astype(cache.v.dtype), mode="drop")
            cache = cache.replace(k=k_all, v=v_all)
            decode_impl = self.attention.resolve_decode(s)
            if decode_impl in ("pallas", "pallas_gpu"):
                # one token per slot: the Pallas kernel reads this layer of the stacked cache in place, only
                # each live slot's filled blocks (+ the new token); a done / empty slot reads nothing
                live = jnp.where(segment_ids[:, 0] != 0, cache.lengths + 1, 0)  # [batch]
                qg = q.reshape(b, s, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
                if decode_impl == "pallas":
                    out = ragged_decode_attention(qg, k_all, v_all, live, layer, read_len=cache.read_len,
                                                  block_kv=self.attention.decode_block_kv,
                                                  shards=kv_fold_shards(self.num_kv_heads), interpret=interpreting())
                else:  # the GPU kernel reads the whole allocated cache length as its bound: no window needed
                    out = gpu_decode_attention(qg[:, 0], k_all, v_all, layer, live, interpret=interpreting())
                out = out.reshape(b, s, self.num_heads, self.head_dim)
                return jnp.einsum("bshd,hde->bse", out, self.o.value.astype(self.dtype)), cache
            # Only the window's positions are read: a static-size slice of this layer, so what XLA reads
            # scales with the window, not with the allocated max_len.
            w = cache.read_len
            keys = jax.lax.dynamic_slice(k_all, (layer, 0, 0, 0), (1, b, w, fold))[0].astype(self.dtype)
            values = jax.lax.dynamic_slice(v_all, (layer, 0, 0, 0), (1, b, w, fold))[0].astype(self.dtype)
            k_idx = jnp.arange(w)[None, :]  # [1, window]
            q_abs = cache.lengths[:, None] + q_idx  # [batch, seq] absolute index of each query in the row
            mask = k_idx[:, None, :] <= q_abs[:, :, None]  # [batch, q, window]

        g = self.num_heads // self.num_kv_heads
        qg = q.reshape(b, s, self.num_kv_heads, g, self.head_dim)  # [batch, seq, kv_heads, group, head_dim]
        if cache is None:
            # Training / scoring: heads-major operands make both einsums plain batched matmuls whose
            # outputs are in the layout the next op reads. Seq-major, XLA relaid out every [q, k] score
            # tensor, forward and backward (most of the 27% of CPU update time in copies, docs/bench).
            # Moving q / k / v costs [seq, head_dim] per head, not [q, k].
            qh = qg.transpose(0, 2, 3, 1, 4)  # [batch, kv_heads, group, q, head_dim]
            kh, vh = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)  # [batch, kv_heads, k, head_dim]
            impl = self.attention.resolve(s)  # by the platform of the mesh traced under
            if impl == "splash":
                out = splash_attention(qh, kh, vh, segment_ids, tiles=self.attention.splash_tiles)
            elif impl == "cudnn":
                out = cudnn_attention(qh, kh, vh, segment_ids)
            elif 0 < self.block < s:
                out = _causal_blocked_attention(qh, kh, vh, mask, self.block, self.dtype)
            else:
                out = _attend(qh, kh, vh, mask, self.dtype)
            out = out.transpose(0, 3, 1, 2, 4)  # [batch, q, kv_heads, group, head_dim]
        else:
            # Prefill / decode against the folded cache, read as stored (no transposed or head-split copy).
            out = folded_attention(qg, keys, values, mask, kv_fold_shards(self.num_kv_heads), self.dtype)
        out = out.reshape(b, s, self.num_heads, self.head_dim)
        y = jnp.einsum("bshd,hde->bse", out, self.o.value.astype(self.dtype))
        return y, cache


def _masked_softmax(scores, mask, head_dim: int, dtype):
    """scores [batch, kv_heads, group, q, k] (any dtype), mask [batch, q, k] -> probabilities in ``dtype``,
    computed in float32."""
    scores = scores.astype(jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def folded_attention(qg, keys, values, mask, shards: int, dtype):
    """Attention of grouped queries against a folded cache, contracting over the folded dim as stored.

    qg: [batch, q, kv_heads, group, head_dim]; keys, values: [batch, k, kv_heads * head_dim] (head-major);
    mask: [batch, q, k]; ``shards``: how many (tensor) shards the folded dim is split into, a divisor of
    kv_heads -> [batch, q, kv_heads, group, head_dim].

    The query is spread block-diagonally over the local part of the folded dim (head j's vector in block j,
    zeros elsewhere), so both einsums contract over / produce the whole 128-wide (or wider) minor dim of the
    cache and the cache is never reshaped into a 64-lane layout the TPU would pad (issue #13). It costs
    kv_heads / shards times the attention FLOPs, which decode (HBM-bound: the cache is read once per step)
    does not notice. Exact: the zeros add exact zeros, and the output keeps only the diagonal blocks.
    Splitting the folded dim into ``shards`` leading blocks keeps each device's contraction local when
    the cache is sharded over kv heads.
    """
    b, s, kvh, g, d = qg.shape
    t = keys.shape[1]
    local = kvh // shards  # kv heads per shard
    q6 = qg.reshape(b, s, shards, local, g, d)  # [batch, q, shards, local, group, head_dim]
    q6 = constrain(q6, ("batch", "seq", "act_kv_heads", None, None, None))
    eye = jnp.eye(local, dtype=bool)[:, None, :, None]  # [local, 1, local, 1]
    qbd = jnp.where(eye, q6[:, :, :, :, :, None, :], jnp.zeros((), qg.dtype))  # [b, q, shards, local, g, local, d]
    qbd = qbd.reshape(b, s, shards, local, g, local * d)  # block-diagonal over the local folded dim
    kc = constrain(keys.reshape(b, t, shards, local * d), ("batch", "cache_seq", "act_kv_heads", None))
    vc = constrain(values.reshape(b, t, shards, local * d), ("batch", "cache_seq", "act_kv_heads", None))
    scores = jnp.einsum("bscjgf,btcf->bcjgst", qbd, kc)  # [batch, shards, local, group, q, k]
    probs = _masked_softmax(scores.reshape(b, kvh, g, s, t), mask, d, dtype)
    out = jnp.einsum("bcjgst,btcf->bscjgf", probs.reshape(b, shards, local, g, s, t), vc)
    out = out.reshape(b, s, shards, local, g, local, d)  # [.., head j, group, block m, head_dim]
    out = jnp.diagonal(out, axis1=3, axis2=5)  # block m == head j: [b, q, shards, g, d, local]
    return out.transpose(0, 1, 2, 5, 3, 4).reshape(b, s, kvh, g, d)


def _attend(qh, kh, vh, mask, dtype):
    """One dense block. qh: [batch, kv_heads, group, q, head_dim]; kh, vh: [batch, kv_heads, k, head_dim];
    mask: [batch, q, k] -> [batch, kv_heads, group, q, head_dim]."""
    probs = _masked_softmax(jnp.einsum("bkgsd,bktd->bkgst", qh, kh), mask, qh.shape[-1], dtype)
    return jnp.einsum("bkgst,bktd->bkgsd", probs, vh)


def _causal_blocked_attention(qh, kh, vh, mask, block: int, dtype):
    """Exact causal attention, one query block at a time against only the keys at or before its end.

    Shapes as ``_attend``; ``mask`` is causal, so keys after a block's last query are masked anyway.
    Computes and stores about (n + 1) / 2n of the dense [q, k] scores for n blocks, with the same
    numbers: a masked key's weight is exactly 0 in both.
    """
    s = qh.shape[3]
    outs = [_attend(qh[:, :, :, start:start + block], kh[:, :, :start + block], vh[:, :, :start + block],
                    mask[:, start:start + block, :start + block], dtype)
            for start in range(0, s, block)]  # static: one pair of einsums per block
    return jnp.concatenate(outs, axis=3)


class MLP(nnx.Module):
    def __init__(self, arch: ArchConfig, *, param_dtype, dtype, stack: int = 0, chunk: int = 0, rngs: nnx.Rngs):
        e, m, std = arch.hidden_size, arch.intermediate_size, arch.initializer_range
        self.gate = _param(rngs, (e, m), ("embed", "mlp"), std, param_dtype, stack)
        self.up = _param(rngs, (e, m), ("embed", "mlp"), std, param_dtype, stack)
        self.down = _param(rngs, (m, e), ("mlp", "embed"), std, param_dtype, stack)
        self.dtype = dtype
        self.chunk = chunk  # model.mlp_chunk: positions per backward chunk (orz_jax/models/mlp.py), 0: whole rows

    def __call__(self, x):
        """x: [batch, seq, embed] -> [batch, seq, embed]."""
        w = [p.value.astype(self.dtype) for p in (self.gate, self.up, self.down)]
        return swiglu_chunked(x, *w, chunk=self.chunk)


class Block(nnx.Module):
    """One decoder block. With ``stack`` = N > 0 it holds the parameters of N blocks stacked over a
    leading ``layers`` axis; :class:`Transformer` runs it under ``lax.scan`` with one slice per step."""

    def __init__(self, arch: ArchConfig, *, param_dtype, dtype, attention_block: int, stack: int = 0,
                 attention: AttentionSpec = AttentionSpec(), sequence_parallel: bool = False, mlp_chunk: int = 0,
                 rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, stack=stack)
        self.sequence_parallel = sequence_parallel
        self.attn_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)
        self.attn = Attention(arch, rngs=rngs, block=attention_block, attention=attention, **kw)
        self.mlp_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)
        self.mlp = MLP(arch, rngs=rngs, chunk=mlp_chunk, **kw)

    def __call__(self, x, positions, segment_ids, inv_freq, layer, cache):
        resid = residual_axes(self.sequence_parallel, cache is None)
        # under sequence parallelism each sublayer's normalised input is gathered along seq (after the token-wise
        # norm ran on this device's part of the row) and its output goes back to this device's part by the resid
        # constraint (XLA all-reduces it, then keeps the part: not the reduce-scatter Megatron uses)
        gather = (lambda t: constrain(t, ("batch", "seq", "act_embed"))) if resid[1] == "act_seq" else (lambda t: t)
        h, cache = self.attn(gather(self.attn_norm(x)), positions, segment_ids, inv_freq, layer, cache)
        x = constrain(x + h, resid)
        x = constrain(x + self.mlp(gather(self.mlp_norm(x))), resid)
        return x, cache


def residual_axes(sequence_parallel: bool, full_rows: bool) -> tuple:
    """Logical axes of the residual stream [batch, seq, embed]: seq on ``act_seq`` (split over tensor) under
    ``model.sequence_parallel`` on the full-row path, else replicated along seq. The KV-cache path (prefill,
    decode) never splits it."""
    return ("batch", "act_seq" if sequence_parallel and full_rows else "seq", "act_embed")


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """The shared trunk: embeddings, decoder blocks, final norm."""

    def __init__(self, arch: ArchConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 attention_block: int = DEFAULT_ATTENTION_BLOCK, attention: AttentionSpec = AttentionSpec(),
                 sequence_parallel: bool = False, mlp_chunk: int = 0, remat_offload: bool = False,
                 rngs: nnx.Rngs):
        self.arch = arch
        self.embed = _param(rngs, (arch.vocab_size, arch.hidden_size), ("vocab", "embed"), arch.initializer_range,
                            param_dtype)
        # All blocks in one module, parameters stacked over a leading "layers" axis ([layers, embed, ...]):
        # the trunk is one lax.scan, so compile time and program size do not grow with depth.
        self.layers = Block(arch, param_dtype=param_dtype, dtype=dtype, attention_block=attention_block,
                            stack=arch.num_layers, attention=attention, sequence_parallel=sequence_parallel,
                            mlp_chunk=mlp_chunk, rngs=rngs)
        self.sequence_parallel, self.remat_offload = sequence_parallel, remat_offload
        self.final_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, param_dtype=param_dtype, dtype=dtype)
        self.dtype, self.remat = dtype, remat

    def __call__(self, tokens, positions, segment_ids, cache: Optional[KVCache] = None, grad_acc=None,
                 layer_params: Optional[Sequence[nnx.State]] = None):
        """tokens, positions, segment_ids: [batch, seq] int32 -> (hidden [batch, seq, embed], cache).

        ``grad_acc`` (full rows, ``remat: full`` only): a float32 pytree like ``nnx.split(self.layers)[1]``; the
        gradient of the layers' parameters then comes back as ``grad_acc`` + the gradient, added in place by the
        backward pass (``orz_jax.models.layer_scan``, ``ppo.grad_accumulation: in_place``).
        ``layer_params``: the blocks' parameters as one state per layer (the rollout engine's ``per_layer``
        serving layout, ``rollout.serving_layers``), run by an unrolled loop instead of the scan over the stacked
        ``self.layers`` (whose arrays are then not read)."""
        x = jnp.take(self.embed.value, tokens, axis=0).astype(self.dtype)  # [batch, seq, embed]
        x = constrain(x, residual_axes(self.sequence_parallel, cache is None))
        inv_freq = rope_inv_freq(self.arch)
        graphdef, stacked = nnx.split(self.layers)  # leaves [layers, ...]

        def layer(x, cache, params, i):
            """One block: params are its slices of the stacked state, i its int32 [] index."""
            return nnx.merge(graphdef, params)(x, positions, segment_ids, inv_freq, i, cache)

        if grad_acc is not None:
            if cache is not None or self.remat != "full":
                raise ValueError("Transformer: grad_acc needs full rows (no cache) and model.remat: full "
                                 f"(got remat {self.remat!r})")
            x = scan_layers_accumulating(lambda x, p, i: layer(x, None, p, i)[0], x, stacked, grad_acc,
                                         residual_axes(self.sequence_parallel, True), offload=self.remat_offload)
        else:
            if self.remat != "none":
                # per layer: the backward pass recomputes one block's activations from its saved input
                layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)

            def body(carry, xs):
                x, cache = carry
                x, cache = layer(x, cache, *xs)
                return (x, cache), None

            if layer_params is not None:
                # One array per layer, read in place: on XLA:CPU a dynamic slice of a stacked weight is a copy.
                if len(layer_params) != self.arch.num_layers:
                    raise ValueError(f"layer_params has {len(layer_params)} layers, the model "
                                     f"{self.arch.num_layers}")
                for i, params in enumerate(layer_params):
                    x, cache = layer(x, cache, params, jnp.int32(i))
            else:
                # the cache rides in the carry (updated in place), not in xs / ys (a new stacked copy per step)
                (x, cache), _ = jax.lax.scan(body, (x, cache),
                                             (stacked, jnp.arange(self.arch.num_layers, dtype=jnp.int32)))
        if cache is not None:
            cache = cache.replace(lengths=cache.lengths + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32))
        h = self.final_norm(x)
        if self.sequence_parallel and cache is None:
            h = constrain(h, ("batch", "seq", "act_embed"))  # whole rows again: the heads' chunks run along seq
        return h, cache


class CausalLM(nnx.Module):
    """Policy: trunk + LM head (tied to the embedding when ``arch.tie_word_embeddings``)."""

    def __init__(self, arch: ArchConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 attention_block: int = DEFAULT_ATTENTION_BLOCK, attention: AttentionSpec = AttentionSpec(),
                 sequence_parallel: bool = False, mlp_chunk: int = 0, remat_offload: bool = False,
                 rngs: nnx.Rngs):
        self.transformer = Transformer(arch, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                       attention_block=attention_block, attention=attention,
                                       sequence_parallel=sequence_parallel, mlp_chunk=mlp_chunk,
                                       remat_offload=remat_offload, rngs=rngs)
        if not arch.tie_word_embeddings:
            self.lm_head = _param(rngs, (arch.hidden_size, arch.vocab_size), ("embed", "vocab"),
                                  arch.initializer_range, param_dtype)
        self.tied = arch.tie_word_embeddings

    @property
    def arch(self) -> ArchConfig:
        return self.transformer.arch

    def head_weight(self) -> jax.Array:
        """The LM head, [embed, vocab] in the parameter dtype."""
        return self.transformer.embed.value.T if self.tied else self.lm_head.value

    def __call__(self, tokens, positions, segment_ids, cache: Optional[KVCache] = None,
                 layer_params: Optional[Sequence[nnx.State]] = None):
        """-> (logits [batch, seq, vocab] float32, cache). ``layer_params``: see ``Transformer.__call__``."""
        h, cache = self.transformer(tokens, positions, segment_ids, cache, layer_params=layer_params)
        logits = jnp.einsum("bse,ev->bsv", h, self.head_weight().astype(h.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab")), cache

    def token_logprobs(self, tokens, positions, segment_ids, *, chunk: int, with_entropy: bool = False,
                       grad_acc=None, layer_params: Optional[Sequence[nnx.State]] = None):
        """Token-aligned log-probs (and entropies) of ``tokens`` without materialising the logits.

        tokens, positions, segment_ids: [batch, seq] int32 -> (logprobs [batch, seq] float32,
        entropy [batch, seq] float32 or None), as ``orz_jax.ppo.losses.token_logprobs(self(...)[0], tokens)``
        but with the LM head applied ``chunk`` positions at a time (see ``chunked_token_logprobs``).
        ``grad_acc``, ``layer_params``: see :meth:`Transformer.__call__`."""
        from orz_jax.ppo.losses import chunked_token_logprobs  # lazy: importing orz_jax.ppo loads the trainer stack

        h, _ = self.transformer(tokens, positions, segment_ids, grad_acc=grad_acc, layer_params=layer_params)
        head = self.transformer.embed.value if self.tied else self.lm_head.value  # as stored: no transposed copy
        head_axes = ("vocab", "embed") if self.tied else ("embed", "vocab")  # as stored
        return chunked_token_logprobs(h, head, tokens, chunk=chunk, with_entropy=with_entropy, vocab_major=self.tied,
                                      constrain_logits=lambda x: constrain(x, ("batch", "seq", "act_vocab")),
                                      constrain_head=lambda w: constrain(w, head_axes))


class Critic(nnx.Module):
    """Value model: the same trunk + a bias-free scalar head on the last hidden state."""

    def __init__(self, arch: ArchConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 attention_block: int = DEFAULT_ATTENTION_BLOCK, attention: AttentionSpec = AttentionSpec(),
                 head_init_std: float = 0.0, sequence_parallel: bool = False, mlp_chunk: int = 0,
                 remat_offload: bool = False, rngs: nnx.Rngs):
        self.transformer = Transformer(arch, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                       attention_block=attention_block, attention=attention,
                                       sequence_parallel=sequence_parallel, mlp_chunk=mlp_chunk,
                                       remat_offload=remat_offload, rngs=rngs)
        self.value_head = _param(rngs, (arch.hidden_size, 1), ("embed", "value"), head_init_std, param_dtype)

    @property
    def arch(self) -> ArchConfig:
        return self.transformer.arch

    def __call__(self, tokens, positions, segment_ids, grad_acc=None,
                 layer_params: Optional[Sequence[nnx.State]] = None):
        """-> values [batch, seq] float32 (value of the state *after* reading token i). ``grad_acc``,
        ``layer_params``: see :meth:`Transformer.__call__`."""
        h, _ = self.transformer(tokens, positions, segment_ids, grad_acc=grad_acc, layer_params=layer_params)
        return jnp.einsum("bse,eo->bso", h.astype(jnp.float32), self.value_head.value.astype(jnp.float32))[..., 0]


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 in each segment of a row. segment_ids: [batch, seq] -> [batch, seq]."""
    s = segment_ids.shape[1]
    idx = jnp.arange(s)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(segment_ids != 0, idx - start_idx, 0).astype(jnp.int32)
