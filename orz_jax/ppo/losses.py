"""PPO losses on token-aligned arrays.

Alignment convention (used by the whole ``orz_jax.ppo`` package): every per-token array is indexed
by the token it describes. ``logprobs[b, i]`` is log pi(tokens[b, i] | tokens[b, :i]), which comes
from the logits at position ``i - 1``; ``values[b, i]`` is V(s_i), the value of the state *before*
token ``i``, which the value head produces at position ``i - 1``. So the first response token's
log-prob and value come from the last prompt position. Index 0 of a row has no predecessor and is
always a prompt token or padding (loss mask 0), so the shift never leaks across packed samples.

Losses are sums over masked tokens divided by ``denom`` (the number of valid tokens of the whole
optimizer batch, not of the micro-batch), so summing losses and gradients over micro-batches gives
exactly the full-batch mean. Metrics follow the same rule (every entry is additive over
micro-batches); :func:`finalize_metrics` derives the non-additive ones (explained variance).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp


def shift_right(x: jax.Array) -> jax.Array:
    """[b, s, ...] -> [b, s, ...] with out[:, i] = x[:, i-1] and out[:, 0] = 0: turns
    "prediction at position i" into "about token i"."""
    pad = jnp.zeros_like(x[:, :1])
    return jnp.concatenate([pad, x[:, :-1]], axis=1)


def token_logprobs(logits: jax.Array, tokens: jax.Array, with_entropy: bool = False
                   ) -> tuple[jax.Array, Optional[jax.Array]]:
    """Token-aligned log-probs (and entropies) from next-token logits.

    Args:
      logits: [b, s, vocab] float (position i predicts token i+1).
      tokens: [b, s] int32.
      with_entropy: also return the entropy of each predictive distribution.
    Returns:
      logprobs: [b, s] float32, logprobs[:, i] = log softmax(logits[:, i-1])[tokens[:, i]], 0 at i = 0.
      entropy:  [b, s] float32 aligned the same way (entropy of the distribution token i was drawn
                from), or None.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, s]
    # Gather the logit of the *next* token at each position without materialising log_softmax.
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # [b, s]
    picked = jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]  # [b, s]
    logp = shift_right(picked - lse)
    ent = None
    if with_entropy:
        probs = jnp.exp(logits - lse[..., None])  # [b, s, vocab]
        ent = shift_right(lse - jnp.sum(probs * logits, axis=-1))
    return logp, ent


def chunked_token_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array, *, chunk: int,
                           with_entropy: bool = False, constrain_logits: Optional[Callable] = None,
                           vocab_major: bool = False, constrain_head: Optional[Callable] = None
                           ) -> tuple[jax.Array, Optional[jax.Array]]:
    """:func:`token_logprobs` of the logits ``hidden @ head`` without ever holding ``[b, s, vocab]``.

    A ``lax.scan`` over sequence chunks of ``chunk`` positions applies the LM head inside the chunk,
    so the largest live tensor is ``[b, chunk, vocab]``. Each chunk's body is rematerialised
    (``jax.checkpoint``): the backward pass recomputes the chunk's logits from its hidden states
    instead of keeping them, and the gradients are those of the full-logits computation.

    Args:
      hidden: [b, s, embed] final hidden states (any float dtype; position i predicts token i+1).
      head: [embed, vocab] LM head, or [vocab, embed] with ``vocab_major`` (a tied embedding as stored:
        a transposed copy would be materialised once per call, as large as the logits of a 1k-token row).
        Cast to ``hidden.dtype``; float32 accumulation, as ``CausalLM``.
      tokens: [b, s] int32.
      chunk: positions per chunk (the last one is padded); >= s computes one chunk.
      with_entropy: also return the token-aligned entropies.
      constrain_logits: optional sharding constraint applied to each chunk's [b, chunk, vocab] logits.
      constrain_head: optional sharding constraint applied to ``head`` (its stored layout) inside each chunk,
        before the cast to ``hidden.dtype``: the head's gradient then reaches that layout in float32 in every
        chunk and is summed over the chunks there (the sum of float32 casts of each chunk's gradient, as before).
    Returns:
      logprobs [b, s] float32 and entropy [b, s] float32 or None, aligned as :func:`token_logprobs`.
    """
    b, s = tokens.shape
    c = max(1, min(chunk, s))
    n = -(-s // c)
    pad = n * c - s
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # [b, s]
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        nxt = jnp.pad(nxt, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, c, hidden.shape[-1]).swapaxes(0, 1)  # [n, b, c, embed]
    ns = nxt.reshape(b, n, c).swapaxes(0, 1)  # [n, b, c]
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(h, nx):
        w = (head if constrain_head is None else constrain_head(head)).astype(hidden.dtype)
        logits = jnp.einsum("bce,ve->bcv" if vocab_major else "bce,ev->bcv", h, w,
                            preferred_element_type=jnp.float32)  # [b, c, vocab]
        if constrain_logits is not None:
            logits = constrain_logits(logits)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [b, c]
        picked = jnp.take_along_axis(logits, nx[..., None], axis=-1)[..., 0]  # [b, c]
        if not with_entropy:
            return picked - lse, None
        probs = jnp.exp(logits - lse[..., None])
        return picked - lse, lse - jnp.sum(probs * logits, axis=-1)

    _, (lp, ent) = jax.lax.scan(lambda carry, x: (carry, one(*x)), None, (hs, ns))  # [n, b, c] each
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * c)[:, :s]  # noqa: E731
    return shift_right(unchunk(lp)), (shift_right(unchunk(ent)) if with_entropy else None)


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                denom: jax.Array, *, clip_eps: float, kl_coef: float = 0.0, kl_estimator: str = "k3",
                entropy: Optional[jax.Array] = None, entropy_coef: float = 0.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate, averaged over valid tokens (sum / ``denom``).

        ratio = exp(logp - old_logp)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
              + kl_coef * KL_est - entropy_coef * entropy

    The optional KL term is an ablation only (ORZ uses none). There is no reference model, so it is
    measured against the *old* (sampling) policy: with log r = logp - old_logp and samples from the
    old policy, k1 = -log r and k3 = (r - 1) - log r both estimate KL(pi_old || pi_theta), i.e. a
    soft trust region around the rollout policy rather than a pull towards the initial model.

    Args:
      logprobs, old_logprobs, advantages, mask: [b, s] token-aligned (mask 1 on response tokens).
      denom: scalar, number of valid tokens the loss is averaged over (>= 1).
      entropy: [b, s] token-aligned entropies (needed for the metric / bonus), or None.
    Returns:
      (loss scalar, metrics) with additive metrics ``actor/pg_loss``, ``actor/clip_frac`` (share of
      tokens where the clipped term is active), ``actor/approx_kl`` (k3 vs the old policy),
      ``actor/entropy`` and ``actor/kl`` (when used).
    """
    m = mask.astype(jnp.float32)
    log_ratio = (logprobs - old_logprobs) * m  # masked first so padding cannot overflow exp
    ratio = jnp.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg = jnp.maximum(pg_unclipped, pg_clipped)  # [b, s]

    def mean(x):
        return jnp.sum(x * m) / denom

    pg_loss = mean(pg)
    loss = pg_loss
    k3 = (ratio - 1.0) - log_ratio
    sg = jax.lax.stop_gradient
    metrics = {
        "actor/pg_loss": sg(pg_loss),
        "actor/clip_frac": sg(mean((pg_clipped > pg_unclipped).astype(jnp.float32))),
        "actor/approx_kl": sg(mean(k3)),
    }
    if kl_coef > 0.0:
        if kl_estimator == "k1":
            kl = -log_ratio
        elif kl_estimator == "k3":
            kl = k3
        else:
            raise ValueError(f"ppo.kl_estimator: unknown estimator {kl_estimator!r} (expected 'k1' or 'k3')")
        kl_loss = mean(kl)
        loss = loss + kl_coef * kl_loss
        metrics["actor/kl"] = sg(kl_loss)
    if entropy is not None:
        ent = mean(entropy)
        if entropy_coef > 0.0:
            loss = loss - entropy_coef * ent
        metrics["actor/entropy"] = sg(ent)
    elif entropy_coef > 0.0:
        raise ValueError("policy_loss: entropy_coef > 0 needs the token entropies")
    metrics["actor/loss"] = sg(loss)
    return loss, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, denom: jax.Array,
               *, value_clip: Optional[float]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Critic loss 0.5 * (V - R)^2 over valid tokens (sum / ``denom``); with ``value_clip`` the PPO2
    clipped form 0.5 * max((V_clip - R)^2, (V - R)^2), V_clip = V_old + clip(V - V_old, -c, c).

    Args:
      values, old_values, returns, mask: [b, s] token-aligned.
      denom: scalar number of valid tokens.
    Returns:
      (loss, metrics): additive metrics ``critic/value_loss``, ``critic/value_error`` (mean (V-R)^2),
      ``critic/clip_frac`` and the moments ``critic/_ret``, ``critic/_ret_sq``, ``critic/_err``,
      ``critic/_err_sq`` that :func:`finalize_metrics` turns into ``critic/explained_variance``.
    """
    m = mask.astype(jnp.float32)
    err = values - returns
    sq = jnp.square(err)
    if value_clip is not None:
        v_clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
        sq_clipped = jnp.square(v_clipped - returns)
        per_tok = 0.5 * jnp.maximum(sq, sq_clipped)
        clip_frac = (sq_clipped > sq).astype(jnp.float32)
    else:
        per_tok = 0.5 * sq
        clip_frac = jnp.zeros_like(sq)

    def mean(x):
        return jnp.sum(x * m) / denom

    loss = mean(per_tok)
    sg = jax.lax.stop_gradient
    metrics = {
        "critic/value_loss": sg(loss),
        "critic/value_error": sg(mean(sq)),
        "critic/clip_frac": sg(mean(clip_frac)),
        "critic/value_mean": sg(mean(values)),
        "critic/_ret": sg(mean(returns)),
        "critic/_ret_sq": sg(mean(jnp.square(returns))),
        "critic/_err": sg(mean(err)),
        "critic/_err_sq": sg(mean(sq)),
    }
    return loss, metrics


def finalize_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Turn accumulated additive metrics into reported ones: adds ``critic/explained_variance``
    = 1 - Var(R - V) / Var(R) over the valid tokens (0 when Var(R) = 0, e.g. all rewards equal) and
    drops the private ``_`` moments. Works on arrays of any leading shape (per-step stacks)."""
    out = {k: v for k, v in metrics.items() if not k.split("/")[-1].startswith("_")}
    if "critic/_ret" in metrics:
        var_ret = metrics["critic/_ret_sq"] - jnp.square(metrics["critic/_ret"])
        var_err = metrics["critic/_err_sq"] - jnp.square(metrics["critic/_err"])
        ok = var_ret > 1e-12
        out["critic/explained_variance"] = jnp.where(ok, 1.0 - var_err / jnp.where(ok, var_ret, 1.0), 0.0)
    return out
