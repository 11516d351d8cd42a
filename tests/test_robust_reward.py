"""The reward's in-process checks are bounded in time and never disagree with math-verify (issue 19,
failure 6): the quadratic ``_UNIT_TEXT`` regex is linear now, inputs the rules cannot bound or read the way
math-verify does (over ``MAX_QUICK_CHARS``, non-ASCII digits such as ``４２``) go to math-verify, a slow
in-process decision is reported as timed out, and generated pairs (digits incl. Unicode, fractions, units,
text, degrees, percent, surds) get the same verdict from the cheap rules as from math-verify itself."""

from __future__ import annotations

import random
import re
import time
from fractions import Fraction

import pytest

from orz_jax.config import RewardConfig
from orz_jax.reward import RewardScorer, extract_answer
from orz_jax.reward import rules
from orz_jax.reward.rules import MAX_QUICK_CHARS, normalize, quick_check

# The pattern before the fix, as the reference for what the linear one must match.
_OLD_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{\s+[^{}]*\}(?:\^\{?\d\}?)?$")


def _orz(box: str) -> str:
    return f"<think>...</think> <answer>\\boxed{{{box}}}</answer>"


def test_unit_text_regex_is_linear_and_matches_what_it_did():
    bomb = "\\text{" + " " * 100_000 + "a}b"  # 12.6 s with the old pattern (issue 19)
    t0 = time.perf_counter()
    assert rules._UNIT_TEXT.sub("", bomb) == bomb
    assert time.perf_counter() - t0 < 0.5  # linear: a few milliseconds; quadratic: seconds
    rng = random.Random(0)
    pieces = ["\\text{", "\\mbox{", " ", "  ", "a", "cm", "}", "{", "^2", "^{3}", "5", "\\"]
    for _ in range(3000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        assert rules._UNIT_TEXT.sub("", s) == _OLD_UNIT_TEXT.sub("", s), s


BOMBS = {
    "unit text": "\\text{" + " " * 1_000_000 + "a}b",
    "thousands": "1" + ",000" * 250_000 + "x",
    "commas": "1," * 500_000,
    "nested text": "\\text{ " * 150_000,
    "fracs": "\\frac" * 200_000,
    "braces": "{" * 500_000 + "}" * 500_000,
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_huge_answers_skip_the_in_process_rules_at_once(name):
    bomb = BOMBS[name]
    t0 = time.perf_counter()
    assert quick_check(bomb, "5") is None and quick_check("5", bomb) is None  # math-verify's, time-limited
    extract_answer(_orz(bomb))  # the extraction runs in process too
    assert time.perf_counter() - t0 < 1.0  # linear passes over 1 MB: tens of milliseconds


def test_just_under_the_cap_stays_fast():
    for bomb in BOMBS.values():
        s = bomb[:MAX_QUICK_CHARS]
        t0 = time.perf_counter()
        quick_check(s, "5")
        quick_check(s, s + "1")
        assert time.perf_counter() - t0 < 0.25, s[:40]


def test_non_ascii_digits_are_left_to_math_verify():
    # Python reads these as 42 ("\d" matches them, int() parses them); math-verify does not.
    for pred in ("４２", "٤٢", "4２", "𝟒𝟐"):
        assert quick_check(pred, "42") is None and quick_check("42", pred) is None


def test_a_slow_in_process_check_is_reported_as_timed_out(monkeypatch):
    def slow(pred, ref):
        time.sleep(0.6)
        return 1.0, "numeric"

    with RewardScorer(RewardConfig(num_workers=1, timeout_s=0.3)) as scorer:
        fast = scorer.score_batch([_orz("5")], ["5"], ["stop"])[0]
        monkeypatch.setattr("orz_jax.reward.scorer.quick_check", slow)
        late = scorer.score_batch([_orz("5")], ["5"], ["stop"])[0]
        assert scorer.summary()["timed_out"] == 1.0
    assert (fast.reward, fast.rule, fast.timed_out) == (1.0, "exact", False)
    assert (late.reward, late.rule, late.timed_out) == (0.0, "numeric", True)


# ---- the cheap rules against math-verify on generated pairs ----------------------------------------

UNICODE_DIGITS = ("０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗")
UNITS = ("cm", "m", "inches", "dollars", "units", "km", "h")
WORDS = ("east", "yes", "no", "odd", "even", "North", "Tuesday")


def _unicode_digits(n: int, rng: random.Random) -> str:
    table = rng.choice(UNICODE_DIGITS)
    mixed = rng.random() < 0.3  # only some digits replaced
    return "".join(table[int(c)] if c.isdigit() and (not mixed or rng.random() < 0.5) else c for c in str(n))


def _number_forms(v: Fraction) -> list[str]:
    if v.denominator == 1:
        n = v.numerator
        return [str(n), f"{n}.0", f"{n}.00"] + ([f"{n:,}"] if abs(n) >= 1000 else []) + ([f"+{n}"] if n >= 0 else [])
    p, q = v.numerator, v.denominator
    out = [f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{p}}}{{{q}}}"]
    out += [f"-\\frac{{{-p}}}{{{q}}}"] if p < 0 else []
    return out + ([str(float(v))] if q in (2, 4, 5, 8) else [])


def _pair(rng: random.Random) -> tuple[str, str]:
    """One (prediction, reference) pair of a random kind; about half of them equal."""
    kind = rng.choice(["int", "frac", "unicode", "unit", "text", "degree", "var", "percent", "surd"])
    n = rng.choice([rng.randint(-20, 20), rng.randint(0, 5000), rng.randint(-10**6, 10**6)])
    v = Fraction(n, rng.choice([1, 1, 2, 3, 4, 5, 7, 8]))
    w = v if rng.random() < 0.5 else v + rng.choice([1, -1, Fraction(1, 2), Fraction(1, 1000)])
    m = abs(n) if rng.random() < 0.6 else abs(n) + rng.choice([1, 2])
    if kind == "int":
        return rng.choice(_number_forms(Fraction(n))), rng.choice(_number_forms(Fraction(m if n >= 0 else n)))
    if kind == "frac":
        return rng.choice(_number_forms(w)), rng.choice(_number_forms(v))
    if kind == "unicode":
        a, b = _unicode_digits(m, rng), str(abs(n))
        return (a, b) if rng.random() < 0.5 else (b, a)
    if kind == "unit":
        u = rng.choice(UNITS)
        forms = [f"{m}\\text{{ {u}}}", f"{m} \\text{{ {u}}}", f"{m}\\mbox{{ {u}}}", f"{m}\\text{{ {u}}}^2",
                 f"{m}\\text{{{u}}}", f"{m} {u}", f"\\text{{{m} {u}}}"]
        return rng.choice(forms), str(abs(n)) if rng.random() < 0.6 else rng.choice(forms)
    if kind == "text":
        a = rng.choice(WORDS)
        b = a if rng.random() < 0.5 else rng.choice(WORDS)
        return (rng.choice([f"\\text{{{a}}}", a, f"\\textbf{{{a}}}", f"\\mathrm{{{a}}}"]),
                rng.choice([f"\\text{{{b}}}", b, str(n)]))
    if kind == "degree":
        return rng.choice([f"{m % 360}^\\circ", f"{m % 360}^{{\\circ}}", f"{m % 360}"]), f"{abs(n) % 360}^\\circ"
    if kind == "var":
        return f"{rng.choice('xyk')}={rng.choice(_number_forms(w))}", rng.choice(_number_forms(v))
    if kind == "percent":
        return rng.choice([f"{m}\\%", f"{m}", f"{m / 100}"]), f"{abs(n)}\\%"
    a, b = rng.randint(2, 9), rng.randint(2, 30)
    forms = [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a}\\pi", f"\\frac{{{a}\\pi}}{{{b}}}", f"{a}+{b}",
             f"{a + b}", f"{a}^{{2}}", f"{a * a}", f"\\frac{{\\sqrt{{{b}}}}}{{{a}}}"]
    return rng.choice(forms), rng.choice(forms)


def test_cheap_rules_never_disagree_with_math_verify_on_generated_pairs():
    """Every pair a cheap rule decides gets the same verdict from math-verify as the reward's workers run it
    (``Verifier``: float_rounding 6, numeric precision 15), the independent reference. Found before the fix:
    ``４２`` = ``42``, ``\\text{North}`` = ``North`` and ``\\text{4833 km}`` = ``4833 km`` (math-verify strips a
    trailing unit word outside ``\\text{}`` only)."""
    from orz_jax.reward._worker import Verifier

    verifier = Verifier()
    rng = random.Random(19)
    decided, kinds = 0, set()
    fixed = [("４２", "42"), ("\\text{North}", "North"), ("4833 km", "\\text{4833 km}"), ("\\text{east}", "east")]
    for pred, ref in fixed + [_pair(rng) for _ in range(300)]:
        got = quick_check(pred, ref)
        if got is None:
            continue
        decided += 1
        kinds.add(got)
        equal, _ = verifier.check(ref, pred)
        assert got[0] == float(equal), (pred, ref, got, equal)
    assert decided >= 150 and {(1.0, "normalized"), (1.0, "numeric"), (0.0, "numeric")} <= kinds
