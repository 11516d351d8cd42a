"""Next-token sampling inside the jitted decode step: temperature, top-k, top-p, greedy.

The sampling distribution is built in the order Hugging Face ``generate`` uses: divide the logits by the
temperature, keep the ``top_k`` largest, then keep the smallest set of the remaining tokens whose
(renormalised) probability mass reaches ``top_p``. Tokens outside the kept set get log-prob ``-inf``.

Log-probs returned with each sampled token are those of this *final* distribution (after temperature and
truncation, renormalised). PPO uses them as the old policy's log-probs; with temperature 1, top_p 1 and
top_k 0 they are exactly the policy's ``log_softmax(logits)``. Greedy decoding (temperature 0) has no
proper distribution (it is a point mass); there we return the untempered ``log_softmax(logits)`` at the
argmax, which is the policy's own log-prob of the chosen token.

Ties at the top-k / top-p threshold are all kept (the threshold is a value, not a count), so the support
may exceed ``top_k`` when several logits are exactly equal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static (hashable) sampling settings: each distinct value compiles the decode step once."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, cfg) -> "SamplingParams":
        """From a ``RolloutConfig`` (or anything with temperature / top_p / top_k)."""
        return cls(temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=int(cfg.top_k))


def sampling_logprobs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Log-probs of the sampling distribution.

    logits: [batch, vocab] float -> [batch, vocab] float32, ``-inf`` outside the kept support. For greedy
    params this is the untempered ``log_softmax(logits)`` (see the module docstring).
    """
    x = logits.astype(jnp.float32)
    if params.greedy:
        return jax.nn.log_softmax(x, axis=-1)
    x = x / params.temperature
    vocab = x.shape[-1]
    use_k = 0 < params.top_k < vocab
    if use_k or params.top_p < 1.0:
        # Candidates in descending order: the top-k values if top-k is on, else the whole sorted vocab.
        if use_k:
            cand = jax.lax.top_k(x, params.top_k)[0]  # [batch, k] descending
            x = jnp.where(x < cand[:, -1:], -jnp.inf, x)
        else:
            cand = -jnp.sort(-x, axis=-1)  # [batch, vocab] descending
        if params.top_p < 1.0:
            cand_logp = jax.nn.log_softmax(cand, axis=-1)  # renormalised over the (top-k) candidates
            cand_p = jnp.exp(cand_logp)
            mass_before = jnp.cumsum(cand_p, axis=-1) - cand_p  # [batch, n_cand] mass of strictly better tokens
            keep = mass_before < params.top_p  # the first candidate always has mass_before == 0 < top_p
            n_keep = jnp.sum(keep, axis=-1, keepdims=True)  # [batch, 1] >= 1
            threshold = jnp.take_along_axis(cand, n_keep - 1, axis=-1)  # smallest kept logit
            x = jnp.where(x < threshold, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row.

    logits: [batch, vocab]; keys: [batch] typed PRNG keys (one per row, so a row's draw does not depend on
    which other rows share the batch). Returns (tokens [batch] int32, logprobs [batch] float32), the
    log-prob of each drawn token under :func:`sampling_logprobs`.
    """
    logp = sampling_logprobs(logits, params)  # [batch, vocab]
    if params.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        tokens = jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logp).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
