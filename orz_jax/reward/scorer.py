"""ORZ's rule-based reward: 1.0 iff the response stopped by itself and its boxed answer is right.

No format reward, no partial credit. For each ``(response, reference, stop_reason)``:

1. ``stop_reason == "length"``               -> 0, rule ``truncated`` (ORZ scores unfinished responses 0)
2. no ``\\boxed{}`` in ``<answer>`` (or empty) -> 0, rule ``no_answer`` (read as ``reward.extraction``
   says: ``orz`` needs a closed ``<answer>...</answer>``, see ``orz_jax/reward/extract.py``)
3. reference is an option letter               -> letter comparison, rule ``choice``
4. cheap rules (``rules.quick_check``)         -> rule ``exact`` / ``normalized`` / ``numeric``
5. otherwise math-verify in a worker process   -> rule ``math_verify`` (``timed_out`` / ``parse_failed``
   flag the checks that scored 0 for want of an answer)

    with RewardScorer(cfg.reward) as scorer:
        results = scorer.score_batch(texts, answers, stop_reasons)
        rewards = [r.reward for r in results]
        log(scorer.summary())
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Literal, Optional, Sequence

from orz_jax.config import RewardConfig, validate_reward
from orz_jax.reward.extract import extract_answer, strip_reference
from orz_jax.reward.pool import VerifyPool
from orz_jax.reward.rules import choice_letter, predicted_letter, quick_check

Rule = Literal["exact", "normalized", "numeric", "math_verify", "choice", "no_answer", "truncated"]
RULES: tuple[str, ...] = ("exact", "normalized", "numeric", "math_verify", "choice", "no_answer", "truncated")
STOP_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Reward of one response and how it was decided.

    reward:       1.0 or 0.0
    extracted:    content of the deciding ``\\boxed{}`` (None: no answer found)
    rule:         which check decided (see module docstring)
    timed_out:    the check (math-verify, or an in-process rule) ran past ``RewardConfig.timeout_s`` (reward 0)
    parse_failed: math-verify's parser raised, the reference parsed to nothing, or the worker died
    """

    reward: float
    extracted: Optional[str]
    rule: Rule
    timed_out: bool = False
    parse_failed: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(results: Sequence[RewardResult]) -> dict[str, float]:
    """Scalar diagnostics of a batch: mean reward, fraction decided by each rule, time-outs, parse failures."""
    n = max(1, len(results))
    by_rule = collections.Counter(r.rule for r in results)
    out = {
        "reward/mean": sum(r.reward for r in results) / n,
        "reward/count": float(len(results)),
        "reward/timed_out": float(sum(r.timed_out for r in results)),
        "reward/parse_failed": float(sum(r.parse_failed for r in results)),
    }
    for rule in RULES:
        out[f"reward/rule_{rule}"] = by_rule.get(rule, 0) / n
    return out


def _check_inputs(responses, answers, stop_reasons) -> None:
    if not (len(responses) == len(answers) == len(stop_reasons)):
        raise ValueError(
            f"score_batch: responses, answers and stop_reasons must have one entry per sample, got "
            f"{len(responses)}, {len(answers)} and {len(stop_reasons)}"
        )
    for i, (resp, ans, stop) in enumerate(zip(responses, answers, stop_reasons)):
        if not isinstance(resp, str):
            raise TypeError(f"score_batch: responses[{i}] must be a str, got {type(resp).__name__}")
        if not isinstance(ans, str):
            raise TypeError(f"score_batch: answers[{i}] must be a str, got {type(ans).__name__}")
        if stop not in STOP_REASONS:
            raise ValueError(f"score_batch: stop_reasons[{i}] must be one of {STOP_REASONS}, got {stop!r}")


class RewardScorer:
    """Scores batches of responses; owns the math-verify worker pool (``close()`` or ``with``)."""

    def __init__(self, cfg: RewardConfig):
        validate_reward(cfg)
        self.cfg = cfg
        self.pool = VerifyPool(cfg)
        self._counts: collections.Counter[str] = collections.Counter()
        self._seconds = 0.0

    def score_batch(
        self,
        responses: Sequence[str],
        answers: Sequence[str],
        stop_reasons: Sequence[str],
    ) -> list[RewardResult]:
        """One :class:`RewardResult` per response, in order.

        responses:    generated texts (prompt excluded)
        answers:      reference answers (a ``\\boxed{}`` in a reference is unwrapped, as ORZ does)
        stop_reasons: "stop" (ended by EOS / stop string) or "length" (hit the token limit)
        """
        _check_inputs(responses, answers, stop_reasons)
        t0 = time.perf_counter()
        results: list[Optional[RewardResult]] = [None] * len(responses)
        pending: list[int] = []  # indices for math-verify
        pairs: list[tuple[str, str]] = []
        extracted: list[Optional[str]] = [None] * len(responses)
        for i, (resp, ans, stop) in enumerate(zip(responses, answers, stop_reasons)):
            t_item = time.perf_counter()
            pred, ref, result = self._in_process(resp, ans, stop)
            extracted[i] = pred
            if result is None:
                pending.append(i)
                pairs.append((ref, pred))
            elif time.perf_counter() - t_item > self.cfg.timeout_s:
                # reward.timeout_s bounds every check, the in-process ones too: one over it scores 0 like a
                # math-verify check would (the rules are length-capped, so this means a badly loaded host).
                result = RewardResult(0.0, pred, result.rule, timed_out=True)
            results[i] = result
        if pairs:
            # A prompt's samples often repeat a (wrong) answer: check each distinct pair once.
            unique = list(dict.fromkeys(pairs))
            verdicts = dict(zip(unique, self.pool.check(unique)))
            for i, pair in zip(pending, pairs):
                v = verdicts[pair]
                results[i] = RewardResult(float(v.equal), extracted[i], "math_verify", v.timed_out, v.parse_failed)
        for r in results:
            self._counts[r.rule] += 1
            self._counts["correct"] += r.reward > 0
            self._counts["timed_out"] += r.timed_out
            self._counts["parse_failed"] += r.parse_failed
        self._counts["responses"] += len(results)
        self._seconds += time.perf_counter() - t0
        return results  # type: ignore[return-value]

    def _in_process(self, resp: str, ans: str, stop: str) -> tuple[Optional[str], str, Optional[RewardResult]]:
        """Steps 1-4 of the module docstring -> (extracted answer, stripped reference, result or None for
        math-verify)."""
        pred = extract_answer(resp, self.cfg.extraction)
        if stop != "stop":
            return pred, "", RewardResult(0.0, pred, "truncated")
        if not pred:
            return pred, "", RewardResult(0.0, pred, "no_answer")
        ref = strip_reference(ans)
        letter = choice_letter(ref)
        if letter is not None:
            return pred, ref, RewardResult(float(predicted_letter(pred) == letter), pred, "choice")
        decided = quick_check(pred, ref) if self.cfg.fast_checks else None
        return pred, ref, None if decided is None else RewardResult(decided[0], pred, decided[1])

    def summary(self) -> dict[str, float]:
        """Cumulative diagnostics since construction: counts per rule, time-outs, parse failures,
        worker kills / restarts, and throughput."""
        c, s = self._counts, self.pool.stats
        out = {
            "responses": float(c["responses"]),
            "correct": float(c["correct"]),
            "timed_out": float(c["timed_out"]),
            "parse_failed": float(c["parse_failed"]),
            "worker_kills": float(s.kills),
            "worker_crashes": float(s.crashes),
            "worker_starts": float(s.worker_starts),
            "math_verify_checks": float(s.checks),
            "seconds": self._seconds,
            "responses_per_s": c["responses"] / self._seconds if self._seconds > 0 else 0.0,
        }
        for rule in RULES:
            out[f"rule_{rule}"] = float(c[rule])
        return out

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
