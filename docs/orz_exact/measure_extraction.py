"""Score the project's reward test set and the ORZ eval answers with both answer extractions
(``reward.extraction: orz`` and ``lenient``) and count the verdicts that differ.

    PYTHONPATH=. python docs/orz_exact/measure_extraction.py [EVAL_DIR]

EVAL_DIR holds ORZ's ``eval_*.json`` (default ``../shared/data/orz``; skipped when absent). The eval
answers are scored as ``python -m orz_jax.reward bench`` builds its responses (each answer once boxed
as itself and once as another record's answer, inside a closed answer block), and once more with the
close tag cut off (a response ended by EOS), which is where the two readings part.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from orz_jax.config import RewardConfig  # noqa: E402
from orz_jax.reward import RewardScorer  # noqa: E402
from orz_jax.reward.cli import bench_mix, load_answers  # noqa: E402


def score_both(responses, refs, stops):
    out = {}
    for extraction in ("orz", "lenient"):
        with RewardScorer(RewardConfig(extraction=extraction, num_workers=2)) as scorer:
            out[extraction] = [r.reward for r in scorer.score_batch(responses, refs, stops)]
    differ = [i for i, (a, b) in enumerate(zip(out["orz"], out["lenient"])) if a != b]
    return sum(out["orz"]), sum(out["lenient"]), differ


def report(name, responses, refs, stops):
    orz, lenient, differ = score_both(responses, refs, stops)
    print(f"{name}: {len(responses)} responses, correct orz {orz:.0f} / lenient {lenient:.0f}, "
          f"verdicts differing {len(differ)}")
    for i in differ[:5]:
        print(f"    {responses[i][-60:]!r} ref={refs[i]!r}")


def main() -> None:
    from test_reward import CASES  # the project's reward test set

    responses, refs, stops = (list(x) for x in zip(*[c[:3] for c in CASES]))
    report("tests/test_reward.py CASES", responses, refs, stops)
    eval_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join("..", "shared", "data", "orz")
    if not os.path.isdir(eval_dir):
        print(f"{eval_dir}: absent, eval answers skipped")
        return
    answers = []
    for name in ("eval_math500.json", "eval_aime2024.json", "eval_gpqa_diamond.json"):
        answers += load_answers(os.path.join(eval_dir, name))
    responses, refs = bench_mix(answers)
    report("eval answers, closed <answer>", responses, refs, ["stop"] * len(responses))
    cut = [r[: r.rindex("</answer>")] for r in responses]
    report("eval answers, </answer> cut off (EOS)", cut, refs, ["stop"] * len(cut))


if __name__ == "__main__":
    main()
