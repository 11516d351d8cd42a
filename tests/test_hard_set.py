"""The annealing chain of ORZ-32B on the tiny demo: a run records per-prompt pass rates, the hard set is mined
from them, and a second run starts from the first one's weights (fresh optimizer) on the mined file with
a linearly decaying lr. Plus the pass-rate and hard-set tools on hand-written records."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from orz_jax.config import load_config
from orz_jax.data.__main__ import main as data_main
from orz_jax.data.hard_set import hard_prompts
from orz_jax.data.pass_rates import PassRateLog
from orz_jax.data.synthetic import generate_synthetic
from orz_jax.launch import DEMO_CONFIG

TINY = [
    "demo.steps=30", "demo.warmup_steps=5", "demo.hidden_size=32", "demo.intermediate_size=64", "demo.num_layers=1",
    "data.prompts_per_iter=4", "rollout.n_samples_per_prompt=4", "rollout.max_concurrent_decodes=16",
    "data.synthetic.num_eval=4", "eval.every=0", "checkpoint.save_every=2", "checkpoint.async_save=false",
    "checkpoint.export_hf_at_end=false", "experiment.progress_bar=false", "experiment.tensorboard=false",
    "ppo.critic_steps_per_batch=2", "ppo.micro_batch_rows=4",
]


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_pass_rate_log_counts_and_hard_set_selection(tmp_path):
    log = PassRateLog(str(tmp_path), {"a": "data/a.json"})
    # batch of 2 prompts x 3 samples: prompt 0 (a#7) 2 correct, prompt 1 (a#2) 0 correct
    log.write(1, ["a", "a"], [7, 2], np.array([0, 0, 0, 1, 1, 1]), np.array([1, 0, 1, 0, 0, 0.0]))
    log.write(2, ["a", "a"], [7, 5], np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1.0]))  # a#7: 0 of 2 now
    log.write(3, ["a", "a"], [2, 9], np.array([0, 0]), np.array([1, 1.0]))  # a#9 got no samples: not logged
    lines = _lines(tmp_path / "pass_rates.jsonl")
    assert lines[0] == {"iteration": 1, "source": "a", "file": "data/a.json", "index": 7, "correct": 2, "samples": 3}
    assert [(r["index"], r["correct"], r["samples"]) for r in lines] == [(7, 2, 3), (2, 0, 3), (7, 0, 2),
                                                                         (5, 2, 2), (2, 2, 2)]
    # latest count at or before the iteration, then correct <= max_correct
    assert [(r["index"], r["correct"]) for r in hard_prompts(str(tmp_path), 1, 0)[0]] == [(2, 0)]
    picked, seen = hard_prompts(str(tmp_path), 2, 0)
    assert ([(r["index"], r["iteration"]) for r in picked], seen) == ([(2, 1), (7, 2)], 3)
    assert [r["index"] for r in hard_prompts(str(tmp_path), 3, 1)[0]] == [7]
    log.truncate_after(1)  # resume from the checkpoint of iteration 1
    assert len(_lines(tmp_path / "pass_rates.jsonl")) == 2
    # nothing qualifies, or no pass rates at all: an error that says so (exit 2), and no file
    easy = tmp_path / "easy"
    easy.mkdir()
    PassRateLog(str(easy), {}).write(1, ["synthetic"], [0], np.array([0, 0]), np.array([1, 1.0]))
    out = tmp_path / "none.json"
    assert data_main(["hard-set", str(easy), "--at-iteration", "1", "--max-correct", "1", "--out", str(out)]) == 2
    assert data_main(["hard-set", str(tmp_path / "nowhere"), "--at-iteration", "1", "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.timeout(900)
def test_demo_run_mine_anneal_chain(tmp_path):
    from orz_jax.checkpoint import Checkpointer
    from orz_jax.trainer import Trainer

    cache = f"demo.cache_dir={tmp_path / 'cache'}"
    main_dir, anneal_dir, hard = tmp_path / "main", tmp_path / "anneal", tmp_path / "hard.json"

    # 1. a run: 2 iterations, pass rates recorded for each prompt of each
    cfg = load_config(DEMO_CONFIG, TINY + [cache, f"experiment.out_dir={main_dir}", "experiment.num_iterations=2"])
    Trainer(cfg).run()
    rates = _lines(main_dir / "pass_rates.jsonl")
    assert [r["iteration"] for r in rates] == [1] * 4 + [2] * 4
    assert all(r["source"] == r["file"] == "synthetic" and r["samples"] == 4 for r in rates)
    for row in _lines(main_dir / "metrics.jsonl"):  # the same samples as the logged accuracy
        if "accuracy" in row:
            it = [r for r in rates if r["iteration"] == row["iteration"]]
            assert sum(r["correct"] for r in it) / 16 == pytest.approx(row["accuracy"])

    # 2. mine: every prompt seen by iteration 2 with at most 4 of 4 correct (all of them), in ORZ's schema
    assert data_main(["hard-set", str(main_dir), "--at-iteration", "2", "--max-correct", "4", "--out", str(hard)]) == 0
    mined = json.loads(hard.read_text())
    latest = {r["index"]: r for r in rates}  # later lines win
    train, _ = generate_synthetic(cfg.data.synthetic)
    assert [rec[0]["value"] for rec in mined] == [train[i].question for i in sorted(latest)]
    assert [rec[1]["ground_truth"]["value"] for rec in mined] == [train[i].answer for i in sorted(latest)]
    assert all(rec[0]["from"] == "human" and rec[1]["from"] == "assistant" for rec in mined)

    # 3. anneal: the first run's weights, a fresh optimizer, the mined file, lr decaying linearly
    cfg2 = load_config(DEMO_CONFIG, TINY + [
        cache, f"experiment.out_dir={anneal_dir}", "experiment.num_iterations=2", f"model.init_from_run={main_dir}",
        "data.source=files", f"data.train_files=[{{path: {hard}}}]", "data.prompts_per_iter=2",
        "ppo.actor.warmup_steps=0", "ppo.actor.schedule=linear", "ppo.actor.final_lr=3e-5", "ppo.actor.decay_steps=2"])
    trainer = Trainer(cfg2)
    trainer._maybe_resume()
    src = Checkpointer(str(main_dir / "checkpoints"), cfg.checkpoint)
    actor, critic, _, meta = src.restore(src.latest_step(), trainer.actor, trainer.critic)
    src.close()
    assert meta["iteration"] == 2 and int(actor.step) == 2
    for got, want in ((trainer.actor.params, actor.params), (trainer.critic.params, critic.params)):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert int(trainer.actor.step) == 0 and trainer.iteration == 0  # fresh optimizer and count
    summary = trainer.run()
    assert summary["end_iteration"] == 2
    lrs = [r["actor/lr"] for r in _lines(anneal_dir / "metrics.jsonl") if "actor/lr" in r]
    np.testing.assert_allclose(lrs, [1e-4, 1e-4 - (1e-4 - 3e-5) / 2], rtol=1e-6)  # demo actor lr 1e-4
    assert {r["file"] for r in _lines(anneal_dir / "pass_rates.jsonl")} == {str(hard)}


def test_init_from_run_startup_errors(tmp_path):
    from orz_jax.trainer import StartupError, check_inputs

    for run, message in ((tmp_path / "nope", "model.init_from_run: run directory not found: "),
                         (tmp_path, f"model.init_from_run: no checkpoint in {tmp_path}")):
        cfg = load_config(DEMO_CONFIG, TINY + [f"model.init_from_run={run}"])
        with pytest.raises(StartupError, match="^" + message.replace("(", r"\(")):
            check_inputs(cfg)
