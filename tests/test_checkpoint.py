"""Whole-state orbax checkpoints: the critic (value head included) and optimizer states round-trip,
and an interrupted save never hides the previous checkpoint."""

from __future__ import annotations

import os

import jax
import numpy as np

from orz_jax.checkpoint import Checkpointer
from orz_jax.config import ArchConfig, CheckpointConfig, ModelConfig, OptimConfig
from orz_jax.models.build import create_model
from orz_jax.ppo.train import create_train_state

ARCH = ArchConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2)


def _states(seed):
    actor = create_train_state(create_model("policy", ARCH, ModelConfig(arch=ARCH), seed=seed), OptimConfig())
    critic = create_train_state(create_model("critic", ARCH, ModelConfig(arch=ARCH, critic_head_init_std=0.5),
                                             seed=seed + 1), OptimConfig())
    return actor, critic


def _leaves(x):
    return [np.asarray(v) for v in jax.tree.leaves(x)]


def test_critic_value_head_and_optimizer_state_round_trip(tmp_path):
    actor, critic = _states(0)
    # make the optimizer state non-trivial
    critic = critic.replace(opt_state=jax.tree.map(lambda x: x + 0.25 if x.dtype == np.float32 else x,
                                                   critic.opt_state), step=critic.step + 7)
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(async_save=True))
    ck.save(5, actor, critic, {"next_index": 11}, {"iteration": 5})
    ck.close()

    other_actor, other_critic = _states(100)  # different values, same structure
    assert not np.array_equal(np.asarray(other_critic.params["value_head"].value),
                              np.asarray(critic.params["value_head"].value))
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig())
    assert ck.latest_step() == 5
    a, c, data, meta = ck.restore(5, other_actor, other_critic)
    ck.close()
    assert data == {"next_index": 11} and meta == {"iteration": 5}
    np.testing.assert_array_equal(np.asarray(c.params["value_head"].value), np.asarray(critic.params["value_head"].value))
    for got, want in zip(_leaves((a.params, a.opt_state, c.params, c.opt_state, c.step)),
                         _leaves((actor.params, actor.opt_state, critic.params, critic.opt_state, critic.step))):
        np.testing.assert_array_equal(got, want)


def test_unfinished_save_is_ignored(tmp_path):
    actor, critic = _states(0)
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig(async_save=False))
    ck.save(2, actor, critic, {"next_index": 1}, {"iteration": 2})
    ck.close()
    # what a kill -9 in the middle of the next save leaves behind: orbax's temporary step directory
    os.makedirs(tmp_path / "ck" / "4.orbax-checkpoint-tmp-1234" / "actor")
    ck = Checkpointer(str(tmp_path / "ck"), CheckpointConfig())
    assert ck.latest_step() == 2
    _, _, data, meta = ck.restore(2, actor, critic)
    assert meta["iteration"] == 2
    ck.close()
