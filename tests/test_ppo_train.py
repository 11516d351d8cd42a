"""PPO update on a tiny model: value/log-prob alignment, packed == unpacked, padding invariance,
gradient accumulation == one big step, mini-batch steps, compile-once, and (in a subprocess with 8
fake CPU devices) sharded steps == the single-device step."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from orz_jax.config import ArchConfig, OptimConfig, PPOConfig
from orz_jax.models.transformer import CausalLM, Critic
from orz_jax.ppo.packing import PackedBatch, pack_response, pack_samples, unpack_response
from orz_jax.ppo.train import (PPOFunctions, accumulate_gradients, actor_loss, create_train_state, critic_loss,
                               required_row_multiple)

ARCH = ArchConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
P, R, N = 5, 7, 8  # max prompt len, max response len, samples


def make_models(seed=0):
    pol = CausalLM(ARCH, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", rngs=nnx.Rngs(seed))
    cri = Critic(ARCH, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", head_init_std=0.5,
                 rngs=nnx.Rngs(seed + 1))
    return pol, cri


def make_rollout(seed=0):
    rng = np.random.default_rng(seed)
    plens = rng.integers(1, P + 1, N)
    rlens = rng.integers(1, R + 1, N)
    prompt_ids = rng.integers(1, ARCH.vocab_size, (N, P)).astype(np.int32)
    response_ids = rng.integers(1, ARCH.vocab_size, (N, R)).astype(np.int32)
    mask = (np.arange(R)[None] < rlens[:, None]).astype(np.float32)
    per_sample = {k: (rng.normal(size=(N, R)) * s + o).astype(np.float32) * mask
                  for k, s, o in (("old_logprobs", 0.3, -3.5), ("old_values", 1.0, 0.0), ("advantages", 1.0, 0.0),
                                  ("returns", 1.0, 0.5))}
    return prompt_ids, plens, response_ids, mask, per_sample


def fill(batch, layout, per_sample):
    """Place per-sample response quantities into a packed batch."""
    rows, L = batch.tokens.shape
    idx = jnp.asarray(layout.response_index)
    return batch.replace(**{k: pack_response(jnp.asarray(v), idx, rows, L) for k, v in per_sample.items()})


def unpacked(prompt_ids, plens, response_ids, mask, per_sample):
    """Reference layout built by hand (not by the packer): one right-padded sample per row of P + R."""
    L = P + R
    tokens, positions, seg, lm = (np.zeros((N, L), np.int32) for _ in range(4))
    index = np.full((N, R), N * L, np.int32)
    for i in range(N):
        p, q = int(plens[i]), int(mask[i].sum())
        tokens[i, :p + q] = np.concatenate([prompt_ids[i, :p], response_ids[i, :q]])
        positions[i, :p + q] = np.arange(p + q)
        seg[i, :p + q] = 1
        lm[i, p:p + q] = 1
        index[i, :q] = i * L + p + np.arange(q)
    z = np.zeros((N, L), np.float32)
    b = PackedBatch(tokens=tokens, positions=positions, segment_ids=seg, loss_mask=lm.astype(np.float32),
                    old_logprobs=z, old_values=z, advantages=z, returns=z)
    b = b.replace(**{k: pack_response(jnp.asarray(v), jnp.asarray(index), N, L) for k, v in per_sample.items()})
    return b, index


def packed(prompt_ids, plens, response_ids, mask, per_sample, pack_len=16, row_multiple=1, seed=0):
    b, lay = pack_samples(prompt_ids, plens, response_ids, mask, pack_len=pack_len, row_multiple=row_multiple,
                          seed=seed)
    return fill(b, lay, per_sample), lay


def tree_close(a, b, rtol=1e-5, scale_atol=1e-6, atol=None):
    """Leafwise allclose. float32 sums taken in a different order differ by a few ulps of the largest
    *terms*, so by default the absolute tolerance scales with each reference leaf's largest entry."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        y = np.asarray(y)
        tol = atol if atol is not None else scale_atol * float(np.abs(y).max(initial=0.0))
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=tol)


@pytest.fixture(scope="module")
def setup():
    pol, cri = make_models()
    data = make_rollout()
    return pol, cri, data


def _grads(model, loss_fn, batch, n_micro, cfg=PPOConfig()):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(params, rest, batch):
        return accumulate_gradients(loss_fn, params, rest, graphdef, batch, n_micro, None, cfg)

    return f(params, rest, batch)


# ---------------------------------------------------------------------------------------------- alignment


def test_prepare_batch_alignment_and_orz_advantages(setup):
    """prepare_batch's packed forwards == a plain forward over one right-padded sample per row, reading
    response token j's log-prob and value at position prompt_len + j - 1; ORZ advantages R - V and
    returns R land on the response tokens and nowhere else."""
    pol, cri, (prompt_ids, plens, response_ids, mask, _) = setup
    cfg = PPOConfig(micro_batch_rows=2, pack_len=16, normalize_advantages=False)
    batch, lay = packed(prompt_ids, plens, response_ids, mask, {}, row_multiple=2)
    fns = PPOFunctions.build(cfg)
    a, c = create_train_state(pol, cfg.actor), create_train_state(cri, cfg.critic)
    rewards = np.arange(N, dtype=np.float32) % 2
    out = fns.prepare_batch(a, c, batch, lay.response_index, mask, rewards, np.arange(N) // 4)
    idx = jnp.asarray(lay.response_index)
    lp, vals = unpack_response(out.old_logprobs, idx), unpack_response(out.old_values, idx)

    ub, _ = unpacked(prompt_ids, plens, response_ids, mask, {})
    logits, _ = pol(jnp.asarray(ub.tokens), jnp.asarray(ub.positions), jnp.asarray(ub.segment_ids))
    logsm = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # [N, P + R, vocab]
    v = np.asarray(cri(jnp.asarray(ub.tokens), jnp.asarray(ub.positions), jnp.asarray(ub.segment_ids)))
    for i in range(N):
        p, q = int(plens[i]), int(mask[i].sum())
        for j in range(q):
            np.testing.assert_allclose(lp[i, j], logsm[i, p + j - 1, response_ids[i, j]], atol=2e-5, rtol=1e-5)
            np.testing.assert_allclose(vals[i, j], v[i, p + j - 1], atol=2e-5, rtol=1e-5)
        assert np.all(np.asarray(lp[i, q:]) == 0) and np.all(np.asarray(vals[i, q:]) == 0)
    assert np.abs(np.asarray(vals)).max() > 0.1  # the critic head is not ~0, so the check has teeth
    np.testing.assert_allclose(unpack_response(out.returns, idx), rewards[:, None] * mask, atol=1e-6)
    np.testing.assert_allclose(unpack_response(out.advantages, idx), (rewards[:, None] - vals) * mask, atol=1e-6)
    off = np.asarray(batch.loss_mask) == 0
    for field in ("old_logprobs", "old_values", "advantages", "returns"):
        assert np.all(np.asarray(getattr(out, field))[off] == 0), field


# ---------------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("loss_fn", [actor_loss, critic_loss], ids=["actor", "critic"])
def test_packed_unpacked_padding_accumulation(setup, loss_fn):
    """Loss, metrics and gradients are the same for: one sample per row; packed rows; packed rows
    with garbage ids on padding slots and extra all-padding rows, accumulated over 2-row micro-batches."""
    pol, cri, data = setup
    model = pol if loss_fn is actor_loss else cri
    ub, _ = unpacked(*data)
    pb, lay = packed(*data, pack_len=16, row_multiple=1)
    assert lay.num_rows < N  # it really packed
    g_u, m_u = _grads(model, loss_fn, ub, 1)
    g_p, m_p = _grads(model, loss_fn, pb, 1)
    tree_close(m_u, m_p)
    tree_close(g_u, g_p)
    # garbage ids on padding slots + 2 all-padding rows, accumulated over 2-row micro-batches
    pad = np.asarray(pb.segment_ids) == 0
    assert pad.any()
    toks = np.where(pad, np.random.default_rng(1).integers(0, ARCH.vocab_size, pad.shape), np.asarray(pb.tokens))
    extra_rows = 2 + lay.num_rows % 2
    extra = jax.tree.map(lambda x: jnp.concatenate([jnp.asarray(x), jnp.zeros((extra_rows,) + x.shape[1:], x.dtype)]),
                         pb.replace(tokens=jnp.asarray(toks, jnp.int32)))
    extra = extra.replace(tokens=extra.tokens.at[-extra_rows:].set(7))
    g_x, m_x = _grads(model, loss_fn, extra, (lay.num_rows + extra_rows) // 2)
    tree_close(m_x, m_p)
    tree_close(g_x, g_p)


def test_actor_minibatch_steps_and_accumulation(setup):
    """2 optimizer steps of 1-row micro-batches == two 1-step updates with one micro-batch each on the
    interleaved halves of the rows; warmup lr; no recompilation on a second call."""
    pol, _, data = setup
    lr = 1e-3
    opt = OptimConfig(lr=lr, warmup_steps=2, weight_decay=0.1, eps=1e-4)  # eps: see SHARDED_CODE
    pb, lay = packed(*data, pack_len=16, row_multiple=4)
    rows = lay.num_rows
    cfg2 = PPOConfig(actor=opt, actor_steps_per_batch=2, micro_batch_rows=1, pack_len=16)
    s2, m2 = PPOFunctions.build(cfg2).actor_step(create_train_state(pol, opt), pb)
    f1 = PPOFunctions.build(dataclasses.replace(cfg2, actor_steps_per_batch=1, micro_batch_rows=rows // 2))
    s1 = create_train_state(pol, opt)
    ms = []
    for half in (0, 1):
        s1, m = f1.actor_step(s1, jax.tree.map(lambda x: x[half::2], pb))
        ms.append(m)
    assert f1.actor_step._cache_size() == 1  # second call, same shapes: no new compile
    assert int(s2.step) == int(s1.step) == 2
    # Adam moves each parameter by at most ~lr per step: agree to 0.1% of that
    tree_close(s2.params, s1.params, rtol=0, atol=1e-3 * lr)
    tree_close(m2, jax.tree.map(lambda a, b: (a + b) / 2, *ms))
    np.testing.assert_allclose(ms[0]["actor/lr"], lr / 2)  # warmup: step 0 uses lr / 2, step 1 the full lr
    np.testing.assert_allclose(ms[1]["actor/lr"], lr)
    before = jax.tree.leaves(create_train_state(pol, opt).params)
    assert max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(s2.params), before)) > 0.5 * lr


def test_critic_takes_configured_steps_and_row_errors(setup):
    """3 critic steps per buffer, here with bfloat16 parameters (the optimizer state keeps their dtype
    across the scanned steps); a row count that does not split fails with a clear message."""
    _, _, data = setup
    cri = Critic(ARCH, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat="none", head_init_std=0.5,
                 rngs=nnx.Rngs(5))
    cfg = PPOConfig(critic_steps_per_batch=3, micro_batch_rows=1, pack_len=16)
    assert required_row_multiple(cfg) == 3
    pb, lay = packed(*data, pack_len=16, row_multiple=required_row_multiple(cfg))
    fns = PPOFunctions.build(cfg)
    c = create_train_state(cri, cfg.critic)
    before = jax.tree.map(np.asarray, c.params)
    c, m = fns.critic_step(c, pb)
    assert int(c.step) == 3 and np.isfinite(float(m["critic/value_loss"]))
    assert {x.dtype for x in jax.tree.leaves(c.params)} == {jnp.dtype(jnp.bfloat16)}
    assert any(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(jax.tree.leaves(c.params), jax.tree.leaves(before)))
    c, _ = fns.critic_step(c, pb)
    assert fns.critic_step._cache_size() == 1
    # the steps donated the state, not the module it was made from
    assert np.isfinite(np.asarray(cri(pb.tokens[:1], pb.positions[:1], pb.segment_ids[:1]))).all()
    odd = jax.tree.map(lambda x: x[:lay.num_rows - 1], pb)
    with pytest.raises(ValueError, match="do not split into 3 optimizer steps"):
        fns.critic_step(c, odd)


# ---------------------------------------------------------------------------------------------- multi-device


def start_with_devices(code: str, n_devices: int = 8) -> subprocess.Popen:
    """Start ``code`` in a fresh python with ``n_devices`` fake CPU devices (XLA_FLAGS must be set before
    jax is imported, so this cannot happen in the pytest process, which has 1 device). The code prints
    one JSON line last; collect it with :func:`finish`."""
    env = dict(os.environ)
    # LLVM opt level 0 halves the CPU compile time of these tiny programs; results stay float32-exact
    # up to summation order, and every comparison is made within the subprocess.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}"
                        " --xla_backend_optimization_level=0").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def finish(proc: subprocess.Popen, timeout: int = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{out[-3000:]}\n{err[-6000:]}"
    return json.loads(out.strip().splitlines()[-1])


SHARDED_CODE = """
import json, numpy as np, jax, jax.numpy as jnp
from orz_jax.config import MeshConfig, OptimConfig, PPOConfig
from orz_jax.sharding import make_mesh
from orz_jax.ppo.train import PPOFunctions, create_train_state, required_row_multiple
from tests.test_ppo_train import make_models, make_rollout, packed

assert len(jax.devices()) == 8
# eps 1e-4: Adam's first step is lr * g / (|g| + eps), which for eps = 1e-8 turns float32 noise in a
# near-zero gradient entry into a visible parameter difference; a larger eps keeps the map smooth.
opt = OptimConfig(lr=1e-3, warmup_steps=0, eps=1e-4)
cfg = PPOConfig(actor=opt, critic=opt, critic_steps_per_batch=2, micro_batch_rows=8, pack_len=16)
data = make_rollout(3)
out = {}
for name, mesh_cfg in (("single", None), ("fsdp8", MeshConfig(fsdp=8)), ("fsdp4_tp2", MeshConfig(fsdp=4, tensor=2))):
    mesh = None if mesh_cfg is None else make_mesh(mesh_cfg)
    # 16 rows for every layout (micro-batches of 8 rows x 2 critic steps), so all runs see the same batch
    assert required_row_multiple(cfg, mesh) == 16
    pb, lay = packed(*data, pack_len=16, row_multiple=16)
    pol, cri = make_models()
    a, c = create_train_state(pol, opt, mesh), create_train_state(cri, opt, mesh)
    fns = PPOFunctions.build(cfg, mesh, a, c)
    rewards = (np.arange(len(lay.row)) % 3 == 0).astype(np.float32)
    prep = fns.prepare_batch(a, c, pb, lay.response_index, data[3], rewards, np.arange(len(lay.row)) // 4)
    prepared = {k: np.asarray(getattr(prep, k)).tolist() for k in ("old_logprobs", "old_values", "advantages")}
    a, ma = fns.actor_step(a, pb)
    c, mc = fns.critic_step(c, pb)
    res = {"params": [np.asarray(x).tolist() for x in jax.tree.leaves(a.params) + jax.tree.leaves(c.params)],
           "metrics": {k: float(v) for k, v in {**ma, **mc}.items()}, "prepared": prepared}
    if mesh is not None:
        split = [x for x in jax.tree.leaves(a.params) if x.sharding.shard_shape(x.shape) != x.shape]
        res["split"] = len(split)
        res["tensor_split"] = sum("tensor" in str(x.sharding.spec) for x in split) if mesh.shape["tensor"] > 1 else 0
        a, _ = fns.actor_step(a, pb)
        c, _ = fns.critic_step(c, pb)
        res["cache"] = [fns.actor_step._cache_size(), fns.critic_step._cache_size()]
    out[name] = res
print(json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def sharded_run():
    """Started before the first test of this module so its compiles overlap the in-process tests."""
    proc = start_with_devices(SHARDED_CODE)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_sharded_steps_equal_single_device(sharded_run):
    """prepare_batch (old log-probs, values, advantages), one actor step and one critic step (2
    mini-batches) on meshes fsdp=8 and fsdp=4 x tensor=2 == single device; parameters really are
    split; the second call does not recompile."""
    out = finish(sharded_run)
    ref = out["single"]
    for name in ("fsdp8", "fsdp4_tp2"):
        res = out[name]
        assert res["cache"] == [1, 1], f"{name} recompiled: {res['cache']}"
        assert res["split"] > 0
        assert (res["tensor_split"] > 0) == (name == "fsdp4_tp2")
        for k, v in ref["metrics"].items():
            np.testing.assert_allclose(res["metrics"][k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
        for k, v in ref["prepared"].items():
            np.testing.assert_allclose(res["prepared"][k], v, rtol=1e-5, atol=1e-5, err_msg=f"{name} prepare_batch {k}")
        # lr = 1e-3 and Adam moves a parameter by at most ~lr per step: agree to 0.1% of that
        for x, y in zip(res["params"], ref["params"]):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6, err_msg=name)
