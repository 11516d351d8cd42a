"""``metrics.jsonl``: one JSON object per line, one line per iteration, a log a restart can trust.

* Every line goes to disk whole or not at all: it is written with one ``os.write`` on an append-only
  descriptor, and when the write fails part-way (a full disk) the file is cut back to its previous
  length before the error is raised. A line cut by a crash of the OS or the process is dropped, with a
  warning, the next time the log is opened.
* Iterations are unique: :meth:`MetricsLog.start` drops every line past the iteration a run starts
  from, and writing an iteration that already has a line merges the new values into that line (the
  final evaluation of an iteration whose training line is already there, a rerun of a finished run).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


def write_whole(path: str, data: bytes) -> None:
    """Append ``data`` to ``path`` with one ``os.write`` (retried for short writes). On an OSError the
    file is cut back to its length before the call, so a reader never sees half of ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:  # nothing more to do; the next start drops the cut line
                pass
            raise
    finally:
        os.close(fd)


def read_records(path: str) -> list[dict]:
    """The JSON records of ``path``. A last line that is cut (no newline, or not valid JSON) is dropped
    with a warning; a bad line elsewhere is dropped with a warning naming its line number."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if tail.strip():
        log.warning("%s: dropping a partial last line (%d bytes, no newline): it was being written when the "
                    "previous run stopped", path, len(tail))
    out = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int):
                raise ValueError("not an object with an integer 'iteration'")
        except ValueError as e:
            log.warning("%s: dropping unreadable line %d (%s)", path, i, str(e).splitlines()[0])
            continue
        out.append(rec)
    return out


def _line(rec: dict) -> bytes:
    return (json.dumps(rec, allow_nan=True) + "\n").encode()


class MetricsLog:
    """JSONL (always) + TensorBoard (when ``tensorboard``), written by process 0 only (``enabled``)."""

    def __init__(self, out_dir: str, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._iterations: set[int] = set()
        self._tb = None
        if self.enabled and tensorboard:
            try:
                from flax.metrics.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception as e:  # TensorBoard is optional: never let it stop a run
                log.warning("TensorBoard disabled: %s", e)

    def start(self, last_iteration: int) -> None:
        """Open the log for a run whose state is that after ``last_iteration`` (-1: a fresh start, no
        checkpoint): drop cut lines and every line past ``last_iteration``, keep one line per iteration."""
        if not self.enabled:
            return
        records = read_records(self.path)
        kept: dict[int, dict] = {}
        for rec in records:
            it = rec["iteration"]
            if it <= last_iteration:  # an older log with duplicates: merge them into one line
                kept[it] = {**kept.get(it, {}), **rec}
        if os.path.isfile(self.path):
            body = b"".join(_line(kept[it]) for it in sorted(kept))
            if len(kept) != len(records) or body != _raw(self.path):
                _replace(self.path, body)
        self._iterations = set(kept)

    def get(self, iteration: int) -> Optional[dict]:
        """The record of ``iteration`` on disk, or None."""
        if not self.enabled or iteration not in self._iterations:
            return None
        for rec in read_records(self.path):
            if rec["iteration"] == iteration:
                return rec
        return None

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if iteration in self._iterations:
            # Rare (a final eval after the training line): rewrite the file with the two merged.
            records = read_records(self.path)
            for rec in records:
                if rec["iteration"] == iteration:
                    rec.update(metrics)
            _replace(self.path, b"".join(_line(r) for r in records))
        else:
            write_whole(self.path, _line({"iteration": iteration, **metrics}))
            self._iterations.add(iteration)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and np.isfinite(v):
                    self._tb.scalar(k, v, iteration)
            self._tb.flush()


def _raw(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _replace(path: str, body: bytes) -> None:
    """Atomically replace ``path`` by ``body`` (write a sibling, fsync, rename): a failure leaves the old file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
