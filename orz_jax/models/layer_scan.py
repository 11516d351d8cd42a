"""The decoder's layer scan with its gradient added in place into an accumulator (``ppo.grad_accumulation``).

With micro-batch gradient accumulation (``orz_jax.ppo.train.accumulate_gradients``) the plain way holds two
float32 copies of the stacked layer gradients per device: the accumulator, and the micro-batch's gradient that
the scan's backward pass writes as its stacked output before it is added (7B on v5p-32: 2 x 1.63 GiB of the actor
step's temporaries, docs/tpu/README.md). :func:`scan_layers_accumulating` runs the same scan, but its backward
pass is a reverse ``lax.scan`` that carries the accumulator and adds each layer's gradient into the layer's slice
of it (a ``dynamic_update_slice`` on a loop carry: in place), so only the accumulator exists.

What it computes, exactly: the function is the plain layer scan; its VJP returns, for the stacked parameters,
``grad_acc + (the true cotangent)``, i.e. the gradient of ``loss + <stop_gradient(grad_acc), params>``. Every
layer is recomputed from its saved input in the backward pass, as ``model.remat: full`` does, so this *is* full
remat; the saved inputs are the layer inputs, stored with ``saved_axes`` (split along seq over ``tensor`` under
``model.sequence_parallel``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from orz_jax.sharding import constrain


def _loop_variant(params: Any, i: jax.Array) -> Any:
    """``params`` (one layer's slices) with an integer 0 that depends on the layer index ``i`` added to the bits
    of every float leaf: the same values, bit for bit.

    Why: the layers cast their float32 weights to the compute dtype inside the scan body; XLA rewrites
    ``convert(dynamic-slice(w, i))`` as ``dynamic-slice(convert(w), i)`` and hoists the convert of the whole
    stack out of the layer and micro-batch loops: a compute-dtype copy of every layer's weights for the whole
    step (7B on v5p-32: 0.8 GiB per device, docs/tpu/README.md). A term XLA cannot prove constant keeps the
    cast per layer (an ``optimization_barrier`` did not: the TPU pipeline drops it). ``i`` >= 0, so the term is
    0; it is added to the bits, not the value, because a float ``w * 1`` or ``w + 0`` is not exact everywhere
    (XLA:CPU flushes subnormals, ``-0.0 + 0`` is ``+0.0``).
    """
    def one(a):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        bits = jnp.dtype(f"int{8 * a.dtype.itemsize}")
        zero = jnp.minimum(i, 0).astype(bits)  # [] == 0
        return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(a, bits) + zero, a.dtype)

    return jax.tree.map(one, params)


def scan_layers_accumulating(layer: Callable, x: jax.Array, stacked: Any, grad_acc: Any,
                             saved_axes: Sequence, offload: bool = False) -> jax.Array:
    """The layer scan ``x -> layer(... layer(x, stacked[0], 0) ..., stacked[n-1], n-1)`` whose gradient with
    respect to ``stacked`` comes back as ``grad_acc`` plus that gradient, added in place layer by layer.

    Args:
      layer: ``layer(x, params, i) -> x``: one block; ``params`` a slice of ``stacked``, ``i`` its int32 [] index.
      x: [batch, seq, embed] the first layer's input.
      stacked: pytree of [layers, ...] parameters (float32, like ``grad_acc``; the cotangent keeps their dtype).
      grad_acc: pytree like ``stacked``, float32: the gradient accumulated so far.
      saved_axes: logical axes of the saved per-layer inputs [batch, seq, embed].
      offload: keep the saved inputs in host memory (``model.remat_offload``): each goes to the host as its
        layer runs forward and comes back to the device just before its layer's backward.
    Returns:
      [batch, seq, embed] the last layer's output. Its VJP: (d x, grad_acc + d stacked, None).
    """
    n = jax.tree.leaves(stacked)[0].shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)

    def forward(x, stacked, keep: bool):
        def body(x, xs):
            params, i = xs
            x = constrain(x, saved_axes)
            saved = jax.device_put(x, jax.memory.Space.Host) if keep and offload else x
            return layer(x, _loop_variant(params, i), i), (saved if keep else None)

        return jax.lax.scan(body, x, (stacked, idx))  # (output, inputs [layers, batch, seq, embed] or None)

    @jax.custom_vjp
    def run(x, stacked, grad_acc):
        return forward(x, stacked, keep=False)[0]

    def run_fwd(x, stacked, grad_acc):
        y, inputs = forward(x, stacked, keep=True)
        return y, (inputs, stacked, grad_acc)

    def run_bwd(res, ct):
        inputs, stacked, grad_acc = res

        def body(carry, i):
            ct_x, acc = carry
            params = _loop_variant(jax.tree.map(lambda a: a[i], stacked), i)
            # recompute layer i from its saved input and pull the cotangent through it (full remat)
            x_in = jax.device_put(inputs[i], jax.memory.Space.Device) if offload else inputs[i]
            _, vjp = jax.vjp(lambda x, p: layer(x, p, i), x_in, params)
            ct_x, ct_p = vjp(ct_x)
            acc = jax.tree.map(lambda a, c: a.at[i].add(c.astype(a.dtype)), acc, ct_p)  # in place: a loop carry
            return (ct_x, acc), None

        (ct_x, acc), _ = jax.lax.scan(body, (ct, grad_acc), idx, reverse=True)
        return ct_x, acc, None  # grad_acc is never differentiated: no cotangent for it

    run.defvjp(run_fwd, run_bwd)
    return run(x, stacked, grad_acc)
