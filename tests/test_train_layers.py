"""``ppo.train_layers``: train states holding the decoder layers stacked (layer scan) or one array per layer
(unrolled loop) compute the same PPO update and the same old log-probs / values; only the per-layer programs are
free of the weight-slice copies that motivate them on a CPU. Checkpoints hold the stacked layout either way (a run
resumes in the other layout), and the rollout engine takes the per-layer parameters as they are."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from orz_jax.checkpoint import Checkpointer
from orz_jax.config import (ArchConfig, CheckpointConfig, ConfigError, OptimConfig, PPOConfig, RolloutConfig,
                            resolve_train_layers)
from orz_jax.models.layer_layout import PerLayerParams, stacked_tree
from orz_jax.models.transformer import CausalLM, Critic
from orz_jax.ppo.packing import pack_samples
from orz_jax.ppo.train import PPOFunctions, create_train_state

HIDDEN, INTER = 24, 40  # distinct dims: a layer's MLP weight is [24, 40] or [40, 24]
ARCH = ArchConfig(vocab_size=40, hidden_size=HIDDEN, intermediate_size=INTER, num_layers=3, num_heads=2,
                  num_kv_heads=1, initializer_range=0.3)
OPT = OptimConfig(lr=1e-3, warmup_steps=0)


def _buffer(seed=0, n=8, plen=4, rlen=6, pack_len=12):
    rng = np.random.default_rng(seed)
    mask = (np.arange(rlen)[None] < rng.integers(2, rlen + 1, n)[:, None]).astype(np.float32)
    batch, lay = pack_samples(rng.integers(1, ARCH.vocab_size, (n, plen)).astype(np.int32),
                              rng.integers(1, plen + 1, n),
                              rng.integers(1, ARCH.vocab_size, (n, rlen)).astype(np.int32), mask, pack_len=pack_len,
                              row_multiple=4, seed=seed)
    return batch, lay, mask, rng.integers(0, 2, n).astype(np.float32), np.arange(n) // 2


def _weight_slices(hlo: str) -> list[str]:
    """Instructions (fused or not) that produce a [hidden, inter] / [inter, hidden] float32 array from a slice:
    a layer's MLP weight copied out of the stack."""
    return [ln for ln in hlo.splitlines() if re.search(
        rf"= f32\[({HIDDEN},{INTER}|{INTER},{HIDDEN})\]\S* (dynamic-slice|slice|fusion)\(", ln) and "slice" in ln]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def models():
    return CausalLM(ARCH, remat="full", rngs=nnx.Rngs(0)), Critic(ARCH, remat="full", head_init_std=0.5,
                                                                  rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def stepped(models):
    """Both layouts through prepare_batch + 2 actor steps of 1-row micro-batches."""
    policy, critic = models
    batch, lay, mask, rewards, groups = _buffer()
    cfg = PPOConfig(actor=OPT, critic=OPT, actor_steps_per_batch=2, critic_steps_per_batch=1, micro_batch_rows=1,
                    pack_len=12)
    fns = PPOFunctions.build(cfg)
    out = {}
    for layers in ("stacked", "per_layer"):
        actor, crit = create_train_state(policy, OPT, layers=layers), create_train_state(critic, OPT, layers=layers)
        prepared = fns.prepare_batch(actor, crit, batch, lay.response_index, mask, rewards, groups)
        step = fns.actor_step.lower(actor, prepared).compile()
        actor, metrics = step(actor, prepared)
        out[layers] = dict(prepared=prepared, actor=actor, metrics=metrics, slices=_weight_slices(step.as_text()))
    return out


def test_per_layer_state_programs_equal_stacked(models, stepped):
    s, p = stepped["stacked"], stepped["per_layer"]
    assert isinstance(p["actor"].params, PerLayerParams) and not isinstance(s["actor"].params, PerLayerParams)
    assert len(s["slices"]) >= 3, s["slices"]  # gate, up, down sliced in the layer scan's body
    assert p["slices"] == [], p["slices"]
    for field in ("old_logprobs", "old_values", "advantages"):
        ref = np.asarray(getattr(s["prepared"], field))
        # the same float32 ops in the same order up to XLA's fusion choices: a few ulps of the largest entry
        np.testing.assert_allclose(np.asarray(getattr(p["prepared"], field)), ref, rtol=1e-5,
                                   atol=1e-5 * np.abs(ref).max())
    assert np.abs(np.asarray(s["prepared"].old_values)).max() > 0.1  # a real critic output, not zeros
    for k in s["metrics"]:
        np.testing.assert_allclose(np.asarray(p["metrics"][k]), np.asarray(s["metrics"][k]), rtol=1e-4, atol=1e-6,
                                   err_msg=k)
    # the per-layer state, stacked, is the stacked state: parameters and Adam moments, same tree
    per, ref = stacked_tree((p["actor"].params, p["actor"].opt_state)), (s["actor"].params, s["actor"].opt_state)
    assert jax.tree.structure(per) == jax.tree.structure(ref)
    start = _leaves(nnx.state(models[0], nnx.Param))
    assert max(np.abs(a - b).max() for a, b in zip(_leaves(ref[0]), start)) > 0.5 * OPT.lr  # Adam moved them
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(per[0])]
    for path, a, b, a0 in zip(paths, _leaves(per[0]), _leaves(ref[0]), start):
        if "k_bias" in path:
            # The key bias's exact gradient is 0 (softmax over the keys is invariant to adding q . b_k to every
            # score): in float32 it is rounding noise, which Adam normalises into steps of up to lr of either
            # sign, so no two programs need agree on it (the layouts differ by up to 1.2e-3 lr in a few entries,
            # depending on XLA's fusions). Both must keep within Adam's bound of lr per step instead.
            steps = int(s["actor"].step)
            assert max(np.abs(a - a0).max(), np.abs(b - a0).max()) <= steps * OPT.lr * (1 + 1e-3), path
            continue
        # Adam moves each weight by <= ~lr per step: agree to 0.1% of that
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * OPT.lr, err_msg=path)
    for a, b in zip(_leaves(per[1]), _leaves(ref[1])):  # Adam moments: to float32 rounding
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * OPT.lr)
    # TrainState.module() gives the stacked model either way
    for st, want in ((p["actor"], per[0]), (s["actor"], ref[0])):
        for a, b in zip(_leaves(nnx.state(st.module(), nnx.Param)), _leaves(want)):
            np.testing.assert_array_equal(a, b)


def test_checkpoints_are_stacked_and_resume_in_either_layout(tmp_path, models, stepped):
    """A per-layer run's checkpoint holds the stacked layout: it restores into a per-layer state and into a stacked
    one (a CPU run resuming on a TPU), parameters and optimizer moments exact."""
    per = stepped["per_layer"]["actor"]
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(async_save=False))
    ck.save(3, per, None, {"next_index": 1}, {"iteration": 3})
    ck.wait()
    want = _leaves(stacked_tree((per.params, per.opt_state)))
    for layers in ("per_layer", "stacked"):
        fresh = create_train_state(models[0], OPT, layers=layers)
        got, _, _, meta = ck.restore(3, fresh, None)
        assert meta["iteration"] == 3 and int(got.step) == 2
        assert isinstance(got.params, PerLayerParams) == (layers == "per_layer")
        assert jax.tree.structure(got.params) == jax.tree.structure(fresh.params)
        for a, b in zip(_leaves(stacked_tree((got.params, got.opt_state))), want):
            np.testing.assert_array_equal(a, b)
        # the trainer's model.init_from_run reads the parameters alone, through a checkpointer of its own
        src = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(async_save=False))
        params, _, _ = src.restore_params(3, fresh, None)
        src.close()
        assert jax.tree.structure(params) == jax.tree.structure(fresh.params)
        for a, b in zip(_leaves(stacked_tree(params)), want):
            np.testing.assert_array_equal(a, b)
    ck.close()


def test_engine_serves_per_layer_train_params(models, stepped):
    """The trainer syncs ``actor.params`` as they are: a per-layer float32 state is shared by a per-layer float32
    engine (no copy), and serves the tokens its stacked form serves."""
    from orz_jax.rollout import RolloutEngine, generate_rollouts
    from orz_jax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=HIDDEN, intermediate_size=INTER, num_layers=3,
                      num_heads=2, num_kv_heads=1, initializer_range=0.5)
    actor = create_train_state(CausalLM(arch, rngs=nnx.Rngs(3)), OPT, layers="per_layer")
    cfg = RolloutConfig(temperature=0.0, max_prompt_len=8, prefill_buckets=[8], max_response_len=5,
                        max_concurrent_decodes=2, stop_strings=[], serving_layers="per_layer")
    eng = RolloutEngine(actor.module(), cfg, tok)
    prompts = [tok.encode(t) for t in ("1+2=", "hello")]
    first = generate_rollouts(eng, prompts, 1, 0, cfg).response_ids.tolist()
    eng.update_params(actor.params)
    assert all(a is b for a, b in zip(jax.tree.leaves(eng.params), jax.tree.leaves(actor.params)))  # shared
    assert generate_rollouts(eng, prompts, 1, 0, cfg).response_ids.tolist() == first
    # a wrong shape in one layer is named: layer 1's MLP up-projection transposed
    bad = actor.params.replace(layers=tuple(
        jax.tree_util.tree_map_with_path(lambda path, x: x.T if i == 1 and "'up'" in jax.tree_util.keystr(path) else x,
                                         layer) for i, layer in enumerate(actor.params.layers)))
    with pytest.raises(ValueError, match=r"update_params: \.layers\[1\].*'up'.* is float32\[40, 24\], the served "
                                         r"policy has float32\[24, 40\]"):
        eng.update_params(bad)


def test_train_layers_resolution_and_errors():
    assert resolve_train_layers("auto", "cpu") == "per_layer"
    assert resolve_train_layers("auto", "tpu") == "stacked"
    assert resolve_train_layers("auto", "gpu") == "stacked"
    assert resolve_train_layers("auto", "cpu", "in_place") == "stacked"  # the in-place sum scans the stack
    assert resolve_train_layers("stacked", "cpu") == "stacked"
    with pytest.raises(ConfigError, match=r"ppo\.train_layers: 'per_layer' cannot run with .*in_place"):
        resolve_train_layers("per_layer", "tpu", "in_place")
    with pytest.raises(ConfigError, match=r"ppo\.train_layers: must be one of"):
        resolve_train_layers("unrolled", "cpu")
    with pytest.raises(ValueError, match=r"train state layers must be 'stacked' or 'per_layer'"):
        create_train_state(CausalLM(ARCH, rngs=nnx.Rngs(0)), OPT, layers="auto")
