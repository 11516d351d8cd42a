"""Issue #14's last two cuts of the 7B train steps' temporaries (docs/tpu/README.md), pinned for numerics:

* ``orz_jax.ppo.train.row_part``: the micro-batch loop slices each micro-batch out of the mini-batch instead of
  scanning over ``split_rows``'s [parts, rows // parts, L] copy; it must pick exactly ``split_rows``'s rows.
* ``orz_jax.models.layer_scan._loop_variant``: each layer's weights with an integer 0 that XLA cannot prove
  is 0 added to their bits (so the compute-dtype cast is not hoisted over the whole stack); it must be the
  identity, bit for bit (a float ``w * 1`` is not: XLA:CPU flushes subnormals).
* ``orz_jax.ppo.train.clip_by_global_norm``: the gradients times one scalar, so that XLA fuses the clip into
  AdamW's moment updates instead of keeping the clipped gradients as a second full-size buffer; it must clip as
  ``optax.clip_by_global_norm`` does.

The accumulated gradients themselves are pinned by the existing tests (tests/test_ppo_train.py against unpacked
rows, tests/test_sequence_parallel.py: in place vs plain bitwise, and both against float64 on a mesh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from orz_jax.config import ArchConfig, OptimConfig, PPOConfig
from orz_jax.models.layer_scan import _loop_variant
from orz_jax.models.transformer import CausalLM
from orz_jax.ppo import train as ppo_train
from orz_jax.ppo.packing import PackedBatch
from orz_jax.ppo.train import clip_by_global_norm, row_part, split_rows

from conftest import run_with_devices


def test_row_part_picks_split_rows_rows():
    """Reference: numpy's strided rows ``x[p::parts]`` (what ``split_rows`` documents), for every part."""
    x = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for parts in (1, 3, 4, 12):
        f = jax.jit(lambda x, p, parts=parts: row_part(x, parts, p, None))
        for p in range(parts):
            got = np.asarray(f(jnp.asarray(x), jnp.int32(p)))  # p traced: one compile for every part
            np.testing.assert_array_equal(got, x[p::parts])
            np.testing.assert_array_equal(got, np.asarray(split_rows(jnp.asarray(x), parts, None)[p]))


MESH_ROW_PART = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from orz_jax.config import MeshConfig
from orz_jax.ppo.train import BATCH_AXES, batch_shardings, row_part
from orz_jax.sharding import logical_to_spec, make_mesh, use_mesh
mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
x = np.arange(16 * 8, dtype=np.int32).reshape(16, 8)
xs = jax.device_put(x, NamedSharding(mesh, logical_to_spec(BATCH_AXES)))
with use_mesh(mesh):
    f = jax.jit(lambda x, p: row_part(x, 4, p, mesh))
    for p in range(4):
        y = f(xs, jnp.int32(p))
        np.testing.assert_array_equal(np.asarray(y), x[p::4])
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, logical_to_spec(BATCH_AXES)), 2), y.sharding
print("OK")
"""


def test_row_part_on_a_mesh_keeps_rows_and_batch_sharding():
    """8 fake CPU devices, rows over fsdp (4): each micro-batch is rows p, p + 4, ... spread over the shards."""
    assert "OK" in run_with_devices(MESH_ROW_PART, 8)


def test_loop_variant_is_the_identity_bit_for_bit():
    """Reference: the input itself, compared as raw bits (signed zeros, inf, NaN, subnormals), inside a scan
    whose index is traced; integer leaves pass through untouched."""
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.5, 3.4e38], np.float32)
    params = {"w": jnp.asarray(np.tile(special, (3, 1))), "b": jnp.asarray(special.astype(jnp.bfloat16)[None]
                                                                              .repeat(3, 0)),
              "n": jnp.arange(3, dtype=jnp.int32)}

    def body(c, xs):
        p, i = xs
        return c, _loop_variant(p, i)

    _, out = jax.jit(lambda ps: jax.lax.scan(body, None, (ps, jnp.arange(3, dtype=jnp.int32))))(params)
    assert out["n"].dtype == jnp.int32 and out["b"].dtype == jnp.bfloat16
    for k in params:
        a, b = np.asarray(params[k]), np.asarray(out[k])
        np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8), err_msg=k)


def test_clip_by_global_norm_against_float64_and_optax():
    """Reference: g * min(1, c / ||g||) in float64 by hand, and optax's clip. Below the bound the gradients pass
    bit for bit; above it both clips are within a few float32 ulps of float64; a NaN norm gives NaN as optax."""
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(37, 5)).astype(np.float32), "b": rng.normal(size=11).astype(np.float32)}
    norm64 = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))  # ~ 13.9
    ours = jax.jit(lambda g, c: clip_by_global_norm(c).update(g, optax.EmptyState())[0])
    theirs = jax.jit(lambda g, c: optax.clip_by_global_norm(c).update(g, optax.EmptyState())[0])
    unclipped = ours(g, 1e3)
    for k in g:
        np.testing.assert_array_equal(np.asarray(unclipped[k]), g[k])
    for c in (0.5, 7.0):
        a, b = ours(g, c), theirs(g, c)
        for k in g:
            ref = g[k].astype(np.float64) * (c / norm64)
            for got in (a[k], b[k]):
                np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=8 * 2.0 ** -23, atol=0)
    bad = dict(g, b=np.full(11, np.nan, np.float32))
    assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(ours(bad, 1.0)))
    assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(theirs(bad, 1.0)))


def test_actor_step_keeps_no_clipped_copy_of_the_gradients(monkeypatch):
    """The compiled actor step (the CPU trainer's per-layer train state) holds at least half the parameters'
    bytes less in temporaries than the same step with optax's clip, whose clipped gradients XLA keeps as a
    buffer: here 0.76 x the parameters; the 0.5B shape on a 2-core CPU: 3.99 -> 2.04 GB (0.98 x)."""
    arch = ArchConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    opt = OptimConfig(lr=1e-3, warmup_steps=0)
    ppo = PPOConfig(actor=opt, critic=opt, actor_steps_per_batch=1, micro_batch_rows=1, pack_len=16)
    z = jnp.zeros((1, 16), jnp.float32)
    batch = PackedBatch(tokens=jnp.ones((1, 16), jnp.int32), positions=jnp.arange(16, dtype=jnp.int32)[None],
                        segment_ids=jnp.ones((1, 16), jnp.int32), loss_mask=jnp.ones((1, 16)), old_logprobs=z,
                        old_values=z, advantages=z, returns=z)
    model = CausalLM(arch, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", rngs=nnx.Rngs(0))
    state = ppo_train.create_train_state(model, opt, layers="per_layer")
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))

    def temp_bytes():
        step = ppo_train.PPOFunctions.build(ppo).actor_step
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes()
    monkeypatch.setattr(ppo_train, "clip_by_global_norm", optax.clip_by_global_norm)
    with_optax = temp_bytes()
    assert with_optax - ours >= 0.5 * param_bytes, (ours, with_optax, param_bytes)
