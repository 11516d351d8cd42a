"""A verifiable arithmetic task generated from a seed, so a run needs no data files.

Each question is an integer expression with ``min_ops..max_ops`` binary operators from ``+ - *`` and
operands in ``1..max_operand``, e.g. ``"Compute 12 + 7 * 3 - 5."``, with the answer ``"28"`` (usual
precedence: ``*`` before ``+``/``-``, left to right). Records have the same :class:`PromptRecord`
form as the ORZ files, so the rest of the pipeline cannot tell the difference.

The operator count is drawn uniformly, so short problems are as common as long ones (an easy ramp
for a small model). Questions are unique across both splits: the eval split is drawn first, so it
stays the same when ``num_train`` changes, and no eval question appears in training.
"""

from __future__ import annotations

import random

from orz_jax.config import ConfigError, SyntheticTaskConfig
from orz_jax.data.records import PromptRecord

__all__ = ["OPS", "evaluate_expression", "synthetic_capacity", "generate_synthetic"]

OPS = ("+", "-", "*")
SOURCE = "synthetic"


def evaluate_expression(operands: list[int], ops: list[str]) -> int:
    """Value of ``operands[0] ops[0] operands[1] ...`` with ``*`` binding tighter than ``+``/``-``."""
    assert len(operands) == len(ops) + 1
    terms = [operands[0]]  # products, each with its sign folded in
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        elif op == "+":
            terms.append(x)
        elif op == "-":
            terms.append(-x)
        else:
            raise ValueError(f"unknown operator {op!r}")
    return sum(terms)


def _count(num_ops: int, max_operand: int, num_op_kinds: int = len(OPS)) -> int:
    """Distinct expressions with ``num_ops`` operators."""
    return max_operand ** (num_ops + 1) * num_op_kinds ** num_ops


def synthetic_capacity(cfg: SyntheticTaskConfig) -> int:
    return sum(_count(k, cfg.max_operand, len(cfg.ops)) for k in range(cfg.min_ops, cfg.max_ops + 1))


def generate_synthetic(cfg: SyntheticTaskConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, eval) records, ``cfg.num_train`` and ``cfg.num_eval`` long, determined by ``cfg.seed``."""
    need = cfg.num_train + cfg.num_eval
    if cfg.num_train < 1 or cfg.num_eval < 0:
        raise ConfigError(f"data.synthetic: need num_train >= 1 and num_eval >= 0, "
                          f"got {cfg.num_train}, {cfg.num_eval}")
    capacity = synthetic_capacity(cfg)
    if need > capacity:
        raise ConfigError(
            f"data.synthetic: num_train + num_eval = {need} unique questions requested, but only {capacity} "
            f"exist with min_ops={cfg.min_ops}, max_ops={cfg.max_ops}, max_operand={cfg.max_operand}")

    rng = random.Random(cfg.seed)  # Mersenne Twister: the same stream on every platform/version
    seen: set[str] = set()
    per_k = {k: 0 for k in range(cfg.min_ops, cfg.max_ops + 1)}
    out: list[PromptRecord] = []
    while len(out) < need:
        # Only operator counts whose expressions are not all used yet, so a full bucket (few
        # operators, small max_operand) never stalls the loop.
        open_ks = [k for k, n in per_k.items() if n < _count(k, cfg.max_operand, len(cfg.ops))]
        k = rng.choice(open_ks)
        operands = [rng.randint(1, cfg.max_operand) for _ in range(k + 1)]
        ops = [rng.choice(cfg.ops) for _ in range(k)]
        expr = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(ops, operands[1:])])
        if expr in seen:
            continue
        seen.add(expr)
        per_k[k] += 1
        split_index = len(out) if len(out) < cfg.num_eval else len(out) - cfg.num_eval
        out.append(PromptRecord(question=f"Compute {expr}.", answer=str(evaluate_expression(operands, ops)),
                                source=SOURCE, index=split_index))
    return out[cfg.num_eval:], out[: cfg.num_eval]
