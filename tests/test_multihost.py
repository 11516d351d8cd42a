"""Two JAX processes (``jax.distributed`` on 127.0.0.1, CPU collectives over gloo), one CPU device each, run one
training iteration together and end with the same actor and critic parameters as one process with two devices
given the same global batch.

The multi-process run is the real ``Trainer``: each process takes its shard of the prompts, samples them with a
rollout engine on its own device, scores them, all-gathers the rollout buffer and joins the SPMD update on the
2-device global mesh (``orz_jax.multihost``). The reference is one process whose data iterator yields both hosts'
shards (built with ``process_index=0, 1``, ``process_count=2``) and whose rollouts sample each host's half with that
host's key on a 1-device engine, as each host does; everything after that is the trainer's own single-process path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

WORKER = r'''
import json, os, sys
import numpy as np
mode, out_dir, tok_dir = sys.argv[1], sys.argv[2], sys.argv[3]
import jax
if mode == "multi":
    pid, port = int(sys.argv[4]), sys.argv[5]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
else:
    assert jax.process_count() == 1 and jax.device_count() == 2
from jax.experimental import multihost_utils
from orz_jax.config import load_config
from orz_jax.trainer import Trainer
from flax import nnx

flat = lambda tree, tag: {f"{tag}/" + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

cfg = load_config(None, [
    "model.arch={vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 4, num_kv_heads: 2}",
    f"model.tokenizer={tok_dir}", "model.critic_head_init_std=0.1", "mesh.fsdp=-1",
    "rollout.n_samples_per_prompt=4", "rollout.max_prompt_len=48", "rollout.max_response_len=16",
    "rollout.prefill_buckets=[48]", "rollout.max_concurrent_decodes=16",
    "ppo.pack_len=64", "ppo.micro_batch_rows=4", "ppo.critic_steps_per_batch=2", "ppo.actor_steps_per_batch=1",
    "ppo.actor.lr=1e-3", "ppo.actor.warmup_steps=0", "ppo.critic.warmup_steps=0",
    "data.source=synthetic", "data.template=compact", "data.prompts_per_iter=4",
    "data.synthetic={num_train: 200, num_eval: 4, min_ops: 1, max_ops: 1, max_operand: 20}",
    "reward.num_workers=1", "eval.every=0", "experiment.num_iterations=1", "checkpoint.async_save=false", f"experiment.out_dir={out_dir}/run",
    "experiment.tensorboard=false", "experiment.progress_bar=false"])
trainer = Trainer(cfg)
# the stacked parameters (TrainState.module()), whatever layout the train state holds (ppo.train_layers)
stacked = lambda state: nnx.state(state.module(), nnx.Param)
init_actor = multihost_utils.process_allgather(stacked(trainer.actor), tiled=True)

export = {}
if mode == "ref":
    import dataclasses
    from jax.sharding import Mesh
    from orz_jax.data.pipeline import PromptBatch, build_train_pipeline
    from orz_jax.rollout.engine import RolloutEngine
    from orz_jax.rollout.rollouts import generate_rollouts

    shards = [next(build_train_pipeline(cfg, trainer.tokenizer, process_index=p, process_count=2)) for p in (0, 1)]
    merged = PromptBatch(*[sum((getattr(s, f.name) for s in shards), []) for f in dataclasses.fields(PromptBatch)])
    trainer.data_iter = iter([merged])
    one_device = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    engine = RolloutEngine(trainer.actor.module(), cfg.rollout, trainer.tokenizer, mesh=one_device,
                           seed=cfg.experiment.seed)

    def rollout(prompt_ids, n_samples, key, temperature=None):
        half = len(prompt_ids) // 2
        parts = [generate_rollouts(engine, prompt_ids[p * half:(p + 1) * half], n_samples,
                                   jax.random.fold_in(key, p), cfg.rollout) for p in (0, 1)]
        cat = lambda name: np.concatenate([getattr(r, name) for r in parts])
        return parts[0].replace(
            prompt_ids=cat("prompt_ids"), prompt_lens=cat("prompt_lens"), response_ids=cat("response_ids"),
            response_mask=cat("response_mask"), logprobs=cat("logprobs"),
            prompt_index=np.concatenate([r.prompt_index + p * half for p, r in enumerate(parts)]),
            stop_reason=parts[0].stop_reason + parts[1].stop_reason, texts=parts[0].texts + parts[1].texts)

    trainer.rollout = rollout

if mode == "ref":
    metrics = trainer.train_iteration()
    trainer.scorer.close()
else:  # the whole loop: eval, one iteration, orbax checkpoint, HF export (process 0), metrics.jsonl
    summary = trainer.run()
    assert summary["end_iteration"] == 1, summary
    if jax.process_index() == 0:
        with open(f"{out_dir}/run/metrics.jsonl") as f:
            metrics = [r for r in map(json.loads, f) if "reward_mean" in r][0]
        metrics.pop("iteration")
        # issue 18: process 0 dumps rows of the global buffer, with the references of both hosts' prompts
        dump = [json.loads(line) for line in open(f"{out_dir}/run/rollouts/iter_000001.jsonl")]
        assert len(dump) == 8 and all(r["reference"] is not None for r in dump), dump
        from orz_jax.models.hf_io import load_hf
        import dataclasses
        exported, _ = load_hf("policy", summary["exported_to"], dataclasses.replace(cfg.model, arch=None))
        export = flat(nnx.state(exported, nnx.Param), "export")
    else:
        metrics, export = {}, {}
actor = multihost_utils.process_allgather(stacked(trainer.actor), tiled=True)
critic = multihost_utils.process_allgather(stacked(trainer.critic), tiled=True)
tag = mode if mode == "ref" else f"multi{jax.process_index()}"
np.savez(f"{out_dir}/{tag}.npz", **flat(actor, "actor"), **flat(critic, "critic"), **flat(init_actor, "init"), **export)
with open(f"{out_dir}/{tag}.json", "w") as f:
    json.dump({k: float(v) for k, v in metrics.items()}, f)
print("ok", tag)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    return env


@pytest.mark.timeout(600)
def test_two_processes_one_iteration_equals_one_process(tmp_path):
    from orz_jax.tokenizer import CharTokenizer

    tok_dir = tmp_path / "tok"
    CharTokenizer().save(str(tok_dir))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    multi_dir, ref_dir = tmp_path / "multi", tmp_path / "ref"
    multi_dir.mkdir()
    ref_dir.mkdir()

    # All three at once: the two hosts and the reference are independent until the comparison.
    cmds = [([str(script), "multi", str(multi_dir), str(tok_dir), str(pid), port], 1) for pid in (0, 1)]
    cmds.append(([str(script), "ref", str(ref_dir), str(tok_dir)], 2))
    procs = [subprocess.Popen([sys.executable, *args], env=_env(n), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args, n in cmds]
    try:
        logs = [p.communicate(timeout=500)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for name, p, log in zip(("process 0", "process 1", "reference"), procs, logs):
        assert p.returncode == 0, f"{name} failed:\n{log[-6000:]}"

    r = np.load(ref_dir / "ref.npz")
    m0, m1 = np.load(multi_dir / "multi0.npz"), np.load(multi_dir / "multi1.npz")
    assert sorted(r.files) == sorted(m1.files) == sorted(k for k in m0.files if not k.startswith("export/"))
    moved = 0.0
    for k in r.files:
        np.testing.assert_array_equal(m0[k], m1[k], err_msg=f"{k}: the two processes disagree")
        # Same SPMD program on the same 2-device mesh: only the all-reduce transport differs.
        np.testing.assert_allclose(m0[k], r[k], rtol=1e-5, atol=1e-7, err_msg=f"{k}: multi-process != one process")
        if k.startswith("actor/"):
            moved = max(moved, float(np.abs(r[k] - r["init/" + k[len("actor/"):]]).max()))
            # process 0's final_hf export holds the gathered global parameters
            np.testing.assert_array_equal(m0["export/" + k[len("actor/"):]], m0[k], err_msg=f"export of {k}")
    assert moved > 1e-4, "the actor did not move: the comparison would be vacuous"

    mr = json.load(open(ref_dir / "ref.json"))
    mm = json.load(open(multi_dir / "multi0.json"))
    assert mm["num_samples"] == mr["num_samples"] == 16  # the global buffer: 2 hosts x 2 prompts x 4 samples
    for k in ("reward_mean", "response_len_mean", "truncated_frac", "pass@4", "actor/pg_loss",
              "critic/value_loss", "actor/grad_norm", "critic/grad_norm", "pack/fill"):
        assert mm[k] == pytest.approx(mr[k], rel=1e-5, abs=1e-7), k
    assert mr["critic/grad_norm"] > 0 and mr["actor/grad_norm"] > 0


def test_to_serving_gathers_large_leaves_in_pieces_and_casts_first(monkeypatch):
    """A stacked leaf larger than the piece size is gathered in slices along its layers axis, each cast to the
    serving dtype before it leaves its devices; the host copy equals the cast of the whole leaf."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from orz_jax import multihost

    calls = []

    def fake_allgather(x, tiled=False):
        calls.append((x.shape, x.dtype))
        return np.asarray(x)

    monkeypatch.setattr(multihost, "is_multiprocess", lambda: True)
    monkeypatch.setattr(multihost.multihost_utils, "process_allgather", fake_allgather)
    stack = jax.random.normal(jax.random.key(0), (8, 16, 32), jnp.float32)  # 16 KiB float32
    small = jnp.arange(4, dtype=jnp.int32)
    out = multihost.to_serving({"stack": stack, "small": small}, jnp.bfloat16, piece_bytes=2048)
    # bf16 stack = 8 KiB; 2 KiB pieces -> 2 layers per piece, 4 gathers; the int leaf is not cast, one gather
    assert sorted(calls, key=str) == sorted([((2, 16, 32), jnp.bfloat16)] * 4 + [((4,), jnp.int32)], key=str)
    assert out["stack"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["stack"], np.asarray(stack.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(out["small"], np.arange(4))
