"""``python -m orz_jax.compile``: every program of a tiny config compiled ahead of time for TPU slices on this CPU.

Needs libtpu (the ``tpu-aot`` extra: ``pip install -e '.[test,tpu-aot]'``); skipped with the reason otherwise.
All compiles run in ONE subprocess (libtpu initialises once, ~10 s) with ``JAX_PLATFORMS=cpu``: the pytest
process's own JAX stays on the CPU, and compile-only TPU devices need no TPU.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest

from conftest import run_aot_script

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e '.[tpu-aot]')")

TINY = """\
model:
  arch: {vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_layers: 1, num_heads: 4, num_kv_heads: 2}
  tokenizer: unused
  dtype: bfloat16
  remat: full
  attention_block: 64
  attention_impl: xla  # the FLOP bounds below count XLA ops; XLA's cost analysis sees no FLOPs in Mosaic kernels
mesh: {data: 1, fsdp: -1, tensor: 1}
rollout: {n_samples_per_prompt: 4, max_prompt_len: 32, max_response_len: 32, prefill_buckets: [16, 32],
          max_concurrent_decodes: 8, driver: orchestrator}
ppo: {micro_batch_rows: 4, pack_len: 128, critic_steps_per_batch: 2, actor_steps_per_batch: 1}
data: {prompts_per_iter: 8}
eval: {temperature: 0.6}
"""

SCRIPT = """
import json, sys, jax, jax.numpy as jnp, numpy as np, dataclasses
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orz_jax.compile import compile_run, compile_program, main, parse_topology, topology_devices
from orz_jax.config import load_config

cfg_path, out = sys.argv[1], sys.argv[2]
res = {}
cfg = load_config(cfg_path)
res["one_host"] = dataclasses.asdict(compile_run(cfg, parse_topology("v5p:2x2x1"), log=lambda s: None))
# two hosts (v5p:2x2x2 = 8 chips, 4 per host): the engine serves from one host's devices
res["two_hosts"] = dataclasses.asdict(compile_run(load_config(cfg_path, ["mesh.tensor=2"]), parse_topology("v5p:2x2x2"), log=lambda s: None,
                                                  only=["decode", "weight_sync", "actor_step"]))
# the batched driver's decode: a while_loop that stops early, its count unknown to the HLO (hint: check_every)
res["batched"] = dataclasses.asdict(compile_run(load_config(cfg_path, ["rollout.driver=batched", "rollout.check_every=8"]),
                                                parse_topology("v5p:2x2x1"), log=lambda s: None, only=["decode"]))
# an unscanned sharded matmul: compiled FLOPs / bytes against 2*M*N*K and the operand sizes
devs = topology_devices(parse_topology("v5p:2x2x1"))
mesh = Mesh(np.asarray(devs).reshape(4), ("x",))
M, N, K = 1024, 2048, 512
a = jax.ShapeDtypeStruct((M, K), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
b = jax.ShapeDtypeStruct((K, N), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x")))
mm = compile_program("matmul", jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P("x", None))), a, b)
res["matmul"] = dataclasses.asdict(mm) | {"collective_bytes": mm.collective_bytes}
# too big: a KV cache of 2048 slots x 32800 positions x 2 KiB per device (137 GB) on a 95 GB chip
big = ["rollout.max_concurrent_decodes=8192", "rollout.max_response_len=32768", "ppo.pack_len=32800",
       "model.arch.head_dim=256", "--programs", "decode"]
res["too_big_rc"] = main(["--config", cfg_path, "--topology", "v5p-8", *big])
json.dump(res, open(out, "w"))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    (tmp / "tiny.yaml").write_text(TINY)
    (tmp / "run.py").write_text(textwrap.dedent(SCRIPT))
    p = run_aot_script(tmp / "run.py", tmp / "tiny.yaml", tmp / "out.json")
    return json.loads((tmp / "out.json").read_text()), p.stdout


def _by_name(report):
    return {p["name"]: p for p in report["programs"]}


def test_every_program_compiles_for_one_host(compiled):
    r = compiled[0]["one_host"]
    assert r["devices"] == 4 and r["processes"] == 1 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["failures"] == [] and r["fits"]
    progs = _by_name(r)
    assert set(progs) == {"prefill[16]", "insert[16]", "prefill[32]", "insert[32]", "init_decode_state", "decode",
                          "eval_decode", "weight_sync", "prepare_batch", "critic_step", "actor_step"}
    # the engine's own bfloat16 copy, whole on every device (tensor 1, no fsdp): TINY's policy has 69,952
    # parameters (embed + lm_head 2 x 256 x 64, q / o 2 x 64 x 64, k / v 2 x 64 x 32, qkv biases 128, MLP
    # 3 x 64 x 128, norms 3 x 64), 2 bytes each. The refresh writes it in place (the old copy donated).
    assert r["resident"]["serving_params_copy"] == 69_952 * 2
    assert progs["weight_sync"]["alias_bytes"] >= r["resident"]["serving_params_copy"]  # (+ TPU tile padding)
    for name, p in progs.items():
        assert p["compile_s"] > 0 and p["temp_bytes"] >= 0 and p["peak_bytes"] > 0, name
        assert p["flops"] >= 0 and p["bytes_accessed"] > 0, name
    # the train steps take (state, batch): at least the state's and the buffer's shard, unpadded
    rows, L = r["buffer"]["rows"], r["buffer"]["pack_len"]
    batch_dev = 8 * rows * L * 4 // 4  # 8 int32/float32 fields, rows split over 4 batch shards
    assert progs["actor_step"]["argument_bytes"] >= r["resident"]["actor_state"] + batch_dev
    assert progs["critic_step"]["argument_bytes"] >= r["resident"]["critic_state"] + batch_dev
    # donated train states come back in place
    assert progs["actor_step"]["alias_bytes"] >= r["resident"]["actor_state"] * 0.99
    # FSDP: the update gathers weights and reduces gradients across the 4 devices
    assert {"all-gather"} <= set(progs["actor_step"]["collectives"])
    assert {"all-reduce", "reduce-scatter"} & set(progs["actor_step"]["collectives"])
    # the HLO's loops (trip counts read from the TPU HLO, which carries no known_trip_count): the micro-batch
    # body runs rows / 4 times per pass over the buffer (the critic: 2 mini-batches x 2 micro-batches; the
    # 1-layer scan is unrolled by the compiler), and no loop is left unknown
    for name in ("actor_step", "critic_step", "prepare_batch"):
        assert progs[name]["unknown_loops"] == [] and progs[name]["loops"], name
        assert max(loop["trips"] * loop["times"] for loop in progs[name]["loops"]) == rows // 4, name
    # compiled FLOPs (trips applied) cover at least forward + backward (3 of the model's 4 remat passes of 2N +
    # causal attention) over every packed position, and the real tokens' whole 4-pass figure; below the 4-pass
    # packed figure (0.96 here) because XLA drops recomputed-forward products the backward never reads (0.5B
    # actor_step on v5p-8: 11 of the 12 MLP matmul passes per layer in the HLO) ...
    a = progs["actor_step"]
    assert a["flops"] >= a["model_flops"] * 3 / 4 and a["flops"] >= a["model_flops_real_tokens"]
    # ... and not much more: the value/LM-head recompute and masked attention blocks add < 1.5x at these sizes
    assert a["flops"] <= 1.5 * a["model_flops"]
    assert a["xla_cost_analysis_loop_bodies_once"]["flops"] < a["flops"] / 2  # loop bodies once: short
    assert r["iteration_roofline_s"] > 0 and set(r["phases"]) == {"rollout", "weight_sync", "prepare",
                                                                  "critic_update", "actor_update"}


def test_two_host_topology_serves_from_local_devices(compiled):
    r = compiled[0]["two_hosts"]
    assert r["devices"] == 8 and r["processes"] == 2 and r["failures"] == []
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert r["serving_mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}  # one host's 4 chips, tensor kept
    progs = _by_name(r)
    assert set(progs) == {"decode", "weight_sync", "actor_step"}
    # multihost.to_serving casts each leaf to bf16 on its devices and gathers leaf by leaf: the compiled program
    # is the largest leaf (the 256 x 64 embedding, now bf16) gathered whole onto every device, its calls scale it
    # to the whole policy by bytes
    assert progs["weight_sync"]["output_bytes"] == 256 * 64 * 2
    assert "all-gather" in progs["weight_sync"]["collectives"]
    params_total = r["resident"]["actor_state"] * 8 / 3  # params + 2 Adam moments, all float32, over 8 devices
    assert progs["weight_sync"]["calls_per_iteration"] * 256 * 64 * 2 == pytest.approx(params_total / 2, rel=0.05)


def test_batched_decode_loop_is_unknown_and_counted_check_every_times(compiled):
    (d,) = compiled[0]["batched"]["programs"]
    assert d["name"] == "decode" and len(d["unknown_loops"]) == 1 and d["unknown_trips"] == 8
    assert [(loop["trips"], loop["known"]) for loop in d["loops"]] == [(8, False)]
    # 8 steps of the one-step program's work: compiled FLOPs against the model's 8 x (2N + attention over the
    # cache) per slot, the same ratio as the orchestrator's one-step decode
    one = _by_name(compiled[0]["one_host"])["decode"]
    assert d["model_flops"] == pytest.approx(8 * one["model_flops"])
    assert d["flops"] == pytest.approx(8 * one["flops"], rel=0.02)


def test_unscanned_matmul_figures_are_exact(compiled):
    mm = compiled[0]["matmul"]
    M, N, K = 1024, 2048, 512
    assert mm["flops"] == pytest.approx(2 * M * N * K / 4, rel=1e-6)  # each device: its quarter of the rows
    assert mm["argument_bytes"] == (M * K + K * N) // 4 * 2  # bf16 shards
    assert mm["output_bytes"] == M * N // 4 * 2
    assert mm["collectives"]["all-gather"]["bytes"] == K * N * 2  # b gathered whole on each device


def test_too_big_is_refused_naming_the_program(compiled):
    results, stdout = compiled
    assert results["too_big_rc"] == 1
    assert "program decode" in stdout and ("does not fit" in stdout or "failed to compile" in stdout)
