"""Cheap answer checks that settle most pairs before math-verify (and sympy) are needed.

Each rule decides only where math-verify (``verify(parse(ref), parse(pred))``, float_rounding=6)
gives the same verdict; the rest (``None``) goes to math-verify in a worker process. Checked against
plain math-verify on the MATH500 benchmark mix and ~15k pairs built from ORZ training answers
(``tests/test_reward.py`` keeps a table of them). Deliberate differences, where math-verify trips on
formatting: a final full stop (``12.`` = ``12``) and whitespace (``\\det(A) > 0`` = ``\\det(A)>0``).

* equal (reward 1): identical strings; identical after formatting-only normalisation (``\\dfrac``,
  spacing commands, ``\\left``/``\\right``, degrees, ``\\text{ units}``, a leading ``x=``); the same
  rational value of two number literals; two arithmetic expressions (``\\frac``, ``\\sqrt``, ``\\pi``,
  powers, single-letter variables) equal at three fixed sample points.
* different (reward 0): two number literals (no percent / degree / unit) apart by more than float
  rounding can bridge; two such expressions clearly apart at a sample point; a number against a word
  (``\\text{east}``) or against a collection of >= 2 distinct numbers (tuple, interval, set, ``\\pm``,
  matrix).
* multiple choice: a reference that is a single option letter (``B``, ``(B)``, ``\\text{(B)}``) is
  compared letter to letter; math-verify is never asked (it would compare the letter as a symbol).

Bounded time: the rules run in the trainer process, where nothing can interrupt them, so they only look at
ASCII strings of at most ``MAX_QUICK_CHARS`` characters (an answer is rarely over 100); anything longer, and
anything with other characters (full-width ``４２``, which Python's ``\\d`` and ``int`` read as 42 and
math-verify does not), goes to math-verify in a worker under ``reward.timeout_s``. The scorer also times
every in-process decision and reports one over ``reward.timeout_s`` as timed out (reward 0).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional

from orz_jax.reward.extract import braced_content

MAX_QUICK_CHARS = 1000  # longer answers go to math-verify (time-limited); keeps every rule here at milliseconds

# ---- normalisation ------------------------------------------------------------------------------

_SPACING = re.compile(r"(?<!\\)\\[!,;:> ]|\\quad|\\qquad|~")  # "\\ " (matrix row end) is no spacing command
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_CMD_SPACE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])")
_SPACE = re.compile(r"\s+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def light_normalize(s: str) -> str:
    """Formatting-only rewrite that never changes the value: math delimiters, spacing, ``\\dfrac``,
    ``\\left``/``\\right``, thousands separators, a final full stop."""
    s = s.strip().replace("\\$", "").replace("$", "")  # "\$18.90" (dollars) and "$...$" delimiters
    s = s.replace("{,}", ",")
    s = _SPACING.sub("", s)
    s = _LEFT_RIGHT.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    # Drop whitespace, except where it ends a command name before a letter ("\\parallel FG").
    s = _SPACE.sub("", _CMD_SPACE.sub("\\1\x00", s)).replace("\x00", " ")
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


_DEGREES = re.compile(r"\^\s*\{?\\circ\}?")
# "5\text{ cm}", "15\mbox{ cm}^2": MATH writes units with a leading space
# One "\s" then "[^{}]*" (spaces included): "\s+[^{}]*" matches the same strings but backtracks between its two
# parts, O(n^2) on "\text{<n spaces>a}b" (12.6 s at n = 100k).
_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{\s[^{}]*\}(?:\^\{?\d\}?)?$")
_ENDS_IN_ALPHA = re.compile(r"[a-zA-Z]\}*$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\d)")
_VAR_PREFIX = re.compile(r"^[a-zA-Z]=(?!=)")
_RELATION = re.compile(r"[<>]|\\(?:le|ge|ne|neq|leq|geq|leqslant|geqslant|lt|gt|in|text|mathrm)(?![a-zA-Z])")


def normalize(s: str) -> str:
    """``light_normalize`` plus decorations math-verify ignores too: degrees, trailing text units,
    ``\\text{}`` wrappers, ``\\frac12`` / ``\\sqrt2`` shorthand, a leading single-letter ``x=``.

    Percent signs are kept: math-verify treats ``50\\%`` = ``50`` but ``0.5\\%`` != ``0.5``.
    """
    s = s.strip()
    relation = _RELATION.search(s) is not None
    s = _UNIT_TEXT.sub("", s)
    s = light_normalize(s)
    s = _DEGREES.sub("", s)
    s = _TEXT_WRAP.sub(r"\1", s)
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    # "x=5" is 5 to math-verify, but "k=n\geq3" is a chained relation and "k=\text{No}" is not "No".
    if s.count("=") == 1 and not relation:
        s = _VAR_PREFIX.sub("", s)
    return s


# ---- number literals ----------------------------------------------------------------------------

_INT = re.compile(r"[+-]?\d+")
_DEC = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_SLASH = re.compile(r"([+-]?\d+)/([+-]?\d+)")
_FRAC = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_MAX_DIGITS = 100  # longer literals go to math-verify (and keep Fraction arithmetic cheap)


def number_literal(s: str) -> Optional[tuple[Fraction, bool]]:
    """``(value, is_integer_literal)`` if ``s`` (already normalised) is one plain number, else None."""
    if len(s) > _MAX_DIGITS:
        return None
    if _INT.fullmatch(s):
        return Fraction(int(s)), True
    if _DEC.fullmatch(s):
        return Fraction(s), False
    m = _SLASH.fullmatch(s)
    if m:
        den = int(m.group(2))
        return (Fraction(int(m.group(1)), den), False) if den != 0 else None
    m = _FRAC.fullmatch(s)
    if m:
        den = int(m.group(3))
        if den == 0:
            return None
        v = Fraction(int(m.group(2)), den)
        return (-v if m.group(1) == "-" else v), False
    return None


def _clearly_different(a: Fraction, b: Fraction) -> bool:
    # math-verify rounds floats to 6 decimals before comparing; a relative gap of 1e-4 is far outside
    # anything that rounding (or its 15-digit evalf) could call equal.
    return abs(a - b) > Fraction(1, 10_000) * max(1, abs(a), abs(b))


# ---- constant expressions ------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\d+\.?\d*|\.\d+|\\(?:frac|sqrt|pi|cdot|times|sin|cos|tan|cot|sec|csc|ln|exp|arcsin|arccos|arctan)(?![a-zA-Z])"
    r"|[-+*/^(){}]|[a-zA-Z]"
)
# Functions, for "different" verdicts only (a trigonometric identity sympy cannot prove would be a
# "yes" here and a "no" there). \log is left out: its base differs between readers.
_FUNCS = {
    "\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan,
    "\\cot": lambda x: 1.0 / math.tan(x), "\\sec": lambda x: 1.0 / math.cos(x), "\\csc": lambda x: 1.0 / math.sin(x),
    "\\ln": math.log, "\\exp": math.exp, "\\arcsin": math.asin, "\\arccos": math.acos, "\\arctan": math.atan,
}  # fmt: skip
# Letters math-verify may read as constants ("e" = E). A plain "i" stays a symbol there ("i^2+2" != 1), so it
# is a variable here too.
_NOT_VARIABLES = frozenset("eEIj")
# The math-verify/latex2sympy unit stripper removes a unit word at the very end ("15 m" = 15, "5 d" = 5),
# so an expression that ends in one of its one-letter units (possibly squared) is left to math-verify.
_ENDS_IN_LETTER = re.compile(r"[tochlsgmd](?:\^\{?\d+\}?)?$")  # its one-letter units
# Fixed sample points for variables: identity testing of polynomial / rational expressions.
_POINTS = (0.5377, 1.8339, 1.3597)  # positive, so \sqrt and \ln of a variable stay defined
_VALUE_LIMIT = 1e15


class _NotConstant(Exception):
    pass


class _ConstParser:
    """Recursive descent over a normalised LaTeX string: numbers, + - * / ^, ``\\cdot``, ``\\times``,
    ``\\frac``, ``\\sqrt``, ``\\pi``, parentheses, implicit products (``3\\sqrt{2}``, ``2\\pi``).

    Letters are variables looked up in ``env`` (none: not a constant). Anything else (``%``, a comma,
    ``!``, subscripts, other commands) is refused, and so is anything LaTeX readers disagree on:
    a digit before ``\\frac`` (a mixed number ``1\\frac{4}{5}``),
    chained ``^`` (``2^3^2``), an implicit product after ``/`` (``1/2\\pi``).
    """

    def __init__(self, s: str, env: Optional[dict[str, float]] = None):
        self.env = env or {}
        self.used_function = False
        self.toks: list[str] = []
        pos = 0
        while pos < len(s):
            if s[pos] == " ":  # kept by light_normalize only between a command and a letter
                pos += 1
                continue
            m = _TOKEN.match(s, pos)
            if m is None:
                raise _NotConstant(s[pos:])
            self.toks.append(m.group())
            pos = m.end()
        self.i = 0

    def peek(self) -> Optional[str]:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: Optional[str] = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _NotConstant(tok)
        self.i += 1
        return tok

    def parse(self) -> float:
        v = self.expr()
        if self.peek() is not None:
            raise _NotConstant(self.peek())
        return v

    def expr(self) -> float:
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            v = v + self.term() if op == "+" else v - self.term()
        return v

    def _starts_atom(self, tok: Optional[str]) -> bool:
        return tok is not None and (
            tok[0].isdigit()
            or tok[0] == "."
            or tok.isalpha()
            or tok in ("\\frac", "\\sqrt", "\\pi", "(")
            or tok in _FUNCS
        )

    def term(self) -> float:
        v = self.unary()
        divided = False
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times", "/"):
                self.take()
                rhs = self.unary()
                if tok == "/":
                    divided = True
                    v = v / rhs
                else:
                    v = v * rhs
            elif self._starts_atom(tok):
                prev = self.toks[self.i - 1]
                if divided or (tok[0].isdigit() or tok[0] == "."):  # "1/2\pi"; "2 3" cannot come apart
                    raise _NotConstant(tok)
                if tok == "\\frac" and prev[0].isdigit():  # mixed number
                    raise _NotConstant(tok)
                v = v * self.power()
            else:
                return v

    def unary(self) -> float:
        if self.peek() in ("+", "-"):
            sign = -1.0 if self.take() == "-" else 1.0
            return sign * self.unary()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        if self.peek() == "{":
            self.take()
            exp = self.expr()
            self.take("}")
        else:
            tok = self.take()
            if not tok.isdigit() or len(tok) != 1:  # "x^23" means x^2 * 3 in LaTeX: refuse
                raise _NotConstant(tok)
            exp = float(tok)
        if self.peek() == "^" or abs(exp) > 64 or (base < 0 and not float(exp).is_integer()):
            raise _NotConstant("^")
        return base**exp

    def atom(self) -> float:
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            return float(tok)
        if tok == "\\pi":
            return math.pi
        if tok.isalpha():
            # "f(x)" may be a function application: refuse rather than read it as a product.
            if tok not in self.env or self.peek() == "(":
                raise _NotConstant(tok)
            return self.env[tok]
        if tok in ("(", "{"):
            v = self.expr()
            self.take(")" if tok == "(" else "}")
            return v
        if tok == "\\frac":
            num = self.frac_arg()
            den = self.frac_arg()
            return num / den
        if tok in _FUNCS:
            self.used_function = True
            nxt = self.peek()
            if nxt in ("(", "{"):
                self.take()
                arg = self.expr()
                self.take(")" if nxt == "(" else "}")
            else:
                # "\sin x" but not "\sin^2x", "\sin 2x" (sin(2x) or sin(2)x?), "\ln x^2", "\sin x\cos x"
                if nxt is None or not (nxt.isalpha() or nxt[0].isdigit()):
                    raise _NotConstant(tok)
                arg = self.atom()
                after = self.peek()
                if after == "^" or self._starts_atom(after):
                    raise _NotConstant(tok)
            return float(_FUNCS[tok](arg))
        if tok == "\\sqrt":
            v = self.braced()
            if v < 0:
                raise _NotConstant("sqrt")
            return math.sqrt(v)
        raise _NotConstant(tok)

    def frac_arg(self) -> float:
        """``{expr}`` or, LaTeX shorthand, one digit: ``\\frac94`` = 9/4, ``\\frac9{19}``."""
        tok = self.peek()
        if tok is not None and tok[0].isdigit() and tok.isdigit():
            if len(tok) > 1:
                self.toks[self.i] = tok[1:]  # the rest of "94" is the next argument / token
            else:
                self.i += 1
            return float(tok[0])
        return self.braced()

    def braced(self) -> float:
        self.take("{")
        v = self.expr()
        self.take("}")
        return v


def _evaluate(s: str, env: Optional[dict[str, float]] = None, functions: bool = False) -> Optional[float]:
    try:
        parser = _ConstParser(s, env)
        v = parser.parse()
    except (_NotConstant, ZeroDivisionError, OverflowError, ValueError, TypeError):
        return None
    if parser.used_function and not functions:
        return None
    return v if isinstance(v, float) and math.isfinite(v) and abs(v) < _VALUE_LIMIT else None


def constant_value(s: str) -> Optional[float]:
    """Value of ``s`` (a ``normalize``d answer) if it is an arithmetic constant (no functions), else None."""
    return _evaluate(s) if len(s) <= 200 else None


def sample_values(s: str, functions: bool = False) -> Optional[tuple[float, ...]]:
    """Values of ``s`` at ``len(_POINTS)`` fixed points for its single-letter variables (all equal for a
    constant); None if ``s`` is not such an expression, names ``e`` / ``E`` / ``I`` / ``j``, or may end in
    a unit math-verify would strip. ``functions``: allow ``\\sin``, ``\\ln``, ... (for "different" only)."""
    if len(s) > 200:
        return None
    letters = sorted(set(re.findall(r"(?<!\\)[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", s))))
    if not letters:
        v = _evaluate(s, functions=functions)
        return None if v is None else (v,) * len(_POINTS)
    if _NOT_VARIABLES.intersection(letters) or _ENDS_IN_LETTER.search(s):
        return None
    out = []
    for k, x in enumerate(_POINTS):
        # A value per letter *name* (both sides must give "n" the same value and "C" another one) and point.
        env = {c: x * (1.0 + 0.0917 * (ord(c) - 64)) + 0.0311 * ord(c) * (k + 1) for c in letters}
        v = _evaluate(s, env, functions)
        if v is None:
            return None
        out.append(v)
    return tuple(out)


_WORD = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{[A-Za-z][A-Za-z ]*\}")


def _is_collection(s: str) -> bool:
    """``s`` (light-normalised) is a tuple / interval / set / list of >= 2 elements, a union, a ``\\pm``, or a
    matrix with >= 2 entries: never equal to a single number (a one-element set can be: "\\{3\\}" = 3)."""
    if s.startswith("\\begin{") and ("\\\\" in s or "&" in s):
        return True
    if "\\cup" in s or "\\pm" in s or "\\mp" in s:  # "1\pm\sqrt{19}" is a two-element set there
        return True
    # Thousands separators are gone (light_normalize), so a comma separates elements: math-verify reads
    # "1,-2" and "1,5" as sets, "(3,4]" as an interval, "x\in[-2,7]" as one. But "2,2" is the set {2},
    # which equals 2: only two elements that are clearly different numbers make it a collection.
    inner = _IN.split(s, 1)[-1]
    for left, right in (("(", ")"), ("[", "]"), ("(", "]"), ("[", ")"), ("\\{", "\\}")):
        if inner.startswith(left) and inner.endswith(right):
            inner = inner[len(left) : len(inner) - len(right)]
            break
    values = set()
    for part in _top_level_split(inner):
        v = constant_value(normalize(part))
        if v is not None and all(abs(v - u) > 1e-4 * max(1.0, abs(v), abs(u)) for u in values):
            values.add(v)
    return len(values) >= 2


_IN = re.compile(r"\\in(?![a-zA-Z])")


def _top_level_split(s: str) -> list[str]:
    """``s`` split at commas outside any (), [], {} nesting."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


# ---- multiple choice ----------------------------------------------------------------------------

_CHOICE_REF = re.compile(r"\(?([A-J])\)?")
# "(B)", "(B) 42", "B", "B.", "B) 42", "B: 42"; a bare letter may be lower case ("b"). Not "a+b" or "Bx".
_CHOICE_PRED = (
    re.compile(r"\(([A-Ja-j])\)(?:\s.*)?", re.DOTALL),
    re.compile(r"([A-Ja-j])(?:[.:)](?:\s.*)?)?", re.DOTALL),
)


_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{")


def _unwrap_choice(s: str) -> str:
    s = s.strip().replace("$", "").strip()
    for _ in range(3):  # "\textbf{\text{(B)}}", "\textbf{(B)} 42"
        m = _TEXT_CMD.match(s)
        inner = braced_content(s, m.end() - 1) if m else None
        if inner is None:
            break
        s = (inner + s[m.end() + len(inner) + 1 :]).strip()
    return s


def choice_letter(reference: str) -> Optional[str]:
    """The option letter if ``reference`` is a multiple-choice answer (``B``, ``(B)``, ``\\text{(B)}``)."""
    m = _CHOICE_REF.fullmatch(_unwrap_choice(reference))
    return m.group(1) if m else None


def predicted_letter(pred: str) -> Optional[str]:
    """The option letter a boxed answer names (``B``, ``b``, ``(B)``, ``\\text{B}``, ``B. 42``), else None."""
    s = _unwrap_choice(pred)
    for pattern in _CHOICE_PRED:
        m = pattern.fullmatch(s)
        if m:
            return m.group(1).upper()
    return None


# ---- the cascade --------------------------------------------------------------------------------


def quick_check(pred: str, reference: str) -> Optional[tuple[float, str]]:
    """``(reward, rule)`` when a cheap rule settles ``pred`` vs ``reference``; None: ask math-verify.

    ``pred`` and ``reference`` are the extracted box content and the stripped reference (non-empty).
    Over ``MAX_QUICK_CHARS`` characters or not ASCII: None (see the module docstring).
    """
    if max(len(pred), len(reference)) > MAX_QUICK_CHARS or not (pred.isascii() and reference.isascii()):
        return None
    if pred == reference:
        return 1.0, "exact"
    light_p, light_r = light_normalize(pred), light_normalize(reference)
    norm_p, norm_r = normalize(pred), normalize(reference)
    if light_p == light_r:
        return 1.0, "normalized"
    if norm_p == norm_r:
        # Unwrapping "\text{...}" is safe unless the text ends in a letter: math-verify strips a trailing unit
        # word outside "\text{}" only ("North" reads as "Nort" + hours, "4833 km" as 4833), so
        # "\text{North}" != "North" and "\text{4833 km}" != "4833 km" there.
        if not (_ENDS_IN_ALPHA.search(norm_p) and (_TEXT_WRAP.search(pred) or _TEXT_WRAP.search(reference))):
            return 1.0, "normalized"
    num_p, num_r = number_literal(norm_p), number_literal(norm_r)
    if num_p is not None and num_r is not None and num_p[0] == num_r[0]:
        return 1.0, "numeric"
    # A "no" only from undecorated literals: "50\%" vs "0.5" or "90^\circ" vs "\frac{\pi}{2}" are math-verify's.
    lit_p, lit_r = number_literal(light_p), number_literal(light_r)
    if lit_p is not None and lit_r is not None:
        if (lit_p[1] and lit_r[1]) or _clearly_different(lit_p[0], lit_r[0]):
            return 0.0, "numeric"
        return None
    # Arithmetic constants ("3\sqrt{13}", "\frac{\pi}{6}", "90^\circ"): equal to float precision ->
    # sympy proves it too; clearly apart -> no rounding bridges it. In between: math-verify.
    # Expressions in single-letter variables ("2k+2" vs "2(k+1)", "8n^2+4n+1" vs "9") are compared at
    # fixed sample points: equal everywhere -> the same polynomial / rational function (sympy agrees);
    # clearly apart somewhere -> different.
    val_p, val_r = constant_value(norm_p), constant_value(norm_r)
    # "x=5" counts as its right side (math-verify unwraps a single-variable assignment too); other
    # equations and relations are math-verify's.
    if "=" not in norm_p and "=" not in norm_r:
        at_p, at_r = sample_values(norm_p), sample_values(norm_r)
        if at_p is not None and at_r is not None:
            gaps = [abs(a - b) / max(1.0, abs(a), abs(b)) for a, b in zip(at_p, at_r)]
            if max(gaps) <= (1e-12 if val_p is not None and val_r is not None else 1e-9):
                return 1.0, "numeric"
            if max(gaps) > 1e-4:
                return 0.0, "numeric"
            return None
        # With functions ("-\ln|x|+C" aside: "e^{2x}\cos x", "\frac{\sin x}{x}") only "different" is safe.
        at_p, at_r = sample_values(norm_p, functions=True), sample_values(norm_r, functions=True)
        if at_p is not None and at_r is not None:
            gaps = [abs(a - b) / max(1.0, abs(a), abs(b)) for a, b in zip(at_p, at_r)]
            if max(gaps) > 1e-3:
                return 0.0, "numeric"
    # A number against a word ("\text{east}") or against a collection of >= 2 things.
    if val_p is not None or val_r is not None:
        other = light_r if val_p is not None else light_p
        if _WORD.fullmatch(other) or _is_collection(other):
            return 0.0, "numeric"
    return None
