"""Training curves as the ORZ paper shows them, from runs' ``metrics.jsonl``.

    python -m orz_jax.plot runs/demo runs/demo_lr2 --out plots/

Three PNGs (matplotlib, Agg backend, no display needed):

* ``reward.png``: mean training reward per iteration;
* ``response_length.png``: mean response length of correct (solid) and incorrect (dashed) samples;
* ``eval_accuracy.png``: eval avg@n per eval set (one marker line per set) over iterations.

Several runs overlay with one colour per run and a legend; a run is named by its config's
``experiment.name`` (from ``config.yaml``), or its directory name when that is missing or shared.
The trainer calls :func:`plot_runs` at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["RunCurves", "load_run", "make_figures", "plot_runs", "main"]

_EVAL_KEY = re.compile(r"^eval/(?P<set>.+)/avg@(?P<n>\d+)$")


class RunCurves:
    """The series of one run: ``series[key] = (iterations, values)`` for every numeric key of its
    ``metrics.jsonl`` (NaN values, e.g. the length of correct samples when none was correct, are dropped)."""

    def __init__(self, name: str, run_dir: str, series: dict[str, tuple[list[int], list[float]]]):
        self.name = name
        self.run_dir = run_dir
        self.series = series

    def get(self, key: str) -> tuple[list[int], list[float]]:
        return self.series.get(key, ([], []))

    def eval_keys(self) -> list[str]:
        return sorted(k for k in self.series if _EVAL_KEY.match(k))


def _run_name(run_dir: str) -> str:
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        import yaml

        with open(cfg_path) as f:
            name = ((yaml.safe_load(f) or {}).get("experiment") or {}).get("name")
        if isinstance(name, str) and name:
            return name
    return os.path.basename(os.path.normpath(run_dir))


def load_run(run_dir: str) -> RunCurves:
    """Read ``RUN_DIR/metrics.jsonl``; ValueError naming the file and line if it is missing or malformed.
    A later line for the same iteration (a resumed run re-logging it) replaces the earlier value."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    points: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                raise ValueError(f"{path}: line {lineno}: expected an object with an integer 'iteration'")
            it = row["iteration"]
            for k, v in row.items():
                if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    points.setdefault(k, {})[it] = float(v)
    series = {k: (sorted(d), [d[i] for i in sorted(d)]) for k, d in points.items()}
    return RunCurves(_run_name(run_dir), run_dir, series)


def _unique_names(runs: list[RunCurves]) -> None:
    """Runs sharing a config name (e.g. both 'demo') are told apart by their directory names."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.name} ({os.path.basename(os.path.normpath(r.run_dir))})"


def _style(fig, ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()


def make_figures(runs: Sequence[RunCurves]) -> dict[str, "plt.Figure"]:
    """{"reward" | "response_length" | "eval_accuracy": Figure} for ``runs`` (overlaid, one colour per run).
    A figure whose metric no run has (e.g. no eval yet) is left out. The caller closes the figures."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {id(r): colors[i % len(colors)] for i, r in enumerate(runs)}
    figs: dict[str, plt.Figure] = {}

    if any(r.get("reward_mean")[0] for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            ax.plot(*r.get("reward_mean"), color=color[id(r)], label=r.name)
        _style(fig, ax, "Training reward", "mean reward")
        figs["reward"] = fig

    if any(r.get("response_len_correct")[0] or r.get("response_len_incorrect")[0] for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            ax.plot(*r.get("response_len_correct"), color=color[id(r)], linestyle="-", label=f"{r.name}: correct")
            ax.plot(*r.get("response_len_incorrect"), color=color[id(r)], linestyle="--",
                    label=f"{r.name}: incorrect")
        _style(fig, ax, "Response length", "mean response length (tokens)")
        figs["response_length"] = fig

    sets = sorted({k for r in runs for k in r.eval_keys()})
    if sets:
        fig, ax = plt.subplots(figsize=(6, 4))
        markers = "osv^D*Px"
        for r in runs:
            for k in r.eval_keys():
                m = _EVAL_KEY.match(k)
                ax.plot(*r.get(k), color=color[id(r)], marker=markers[sets.index(k) % len(markers)],
                        label=f"{r.name}: {m['set']} avg@{m['n']}")
        _style(fig, ax, "Evaluation accuracy", "avg@n accuracy")
        figs["eval_accuracy"] = fig
    return figs


def plot_runs(run_dirs: Sequence[str], out_dir: str) -> dict[str, str]:
    """Draw the figures of ``run_dirs`` (overlaid) as ``out_dir/<figure>.png``.

    Returns {figure name: path} of the figures drawn (see :func:`make_figures`). Raises ValueError for a
    directory without a readable ``metrics.jsonl``."""
    if not run_dirs:
        raise ValueError("plot_runs: no run directories given")
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    os.makedirs(out_dir, exist_ok=True)
    out = {}
    for name, fig in make_figures(runs).items():
        out[name] = os.path.join(out_dir, f"{name}.png")
        fig.savefig(out[name], dpi=120)
        plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orz_jax.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots of the first run)")
    args = p.parse_args(argv)
    out_dir = args.out or os.path.join(args.runs[0], "plots")
    try:
        paths = plot_runs(args.runs, out_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"nothing to plot: no reward, length or eval metrics in {args.runs}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
