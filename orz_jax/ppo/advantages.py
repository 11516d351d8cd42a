"""Advantage estimators over per-sample response arrays.

All functions take response-aligned arrays ``[n, resp_len]`` (sample ``i``, response token ``t``)
with a ``mask`` that is 1 on generated tokens (including the stop token) and 0 on padding. Prompt
tokens never appear here: the packed training batch is built from these arrays afterwards
(``orz_jax.ppo.packing``), so padding and prompts contribute nothing by construction.

ORZ facts: the reward is terminal (placed at the last response token), gamma = lambda = 1, so the
advantage of token ``t`` is ``R - V(s_t)`` and its return is ``R``; advantages are then normalised
with one mean/std over every valid token of the rollout buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from orz_jax.config import PPOConfig

NORM_EPS = 1e-8  # added to the std so a constant-advantage buffer does not divide by zero


def terminal_rewards(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Place each sample's scalar reward on its last valid response token.

    Args:
      rewards: [n] float, one reward per sample.
      mask:    [n, resp_len] {0,1}, 1 on response tokens.
    Returns:
      token_rewards: [n, resp_len] float32, zero everywhere except the last masked token of each row
      (rows with no valid token get nothing).
    """
    mask = mask.astype(jnp.float32)
    resp_len = mask.shape[1]
    idx = jnp.arange(resp_len)
    last = jnp.max(jnp.where(mask > 0, idx[None, :], -1), axis=1)  # [n], -1 for empty rows
    onehot = (idx[None, :] == last[:, None]).astype(jnp.float32)  # [n, resp_len]
    return onehot * rewards.astype(jnp.float32)[:, None]


def gae(token_rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Masked generalised advantage estimation, a backward ``lax.scan`` over response tokens.

    Masked tokens are skipped: they get advantage 0 and leave the running (next value, next
    advantage) carry untouched, so right padding acts as the terminal state (carry starts at 0) and
    a hole in the mask joins its neighbours as if it were not there.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_{t+1} = 0 after the last valid token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        return_t = A_t + V_t

    Args:
      token_rewards: [n, resp_len] float, e.g. from :func:`terminal_rewards`.
      values:        [n, resp_len] float, V(s_t) for each response token.
      mask:          [n, resp_len] {0,1}.
      gamma, lam:    discount and GAE lambda (Python floats; static).
    Returns:
      (advantages, returns): both [n, resp_len] float32, zero where mask == 0.
    """
    m = mask.astype(jnp.float32)
    r = token_rewards.astype(jnp.float32) * m
    v = values.astype(jnp.float32) * m

    def step(carry, xs):
        next_v, next_a = carry  # [n], [n]
        r_t, v_t, m_t = xs  # [n] each
        delta = r_t + gamma * next_v - v_t
        a_t = delta + gamma * lam * next_a
        new_carry = (jnp.where(m_t > 0, v_t, next_v), jnp.where(m_t > 0, a_t, next_a))
        return new_carry, a_t * m_t

    n = r.shape[0]
    init = (jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    # Scan over time: time-major [resp_len, n], reversed.
    _, adv_tm = jax.lax.scan(step, init, (r.T, v.T, m.T), reverse=True)
    adv = adv_tm.T  # [n, resp_len]
    returns = (adv + v) * m
    return adv, returns


def gae_unit(token_rewards: jax.Array, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Closed form of :func:`gae` at gamma = lambda = 1: return_t = sum of rewards at and after t,
    advantage_t = return_t - V_t. Shapes as in :func:`gae`."""
    m = mask.astype(jnp.float32)
    r = token_rewards.astype(jnp.float32) * m
    returns = jnp.flip(jnp.cumsum(jnp.flip(r, axis=1), axis=1), axis=1) * m  # reverse cumulative sum
    adv = (returns - values.astype(jnp.float32)) * m
    return adv, returns


def masked_normalize(x: jax.Array, mask: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """(x - mean) / (std + eps) with one mean and (population) std over every masked element of the
    whole array (the whole rollout buffer, not per sample). Masked-out entries come back as 0.

    Args: x [...] float, mask [...] {0,1} of the same shape. Returns: [...] float32.
    """
    m = mask.astype(jnp.float32)
    x = x.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x * m) / count
    var = jnp.sum(jnp.square(x - mean) * m) / count
    return (x - mean) / (jnp.sqrt(var) + eps) * m


def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, mask: jax.Array, divide_by_std: bool = True
                    ) -> tuple[jax.Array, jax.Array]:
    """GRPO estimator: each sample's reward minus its prompt group's mean, divided by the group's
    population std when that std is > 0 (a group with identical rewards gets advantage 0), broadcast
    over the sample's response tokens.

    ``divide_by_std=False`` is ORZ's own GRPO baseline (``ppo.advantage_estimator: grpo_mean_only``): its
    code subtracts the group mean and, through an operator-precedence slip, never divides by the group
    std. This reproduces what that code does (the group-mean baseline alone), for comparison with ORZ's
    PPO-vs-GRPO figure; ``grpo`` is the estimator as intended (see docs/ppo_vs_grpo/README.md).

    Args:
      rewards:   [n] float.
      group_ids: [n] int, equal for samples of the same prompt (any integers; remapped internally).
      mask:      [n, resp_len] {0,1}.
      divide_by_std: False: the group-mean baseline only.
    Returns:
      (advantages, returns): [n, resp_len] float32; ``returns`` is the reward on every valid token
      (GRPO has no critic; it is there so the batch layout is the same as for GAE).
    """
    n = rewards.shape[0]
    r = rewards.astype(jnp.float32)
    _, gid = jnp.unique(group_ids, return_inverse=True, size=n)  # dense ids in [0, n)
    gid = gid.reshape(n)
    count = jax.ops.segment_sum(jnp.ones_like(r), gid, num_segments=n)  # [n groups]
    mean = jax.ops.segment_sum(r, gid, num_segments=n) / jnp.maximum(count, 1.0)
    centered = r - mean[gid]  # [n]
    var = jax.ops.segment_sum(jnp.square(centered), gid, num_segments=n) / jnp.maximum(count, 1.0)
    std = jnp.sqrt(var)[gid]
    if divide_by_std:
        adv = jnp.where(std > 0, centered / jnp.where(std > 0, std, 1.0), centered)  # [n]
    else:
        adv = centered  # [n]
    m = mask.astype(jnp.float32)
    return adv[:, None] * m, r[:, None] * m


def compute_advantages(cfg: PPOConfig, rewards: jax.Array, values: jax.Array, mask: jax.Array,
                       group_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dispatch on ``cfg.advantage_estimator`` and apply the optional global normalisation.

    Args:
      rewards:   [n] float, one scalar reward per sample.
      values:    [n, resp_len] float, critic values V(s_t) (ignored by GRPO).
      mask:      [n, resp_len] {0,1} response mask.
      group_ids: [n] int, prompt group of each sample (used by GRPO only).
    Returns:
      (advantages, returns): [n, resp_len] float32, zero where mask == 0.
    """
    if cfg.advantage_estimator == "gae":
        tok_r = terminal_rewards(rewards, mask)
        if cfg.gamma == 1.0 and cfg.lam == 1.0:
            adv, ret = gae_unit(tok_r, values, mask)
        else:
            adv, ret = gae(tok_r, values, mask, cfg.gamma, cfg.lam)
    elif cfg.advantage_estimator in ("grpo", "grpo_mean_only"):
        adv, ret = grpo_advantages(rewards, group_ids, mask, divide_by_std=cfg.advantage_estimator == "grpo")
    else:
        raise ValueError(f"ppo.advantage_estimator: unknown estimator {cfg.advantage_estimator!r}")
    if cfg.normalize_advantages:
        adv = masked_normalize(adv, mask)
    return adv, ret
