"""A pool of math-verify worker processes with per-check time limits and stuck-worker replacement.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one worker (killing one breaks the
whole pool) and cannot tell which task a worker is stuck on. Here each worker is a plain subprocess
(``_worker.py``) joined by a socket; the parent sends it a chunk of checks only when it is idle, the
worker answers item by item, and the parent times every item from the previous answer:

* the worker's own SIGALRM deadline (``cfg.timeout_s``) ends a slow check and reports it;
* an item still unanswered ``timeout_s + kill_grace_s`` after the worker started it means code that
  ignores signals: the worker is killed (SIGKILL), that item scores 0 as timed out, the rest of its
  chunk goes back in the queue, and a fresh worker is started;
* a worker that dies mid-chunk (segfault, out of memory) costs only the item it was on
  (``parse_failed``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Optional, Sequence

from orz_jax.config import RewardConfig

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome of one math-verify check."""

    equal: bool
    timed_out: bool = False
    parse_failed: bool = False


@dataclasses.dataclass
class PoolStats:
    """Cumulative counters of a pool (for logging)."""

    checks: int = 0  # verdicts returned
    timeouts: int = 0  # checks that hit the deadline (soft or hard)
    kills: int = 0  # workers killed because a check ignored the deadline
    crashes: int = 0  # workers that died on their own mid-check
    worker_starts: int = 0
    busy_s: float = 0.0  # wall time spent inside check() calls


class _Worker:
    def __init__(self, cfg: RewardConfig):
        parent_sock, child_sock = socket.socketpair()
        cmd = [
            sys.executable,
            _WORKER_SCRIPT,
            "--fd", str(child_sock.fileno()),
            "--timeout-s", str(cfg.timeout_s if cfg.soft_timeout else 0.0),
            "--memory-mb", str(cfg.worker_memory_mb),
            "--float-rounding", str(cfg.float_rounding),
            "--numeric-precision", str(cfg.numeric_precision),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        child_sock.close()  # the child holds its copy; ours would hide its EOF
        self.conn = Connection(parent_sock.detach())
        self.started = time.monotonic()
        self.ready = False
        self.outstanding: collections.deque[int] = collections.deque()  # item indices, in send order
        self.last_progress = 0.0  # when its current item started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed process always goes
            pass
        self.conn.close()

    def stop(self) -> None:
        """Polite shutdown: ask, then kill if it does not exit."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class VerifyPool:
    """``cfg.num_workers`` math-verify processes. ``check(pairs)`` blocks until every pair has a verdict.

    Workers start at construction, in the background (a fresh one takes 1-5 s to import sympy and run
    its warm-up checks), and live until :meth:`close`. Thread-safe: concurrent ``check`` calls are
    serialised.
    """

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [self._start_worker() for _ in range(cfg.num_workers)]

    def _start_worker(self) -> _Worker:
        self.stats.worker_starts += 1
        return _Worker(self.cfg)

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def check(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for ``(reference, prediction)`` pairs, in order."""
        if self._closed:
            raise RuntimeError("VerifyPool is closed")
        with self._lock:
            t0 = time.perf_counter()
            out = self._run(pairs)
            self.stats.busy_s += time.perf_counter() - t0
            self.stats.checks += len(out)
            return out

    # ---- the scheduling loop ----------------------------------------------------------------

    def _run(self, pairs: Sequence[tuple[str, str]]) -> list[Optional[Verdict]]:
        cfg = self.cfg
        results: list[Optional[Verdict]] = [None] * len(pairs)
        queue = collections.deque(range(len(pairs)))
        remaining = len(pairs)
        hard_limit = cfg.timeout_s + cfg.kill_grace_s
        while remaining:
            now = time.monotonic()
            # Dispatch to idle workers. Check times vary 100-fold (1 ms to 0.2 s), so chunks stay small
            # against the queue (about 4 per worker) and no worker idles while another has a long tail.
            idle = [w for w in self._workers if w.ready and not w.outstanding]
            for w in idle:
                if not queue:
                    break
                size = max(1, min(cfg.chunk_size, -(-len(queue) // (4 * len(self._workers)))))
                chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
                try:
                    w.conn.send([(i, pairs[i][0], pairs[i][1]) for i in chunk])
                except OSError:  # died while idle; noticed below through EOF
                    queue.extendleft(reversed(chunk))
                    continue
                w.outstanding.extend(chunk)
                w.last_progress = now

            # Sleep until a message arrives or the nearest deadline.
            deadlines = [
                (w.last_progress + hard_limit) if w.ready else (w.started + cfg.worker_start_timeout_s)
                for w in self._workers
                if w.outstanding or not w.ready
            ]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            conns = [w.conn for w in self._workers if w.outstanding or not w.ready]
            if not conns:  # pragma: no cover - every worker ready and idle, yet items remain: impossible
                raise RuntimeError("reward pool: no worker can take the queued checks")
            ready_conns = wait(conns, timeout=timeout)

            for w in list(self._workers):
                if w.conn in ready_conns:
                    remaining -= self._drain(w, results, queue)
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.outstanding and now - w.last_progress > hard_limit:
                    # Stuck where SIGALRM cannot reach (or the soft deadline is off): kill, replace.
                    idx = w.outstanding.popleft()
                    results[idx] = Verdict(False, timed_out=True)
                    remaining -= 1
                    self.stats.timeouts += 1
                    self.stats.kills += 1
                    queue.extendleft(reversed(w.outstanding))
                    self._replace(w)
                elif not w.ready and now - w.started > cfg.worker_start_timeout_s:
                    self._fail_start(w, f"not ready after {cfg.worker_start_timeout_s:.0f} s")
        return results

    def _drain(self, w: _Worker, results: list, queue: collections.deque) -> int:
        """Read every message ``w`` has sent; return how many results arrived."""
        n = 0
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    continue
                if msg[0] == "error":
                    self._fail_start(w, msg[1])
                idx, equal, timed_out, failed = msg
                expected = w.outstanding.popleft()
                assert idx == expected, f"reward worker answered item {idx}, expected {expected}"
                results[idx] = Verdict(bool(equal), bool(timed_out), bool(failed))
                self.stats.timeouts += bool(timed_out)
                w.last_progress = time.monotonic()
                n += 1
        except (EOFError, OSError):
            # The worker died on its own. Before it was ready this is a start-up failure; otherwise the
            # item it was on is lost (scored as a parse failure) and the rest are re-queued.
            if not w.ready:
                self._fail_start(w, f"exited with code {w.proc.wait()} before it was ready")
            if w.outstanding:
                idx = w.outstanding.popleft()
                results[idx] = Verdict(False, parse_failed=True)
                n += 1
            self.stats.crashes += 1
            queue.extendleft(reversed(w.outstanding))
            self._replace(w)
        return n

    def _replace(self, w: _Worker) -> None:
        w.outstanding.clear()
        w.kill()
        self._workers[self._workers.index(w)] = self._start_worker()

    def _fail_start(self, w: _Worker, why: str) -> None:
        w.kill()
        self._workers.remove(w)
        self.close()
        raise RuntimeError(f"reward worker (pid {w.proc.pid}, {_WORKER_SCRIPT}) failed to start: {why}")

    # ---- lifetime ----------------------------------------------------------------------------

    def wait_ready(self) -> None:
        """Block until every worker has finished importing (benchmarks; ``check`` waits anyway)."""
        with self._lock:
            for w in list(self._workers):
                if w.ready:
                    continue
                left = w.started + self.cfg.worker_start_timeout_s - time.monotonic()
                try:
                    if not w.conn.poll(max(0.0, left)):
                        self._fail_start(w, f"not ready after {self.cfg.worker_start_timeout_s:.0f} s")
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    self._fail_start(w, f"exited with code {w.proc.wait()} before it was ready")
                if msg[0] != "ready":
                    self._fail_start(w, str(msg[1]))
                w.ready = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.stop()
        self._workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
