"""``python -m orz_jax.reward``: score a JSONL file, or benchmark the scorer.

    python -m orz_jax.reward score IN.jsonl [OUT.jsonl] [--set timeout_s=2 --set num_workers=4]
        IN lines: {"response": str, "answer": str, "stop_reason": "stop"|"length" (default "stop"), ...}
        a bad line stops the run with its line number; --skip-bad leaves such lines out and counts them
        OUT lines: the same object plus reward, extracted, rule, timed_out, parse_failed (stdout if no OUT)
    python -m orz_jax.reward bench --data ../shared/data/orz/eval_math500.json [MORE.json ...] [--skip-plain]
        responses/s of a plain single-process math-verify loop vs RewardScorer on a mix where every
        reference is answered once correctly and once with another record's answer
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Optional

import yaml

from orz_jax.config import ConfigError, RewardConfig, _build, validate_reward
from orz_jax.reward.extract import extract_answer, strip_reference
from orz_jax.reward.scorer import STOP_REASONS, RewardScorer, summarize


class InputError(ValueError):
    """A bad input record; the message names the file and line."""


def reward_config(settings: list[str]) -> RewardConfig:
    """RewardConfig from ``field=value`` strings (YAML values), type-checked like the YAML config."""
    data = {}
    for text in settings:
        if "=" not in text:
            raise ConfigError(f"--set {text!r} is not of the form field=value")
        key, raw = text.split("=", 1)
        data[key.strip().removeprefix("reward.")] = yaml.safe_load(raw) if raw.strip() else ""
    cfg = _build(RewardConfig, data, "reward")
    validate_reward(cfg)
    return cfg


def _parse_record(where: str, raw: bytes) -> Optional[dict]:
    """One JSONL line -> its record (None for a blank line); InputError naming ``where`` for a bad one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("response", "answer"):
        if key not in rec:
            raise InputError(f"{where}: missing key '{key}' (need 'response' and 'answer')")
        if not isinstance(rec[key], str):
            raise InputError(f"{where}: '{key}' must be a string, got {type(rec[key]).__name__}")
    stop = rec.setdefault("stop_reason", "stop")
    if stop not in STOP_REASONS:
        raise InputError(f"{where}: 'stop_reason' must be one of {list(STOP_REASONS)}, got {stop!r}")
    try:  # a "\ud800" escape is valid JSON but cannot be written back out as UTF-8
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: contains an unpaired UTF-16 surrogate escape, which is not text") from None
    return rec


def read_jsonl(path: str, skipped: Optional[list[str]] = None) -> list[dict]:
    """Records of a JSONL scoring file.

    A bad line (not UTF-8, not JSON, missing or mistyped keys) raises InputError naming ``path:line``; with
    a ``skipped`` list it is left out instead and its message appended there.
    """
    records = []
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            try:
                rec = _parse_record(f"{path}:{lineno}", raw)
            except InputError as e:
                if skipped is None:
                    raise
                skipped.append(str(e))
                continue
            if rec is not None:
                records.append(rec)
    return records


def _open_output(path: str):
    """A temporary file next to ``path`` (renamed onto it once every line is written), so an unwritable
    output is found before the scoring and a failed run leaves an existing output untouched."""
    if os.path.isdir(path):
        raise InputError(f"{path}: the output path is a directory")
    try:
        return tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=os.path.dirname(path) or ".",
                                           prefix=f".{os.path.basename(path)}.", suffix=".tmp", delete=False)
    except OSError as e:
        raise InputError(f"{path}: cannot write the output ({e.strerror})") from None


def cmd_score(args) -> int:
    cfg = reward_config(args.set)
    skipped: Optional[list[str]] = [] if args.skip_bad else None
    records = read_jsonl(args.input, skipped)
    out = _open_output(args.output) if args.output else sys.stdout
    try:
        with RewardScorer(cfg) as scorer:
            results = scorer.score_batch(
                [r["response"] for r in records], [r["answer"] for r in records], [r["stop_reason"] for r in records]
            )
        for rec, res in zip(records, results):
            out.write(json.dumps({**rec, **res.to_dict()}, ensure_ascii=False) + "\n")
        if out is not sys.stdout:
            out.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(out.name, 0o666 & ~umask)  # a temporary file is 0600; the output gets the usual mode
            os.replace(out.name, args.output)
    finally:
        if out is not sys.stdout and os.path.exists(out.name):
            out.close()
            os.unlink(out.name)
    stats = summarize(results)
    print(
        f"scored {len(results)} responses: mean reward {stats['reward/mean']:.4f}, "
        f"{int(stats['reward/timed_out'])} timed out, {int(stats['reward/parse_failed'])} parse failures",
        file=sys.stderr,
    )
    if skipped:
        print(f"skipped {len(skipped)} bad line(s) (--skip-bad); the first: {skipped[0]}", file=sys.stderr)
    return 0


# ---- benchmark ----------------------------------------------------------------------------------


def bench_mix(answers: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Each reference answered once correctly (boxed as itself) and once with another record's answer."""
    rng = random.Random(seed)
    other = list(range(len(answers)))
    rng.shuffle(other)
    responses, refs = [], []
    for i, ans in enumerate(answers):
        j = other[i] if other[i] != i else (i + 1) % len(answers)
        for pred in (ans, answers[j]):
            responses.append(
                "<think> Let me work through the problem step by step ... so the result follows. </think> "
                f"<answer> The final answer is \\boxed{{{pred}}}. </answer>"
            )
            refs.append(ans)
    return responses, refs


def load_answers(path: str) -> list[str]:
    """Reference answers of an ORZ data file: eval files (``final_answer``) or training files
    (``[{"from": "human", ...}, {"from": "assistant", "ground_truth": {"value": ...}}]``)."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    out = []
    for i, r in enumerate(records):
        if isinstance(r, dict) and "final_answer" in r:
            out.append(str(r["final_answer"]))
        elif isinstance(r, list) and len(r) == 2 and isinstance(r[1], dict) and "ground_truth" in r[1]:
            out.append(str(r[1]["ground_truth"]["value"]))
        else:
            raise InputError(f"{path}: record {i} has neither 'final_answer' nor an assistant 'ground_truth'")
    return out


def plain_math_verify(responses: list[str], refs: list[str], extraction: str = "lenient") -> list[bool]:
    """The baseline: one process, math-verify with its default (signal) time-outs, no shortcuts
    (answers read as ``reward.extraction`` says, like the scorer's)."""
    from math_verify import parse, verify

    out = []
    for resp, ref in zip(responses, refs):
        pred = extract_answer(resp, extraction)
        ok = False
        if pred:
            ok = bool(verify(parse("\\boxed{" + strip_reference(ref) + "}"), parse("\\boxed{" + pred + "}")))
        out.append(ok)
    return out


def cmd_bench(args) -> int:
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    cfg = reward_config(args.set)
    answers = []
    for path in args.data:
        answers += load_answers(path)
    responses, refs = bench_mix(answers, args.seed)
    stops = ["stop"] * len(responses)
    n = len(responses)
    print(f"mix: {n} responses from {len(answers)} references in {', '.join(args.data)}; "
          f"{cfg.num_workers} workers, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    plain = None
    if not args.skip_plain:
        t0 = time.perf_counter()
        plain = plain_math_verify(responses, refs, cfg.extraction)
        plain_s = time.perf_counter() - t0
        print(f"(a) plain math_verify loop:   {n / plain_s:8.1f} responses/s  ({plain_s:.2f} s, "
              f"{sum(plain)} correct)")

    t0 = time.perf_counter()
    with RewardScorer(cfg) as scorer:
        scorer.pool.wait_ready()
        start_s = time.perf_counter() - t0
        # Timed: one pass on warm workers with cold caches (math-verify caches parsed LaTeX, so a
        # second pass over the same strings would flatter us).
        t1 = time.perf_counter()
        results = scorer.score_batch(responses, refs, stops)
        best = time.perf_counter() - t1
        summary = scorer.summary()
    ours = [r.reward > 0 for r in results]
    print(f"(b) RewardScorer:             {n / best:8.1f} responses/s  ({best:.2f} s, {sum(ours)} correct; "
          f"pool start {start_s:.2f} s not included)")
    rules = {k.removeprefix("rule_"): int(v) for k, v in summary.items() if k.startswith("rule_") and v}
    print(f"    decided by: {rules}; "
          f"{int(summary['timed_out'])} timed out, {int(summary['parse_failed'])} parse failures")
    if plain is None:
        return 0
    differ = [i for i in range(n) if ours[i] != plain[i]]
    print(f"    verdicts differing from the plain loop: {len(differ)}")
    for i in differ[:10]:
        print(f"      ref={refs[i]!r} pred={extract_answer(responses[i], cfg.extraction)!r} plain={plain[i]} ours={ours[i]} "
              f"rule={results[i].rule}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orz_jax.reward", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("score", help="score a JSONL file of responses")
    sp.add_argument("input")
    sp.add_argument("output", nargs="?", help="output JSONL (default: stdout)")
    sp.add_argument("--skip-bad", action="store_true",
                    help="leave out bad input lines (counted, the first one reported) instead of stopping")
    bp = sub.add_parser("bench", help="throughput: plain math-verify loop vs RewardScorer")
    bp.add_argument("--data", nargs="+", required=True,
                    help="ORZ eval (final_answer) or training (ground_truth) JSON files, e.g. eval_math500.json")
    bp.add_argument("--skip-plain", action="store_true", help="time only RewardScorer")
    bp.add_argument("--seed", type=int, default=0)
    for p in (sp, bp):
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="a RewardConfig field, e.g. --set timeout_s=2 (repeatable)")
    args = ap.parse_args(argv)
    try:
        return cmd_score(args) if args.cmd == "score" else cmd_bench(args)
    except (InputError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
