"""PPO update for ORZ: advantages, losses, sequence packing and the jitted actor / critic steps.

Data flow for one rollout buffer::

    batch, layout = pack_samples(prompt_ids, prompt_lens, response_ids, response_mask, cfg.ppo.pack_len,
                                 row_multiple=required_row_multiple(cfg.ppo, mesh), seed=it)
    batch = fns.prepare_batch(actor, critic, batch, layout.response_index, response_mask, rewards, prompt_index)
    actor, actor_metrics = fns.actor_step(actor, batch)
    critic, critic_metrics = fns.critic_step(critic, batch)
"""

from orz_jax.ppo.advantages import (compute_advantages, gae, gae_unit, grpo_advantages, masked_normalize,
                                    terminal_rewards)
from orz_jax.ppo.losses import finalize_metrics, policy_loss, shift_right, token_logprobs, value_loss
from orz_jax.ppo.packing import PackedBatch, PackLayout, pack_response, pack_samples, unpack_response
from orz_jax.ppo.train import (PPOFunctions, TrainState, create_train_state, lr_schedule, make_optimizer,
                               required_row_multiple, train_state_shardings)

__all__ = [
    "compute_advantages", "gae", "gae_unit", "grpo_advantages", "masked_normalize", "terminal_rewards",
    "finalize_metrics", "policy_loss", "shift_right", "token_logprobs", "value_loss",
    "PackedBatch", "PackLayout", "pack_response", "pack_samples", "unpack_response",
    "PPOFunctions", "TrainState", "create_train_state", "lr_schedule", "make_optimizer", "required_row_multiple",
    "train_state_shardings",
]
