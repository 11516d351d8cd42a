"""The training loop end to end on a tiny config: a full run, kill -9 + resume, start-up errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

# Tiny demo: a few pretraining steps, few prompts, short responses. Same code path as the real runs.
TINY = [
    "demo.steps=30", "demo.warmup_steps=5", "demo.hidden_size=32", "demo.intermediate_size=64", "demo.num_layers=1",
    "data.prompts_per_iter=4", "rollout.n_samples_per_prompt=4", "rollout.max_concurrent_decodes=16",
    "data.synthetic.num_eval=16", "eval.every=2", "checkpoint.save_every=2", "experiment.progress_bar=false",
    "experiment.tensorboard=false", "ppo.critic_steps_per_batch=2", "ppo.micro_batch_rows=4",
]


def _env(tmp_path):
    env = dict(os.environ)
    env["ORZ_JAX_CACHE"] = str(tmp_path / "cache")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cmd(out_dir, iters, extra=()):
    return [sys.executable, "-m", "orz_jax.launch", *TINY, f"experiment.out_dir={out_dir}",
            f"experiment.num_iterations={iters}", *extra]


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r for r in rows if "reward_mean" in r}


def _finalized_steps(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


@pytest.mark.timeout(1200)
def test_kill_then_resume_matches_uninterrupted_run(tmp_path):
    env = _env(tmp_path)
    iters = 6
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"

    ref = subprocess.run(_cmd(ref_dir, iters), env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-4000:]
    assert "done: iterations 0 -> 6" in ref.stdout
    summary = json.load(open(ref_dir / "summary.json"))
    assert os.path.isfile(os.path.join(summary["exported_to"], "model.safetensors"))
    ref_m = _metrics(ref_dir)
    assert sorted(ref_m) == list(range(1, iters + 1))

    # Same command, killed with SIGKILL as soon as the checkpoint of iteration 2 is finalised.
    proc = subprocess.Popen(_cmd(run_dir, iters), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while 2 not in _finalized_steps(run_dir / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run ended before it could be killed; make the tiny run longer"
    killed_at = max(_metrics(run_dir))
    assert 2 <= killed_at < iters

    resume_from = max(_finalized_steps(run_dir / "checkpoints"))  # the latest step orbax finalised before the kill
    assert resume_from >= 2
    resumed = subprocess.run(_cmd(run_dir, iters), env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"done: iterations {resume_from} -> {iters}" in resumed.stdout, resumed.stdout[-2000:]
    run_m = _metrics(run_dir)
    assert sorted(run_m) == list(range(1, iters + 1))  # lines past the resumed checkpoint were replaced
    for it in range(3, iters + 1):  # iterations after the checkpoint: same data, same samples, same updates
        for key in ("reward_mean", "response_len_mean", "actor/loss", "critic/value_loss"):
            assert run_m[it][key] == pytest.approx(ref_m[it][key], rel=1e-5, abs=1e-6), (it, key)


def _launch_error(args, env=None, n_devices=1):
    env = dict(env or os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    p = subprocess.run([sys.executable, "-m", "orz_jax.launch", *args], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert "Compiling" not in p.stderr
    return errors[0]


def test_startup_errors_are_one_clear_line(tmp_path):
    line = _launch_error(["model.checkpoint=/nonexistent/qwen"])
    assert line == "error: model.checkpoint: directory not found: /nonexistent/qwen"
    line = _launch_error(["data.source=files", "data.train_files=[{path: /nope/train.json}]"])
    assert line == "error: data.train_files[0].path: file not found: /nope/train.json"
    line = _launch_error(["mesh.fsdp=2"])
    assert "mesh: data=1 x fsdp=2 x tensor=1 = 2 devices, but 1 are available" in line
    line = _launch_error(["rollout.max_concurrent_decodes=3"], n_devices=2)
    assert line.startswith("error: rollout.max_concurrent_decodes: 3 decode slots do not divide over the 2 slot shards")
    line = _launch_error(["ppo.clip_epz=0.1"])
    assert line.startswith("error: ") and "unknown config key 'ppo.clip_epz'" in line
