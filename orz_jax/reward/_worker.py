"""math-verify worker process: answers ``(index, reference, prediction)`` checks under a time limit.

Started by :class:`orz_jax.reward.pool.VerifyPool` as ``python _worker.py --fd N ...`` (a script, not
``multiprocessing``): a spawned ``multiprocessing`` child re-imports the trainer's ``__main__`` (JAX, the
model code) and a forked one inherits JAX's threads; this file needs only the standard library and
math-verify.

Time limits. math-verify's own ``timeout_seconds`` / ``parsing_timeout`` use ``signal.alarm``: whole
seconds only, they fail outside the main thread, a time-out is swallowed into ``False`` / ``[]`` (not
countable), and their ``finally: signal.alarm(0)`` would cancel any timer of ours. So both are switched
off (``None``) and one ``setitimer`` deadline covers the whole check (parse reference, parse prediction,
verify). Its handler raises :class:`CheckTimeout`, a ``BaseException`` so that math-verify's and sympy's
``except Exception`` blocks do not swallow it. Code that never returns to the interpreter (one huge
integer multiplication) ignores signals; for that the parent kills the process (see ``pool.py``).

Protocol over a ``multiprocessing.connection.Connection``: the worker sends ``("ready", pid)`` once
warmed up (or ``("error", text)``), then for every received list of ``(index, reference, prediction)``
one ``(index, equal, timed_out, parse_failed)`` tuple per item, in order. ``None`` or EOF: exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback


class CheckTimeout(BaseException):
    """Raised by the SIGALRM handler when a check runs past its deadline."""


class ParseCrash(Exception):
    """``math_verify.parse`` raised (reported as ``parse_failed``)."""


def _on_alarm(signum, frame):
    raise CheckTimeout()


def _boxed(s: str) -> str:
    # Wrapping makes math-verify's LaTeX extractor take the whole string as the answer (its boxed
    # pattern has the highest priority) instead of hunting for a sub-expression.
    return "\\boxed{" + s + "}"


class Verifier:
    """math-verify with its own timeouts off, plus a cache of parsed references (a prompt's n samples
    share one reference)."""

    def __init__(self, float_rounding: int = 6, numeric_precision: int = 15, cache_size: int = 4096):
        import logging

        import math_verify
        import math_verify.grader
        import math_verify.parser

        # We pass timeout None on purpose; silence the one-time "timeout is disabled" warning.
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        self._parse = math_verify.parse
        self._verify = math_verify.verify
        self.float_rounding = float_rounding
        self.numeric_precision = numeric_precision
        self.cache_size = cache_size
        self._ref_cache: dict[str, list] = {}

    def parse(self, s: str) -> list:
        try:
            return self._parse(_boxed(s), parsing_timeout=None, raise_on_error=True)
        except Exception as e:  # CheckTimeout is a BaseException and passes through
            raise ParseCrash(f"{type(e).__name__}: {e}") from e

    def check(self, reference: str, prediction: str) -> tuple[bool, bool]:
        """``(equal, parse_failed)``. ``parse_failed``: parse raised, or the reference parsed to nothing."""
        ref = self._ref_cache.get(reference)
        try:
            if ref is None:
                ref = self.parse(reference)
                if len(self._ref_cache) >= self.cache_size:
                    self._ref_cache.clear()
                self._ref_cache[reference] = ref
            if not ref:
                return False, True
            pred = self.parse(prediction)
        except ParseCrash:
            return False, True
        equal = self._verify(
            ref,
            pred,
            float_rounding=self.float_rounding,
            numeric_precision=self.numeric_precision,
            timeout_seconds=None,
        )
        return bool(equal), False


def check_with_deadline(verifier: Verifier, reference: str, prediction: str, seconds: float | None):
    """``(equal, timed_out, parse_failed)`` for one check; ``seconds`` None: no in-process deadline.

    Must run in the main thread of its process (signals are delivered there).
    """
    if seconds is None:
        equal, failed = verifier.check(reference, prediction)
        return equal, False, failed
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            equal, failed = verifier.check(reference, prediction)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except CheckTimeout:  # also when the alarm lands between the check's return and the cancel
        return False, True, False
    return equal, False, failed


WARMUP = (
    ("\\{1, 2\\}", "\\{2, 1\\}"),
    ("[0,1)", "(0,1]"),
    ("(1,2)", "(2,1)"),
    ("1+2i", "2-i"),
    ("y=2x+1", "2x+1"),
    ("x \\in (0, 1)", "(0,1)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1,2)"),
    ("x^2-1", "(x-1)(x+1)"),
    ("\\frac{\\sqrt{3}}{2}", "0.866"),
    ("50\\%", "0.5"),
    ("\\text{yes}", "7"),
    ("(-\\infty, 0] \\cup (1, \\infty)", "3"),
    ("1 \\pm \\sqrt{2}", "2"),
    ("12_3", "5"),
    ("\\cos x", "\\sin x"),
    ("a \\le 3", "3"),
)


def _limit_memory(mb: int) -> None:
    if mb > 0:
        import resource

        limit = mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(conn, timeout_s: float | None, verifier: Verifier) -> None:
    """Answer check lists from ``conn`` until ``None`` or EOF."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        for index, reference, prediction in msg:
            equal, timed_out, failed = check_with_deadline(verifier, reference, prediction, timeout_s)
            try:
                conn.send((index, equal, timed_out, failed))
            except OSError:  # the parent went away (closed mid-batch): nothing left to answer
                return


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fd", type=int, required=True, help="socket fd of the parent connection")
    ap.add_argument("--timeout-s", type=float, default=0.0, help="per-check deadline; 0: none (parent kills)")
    ap.add_argument("--memory-mb", type=int, default=0)
    ap.add_argument("--float-rounding", type=int, default=6)
    ap.add_argument("--numeric-precision", type=int, default=15)
    args = ap.parse_args(argv)

    from multiprocessing.connection import Connection

    conn = Connection(args.fd)
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        _limit_memory(args.memory_mb)
        verifier = Verifier(args.float_rounding, args.numeric_precision)
        t0 = time.perf_counter()
        # Warm-up: the first parse loads the LaTeX grammar, and sympy imports and caches a lot on the first
        # set / interval / matrix / complex / relation comparison (0.1-0.5 s each). Pay that before
        # reporting ready rather than inside the first batch's deadlines.
        assert verifier.check("\\frac{1}{2}", "0.5") == (True, False)
        for reference, prediction in WARMUP:
            check_with_deadline(verifier, reference, prediction, 10.0)
        warm_s = time.perf_counter() - t0
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    conn.send(("ready", os.getpid(), warm_s))
    serve(conn, args.timeout_s if args.timeout_s > 0 else None, verifier)


if __name__ == "__main__":
    # Run as a script, sys.path[0] is this package directory: drop it so that no module here can
    # shadow a top-level module that sympy or math-verify imports.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    main()
