"""The GPU decode-attention kernel (orz_jax/models/gpu_decode_attention.py), in Pallas interpret mode on the CPU.

* Against a float64 loop over slots and heads: ragged lengths (a full slot, an empty one, lengths that are not
  multiples of the block), GQA groups that are not powers of two, head_dim 16 / 64 / 128, a window the block does
  not divide. Tolerance: 1e-5, ~30x the float32 kernel's own error here (3.5e-7 at most), for float32 sums of at
  most 512 terms of magnitude <= ~10.
* It reads the live blocks only: the cache beyond each slot's last live block is NaN; a kernel that read those
  blocks (the XLA path reads the whole window) would return NaN (0 x NaN = NaN in the P V product).
* On 8 fake devices (shard_map over slots and kv heads) it equals one device.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_with_devices

TOL = 1e-5


def _reference(q, k, v, layer, lengths):
    """float64: q [S, H, G, D], caches [L, S, T, H*D] -> [S, H, G, D]; a slot with length 0 gives zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s_, h_, _, d = q.shape
    out = np.zeros_like(q)
    for i in range(s_):
        n = int(lengths[i])
        for h in range(h_ if n else 0):
            kk, vv = k[layer, i, :n, h * d:(h + 1) * d], v[layer, i, :n, h * d:(h + 1) * d]
            sc = q[i, h] @ kk.T / np.sqrt(d)
            p = np.exp(sc - sc.max(1, keepdims=True))
            out[i, h] = (p / p.sum(1, keepdims=True)) @ vv
    return out


def _inputs(rng, layers, slots, t, heads, group, d):
    q = rng.randn(slots, heads, group, d).astype(np.float32)
    k = rng.randn(layers, slots, t, heads * d).astype(np.float32)
    v = rng.randn(layers, slots, t, heads * d).astype(np.float32)
    lengths = rng.randint(1, t, slots)
    lengths[0], lengths[-1] = t, 0  # a full slot and an empty (done) one
    return q, k, v, lengths


@pytest.mark.parametrize("layers,slots,t,heads,group,d,block_k,k_splits", [
    (2, 5, 100, 2, 3, 64, 32, 3),  # window not a multiple of the block: the last block is read shifted back
    (1, 3, 37, 4, 7, 16, 16, 2),  # Qwen2.5-7B's group of 7
    (2, 4, 512, 2, 2, 128, 64, 8),
])
def test_kernel_equals_float64(layers, slots, t, heads, group, d, block_k, k_splits):
    import jax.numpy as jnp

    from orz_jax.models.gpu_decode_attention import gpu_decode_attention

    q, k, v, lengths = _inputs(np.random.RandomState(t), layers, slots, t, heads, group, d)
    got = gpu_decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(layers - 1),
                               jnp.asarray(lengths), block_k=block_k, k_splits=k_splits, interpret=True)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), _reference(q, k, v, layers - 1, lengths), atol=TOL, rtol=0)


def test_kernel_reads_live_blocks_only():
    import jax.numpy as jnp

    from orz_jax.models.gpu_decode_attention import gpu_decode_attention
    from orz_jax.models.transformer import folded_attention

    block = 16
    q, k, v, lengths = _inputs(np.random.RandomState(1), 1, 4, 96, 2, 2, 16)
    lengths[:] = [96, 20, 33, 0]
    kp, vp = k.copy(), v.copy()
    for i, n in enumerate(lengths):  # NaN from each slot's first block with no live position
        end = -(-n // block) * block
        kp[:, i, end:], vp[:, i, end:] = np.nan, np.nan
    got = np.asarray(gpu_decode_attention(jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.int32(0),
                                          jnp.asarray(lengths), block_k=block, k_splits=2, interpret=True))
    np.testing.assert_allclose(got, _reference(q, k, v, 0, lengths), atol=TOL, rtol=0)
    # the XLA path over the same window reads the dead positions: NaN (what the check above would catch)
    mask = jnp.arange(96)[None, None, :] < jnp.asarray(lengths)[:, None, None]  # [slots, 1, k]
    xla = folded_attention(jnp.asarray(q)[:, None], jnp.asarray(kp[0]), jnp.asarray(vp[0]), mask, 1, jnp.float32)
    assert np.isnan(np.asarray(xla)[1]).any()


def test_sharded_equals_one_device():
    out = run_with_devices("""
import numpy as np, jax, jax.numpy as jnp
from orz_jax.config import MeshConfig
from orz_jax.models.gpu_decode_attention import gpu_decode_attention
from orz_jax.sharding import make_mesh, use_mesh
rng = np.random.RandomState(0)
S, H, G, D, T = 8, 4, 2, 16, 64
q = jnp.asarray(rng.randn(S, H, G, D), jnp.float32)
k, v = (jnp.asarray(rng.randn(2, S, T, H * D), jnp.float32) for _ in range(2))
lengths = jnp.asarray(rng.randint(0, T + 1, S), jnp.int32)
one = gpu_decode_attention(q, k, v, jnp.int32(1), lengths, block_k=16, k_splits=2, interpret=True)
mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
with use_mesh(mesh):
    f = jax.jit(lambda *a: gpu_decode_attention(*a, block_k=16, k_splits=2, interpret=True))
    sharded = f(q, k, v, jnp.int32(1), lengths)
    hlo = f.lower(q, k, v, jnp.int32(1), lengths).as_text()
assert "shard_map" in hlo or "sdy.manual_computation" in hlo or "custom_call" in hlo
np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), atol=1e-6, rtol=0)
print("OK")
""", n_devices=8, timeout=300)
    assert out.rstrip().endswith("OK")


def _has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU: compiles the Triton kernel")
def test_compiled_kernel_on_gpu():
    """On a GPU: the compiled kernel (not interpret mode) equals float64, in float32 and bfloat16 caches."""
    import jax
    import jax.numpy as jnp

    from orz_jax.models.gpu_decode_attention import gpu_decode_attention

    q, k, v, lengths = _inputs(np.random.RandomState(2), 2, 8, 640, 4, 7, 128)
    f = jax.jit(lambda *a: gpu_decode_attention(*a))
    got = f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(1), jnp.asarray(lengths))
    # float32 in and out, but Triton's dot may round its float32 operands to TF32 (10 mantissa bits, 2^-11
    # relative): scores of magnitude ~30 then move by ~1.5e-2 before the softmax, ~1e-3 after it
    np.testing.assert_allclose(np.asarray(got, np.float64), _reference(q, k, v, 1, lengths), atol=5e-3, rtol=0)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    got = f(*bf, jnp.int32(1), jnp.asarray(lengths))
    ref = _reference(*(np.asarray(a, np.float32) for a in bf), 1, lengths)
    # the kernel computes in float32 from the bfloat16 inputs; its output is rounded to bfloat16 (relative 2^-9)
    # and is a convex mix of values of magnitude < 4 here: <= 8e-3, plus float32 sums
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=1e-2, rtol=0)
