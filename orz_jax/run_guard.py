"""Failures that stop a training run with one clear line: non-finite updates and a full disk; and the
divergence warning for runs that are finite but going nowhere good.

The jitted PPO steps report ``actor/nonfinite`` / ``critic/nonfinite`` (1.0 when the loss, the gradient
norm or any updated parameter of any optimizer step was NaN or Inf); the
trainer reads them from the metrics it fetches every iteration anyway, so the guard adds no host sync.
"""

from __future__ import annotations

import errno
import math
from typing import Optional

# Guarded quantities of each update, in the order the guard reports them (the first non-finite one). The
# parameters are not a norm here: finite 1e20 entries have an infinite float32 norm; the jitted update's
# ``nonfinite_params`` flag checks them entry by entry.
GUARDED = ("loss", "value_loss", "grad_norm")

# An actor entropy above this share of its maximum log(vocab) means sampling is close to uniform.
ENTROPY_WARN_FRACTION = 0.9


class TrainingError(RuntimeError):
    """A run stopped by a failure its user must act on; the message is one line."""


class NonFiniteError(TrainingError):
    pass


def nonfinite_quantity(metrics: dict[str, float]) -> Optional[str]:
    """The name of the first non-finite quantity of an iteration's metrics (``critic/value_loss``,
    ``actor/grad_norm``, ``actor parameters``, ...), or None when the update was finite."""
    for who in ("critic", "actor"):
        for q in GUARDED:
            v = metrics.get(f"{who}/{q}")
            if v is not None and not math.isfinite(v):
                return f"{who}/{q}"
        if metrics.get(f"{who}/nonfinite_params", 0.0) != 0.0:
            return f"{who} parameters"
        if metrics.get(f"{who}/nonfinite", 0.0) != 0.0:  # the in-step flag, in case a NaN step averaged away
            return f"{who}/nonfinite"
    return None


def divergence(metrics: dict[str, float], vocab_size: int) -> tuple[dict[str, float], Optional[str]]:
    """Health metrics of an iteration and a warning when the policy is clearly diverging.

    Returns ({"health/entropy_frac": entropy / log(vocab), "health/diverging": 0 or 1}, warning or None).
    """
    ent = metrics.get("actor/entropy")
    if ent is None or vocab_size < 2:
        return {}, None
    frac = float(ent) / math.log(vocab_size)
    out = {"health/entropy_frac": frac, "health/diverging": float(frac >= ENTROPY_WARN_FRACTION)}
    if frac >= ENTROPY_WARN_FRACTION:
        return out, (f"actor entropy {ent:.3f} is {100 * frac:.0f}% of its maximum log({vocab_size}) = "
                     f"{math.log(vocab_size):.3f}: the policy samples almost uniformly (diverging; lower "
                     f"ppo.actor.lr?)")
    return out, None


def disk_full(e: BaseException) -> bool:
    """True when ``e`` or an exception it was raised from is ENOSPC (orbax and tensorstore wrap it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
