"""Mine the hard prompts of a run: ``python -m orz_jax.data hard-set RUN_DIR --at-iteration N
--max-correct 3 --out FILE``.

ORZ-32B's annealing stage trained on the prompts with fewer than 4 of 64 samples correct at step 1,100 of
its main run (ORZ paper; ``orz_math_13k_collection_hard.json``). This reads the run's per-prompt pass rates
(:mod:`orz_jax.data.pass_rates`), takes each prompt's latest count at or before iteration N, keeps those
with at most ``--max-correct`` correct samples, and writes them as one JSON array in ORZ's training schema
(``[{"from": "human", "value": q}, {"from": "assistant", "ground_truth": {"value": a}}]``); a record from
a training file is copied as it is there. Prompts the run had not sampled by iteration N are not counted
(their pass rate is unknown). Train on the output with ``data.train_files``
(``configs/orz_32b_anneal.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from orz_jax.data.pass_rates import read_pass_rates

__all__ = ["main", "hard_prompts", "write_hard_set"]


def hard_prompts(run_dir: str, at_iteration: int, max_correct: int) -> tuple[list[dict], int]:
    """(latest pass-rate record of each selected prompt, sorted by file and index; number of prompts seen
    by ``at_iteration``)."""
    latest: dict[tuple[str, int], dict] = {}
    for rec in read_pass_rates(run_dir):
        if rec["iteration"] > at_iteration:
            continue
        key = (rec["file"], rec["index"])
        if key not in latest or rec["iteration"] >= latest[key]["iteration"]:
            latest[key] = rec
    picked = [latest[k] for k in sorted(latest) if latest[k]["correct"] <= max_correct]
    return picked, len(latest)


def _training_record(raw) -> list:
    """A record of either ORZ schema -> the training schema (training records are kept as they are)."""
    if isinstance(raw, list):
        return raw
    return [{"from": "human", "value": raw["prompt"][0]["value"]},
            {"from": "assistant", "ground_truth": {"value": raw["final_answer"]}}]


def _records_of(file: str, run_dir: str, data_dir: Optional[str]) -> list:
    """The records of one source: a JSON file's array, or the synthetic task's training split regenerated
    from the run's own config."""
    if file == "synthetic":
        from orz_jax.config import load_config
        from orz_jax.data.synthetic import generate_synthetic

        cfg_path = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: not found; the synthetic prompts are rebuilt from the run's config")
        train, _ = generate_synthetic(load_config(cfg_path).data.synthetic)
        return [[{"from": "human", "value": r.question}, {"from": "assistant", "ground_truth": {"value": r.answer}}]
                for r in train]
    path = os.path.join(data_dir, os.path.basename(file)) if data_dir else file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: training file of the run not found (pass --data-dir DIR to look for "
                                f"{os.path.basename(file)} in DIR)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_hard_set(run_dir: str, at_iteration: int, max_correct: int, out: str,
                   data_dir: Optional[str] = None) -> tuple[int, int]:
    """Write the hard set to ``out``; returns (prompts written, prompts seen by ``at_iteration``)."""
    picked, seen = hard_prompts(run_dir, at_iteration, max_correct)
    if not picked:
        raise ValueError(f"{run_dir}: none of the {seen} prompts sampled by iteration {at_iteration} has at most "
                         f"{max_correct} correct samples; nothing written")
    sources: dict[str, list] = {}
    records = []
    for rec in picked:
        if rec["file"] not in sources:
            sources[rec["file"]] = _records_of(rec["file"], run_dir, data_dir)
        raw = sources[rec["file"]]
        if not 0 <= rec["index"] < len(raw):
            raise ValueError(f"{rec['file']}: record {rec['index']} of the pass rates is not in the file "
                             f"({len(raw)} records): is it the file the run trained on?")
        records.append(_training_record(raw[rec["index"]]))
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    os.replace(tmp, out)  # never a half-written file under the final name
    return len(records), seen


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orz_jax.data hard-set", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="run directory (experiment.out_dir) holding pass_rates.jsonl")
    ap.add_argument("--at-iteration", type=int, required=True,
                    help="use each prompt's latest pass rate at or before this iteration")
    ap.add_argument("--max-correct", type=int, default=3,
                    help="keep prompts with at most this many correct samples (ORZ: 3 of 64)")
    ap.add_argument("--out", required=True, help="output JSON file (ORZ training schema)")
    ap.add_argument("--data-dir", default=None, help="look for the run's training files here (by file name)")
    args = ap.parse_args(argv)
    if args.at_iteration < 1:
        ap.error(f"--at-iteration must be >= 1, got {args.at_iteration}")
    if args.max_correct < 0:
        ap.error(f"--max-correct must be >= 0, got {args.max_correct}")
    try:
        n, seen = write_hard_set(args.run_dir, args.at_iteration, args.max_correct, args.out, args.data_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} of the {seen} prompts sampled by iteration {args.at_iteration} "
          f"(at most {args.max_correct} correct) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
