"""``python -m orz_jax.bench all`` on a tiny config: it runs end to end (a JAX process, then a torch
process), the torch side reproduces our logits on the exported weights before it times anything,
and the JSON / CSV / PNG reports are written with a row per measurement and implementation."""

import csv
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from orz_jax.bench import report  # noqa: E402

TINY = ["--model", "tiny", "--reps", "2", "--torch", "eager", "--sizes", "2", "--prefill-sizes", "2",
        "--drivers", "batched", "--prompt-len", "8", "--new-tokens", "4", "--pack-len", "64", "--rows", "2",
        "--micro-rows", "1", "--e2e-prompts", "1", "--e2e-samples", "2", "--e2e-new-tokens", "4"]


def test_stats_median_and_spread():
    s = report.stats([4.0, 1.0, 3.0, 2.0])
    # numpy's linear percentiles of 1, 2, 3, 4: q1 = 1.75, median = 2.5, q3 = 3.25
    assert (s["median_s"], s["q1_s"], s["q3_s"], s["min_s"], s["max_s"], s["n"]) == (2.5, 1.75, 3.25, 1.0, 4.0, 4)


def test_report_runs_and_writes_files(tmp_path):
    out = tmp_path / "bench"
    res = report.main([*TINY, "--out", str(out)])
    meta, rows = res["meta"], res["rows"]

    # equal work: transformers on the exported weights gives our logits (float32)
    check = meta["logit_check"]
    assert check["ok"] and check["max_abs_diff"] < 1e-4, check
    assert check["max_abs_logit"] > 1e-2  # a real comparison, not of two zero arrays

    kinds = {(r["kind"], r["impl"]) for r in rows}
    for kind in ("prefill", "update actor", "update critic", "e2e iteration"):
        assert (kind, "jax") in kinds and (kind, "torch eager") in kinds, kind
    assert ("decode", "jax batched") in kinds and ("decode", "torch generate") in kinds
    for r in rows:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["reps"] == 2, r
        if r["kind"] == "decode":
            assert r["tokens"] == 2 * 4 and r["bound_tokens_per_s"] > 0
        if r["kind"] in ("prefill", "update actor", "update critic"):
            assert 0 < r["mfu"] < 1.5, r  # against the measured peak; a little over 1 is timing noise
    assert meta["jax_version"] and meta["torch_version"] and meta["dtype"] == "float32"

    for name in ("report.json", "report.csv", "report.png", "report.md"):
        assert os.path.getsize(out / name) > 0, name
    with open(out / "report.json") as f:
        assert len(json.load(f)["rows"]) == len(rows)
    with open(out / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with open(out / "report.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_torch_side_refuses_other_weights(tmp_path):
    """The check can fail: logits that are not those of the exported weights stop the torch side
    before any timing."""
    from orz_jax.config import ModelConfig
    from orz_jax.models.build import create_model
    from orz_jax.models.hf_io import export_hf

    args = report.parse([*TINY, "--torch", "none"])
    arch = report.PRESETS["tiny"]
    export_hf(create_model("policy", arch, ModelConfig(arch=arch), seed=1), str(tmp_path / "hf"))
    other = create_model("policy", arch, ModelConfig(arch=arch), seed=2)  # different weights
    check, _, _ = report._inputs(args, arch)
    pos = np.broadcast_to(np.arange(check.shape[1], dtype=np.int32), check.shape)
    np.save(tmp_path / "check.npy", np.asarray(other(check, pos, np.ones_like(check))[0]))
    spec = dict(args=vars(args), arch=__import__("dataclasses").asdict(arch), hf_dir=str(tmp_path / "hf"),
                check_path=str(tmp_path / "check.npy"), buffer_path=str(tmp_path / "missing.npz"))
    out = report.torch_side(spec)
    assert not out["logit_check"]["ok"] and out["logit_check"]["max_abs_diff"] > 1e-3
    assert "prefill" not in out and "update" not in out


def test_profile_traces_both_sides(tmp_path):
    """``--profile``: our update's device ops and torch's eager ops, each summed per update and by category;
    on this update torch runs its fused SDPA kernel and JAX has no such op (the gap the report explains)."""
    prof = report.main(["--model", "tiny", "--profile", "--pack-len", "64", "--rows", "2", "--out", str(tmp_path)])
    with open(tmp_path / "profile.json") as f:
        assert json.load(f).keys() == prof.keys() == {"jax", "torch eager"}
    jx, th = prof["jax"], prof["torch eager"]
    for side in (jx, th):
        assert side["ops_s"] > 0 and abs(sum(side["categories"].values()) - side["ops_s"]) < 1e-6
        assert len(side["top_ops"]) > 0
    assert th["categories"].get("fused attention (SDPA kernels, forward and backward)", 0) > 0
    assert any(op["name"].startswith("aten::_scaled_dot_product") for op in th["top_ops"])
    assert not any("fused attention" in k for k in jx["categories"])
