"""ORZ reward: answer extraction, the cheap rules against math-verify, the worker pool (time-outs,
stuck-worker replacement), a 1,000-response batch, and the JSONL command line."""

from __future__ import annotations

import json
import time

import pytest

from orz_jax.config import ConfigError, RewardConfig, validate_reward
from orz_jax.reward import RewardScorer, extract_answer, summarize
from orz_jax.reward.cli import InputError, main, read_jsonl
from orz_jax.reward.extract import strip_reference
from orz_jax.reward.rules import quick_check


def orz(box: str) -> str:
    """An ORZ-style response whose answer tag holds ``\\boxed{box}``."""
    return (
        "<think> Some reasoning about \\boxed{wrong} first. </think> "
        f"<answer> So it is \\boxed{{{box}}}. </answer>"
    )


# ---- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        (orz("42"), "42"),
        (orz("\\frac{1}{\\sqrt{2}}"), "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("<answer> \\boxed{1} then \\boxed{2} </answer>", "2"),  # the last box counts
        ("<answer> \\boxed{1} </answer> text <answer> \\boxed{3} </answer>", "3"),
        ("<answer> \\boxed{1} </answer> \\boxed{9}", "1"),  # a box outside the answer tag is ignored
        ("The answer is \\boxed{5}.", None),  # no answer tag
        ("<answer> 5 </answer>", None),  # tag without a box
        ("<answer> \\boxed{\\frac{1}{2} </answer>", None),  # unbalanced: cut-off last box
        ("<answer> \\boxed{1} and \\boxed{\\frac{1}{2 </answer>", None),  # the *last* box is broken
        ("<answer> \\boxed{} </answer>", ""),  # empty box
        ("<answer> \\boxed{ 7 } ", "7"),  # close tag eaten by the stop string
        ("<answer> \\boxed{\\{1,2\\}} </answer>", "\\{1,2\\}"),  # escaped braces do not count
        ("<answer>\\boxed {x+1}</answer>", "x+1"),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# ---- scoring table ------------------------------------------------------------------------------

# (response, reference, stop_reason, reward, rule or None for "any rule")
CASES = [
    (orz("42"), "42", "stop", 1.0, "exact"),
    (orz("41"), "42", "stop", 0.0, "numeric"),
    (orz("\\frac{1}{2}"), "0.5", "stop", 1.0, "numeric"),
    (orz("\\dfrac{3}{4}"), "\\frac34", "stop", 1.0, "normalized"),
    (orz("3/4"), "\\frac{3}{4}", "stop", 1.0, "numeric"),
    (orz("0.75"), "\\frac{2}{3}", "stop", 0.0, "numeric"),
    (orz("2\\sqrt{3}"), "\\sqrt{12}", "stop", 1.0, "numeric"),
    (orz("3\\sqrt{2}"), "\\sqrt{12}", "stop", 0.0, "numeric"),
    (orz("\\frac{\\sqrt{3}}{3}"), "\\frac{1}{\\sqrt{3}}", "stop", 1.0, "numeric"),
    (orz("90^\\circ"), "90", "stop", 1.0, "normalized"),
    (orz("90"), "90^{\\circ}", "stop", 1.0, "normalized"),
    (orz("50\\%"), "50", "stop", 1.0, None),  # math-verify: an integer percent equals the integer
    (orz("5\\text{ cm}"), "5", "stop", 1.0, "normalized"),
    (orz("\\$18.90"), "18.90", "stop", 1.0, "normalized"),
    (orz("10,080"), "10,\\!080", "stop", 1.0, "normalized"),
    (orz("x = 5"), "5", "stop", 1.0, "normalized"),
    (orz("(3, 4]"), "(3,4]", "stop", 1.0, "normalized"),
    (orz("[3, 4)"), "(3,4]", "stop", 0.0, "math_verify"),
    (orz("\\left( 3, \\frac{\\pi}{2} \\right)"), "(3,\\frac{\\pi}{2})", "stop", 1.0, "normalized"),
    (orz("(2, 1)"), "(1, 2)", "stop", 0.0, "math_verify"),
    (orz("\\{2, 1\\}"), "\\{1, 2\\}", "stop", 1.0, "math_verify"),  # sets are unordered
    (orz("(2,\\infty)"), "(2, \\infty)", "stop", 1.0, "normalized"),
    (orz("7"), "(1, 2)", "stop", 0.0, "numeric"),  # a number is never a pair
    (orz("2(k+1)"), "2k+2", "stop", 1.0, "numeric"),
    (orz("(x+1)^2"), "x^2+2x+1", "stop", 1.0, "numeric"),
    (orz("x^2+1"), "x^2-1", "stop", 0.0, "numeric"),
    (orz("9"), "8n^2 + 4n + 1", "stop", 0.0, "numeric"),
    (orz("x\\sin x"), "2", "stop", 0.0, "numeric"),  # with functions: only "different" is decided cheaply
    (orz("\\cos x"), "\\sin x", "stop", 0.0, "numeric"),
    (orz("\\sin^2 x+\\cos^2 x"), "1", "stop", 1.0, "math_verify"),  # an identity: sympy's to prove
    (orz("\\text{Evelyn}"), "\\text{Evelyn}", "stop", 1.0, "exact"),
    (orz("\\text{east}"), "\\text{Evelyn}", "stop", 0.0, "math_verify"),
    (orz("3"), "\\text{east}", "stop", 0.0, "numeric"),
    (orz("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "stop", 1.0, None),
    (orz("6-5i"), "6 - 5i", "stop", 1.0, "normalized"),
    (orz("6+5i"), "6 - 5i", "stop", 0.0, "numeric"),  # "i" is a plain symbol to math-verify
    (orz("\\frac{\\pi}{3}"), "\\frac{2\\pi}{6}", "stop", 1.0, "numeric"),
    (orz("1\\frac{4}{5}"), "\\frac{9}{5}", "stop", 1.0, "math_verify"),  # a mixed number: left to math-verify
    # several boxes: the last counts
    ("<answer> \\boxed{3} no, \\boxed{4} </answer>", "4", "stop", 1.0, "exact"),
    ("<answer> \\boxed{4} no, \\boxed{3} </answer>", "4", "stop", 0.0, "numeric"),
    # no answer
    ("The answer is \\boxed{4}.", "4", "stop", 0.0, "no_answer"),
    ("<answer> \\boxed{\\frac{4}{1} </answer>", "4", "stop", 0.0, "no_answer"),
    ("<answer> \\boxed{} </answer>", "4", "stop", 0.0, "no_answer"),
    ("", "4", "stop", 0.0, "no_answer"),
    # truncated: right answer, but the response did not end by itself
    (orz("4"), "4", "length", 0.0, "truncated"),
    ("<answer> \\boxed{4} ", "4", "stop", 1.0, "exact"),  # stop string ate </answer>: still counts
    # a reference written as a solution is reduced to its box, as ORZ does
    (orz("12"), "so the total is \\boxed{12}", "stop", 1.0, "exact"),
    # multiple choice (GPQA Diamond letters; MATH's \text{(C)})
    (orz("B"), "B", "stop", 1.0, "choice"),
    (orz("\\text{B}"), "B", "stop", 1.0, "choice"),
    (orz("(B)"), "B", "stop", 1.0, "choice"),
    (orz("b"), "B", "stop", 1.0, "choice"),
    (orz("\\textbf{(B)} 42"), "B", "stop", 1.0, "choice"),
    (orz("C"), "B", "stop", 0.0, "choice"),
    (orz("42"), "B", "stop", 0.0, "choice"),
    (orz("C"), "\\text{(C)}", "stop", 1.0, "choice"),
    (orz("B"), "B", "length", 0.0, "truncated"),
]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(timeout_s=5.0, num_workers=2)) as s:
        yield s


def test_score_table(scorer):
    responses, refs, stops, want_reward, want_rule = zip(*CASES)
    results = scorer.score_batch(list(responses), list(refs), list(stops))
    for case, res in zip(CASES, results):
        assert res.reward == case[3], (case, res)
        if case[4] is not None:
            assert res.rule == case[4], (case, res)
        assert not res.timed_out and not res.parse_failed, (case, res)
    assert results[0].extracted == "42"
    stats = summarize(results)
    assert stats["reward/mean"] == pytest.approx(sum(want_reward) / len(CASES))
    assert stats["reward/rule_truncated"] == pytest.approx(2 / len(CASES))


def test_cheap_rules_agree_with_math_verify():
    """Every pair a cheap rule decides gets the same verdict from plain math-verify (the reference)."""
    from math_verify import parse, verify

    pairs = [(extract_answer(c[0]), c[1]) for c in CASES if c[2] == "stop" and extract_answer(c[0])]
    pairs += [("0.333333", "\\frac{1}{3}"), ("0.3333", "\\frac{1}{3}"), ("\\pi", "3.14159265"), ("15 m", "15"),
              ("5d", "5"), ("2", "\\{2\\}"), ("i^2+2", "1"), ("3 \\pm 1", "3"), ("\\pm 3", "3"), ("2, 2", "2"),
              ("\\{1,1\\}", "1"), ("(2,\\infty)", "5"), ("\\frac{\\sin x}{x}", "1"), ("e^{2x}", "7"),
              ("x \\in [-2,7]", "11"), ("1,-2", "440"), ("5, 5.00001", "5"), ("n", "C"), ("x^2", "y^2"),
              ("1,5", "1.5"), ("17", "k=17")]
    decided = 0
    for pred, ref in pairs:
        if ref.startswith("\\text{(") or len(ref) == 1 and ref.isupper():
            continue  # multiple choice: compared as letters, not by math-verify
        ref = strip_reference(ref)
        got = quick_check(pred, ref)
        if got is None:
            continue
        decided += 1
        mv = verify(parse("\\boxed{" + ref + "}"), parse("\\boxed{" + pred + "}"))
        assert got[0] == float(mv), (pred, ref, got, mv)
    assert decided >= 30


def test_fast_checks_off_gives_same_rewards():
    """All of the table through math-verify alone (fast_checks=False) scores the same."""
    cases = [c for c in CASES if c[4] not in ("choice",)]
    responses, refs, stops, want, _ = zip(*cases)
    with RewardScorer(RewardConfig(fast_checks=False, num_workers=2)) as s:
        results = s.score_batch(list(responses), list(refs), list(stops))
    assert [r.reward for r in results] == list(want)
    assert {r.rule for r in results} <= {"math_verify", "no_answer", "truncated"}


# ---- time limits --------------------------------------------------------------------------------

# sympy evaluates 9^(9^9) (a 370-million-digit integer) when comparing it with a number: minutes.
SLOW = orz("9^{9^{9}}")


def test_timeout_in_worker_scores_zero_and_pool_goes_on():
    cfg = RewardConfig(timeout_s=0.5, num_workers=1)
    with RewardScorer(cfg) as s:
        s.pool.wait_ready()
        pid = s.pool.worker_pids
        t0 = time.perf_counter()
        res = s.score_batch([SLOW, orz("\\{2,1\\}")], ["5", "\\{1,2\\}"], ["stop", "stop"])
        elapsed = time.perf_counter() - t0
        assert (res[0].reward, res[0].rule, res[0].timed_out) == (0.0, "math_verify", True)
        assert (res[1].reward, res[1].timed_out) == (1.0, False)
        assert elapsed < 0.5 + cfg.kill_grace_s  # the in-worker alarm ended it, not the kill
        assert s.pool.worker_pids == pid and s.pool.stats.kills == 0
        assert s.summary()["timed_out"] == 1


def test_stuck_worker_is_killed_and_replaced():
    # Without the in-worker alarm the check runs on: the parent must kill and replace the worker.
    cfg = RewardConfig(timeout_s=0.3, kill_grace_s=0.3, soft_timeout=False, num_workers=1)
    with RewardScorer(cfg) as s:
        s.pool.wait_ready()
        pid = s.pool.worker_pids
        res = s.score_batch([orz("\\{2,1\\}"), SLOW, orz("\\{3,1\\}")], ["\\{1,2\\}", "5", "\\{1,3\\}"], ["stop"] * 3)
        assert [r.reward for r in res] == [1.0, 0.0, 1.0]
        assert [r.timed_out for r in res] == [False, True, False]
        assert s.pool.stats.kills == 1 and s.pool.worker_pids != pid
        # the replacement serves the next batch
        assert s.score_batch([orz("\\{5,4\\}")], ["\\{4,5\\}"], ["stop"])[0].reward == 1.0


# ---- a large batch ------------------------------------------------------------------------------


def test_batch_of_1000(scorer):
    responses, refs, want = [], [], []
    for k in range(250):
        # exact; wrong; equal by value; an integer percent (math-verify: "9\%" equals 9)
        responses += [orz(str(k)), orz(str(k + 1)), orz(f"\\frac{{{2 * k}}}{{2}}"), orz(f"{k}\\%")]
        refs += [str(k), str(k), str(k), str(k)]
        want += [1.0, 0.0, 1.0, 1.0]
    results = scorer.score_batch(responses, refs, ["stop"] * len(responses))
    assert len(results) == 1000
    assert [r.reward for r in results] == want
    assert sum(r.rule == "math_verify" for r in results) == 250  # the percents
    assert not any(r.timed_out or r.parse_failed for r in results)


def test_repeated_pairs_are_checked_once(scorer):
    before = scorer.pool.stats.checks
    res = scorer.score_batch([orz("\\{7,6\\}")] * 6 + [orz("\\{6,8\\}")], ["\\{6,7\\}"] * 7, ["stop"] * 7)
    assert [r.reward for r in res] == [1.0] * 6 + [0.0]
    assert scorer.pool.stats.checks - before == 2


def test_bad_inputs(scorer):
    with pytest.raises(ValueError, match="one entry per sample"):
        scorer.score_batch(["a"], ["1", "2"], ["stop"])
    with pytest.raises(ValueError, match=r"stop_reasons\[1\]"):
        scorer.score_batch(["a", "b"], ["1", "2"], ["stop", "eos"])
    with pytest.raises(TypeError, match=r"answers\[0\]"):
        scorer.score_batch(["a"], [1], ["stop"])
    with pytest.raises(ConfigError, match="reward.timeout_s"):
        validate_reward(RewardConfig(timeout_s=0))


# ---- command line -------------------------------------------------------------------------------


def test_cli_round_trip(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"response": orz("\\frac{1}{2}"), "answer": "0.5", "id": 7},
        {"response": orz("3"), "answer": "4", "stop_reason": "stop"},
        {"response": orz("4"), "answer": "4", "stop_reason": "length"},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert main(["score", str(src), str(dst), "--set", "num_workers=1"]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["reward"] for o in out] == [1.0, 0.0, 0.0]
    assert [o["rule"] for o in out] == ["numeric", "numeric", "truncated"]
    assert out[0]["id"] == 7 and out[0]["stop_reason"] == "stop" and out[0]["extracted"] == "\\frac{1}{2}"
    assert out[2]["timed_out"] is False and out[2]["parse_failed"] is False


def test_cli_malformed_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"response": "x", "answer": "1"}) + "\n{not json\n")
    assert main(["score", str(src)]) == 2
    assert f"{src}:2: not valid JSON" in capsys.readouterr().err
    src.write_text(json.dumps({"response": "x"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: missing key 'answer'"):
        read_jsonl(str(src))
    src.write_text(json.dumps({"response": "x", "answer": "1", "stop_reason": "eos"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: 'stop_reason' must be one of"):
        read_jsonl(str(src))
    assert main(["score", str(src), "--set", "timeout_s=-1"]) == 2
    assert "reward.timeout_s" in capsys.readouterr().err
