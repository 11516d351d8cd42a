"""Sampler-vs-trainer log-prob gap: hand numbers, the jump warning, and a real rollout whose weight sync is
broken on purpose (the engine keeps serving other weights than the trainer's)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from orz_jax.config import ArchConfig, MeshConfig, ModelConfig, PPOConfig, RolloutConfig
from orz_jax.models.build import create_model
from orz_jax.ppo.gap import GapMonitor, sampler_gap
from orz_jax.ppo.packing import pack_samples
from orz_jax.ppo.train import PPOFunctions, create_train_state
from orz_jax.rollout import RolloutEngine, generate_rollouts
from orz_jax.sharding import make_mesh
from orz_jax.tokenizer import CharTokenizer


def test_sampler_gap_hand_numbers():
    old = jnp.asarray([[0.0, -1.0, -2.0, -3.0], [0.0, 0.0, -0.5, -0.25]])  # [rows, pack_len]
    index = jnp.asarray([[1, 2, 3], [6, 7, 8]])  # sample 1's third token is past the end (8 = rows * pack_len)
    sampler = jnp.asarray([[-1.5, -2.0, -2.0], [-0.5, -0.5, 9.0]])
    mask = jnp.asarray([[1, 1, 1], [1, 1, 0]])
    got = sampler_gap(old, index, sampler, mask)
    # |d| = 0.5, 0, 1.0 | 0, 0.25 (masked 9.0 ignored): mean 1.75 / 5, max 1.0
    np.testing.assert_allclose(float(got["rollout/logprob_gap_mean"]), 1.75 / 5, rtol=1e-6)
    np.testing.assert_allclose(float(got["rollout/logprob_gap_max"]), 1.0, rtol=1e-6)


def test_gap_monitor_warns_on_jumps_only(caplog):
    mon = GapMonitor()
    with caplog.at_level(logging.WARNING, logger="orz_jax.ppo.gap"):
        assert not any(mon.update(g, i) for i, g in enumerate([2e-4, 3e-4, 1e-4, 8e-4]))  # below the floor
        steady = GapMonitor()
        assert not any(steady.update(g, i) for i, g in enumerate([0.3, 0.35, 0.28, 0.4]))  # truncated sampling
        assert steady.update(2.0, 4)
    assert len(caplog.records) == 1 and "jumped to 2 nats" in caplog.records[0].getMessage()


def test_broken_weight_sync_makes_the_gap_jump():
    tok = CharTokenizer()
    arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, initializer_range=0.5, rope_theta=1000.0)
    mesh = make_mesh(MeshConfig())
    policy = create_model("policy", arch, ModelConfig(arch=arch), mesh, seed=0)
    # temperature 1, no truncation: the sampler's log-probs are the policy's own
    rcfg = RolloutConfig(driver="batched", temperature=1.0, max_prompt_len=8, prefill_buckets=[8],
                         max_response_len=8, max_concurrent_decodes=8, stop_strings=[], long_prompt="error")
    engine = RolloutEngine(policy, rcfg, tok, seed=0)
    ppo = PPOConfig(micro_batch_rows=2, pack_len=16)
    actor = create_train_state(policy, ppo.actor, mesh)
    fns = PPOFunctions.build(ppo, mesh, actor)
    prompts = [tok.encode(p) for p in ("1+2=", "hello", "x*y")]
    mon = GapMonitor()

    def gap(seed):
        ro = generate_rollouts(engine, prompts, 2, seed, rcfg)
        packed, layout = pack_samples(ro.prompt_ids, ro.prompt_lens, ro.response_ids, ro.response_mask,
                                      ppo.pack_len, row_multiple=2)
        packed = fns.prepare_batch(actor, None, packed, layout.response_index, ro.response_mask,
                                   np.zeros(ro.num_samples, np.float32), ro.prompt_index)
        g = {k: float(v) for k, v in sampler_gap(packed.old_logprobs, layout.response_index, ro.logprobs,
                                                 ro.response_mask).items()}
        return g, mon.update(g["rollout/logprob_gap_mean"], seed)

    synced = [gap(seed) for seed in (0, 1)]
    for g, jumped in synced:
        # decode and full forward agree to float32 rounding (test_rollout pins them at 2e-5 per token)
        assert g["rollout/logprob_gap_max"] < 1e-4 and not jumped, g
    # Break the sync: the engine serves perturbed weights while the trainer keeps its own.
    noise = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(7), p.shape, p.dtype),
                         jax.tree.map(jnp.copy, actor.params))
    engine.update_params(noise)
    g, jumped = gap(2)
    assert g["rollout/logprob_gap_mean"] > 0.05 and jumped, g
