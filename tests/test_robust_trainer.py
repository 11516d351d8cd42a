"""Issue 19 (part B): the training loop under faults. The loop (``Trainer.run``) runs for real with real
orbax checkpoints of a tiny model; only the expensive phases (rollouts, the PPO update, evaluation) are
stand-ins returning hand-made metrics, so each scenario takes about a second:

* kills, SIGTERM and reruns leave one metrics line per iteration (2 of the issue: #3);
* a cut last metrics line does not block a restart (#4);
* a non-finite update stops the run with one line, saves nothing of it and keeps the last finite
  checkpoint (#2);
* a corrupt or empty latest checkpoint falls back to the newest one that restores (#5);
* a full disk stops with one line and the run resumes once space is free (#7).

The jitted guard itself and one end-to-end ``lr=1e30`` run are at the end.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from orz_jax import trainer as trainer_mod
from orz_jax.checkpoint import Checkpointer
from orz_jax.config import ArchConfig, CheckpointConfig, ModelConfig, OptimConfig, load_config
from orz_jax.data.pass_rates import PassRateLog
from orz_jax.launch import DEMO_CONFIG
from orz_jax.models.build import create_model
from orz_jax.ppo.train import create_train_state

ARCH = ArchConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2)


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing in the loop handles it."""


@pytest.fixture(scope="module")
def states():
    actor = create_train_state(create_model("policy", ARCH, ModelConfig(arch=ARCH), seed=0), OptimConfig())
    critic = create_train_state(create_model("critic", ARCH, ModelConfig(arch=ARCH, critic_head_init_std=0.5),
                                             seed=1), OptimConfig())
    return actor, critic


class _Data:
    def __init__(self):
        self.index = 0

    def get_state(self):
        return {"index": self.index}

    def set_state(self, s):
        self.index = s["index"]


class _Stub:
    def update_params(self, params):
        pass

    def close(self):
        pass


def _train_metrics(iteration: int) -> dict:
    return {"reward_mean": 0.1 * iteration, "accuracy": 0.1 * iteration, "response_len_mean": 10.0,
            "time/iteration": 0.01, "actor/loss": 0.5, "actor/grad_norm": 1.0, "actor/entropy": 0.5,
            "actor/nonfinite": 0.0, "actor/nonfinite_params": 0.0, "critic/value_loss": 0.25,
            "critic/grad_norm": 1.0, "critic/nonfinite": 0.0, "critic/nonfinite_params": 0.0}


def make_trainer(out_dir, states, overrides=(), kill_at=None, nan_at=None, sigterm_in_eval=False):
    """A Trainer whose loop, checkpoints and metrics log are real and whose phases are stand-ins.

    kill_at: raise Killed while training that iteration (1-based). nan_at: that iteration's actor update is
    non-finite. sigterm_in_eval: the SIGTERM handler fires during the iteration-0 evaluation."""
    cfg = load_config(DEMO_CONFIG, [f"experiment.out_dir={out_dir}", "experiment.progress_bar=false",
                                    "experiment.tensorboard=false", "checkpoint.export_hf_at_end=false",
                                    "checkpoint.async_save=false", "eval.every=2", "checkpoint.save_every=2",
                                    *overrides])
    t = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
    t.cfg, t.out_dir, t.arch, t.model_path = cfg, str(out_dir), ARCH, None
    os.makedirs(out_dir, exist_ok=True)
    t.actor, t.critic = states
    t.ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), cfg.checkpoint)
    t.metrics = trainer_mod.MetricsLog(str(out_dir), False)
    t.pass_rates = PassRateLog(str(out_dir), {})
    t.data_iter, t.engine, t.scorer = _Data(), _Stub(), _Stub()
    t.eval_sets = {"synthetic": [None]}
    t.key = jax.random.key(0)
    t.iteration, t._stop_requested, t._entropy_frac0 = 0, False, None
    t.eval_calls = []

    def evaluate(iteration):
        t.eval_calls.append(iteration)
        if sigterm_in_eval and iteration == 0:
            t._on_sigterm(15, None)
        return {"eval/synthetic/avg@1": 0.5, "eval/avg_accuracy": 0.5}

    def train_iteration():
        it = t.iteration + 1
        if kill_at == it:
            raise Killed()
        t.data_iter.index += 1
        m = _train_metrics(it)
        if nan_at is not None and it >= nan_at:
            m.update({"actor/loss": math.nan, "actor/grad_norm": math.nan, "actor/nonfinite": 1.0})
        return m

    t.evaluate, t.train_iteration = evaluate, train_iteration
    return t


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    import orz_jax.plot
    monkeypatch.setattr(orz_jax.plot, "plot_runs", lambda *a, **k: {})


def iterations(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["iteration"] for line in f]


def steps(out_dir):
    d = os.path.join(out_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


# ----------------------------------------------------------------------------------------------
# #3: unique iterations after kills, signals and reruns
# ----------------------------------------------------------------------------------------------


def test_kill_before_first_checkpoint_then_restart_has_unique_iterations(tmp_path, states):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        make_trainer(out, states, ["checkpoint.save_every=10", "experiment.num_iterations=4"], kill_at=3).run()
    assert iterations(out) == [0, 1, 2]
    make_trainer(out, states, ["checkpoint.save_every=10", "experiment.num_iterations=4"]).run()
    assert iterations(out) == [0, 1, 2, 3, 4]


def test_sigterm_during_first_eval_then_restart_has_unique_iterations(tmp_path, states):
    out = tmp_path / "run"
    summary = make_trainer(out, states, ["experiment.num_iterations=4"], sigterm_in_eval=True).run()
    assert summary["stopped_by_signal"] and summary["end_iteration"] == 0
    assert steps(out) == [0] and iterations(out) == [0]
    t = make_trainer(out, states, ["experiment.num_iterations=4"])
    t.run()
    assert iterations(out) == [0, 1, 2, 3, 4]
    assert t.eval_calls == [2, 4]  # the iteration-0 eval on disk is not redone


def test_rerun_of_finished_run_and_final_eval_add_no_line(tmp_path, states):
    out = tmp_path / "run"
    # 3 iterations with eval.every=2: the final eval of iteration 3 joins the training line of iteration 3
    make_trainer(out, states, ["experiment.num_iterations=3"]).run()
    assert iterations(out) == [0, 1, 2, 3]
    with open(out / "metrics.jsonl") as f:
        last = json.loads(f.readlines()[-1])
    assert last["reward_mean"] == pytest.approx(0.3) and last["eval/avg_accuracy"] == 0.5
    t = make_trainer(out, states, ["experiment.num_iterations=3"])
    summary = t.run()
    assert iterations(out) == [0, 1, 2, 3]
    assert t.eval_calls == [] and summary["eval_after"]["eval/avg_accuracy"] == 0.5


def test_kill_after_checkpoint_replaces_lines_past_it(tmp_path, states):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        make_trainer(out, states, ["experiment.num_iterations=6"], kill_at=4).run()
    assert iterations(out) == [0, 1, 2, 3] and steps(out) == [2]
    make_trainer(out, states, ["experiment.num_iterations=6"]).run()
    assert iterations(out) == [0, 1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------
# #4: a cut last line
# ----------------------------------------------------------------------------------------------


def test_partial_last_metrics_line_is_dropped_on_restart(tmp_path, states, caplog):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        make_trainer(out, states, ["experiment.num_iterations=4"], kill_at=4).run()
    with open(out / "metrics.jsonl", "a") as f:  # what a crash in the middle of a write leaves
        f.write('{"iteration": 4, "reward_mean": 0.')
    with caplog.at_level(logging.WARNING):
        make_trainer(out, states, ["experiment.num_iterations=4"]).run()
    assert iterations(out) == [0, 1, 2, 3, 4]
    assert any("partial last line" in r.getMessage() for r in caplog.records)


def test_metrics_write_failing_midway_leaves_no_partial_line(tmp_path, monkeypatch):
    from orz_jax import metrics_log

    log = metrics_log.MetricsLog(str(tmp_path), False)
    log.start(-1)
    log.write(1, {"a": 1.0})
    real_write = os.write

    def half_then_enospc(fd, data):  # the first half reaches the disk, then the disk is full
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_log.os, "write", half_then_enospc)
    with pytest.raises(OSError):
        log.write(2, {"a": "x" * 10000})
    monkeypatch.setattr(metrics_log.os, "write", real_write)
    assert iterations(tmp_path) == [1]
    log.write(2, {"a": 2.0})
    assert iterations(tmp_path) == [1, 2]


# ----------------------------------------------------------------------------------------------
# #2: non-finite updates
# ----------------------------------------------------------------------------------------------


def test_nonfinite_update_stops_without_saving_and_keeps_last_finite_checkpoint(tmp_path, states):
    from orz_jax.run_guard import NonFiniteError

    out = tmp_path / "run"
    t = make_trainer(out, states, ["experiment.num_iterations=10", "checkpoint.save_every=1",
                                   "checkpoint.keep=3"], nan_at=5)
    with pytest.raises(NonFiniteError) as e:
        t.run()
    msg = str(e.value)
    assert "\n" not in msg and "iteration 5" in msg and "actor/loss is nan" in msg
    assert "last checkpoint is step 4" in msg
    assert steps(out) == [2, 3, 4]  # nothing of iteration 5; the last finite one (4) is still there
    assert not os.path.exists(out / "summary.json")


def test_entropy_near_maximum_is_flagged(tmp_path, states, caplog):
    out = tmp_path / "run"
    t = make_trainer(out, states, ["experiment.num_iterations=2"])
    plain = t.train_iteration
    uniform = math.log(ARCH.vocab_size)
    t.train_iteration = lambda: {**plain(), "actor/entropy": 0.2 * uniform if t.iteration == 0 else 0.97 * uniform}
    with caplog.at_level(logging.WARNING):
        t.run()
    with open(out / "metrics.jsonl") as f:
        rows = {r["iteration"]: r for r in map(json.loads, f)}
    assert rows[1]["health/diverging"] == 0.0 and rows[2]["health/diverging"] == 1.0
    assert rows[2]["health/entropy_frac"] == pytest.approx(0.97)
    assert any("almost uniformly" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# #5: a latest checkpoint that does not restore
# ----------------------------------------------------------------------------------------------


def _largest_file(d):
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, states, caplog, damage):
    out = tmp_path / "run"
    make_trainer(out, states, ["experiment.num_iterations=4"]).run()
    assert steps(out) == [2, 4]
    step4 = out / "checkpoints" / "4"
    if damage == "truncated":
        victim = _largest_file(step4 / "actor")  # the OCDBT data file holding the parameters
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        for entry in os.listdir(step4):
            p = step4 / entry
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    with caplog.at_level(logging.WARNING):
        t = make_trainer(out, states, ["experiment.num_iterations=4"])
        t.run()
    assert t.eval_calls == [4]  # resumed at 2, trained 3 and 4 again
    assert iterations(out) == [0, 1, 2, 3, 4] and steps(out) == [2, 4]
    skipped = [r.getMessage() for r in caplog.records if "checkpoint step 4 skipped" in r.getMessage()]
    assert len(skipped) == 1 and "moved to" in skipped[0]
    kept = os.listdir(out / "checkpoints" / "unreadable")
    assert len(kept) == 1 and kept[0].startswith("4-")  # set aside, never deleted


# ----------------------------------------------------------------------------------------------
# #7: a full disk
# ----------------------------------------------------------------------------------------------


def test_disk_full_during_checkpoint_stops_with_one_line_and_resumes(tmp_path, states, monkeypatch):
    """The full disk is simulated by making orbax's final rename of the step directory raise ENOSPC: the
    step's files were written to ``<step>.orbax-checkpoint-tmp`` (what a real full disk leaves behind) and the
    error comes back through orbax's background thread exactly as a real one does. A real small filesystem
    (tmpfs, a loop device) needs root mounts, which CI machines do not give."""
    from orbax.checkpoint._src.path import async_path
    from orz_jax.run_guard import TrainingError

    out = tmp_path / "run"
    real_rename = async_path.rename

    async def rename(src, dst, *a, **k):
        if str(dst).endswith(os.sep + "4"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_rename(src, dst, *a, **k)

    monkeypatch.setattr(async_path, "rename", rename)
    with pytest.raises(TrainingError) as e:
        make_trainer(out, states, ["experiment.num_iterations=6"]).run()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("disk full at iteration 4") and "resume from checkpoint step 2" in msg
    assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(out / "checkpoints"))
    monkeypatch.setattr(async_path, "rename", real_rename)  # space freed

    make_trainer(out, states, ["experiment.num_iterations=6"]).run()
    assert iterations(out) == [0, 1, 2, 3, 4, 5, 6] and steps(out) == [2, 4, 6]
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(out / "checkpoints"))


def test_disk_full_in_launch_is_one_line_and_exit_1(tmp_path, states, monkeypatch, capsys):
    from orz_jax import launch

    t = make_trainer(tmp_path / "run", states, ["experiment.num_iterations=2"])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    t.ckpt.save = full
    monkeypatch.setattr(trainer_mod, "Trainer", lambda cfg: t)
    rc = launch.main([f"experiment.out_dir={tmp_path / 'run'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(err) == 1 and "disk full at iteration 2" in err[0]


# ----------------------------------------------------------------------------------------------
# The jitted guard, and lr=1e30 end to end
# ----------------------------------------------------------------------------------------------


def test_jitted_step_flags_nonfinite_updates(states):
    from orz_jax.config import PPOConfig
    from orz_jax.ppo.packing import PackedBatch
    from orz_jax.ppo.train import PPOFunctions

    rows, length = 4, 16
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, ARCH.vocab_size, (rows, length)).astype(np.int32)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    batch = PackedBatch(tokens=tokens, positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                        segment_ids=np.ones((rows, length), np.int32), loss_mask=f32(np.ones((rows, length))),
                        old_logprobs=f32(np.full((rows, length), -4.0)), old_values=f32(np.zeros((rows, length))),
                        advantages=f32(rng.normal(size=(rows, length))), returns=f32(np.ones((rows, length))))
    # lr=1e30: the first update leaves huge but finite weights (no flag: the guard checks the parameters, not
    # their norm, which overflows float32), the second update's forward is NaN (flagged). One compile.
    cfg = PPOConfig(actor=OptimConfig(lr=1e30, warmup_steps=0), micro_batch_rows=4, pack_len=length)
    fns = PPOFunctions.build(cfg)
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, states[0])  # steps donate
    got, largest = [], []
    for _ in range(2):
        state, m = fns.actor_step(state, batch)
        got.append(jax.device_get(m))
        largest.append(max(float(np.max(np.abs(x))) for x in jax.tree.leaves(jax.device_get(state.params))))
    assert float(got[0]["actor/nonfinite"]) == 0.0 and np.isfinite(got[0]["actor/loss"])
    assert float(got[0]["actor/nonfinite_params"]) == 0.0 and 1e20 < largest[0] < np.inf
    assert float(got[1]["actor/nonfinite"]) == 1.0 and float(got[1]["actor/nonfinite_params"]) == 1.0
    assert not np.isfinite(got[1]["actor/loss"])


def test_all_finite_flags_every_nonfinite_value_and_no_finite_one():
    from orz_jax.ppo.train import all_finite

    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(3, 5)).astype(np.float32), "b": jnp.ones(7, jnp.bfloat16),
            "n": np.arange(4, dtype=np.int32)}
    check = jax.jit(all_finite)
    assert bool(check(tree))
    # finite, but its sum (all_finite's first read) overflows: the exact check must clear it
    huge = dict(tree, w=np.full((3, 5), np.finfo(np.float32).max))
    assert bool(check(huge))
    assert not bool(check(dict(huge, b=tree["b"].at[0].set(np.nan))))  # ... and still catch a NaN elsewhere
    assert not bool(check(dict(tree, w=np.array([np.inf, -np.inf], np.float32))))  # a sum of NaN, not of 0
    for v in (np.nan, np.inf, -np.inf):
        w = tree["w"].copy()
        w[1, 2] = v
        assert not bool(check(dict(tree, w=w))), v
        assert not bool(check(dict(tree, b=tree["b"].at[3].set(v)))), ("bfloat16", v)


TINY = [
    "demo.steps=30", "demo.warmup_steps=5", "demo.hidden_size=32", "demo.intermediate_size=64", "demo.num_layers=1",
    "data.prompts_per_iter=4", "rollout.n_samples_per_prompt=4", "rollout.max_concurrent_decodes=16",
    "data.synthetic.num_eval=4", "eval.every=0", "experiment.progress_bar=false",
    "experiment.tensorboard=false", "ppo.critic_steps_per_batch=2", "ppo.micro_batch_rows=4",
    "model.critic_head_init_std=0.02",  # a non-zero value head: advantages R - V are non-zero from iteration 1
]


@pytest.mark.timeout(600)
def test_lr_1e30_run_stops_with_one_line_and_no_nan_checkpoint(tmp_path):
    env = dict(os.environ, ORZ_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "orz_jax.launch", *TINY, f"experiment.out_dir={out}",
                        "experiment.num_iterations=4", "checkpoint.save_every=1", "checkpoint.keep=3",
                        "ppo.actor.lr=1e30"], env=env, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "done:" not in p.stdout and not os.path.exists(out / "final_hf")
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "iteration 2: actor/" in errors[0] and "last checkpoint is step 1" in errors[0], \
        p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert steps(out) == [1]
    # the kept checkpoint is finite (huge: one Adam step of lr 1e30)
    ck = Checkpointer(str(out / "checkpoints"), CheckpointConfig())
    import orbax.checkpoint as ocp
    restored = ck._mgr.restore(1, args=ocp.args.Composite(actor=ocp.args.StandardRestore()))
    ck.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["actor"]["params"]))
