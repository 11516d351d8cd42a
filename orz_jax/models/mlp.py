"""The SwiGLU MLP with a sequence-chunked backward pass (``model.mlp_chunk``).

The MLP is token-wise, so it can run ``chunk`` positions at a time: the [batch, seq, mlp] activations (gate, up,
their product and, in the backward pass, their gradients: 6 of them at 16,384 x 4,736 per device for 7B at
tensor 4, 148 MiB each) then exist for one chunk only. The forward pass keeps nothing but its input: the
backward recomputes each chunk's gate / up from it. Under remat (every ORZ config) the layer's forward is run
again just before its backward and the MLP's output is not needed there, so XLA drops that forward and the
chunked backward's recomputation is the only one: the FLOPs are those of the unchunked MLP.

Numbers: the same products; each weight's gradient is summed over the chunks in float32 and rounded to the
weight's dtype once (in float32 compute: the sums of the whole-row matmul, in another order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from orz_jax.sharding import constrain


def swiglu(x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array) -> jax.Array:
    """x: [batch, seq, embed]; wg, wu: [embed, mlp]; wd: [mlp, embed] (all in the compute dtype) -> [batch, seq,
    embed] = (silu(x wg) * (x wu)) wd."""
    gate = x @ wg  # [batch, seq, mlp]
    up = x @ wu
    h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    return h @ wd


def swiglu_chunked(x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, chunk: int) -> jax.Array:
    """:func:`swiglu` whose backward pass runs ``chunk`` positions at a time. ``chunk`` <= 0, or one that does not
    divide a shorter-than-chunk or uneven row: the plain :func:`swiglu`."""
    s = x.shape[1]
    if chunk <= 0 or s <= chunk or s % chunk:
        return swiglu(x, wg, wu, wd)
    return _swiglu_chunked(chunk, x, wg, wu, wd)


def _split(t: jax.Array, chunk: int) -> jax.Array:
    """[batch, seq, dim] -> [seq / chunk, batch, chunk, dim]."""
    b, s, d = t.shape
    return t.reshape(b, s // chunk, chunk, d).swapaxes(0, 1)


def _merge(t: jax.Array) -> jax.Array:
    """Inverse of :func:`_split`."""
    n, b, c, d = t.shape
    return t.swapaxes(0, 1).reshape(b, n * c, d)


def _gathered(wg, wu, wd):
    """The weights in their compute layout (embed whole, mlp over tensor), gathered once before a chunk loop:
    left sharded, the partitioner gathers them again in every chunk (4x the all-gather bytes at 4 chunks)."""
    up_axes = ("act_embed", "act_mlp")
    return constrain(wg, up_axes), constrain(wu, up_axes), constrain(wd, up_axes[::-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu_chunked(chunk, x, wg, wu, wd):
    # the forward in chunks too: its [batch, seq, mlp] temporaries are one chunk's (token-wise: the same numbers)
    wg, wu, wd = _gathered(wg, wu, wd)
    return _merge(jax.lax.map(lambda xc: swiglu(xc, wg, wu, wd), _split(x, chunk)))


def _fwd(chunk, x, wg, wu, wd):
    return _swiglu_chunked(chunk, x, wg, wu, wd), (x, wg, wu, wd)  # keeps only the inputs


def _bwd(chunk, res, ct):
    x, wg, wu, wd = res
    wg, wu, wd = _gathered(wg, wu, wd)
    b, s, e = x.shape
    split = functools.partial(_split, chunk=chunk)

    def body(acc, xs):
        xc, ctc = xs  # [batch, chunk, embed] each
        _, vjp = jax.vjp(swiglu, xc, wg, wu, wd)
        dx, *dw = vjp(ctc)
        return tuple(a + d.astype(jnp.float32) for a, d in zip(acc, dw)), dx

    acc0 = tuple(jnp.zeros(w.shape, jnp.float32) for w in (wg, wu, wd))
    acc, dx = jax.lax.scan(body, acc0, (split(x), split(ct)))
    dx = _merge(dx)
    return (dx,) + tuple(a.astype(w.dtype) for a, w in zip(acc, (wg, wu, wd)))


_swiglu_chunked.defvjp(_fwd, _bwd)
