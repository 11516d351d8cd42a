"""Per-prompt pass rates of a training run: ``<run dir>/pass_rates.jsonl``, one line per prompt per iteration.

    {"iteration": 12, "source": "orz_math_57k_collected", "file": "data/orz/orz_math_57k_collected.json",
     "index": 4711, "correct": 3, "samples": 64}

``iteration`` is the iteration the samples trained (as in ``metrics.jsonl``), ``source`` / ``index`` the
prompt's record (:class:`orz_jax.data.records.PromptRecord`: file name without ``.json`` and position in
the file; ``"synthetic"`` for the built-in task), ``file`` the training file as the config names it, and
``correct`` of ``samples`` responses scored 1. ORZ-32B's annealing set is mined from such counts
(``python -m orz_jax.data hard-set``, :mod:`orz_jax.data.hard_set`).

With several JAX processes each writes its own prompts to ``pass_rates.process<i>.jsonl``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterator, Sequence

import numpy as np

__all__ = ["PassRateLog", "read_pass_rates"]

FILE = "pass_rates.jsonl"

log = logging.getLogger(__name__)


class PassRateLog:
    """Appends one line per prompt of each iteration (see the module docstring).

    files: ``{source name: path as configured}`` for the training files (``"synthetic"`` maps to itself).
    """

    def __init__(self, out_dir: str, files: dict[str, str], process_index: int = 0, process_count: int = 1):
        name = FILE if process_count == 1 else f"pass_rates.process{process_index}.jsonl"
        self.path = os.path.join(out_dir, name)
        self.files = dict(files)

    def write(self, iteration: int, sources: Sequence[str], indices: Sequence[int], prompt_index: np.ndarray,
              rewards: np.ndarray) -> None:
        """sources, indices: [prompts] of this process's batch; prompt_index: [samples] int, each sample's
        prompt in the batch; rewards: [samples] float (1.0 = correct). Prompts without samples are skipped."""
        prompt_index = np.asarray(prompt_index)
        correct = np.bincount(prompt_index, weights=np.asarray(rewards) > 0.5, minlength=len(sources))
        samples = np.bincount(prompt_index, minlength=len(sources))
        with open(self.path, "a") as f:
            for p, (src, idx) in enumerate(zip(sources, indices)):
                if samples[p] == 0:  # dropped by the rollout (over the prompt limit): no pass rate to report
                    continue
                f.write(json.dumps({"iteration": int(iteration), "source": src, "file": self.files.get(src, src),
                                    "index": int(idx), "correct": int(correct[p]), "samples": int(samples[p])})
                        + "\n")

    def truncate_after(self, iteration: int) -> None:
        """Drop lines past ``iteration`` (written after the checkpoint a run resumes from)."""
        if not os.path.isfile(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["iteration"] <= iteration:
                        keep.append(line)
                except (ValueError, KeyError):  # a line cut by a kill or a full disk: drop it, as metrics.jsonl does
                    log.warning("%s: dropped an incomplete line on restart", self.path)
        with open(self.path, "w") as f:
            f.writelines(keep)


def read_pass_rates(run_dir: str) -> Iterator[dict]:
    """Every line of every process's pass-rate file of ``run_dir``; ValueError naming the file and line
    when one is not a pass-rate record."""
    paths = sorted(glob.glob(os.path.join(run_dir, "pass_rates*.jsonl")))
    if not paths:
        raise FileNotFoundError(f"{run_dir}: no {FILE} (is it the run directory of a training run?)")
    keys = ("iteration", "source", "file", "index", "correct", "samples")
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or any(k not in rec for k in keys):
                        raise ValueError(f"expected the keys {list(keys)}")
                except ValueError as e:
                    raise ValueError(f"{path}: line {n}: not a pass-rate record: {e}") from None
                yield rec
