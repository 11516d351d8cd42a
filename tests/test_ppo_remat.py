"""The packed forwards of ``prepare_batch`` with a remat'd model (every ORZ config sets model.remat: full).

They once merged the module outside their ``lax.map`` and flax refused the remat'd layers
(TraceContextError), which only the first ``prepare_batch`` after a whole rollout would have shown.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from orz_jax.config import load_config
from orz_jax.models.build import create_model
from orz_jax.ppo.packing import PackedBatch
from orz_jax.ppo.train import PPOFunctions, create_train_state


def test_packed_forwards_with_remat_match_no_remat():
    cfg = load_config(None, ["model.arch={vocab_size: 64, hidden_size: 32, intermediate_size: 64, num_layers: 1, "
                             "num_heads: 4, num_kv_heads: 2}", "model.tokenizer=unused", "ppo.micro_batch_rows=2",
                             "ppo.pack_len=16", "rollout.max_prompt_len=8", "rollout.max_response_len=8",
                             "rollout.prefill_buckets=[8]", "model.critic_head_init_std=0.1"])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 64, (4, 16)), jnp.int32)
    positions = jnp.tile(jnp.arange(16, dtype=jnp.int32), (4, 1))
    ones = jnp.ones((4, 16), jnp.float32)
    batch = PackedBatch(tokens, positions, jnp.ones((4, 16), jnp.int32), ones, *[jnp.zeros((4, 16))] * 4)
    out = {}
    for remat in ("none", "full"):
        mcfg = dataclasses.replace(cfg.model, remat=remat)
        actor = create_train_state(create_model("policy", cfg.model.arch, mcfg, seed=0), cfg.ppo.actor)
        critic = create_train_state(create_model("critic", cfg.model.arch, mcfg, seed=1), cfg.ppo.critic)
        fns = PPOFunctions.build(cfg.ppo)
        out[remat] = (np.asarray(fns.compute_logprobs(actor, batch)), np.asarray(fns.compute_values(critic, batch)))
    # remat recomputes the same float32 forward: equal to rounding (1e-6 relative is float32's noise floor here)
    for a, b in zip(out["none"], out["full"]):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    assert np.abs(out["none"][1]).max() > 0 and np.all(out["none"][0][:, 1:] < 0)  # column 0 starts a row: no log-prob
