"""Training-curve plots from synthetic metrics.jsonl files: two runs overlay, every point drawn is a logged one."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from conftest import REPO
from orz_jax.plot import load_run, make_figures, plot_runs


def _write_run(run_dir, name, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"experiment:\n  name: {name}\n  out_dir: {run_dir}\n")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, allow_nan=True) + "\n")


def _rows(scale):
    """Iteration 0: eval only (as the trainer logs it); 1..6 training; eval every 3; iteration 1 has no correct
    sample (NaN length, as rollout_metrics writes it)."""
    rows = [{"iteration": 0, "eval/math500/avg@4": 0.1 * scale, "eval/aime2024/avg@4": 0.0}]
    for it in range(1, 7):
        r = {"iteration": it, "reward_mean": scale * it / 10, "accuracy": scale * it / 10,
             "response_len_correct": float("nan") if it == 1 else 100.0 + 10 * it,
             "response_len_incorrect": 80.0 + 5 * it * scale}
        if it % 3 == 0:
            r.update({"eval/math500/avg@4": 0.1 * scale + 0.05 * it, "eval/aime2024/avg@4": 0.01 * it})
        rows.append(r)
    return rows


@pytest.fixture()
def two_runs(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    _write_run(a, "baseline", _rows(1.0))
    _write_run(b, "lr_x2", _rows(2.0))
    return a, b


def _lines(fig):
    ax = fig.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_figures_overlay_both_runs_with_logged_points(two_runs):
    a, b = two_runs
    runs = [load_run(str(a)), load_run(str(b))]
    figs = make_figures(runs)
    try:
        assert sorted(figs) == ["eval_accuracy", "response_length", "reward"]
        reward = _lines(figs["reward"])
        assert reward == {"baseline": (list(range(1, 7)), [it / 10 for it in range(1, 7)]),
                          "lr_x2": (list(range(1, 7)), [2 * it / 10 for it in range(1, 7)])}
        lengths = _lines(figs["response_length"])
        # NaN (no correct sample at iteration 1) is left out rather than drawn as a gap at 0.
        assert lengths["baseline: correct"] == (list(range(2, 7)), [100.0 + 10 * it for it in range(2, 7)])
        assert lengths["lr_x2: incorrect"] == (list(range(1, 7)), [80.0 + 10 * it for it in range(1, 7)])
        assert len(lengths) == 4
        ev = _lines(figs["eval_accuracy"])
        assert set(ev) == {f"{r}: {s} avg@4" for r in ("baseline", "lr_x2") for s in ("math500", "aime2024")}
        assert ev["lr_x2: math500 avg@4"][0] == [0, 3, 6]
        np.testing.assert_allclose(ev["lr_x2: math500 avg@4"][1], [0.2, 0.35, 0.5])
        legend = [t.get_text() for t in figs["reward"].axes[0].get_legend().get_texts()]
        assert legend == ["baseline", "lr_x2"]
        # one colour per run, shared by its lines in every figure
        colors = {lbl: line.get_color() for lbl, line in
                  ((ln.get_label(), ln) for ln in figs["response_length"].axes[0].get_lines())}
        assert colors["baseline: correct"] == colors["baseline: incorrect"] != colors["lr_x2: correct"]
    finally:
        import matplotlib.pyplot as plt
        for f in figs.values():
            plt.close(f)


def test_plot_runs_writes_pngs_and_cli(two_runs, tmp_path):
    a, b = two_runs
    out = plot_runs([str(a), str(b)], str(tmp_path / "plots"))
    assert sorted(out) == ["eval_accuracy", "response_length", "reward"]
    for path in out.values():
        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # something is drawn

    proc = subprocess.run([sys.executable, "-m", "orz_jax.plot", str(a), str(b), "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("reward", "response_length", "eval_accuracy"):
        assert (tmp_path / "cli" / f"{name}.png").is_file()


def test_same_config_name_told_apart_and_bad_input(tmp_path):
    a, b = tmp_path / "x" / "seed0", tmp_path / "x" / "seed1"
    _write_run(a, "demo", _rows(1.0))
    _write_run(b, "demo", _rows(1.5))
    from orz_jax.plot import _unique_names
    runs = [load_run(str(a)), load_run(str(b))]
    _unique_names(runs)
    assert [r.name for r in runs] == ["demo (seed0)", "demo (seed1)"]

    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot_runs([str(tmp_path / "missing")], str(tmp_path / "p"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"iteration": 1, "reward_mean": 0.5}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        load_run(str(bad))
    assert math.isclose(load_run(str(a)).get("reward_mean")[1][-1], 0.6)
