"""Offline evaluation (``python -m orz_jax.evaluate``) with a tiny char-level model pretrained in the test.

* the per-file and overall avg@n / pass@n it prints (and writes to results.json) equal a recomputation from the
  generations it wrote, and every reward in them agrees with a naive regex grader (synthetic answers);
* a run directory (orbax checkpoint + config.yaml naming the base) evaluates exactly like the HF export of the
  same parameters, and unlike the base model: the checkpoint's parameters are the ones restored;
* bad input fails before any work with a one-line error.
"""

from __future__ import annotations

import collections
import json
import re

import jax
import numpy as np
import pytest

from orz_jax.config import dump_yaml, load_config
from orz_jax.data.synthetic import generate_synthetic
from orz_jax.evaluate import main

N = 4
MAX_PROMPTS = 8

# Tiny model and task: 1-op additions of 1..9; prompts up to 256 characters (ORZ questions are left-truncated).
CONFIG = """
model: {checkpoint: demo}
demo: {hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 4, num_kv_heads: 2, steps: 800,
       batch_size: 32, lr: 1.0e-2, warmup_steps: 20, boxed_prob: 0.5}
data:
  source: synthetic
  template: compact
  synthetic: {num_train: 60, num_eval: 16, min_ops: 1, max_ops: 1, max_operand: 9, ops: "+"}
rollout: {max_prompt_len: 256, max_response_len: 40, prefill_buckets: [48, 256], max_concurrent_decodes: 32,
          long_prompt: left_truncate}
ppo: {pack_len: 296}
reward: {num_workers: 1}
eval: {temperature: 1.5}  # hot enough that the memorised answers vary between samples
checkpoint: {async_save: false}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, orz_fixtures):
    """Base HF model, a perturbed copy as an orbax run dir and as an HF export, and an eval file of questions
    the model has memorised (so that some, but not all, samples are correct)."""
    from orz_jax.checkpoint import Checkpointer
    from orz_jax.demo import pretrain_demo_model
    from orz_jax.models.hf_io import export_hf, load_hf
    from orz_jax.ppo.train import create_train_state

    root = tmp_path_factory.mktemp("evaluate")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(CONFIG)
    cfg = load_config(str(cfg_path))
    base = root / "base_hf"
    pretrain_demo_model(cfg, str(base))

    train, _ = generate_synthetic(cfg.data.synthetic)
    seen = root / "eval_seen.json"  # ORZ eval schema
    seen.write_text(json.dumps([{"prompt": [{"from": "user", "value": r.question}], "final_answer": r.answer}
                                for r in train[:MAX_PROMPTS + 2]]))

    # A run whose latest checkpoint holds perturbed parameters; its config names the base model.
    run_cfg = load_config(str(cfg_path), [f"model.checkpoint={base}"])
    policy, _ = load_hf("policy", str(base), run_cfg.model)
    state = create_train_state(policy, run_cfg.ppo.actor)
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.3 * _std(x) * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    state = state.replace(params=jax.tree.unflatten(treedef, noisy))
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(run_cfg))
    ck = Checkpointer(str(run / "checkpoints"), run_cfg.checkpoint)
    ck.save(1, state, state, {}, {"iteration": 1})
    ck.save(3, state, state, {}, {"iteration": 3})
    ck.close()
    pert = root / "perturbed_hf"
    export_hf(state.module(), str(pert), tokenizer_src=str(base))
    return dict(root=root, cfg=str(cfg_path), base=str(base), run=str(run), pert=str(pert), seen=str(seen),
                aime=str(orz_fixtures / "eval_aime2024.json"))


def _std(x):
    return float(np.std(np.asarray(x))) or 1.0


def _run(capsys, args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _gens(out_dir):
    with open(f"{out_dir}/generations.jsonl") as f:
        return [json.loads(line) for line in f]


def _printed(out: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for m in re.finditer(rf"^(\S+)\s+avg@{N} ([0-9.]+)\s+pass@{N} ([0-9.]+)", out, re.M):
        rows[m[1]] = (float(m[2]), float(m[3]))
    return rows


def _naive_reward(g) -> float:
    """1 iff the response stopped and its <answer> holds exactly \\boxed{<the integer answer>}."""
    m = re.search(r"<answer>\s*\\boxed\{\s*(-?\d+)\s*\}\s*</answer>", g["response"])
    return float(g["stop_reason"] == "stop" and m is not None and int(m[1]) == int(g["answer"]))


def test_printed_numbers_match_generations(setup, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, out, err = _run(capsys, ["--checkpoint", setup["base"], "--config", setup["cfg"], "--data", setup["seen"],
                                 "synthetic", setup["aime"], "--n", N, "--max-prompts", MAX_PROMPTS, "--out", out_dir])
    assert rc == 0, err
    gens = _gens(out_dir)
    printed = _printed(out)
    results = json.load(open(out_dir / "results.json"))
    assert set(printed) == {"eval_seen", "synthetic", "eval_aime2024", "overall", "mean_over_files"}

    by_file = collections.defaultdict(lambda: collections.defaultdict(list))
    for g in gens:
        by_file[g["file"]][g["index"]].append(g)
    per_file = {}
    for name, prompts in by_file.items():
        assert sorted(prompts) == list(range(MAX_PROMPTS)), name  # the first k prompts, in file order
        frac, anyc = [], []
        for idx, samples in prompts.items():
            assert sorted(s["sample"] for s in samples) == list(range(N))
            assert len({s["question"] for s in samples}) == 1
            rewards = [s["reward"] for s in samples]
            assert set(rewards) <= {0.0, 1.0}
            frac.append(sum(rewards) / N)  # naive: correct fraction of this prompt's n samples
            anyc.append(float(any(rewards)))
        per_file[name] = (np.mean(frac), np.mean(anyc), frac, anyc)
        assert printed[name] == pytest.approx(per_file[name][:2], abs=1e-6)
        assert results["files"][name][f"avg@{N}"] == pytest.approx(per_file[name][0], abs=1e-12)
        assert results["files"][name][f"pass@{N}"] == pytest.approx(per_file[name][1], abs=1e-12)
    all_frac = [x for v in per_file.values() for x in v[2]]
    all_any = [x for v in per_file.values() for x in v[3]]
    assert printed["overall"] == pytest.approx((np.mean(all_frac), np.mean(all_any)), abs=1e-6)
    assert printed["mean_over_files"] == pytest.approx(
        (np.mean([v[0] for v in per_file.values()]), np.mean([v[1] for v in per_file.values()])), abs=1e-6)

    # Rewards against an independent grader (integer answers only; AIME answers are integers too).
    for g in gens:
        assert g["reward"] == _naive_reward(g), g
    # Memorised questions: some samples right, some wrong, and some prompt with mixed samples, so avg@n
    # and pass@n really measure different things here.
    avg, pas, frac, _ = per_file["eval_seen"]
    assert 0 < avg < 1 and avg < pas
    assert any(0 < f < 1 for f in frac)
    questions = json.load(open(setup["seen"]))
    assert [p["prompt"][0]["value"] for p in questions[:MAX_PROMPTS]] == \
        [by_file["eval_seen"][i][0]["question"] for i in range(MAX_PROMPTS)]


def test_run_dir_restores_checkpoint_params(setup, tmp_path, capsys):
    common = ["--data", "synthetic", "--n", 2, "--max-prompts", 6, "--seed", 3]
    rc, out, err = _run(capsys, ["--checkpoint", setup["run"], *common])  # config: the run's config.yaml
    assert rc == 0, err
    assert "checkpoints/3" in out  # the latest step
    run_gens = _gens(f"{setup['run']}/eval/step_3")  # default output dir of a run
    rc, _, err = _run(capsys, ["--checkpoint", setup["pert"], "--config", setup["cfg"], "--out", tmp_path / "p", *common])
    assert rc == 0, err
    rc, _, err = _run(capsys, ["--checkpoint", setup["base"], "--config", setup["cfg"], "--out", tmp_path / "b", *common])
    assert rc == 0, err
    texts = lambda gs: [g["response"] for g in gs]  # noqa: E731
    assert texts(run_gens) == texts(_gens(tmp_path / "p"))
    assert texts(run_gens) != texts(_gens(tmp_path / "b"))


def test_bad_input(setup, tmp_path, capsys):
    rc, _, err = _run(capsys, ["--checkpoint", tmp_path / "nope", "--data", "synthetic"])
    assert rc == 2 and "--checkpoint: directory not found" in err
    rc, _, err = _run(capsys, ["--checkpoint", tmp_path, "--data", "synthetic"])
    assert rc == 2 and "neither a Hugging Face model directory" in err
    rc, _, err = _run(capsys, ["--checkpoint", setup["base"], "--data", tmp_path / "missing.json"])
    assert rc == 2 and "missing.json" in err
    rc, _, err = _run(capsys, ["--checkpoint", setup["run"], "--step", 2, "--data", "synthetic"])
    assert rc == 2 and "no checkpoint of that step" in err and "[1, 3]" in err
    rc, _, err = _run(capsys, ["--checkpoint", setup["base"], "--data", "synthetic", "rollout.nonsense=1"])
    assert rc == 2 and "rollout.nonsense" in err
