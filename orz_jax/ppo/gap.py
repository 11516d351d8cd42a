"""Sampler-vs-trainer log-prob gap: the rollout engine's sampling log-probs against the trainer's
recomputed old log-probs, over response tokens.

ORZ recomputes the old log-probs with the trainer's forward (so does ``prepare_batch``). The engine
returns the log-probs it sampled with too; with temperature 1 and no top-k / top-p truncation both are
log pi_old(token), so the gap is rounding (serving dtype, decode vs full-sequence kernels). A bad weight
sync or a serving-copy bug makes the engine sample from another policy, and the gap jumps at once.
With truncated sampling the gap is large by design but steady: :class:`GapMonitor` warns on a jump
against the run's own history, not on a fixed level.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import jax
import jax.numpy as jnp

from orz_jax.ppo.packing import unpack_response

log = logging.getLogger(__name__)


@jax.jit
def sampler_gap(old_logprobs: jax.Array, response_index: jax.Array, sampler_logprobs: jax.Array,
                response_mask: jax.Array) -> dict[str, jax.Array]:
    """Mean and max |trainer - sampler| log-prob over response tokens.

    Args:
      old_logprobs: [rows, pack_len] float32, token-aligned (``PackedBatch.old_logprobs``).
      response_index: [n, max_response_len] int32, the packer's map from responses to packed cells.
      sampler_logprobs: [n, max_response_len] float32 (``RolloutBatch.logprobs``).
      response_mask: [n, max_response_len] {0, 1}.
    Returns:
      {"rollout/logprob_gap_mean": [] float32, "rollout/logprob_gap_max": [] float32}.
    """
    trainer = unpack_response(old_logprobs, response_index)  # [n, max_response_len]
    m = response_mask.astype(jnp.float32)
    d = jnp.abs(trainer - sampler_logprobs.astype(jnp.float32)) * m
    return {"rollout/logprob_gap_mean": jnp.sum(d) / jnp.maximum(jnp.sum(m), 1.0),
            "rollout/logprob_gap_max": jnp.max(d, initial=0.0)}


@dataclasses.dataclass
class GapMonitor:
    """Warns when an iteration's mean gap jumps above ``factor`` x its running average (an EMA over the
    previous iterations) and above ``floor`` nats (so rounding noise near 0 never warns)."""

    factor: float = 4.0
    floor: float = 1e-3
    decay: float = 0.7
    ema: Optional[float] = None

    def update(self, gap_mean: float, iteration: Optional[int] = None) -> bool:
        """Record one iteration's mean gap; returns True (and logs a warning) on a jump."""
        jumped = self.ema is not None and gap_mean > max(self.factor * self.ema, self.floor)
        if jumped:
            log.warning("iteration %s: sampler-vs-trainer log-prob gap jumped to %.3g nats (running average %.3g): "
                        "the rollout engine may be serving stale or wrong weights", iteration, gap_mean, self.ema)
        self.ema = gap_mean if self.ema is None else self.decay * self.ema + (1 - self.decay) * gap_mean
        return jumped
