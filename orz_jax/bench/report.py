"""``python -m orz_jax.bench all``: one report of our JAX stack next to PyTorch on the same model.

    python -m orz_jax.bench all --model tiny --out docs/bench/tiny
    python -m orz_jax.bench all --model configs/orz_0p5b.yaml --out docs/bench/qwen2.5-0.5b-cpu
    python -m orz_jax.bench all --model configs/orz_0p5b.yaml --dtype bfloat16 --out $OUT/bench   # GPU

``--model``: a preset (``tiny``, ``small``) or a YAML config whose ``model.arch`` gives the shape
(random weights). A fresh process runs the JAX side, then another the PyTorch side (``transformers``
Qwen2 + torch): JAX's CPU thread pool, or its GPU allocator holding most of the device memory, would
slow or starve torch in a shared process. The torch side loads the very weights the JAX side exported
and first checks that its logits equal ours on a fixed input (float32, full matmul precision): the
comparison is of equal work, and the report refuses to compare otherwise.

Rows (each: median of ``--reps`` timed repetitions after one warm-up call, with min / max / IQR):

* ``prefill``: one forward pass over ``[batch, prompt_len]`` tokens, logits for every position, no
  gradient; MFU against the measured matmul peak.
* ``decode``: generated tokens/s of a whole greedy generation call (prefill + ``new_tokens`` decode
  steps), our JetStream engine (both drivers) vs ``transformers`` ``generate``; next to the
  memory-bandwidth bound (weights + mean KV bytes per step over the measured copy bandwidth).
* ``update``: PPO update tokens/s (forward + backward + AdamW, micro-batch accumulation) for the actor
  and the critic on a packed ORZ-like buffer (:mod:`orz_jax.bench.train`), JAX vs torch eager and
  ``torch.compile``; MFU.
* ``e2e``: one PPO iteration on a small batch: sampled rollout, log-probs + values (+ advantages),
  critic update, actor update (+ weight sync on the JAX side). JAX: the real loop, timed as a whole.
  torch (eager): HF ``generate`` + no-grad log-probs / values forwards timed as one loop, plus the
  medians of the torch actor and critic updates on that same packed buffer.

Writes ``report.json``, ``report.csv``, ``report.png`` under ``--out`` and prints one table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Optional

import numpy as np

from orz_jax.config import DEFAULT_ATTENTION_BLOCK, ArchConfig, OptimConfig, PPOConfig

PRESETS = {
    # seconds on a CPU: the unit test and a smoke run
    "tiny": ArchConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True),
    # the default shape of bench/train.py: a couple of minutes on a 2-core CPU
    "small": ArchConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                        num_kv_heads=2, tie_word_embeddings=True),
}
_TAG = "BENCH_REPORT_JSON "


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orz_jax.bench all", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="preset (tiny, small) or a YAML config with model.arch")
    p.add_argument("--out", default="bench_out", help="directory for report.json / .csv / .png")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (bfloat16 on GPU/TPU); master weights stay float32 for the updates")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per row (after one warm-up)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prefill-sizes", default="1,4", help="prefill batch sizes")
    p.add_argument("--sizes", "--batch-sizes", dest="sizes", default="1,8", help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=32, help="decode: generated tokens per sample")
    p.add_argument("--drivers", default="batched,orchestrator", help="our rollout drivers to time")
    p.add_argument("--check-every", type=int, default=8, help="batched driver: decode steps per host check")
    p.add_argument("--pack-len", type=int, default=512, help="update: tokens per packed row")
    p.add_argument("--rows", type=int, default=2, help="update: packed rows per buffer (one optimizer step)")
    p.add_argument("--micro-rows", type=int, default=1, help="rows per micro-batch (gradient accumulation)")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    p.add_argument("--attention-block", type=int, default=DEFAULT_ATTENTION_BLOCK,
                   help="JAX: causal query block of the training / scoring attention (0: dense)")
    p.add_argument("--e2e-prompts", type=int, default=2, help="e2e: prompts per iteration (0: skip the row)")
    p.add_argument("--e2e-samples", type=int, default=2, help="e2e: samples per prompt")
    p.add_argument("--e2e-new-tokens", type=int, default=32, help="e2e: response tokens per sample")
    p.add_argument("--torch", choices=["both", "eager", "compile", "none"], default="both",
                   help="torch update variants (prefill / decode / e2e: eager)")
    p.add_argument("--matmul", type=int, default=0, help="matmul size for the peak (0: 2048 CPU, 8192 else)")
    p.add_argument("--check-atol", type=float, default=1e-3,
                   help="max |logit difference| allowed between the two sides (float32, same weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="instead of the report: trace the actor update on both sides (jax.profiler; "
                        "torch.profiler on the eager update, in its own process) and print where each one's "
                        "time goes (top ops with their shapes, by category); writes profile.json")
    p.add_argument("--torch-profile-child", default=None, help=argparse.SUPPRESS)  # spec file: torch profile
    p.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)  # spec file: run the torch side only
    p.add_argument("--jax-child", default=None, help=argparse.SUPPRESS)  # spec file: run the JAX side only
    return p.parse_args(argv)


def load_arch(spec: str) -> tuple[ArchConfig, str]:
    """(arch, name) from a preset name or a YAML config's ``model.arch``."""
    if spec in PRESETS:
        return PRESETS[spec], spec
    if not os.path.isfile(spec):
        raise SystemExit(f"--model {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a config file")
    from orz_jax.config import load_config

    cfg = load_config(spec)
    if cfg.model.arch is None:
        raise SystemExit(f"{spec}: model.arch is not set; the benchmark needs the shape (weights are random)")
    return cfg.model.arch, os.path.splitext(os.path.basename(spec))[0]


def stats(times: list[float]) -> dict:
    """Median and spread of repeated timings (seconds)."""
    t = np.asarray(times, np.float64)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return dict(median_s=float(med), min_s=float(t.min()), max_s=float(t.max()), q1_s=float(q1), q3_s=float(q3),
                n=len(times), times=[float(x) for x in times])


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ppo(args, pack_len: int) -> PPOConfig:
    # lr tiny so repeated updates stay close to the start; one optimizer step per buffer (as bench/train)
    opt = OptimConfig(lr=1e-6, warmup_steps=0)
    return PPOConfig(actor=opt, critic=opt, actor_steps_per_batch=1, critic_steps_per_batch=1,
                     micro_batch_rows=args.micro_rows, pack_len=pack_len)


def _train_ns(args, arch: ArchConfig, pack_len: int, iters: int) -> SimpleNamespace:
    """The argument namespace orz_jax.bench.train's functions read."""
    return SimpleNamespace(vocab=arch.vocab_size, pack_len=pack_len, rows=args.rows, micro_rows=args.micro_rows,
                           dtype=args.dtype, remat=args.remat, iters=iters, seed=args.seed,
                           attention_block=args.attention_block)


def _inputs(args, arch: ArchConfig):
    """Deterministic token ids shared by both sides: the logit check, prefill and decode prompts."""
    rng = np.random.default_rng(args.seed + 7)
    check = rng.integers(1, arch.vocab_size, (2, 16)).astype(np.int32)
    prompts = {b: rng.integers(1, arch.vocab_size, (b, args.prompt_len)).astype(np.int32)
               for b in sorted(set(_ints(args.sizes)) | set(_ints(args.prefill_sizes)))}
    e2e = rng.integers(1, arch.vocab_size, (max(args.e2e_prompts, 1), args.prompt_len)).astype(np.int32)
    return check, prompts, e2e


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _seg_tokens(segment_ids: np.ndarray) -> np.ndarray:
    from orz_jax.bench.train import segment_lengths

    return segment_lengths(np.asarray(segment_ids))


# ----------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------


def jax_side(args, arch: ArchConfig, hf_dir: str, check_path: str) -> dict:
    """Every JAX row; exports the policy weights to ``hf_dir`` and its check logits to ``check_path``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from orz_jax.bench.rollout import _BenchTokenizer, copy_bandwidth
    from orz_jax.bench.train import make_buffer, matmul_peak
    from orz_jax.config import ModelConfig, RolloutConfig, resolve_serving_layers
    from orz_jax.models.build import create_model, param_count
    from orz_jax.models.hf_io import export_hf
    from orz_jax.models.layer_layout import merge_model, split_layers
    from orz_jax.ppo.packing import pack_samples
    from orz_jax.ppo.train import PPOFunctions, create_train_state, train_layers
    from orz_jax.rollout import RolloutEngine, generate_rollouts

    out: dict = {"backend": jax.default_backend(), "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
                 "jax_version": jax.__version__}
    n = args.matmul or (2048 if jax.default_backend() == "cpu" else 8192)
    out["matmul_peak_flops"] = matmul_peak(n)
    out["matmul_n"] = n
    out["copy_bandwidth_Bps"] = copy_bandwidth()
    check, prompts, e2e_prompts = _inputs(args, arch)

    # Same weights both sides: float32 params from one seed; the check runs in float32 at full matmul
    # precision (TF32 on a GPU would differ from torch's float32 by ~1e-3).
    f32 = ModelConfig(arch=arch, dtype="float32", param_dtype="float32", remat=args.remat,
                      attention_block=args.attention_block)
    policy = create_model("policy", arch, f32, seed=args.seed)
    out["params"] = param_count(policy)
    with jax.default_matmul_precision("highest"):
        pos = np.broadcast_to(np.arange(check.shape[1], dtype=np.int32), check.shape)
        logits = np.asarray(policy(jnp.asarray(check), jnp.asarray(pos), jnp.ones_like(jnp.asarray(check)))[0])
    np.save(check_path, logits.astype(np.float32))
    export_hf(policy, hf_dir, dtype="float32")
    if args.dtype != "float32":  # same float32 params (same seed), bfloat16 compute
        del policy
        policy = create_model("policy", arch, dataclasses.replace(f32, dtype=args.dtype), seed=args.seed)

    # --- prefill: one forward over [b, prompt_len], all logits, no gradient, with the layers in the layout the
    # engine and the trainer hold on this platform (one array per layer on a CPU: rollout.serving_layers and
    # ppo.train_layers; XLA:CPU would copy each layer's slice of a stacked weight)
    graphdef, state = nnx.split(policy)
    layout = resolve_serving_layers("auto", jax.devices()[0].platform)
    prefill_params = split_layers(state) if layout == "per_layer" else state
    out["prefill_layers"] = layout

    @jax.jit
    def forward(params, tokens):  # tokens [b, prompt_len] -> logits [b, prompt_len, vocab]
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        model, layer_params = merge_model(graphdef, params)
        return model(tokens, pos, jnp.ones_like(tokens), layer_params=layer_params)[0]

    out["prefill"] = {}
    for b in _ints(args.prefill_sizes):
        tok = jax.device_put(prompts[b])
        forward(prefill_params, tok).block_until_ready()  # compile
        out["prefill"][str(b)] = st = stats([_timed(lambda: forward(prefill_params, tok).block_until_ready())
                                           for _ in range(args.reps)])
        print(f"jax prefill b={b}: {st['median_s']:.4f} s", flush=True)

    # --- decode: greedy, every sample runs exactly new_tokens steps (EOS id outside the vocabulary)
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    # serving copy in the compute dtype (the trainer serves a cast copy too; weights are read every step)
    serving = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                               state))
    out["decode_weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(serving, nnx.Param)))
    out["decode"] = {}
    for b in _ints(args.sizes):
        cfg = RolloutConfig(temperature=0.0, max_prompt_len=args.prompt_len, prefill_buckets=[args.prompt_len],
                            max_response_len=args.new_tokens, max_concurrent_decodes=b, stop_strings=[])
        engine = RolloutEngine(serving, cfg, _BenchTokenizer(arch.vocab_size))
        row = {"max_len": engine.max_len}
        for drv in [d for d in args.drivers.split(",") if d]:
            call = lambda: generate_rollouts(engine, prompts[b].tolist(), 1, 0, cfg, driver=drv,  # noqa: E731
                                             check_every=args.check_every)
            ro = call()  # warm-up: compiles
            if int(ro.response_mask.sum()) != b * args.new_tokens:
                raise RuntimeError(f"decode {drv} b={b}: {int(ro.response_mask.sum())} tokens, "
                                   f"expected {b * args.new_tokens}")
            row[drv] = stats([_timed(call) for _ in range(args.reps)])
            print(f"jax decode {drv} b={b}: {row[drv]['median_s']:.3f} s", flush=True)
        out["decode"][str(b)] = row
        del engine
    del serving, state, prefill_params, forward
    gc.collect()

    # --- update: the packed buffer of bench/train (ORZ-like length mix), actor then critic
    ppo = _ppo(args, args.pack_len)
    batch = make_buffer(_train_ns(args, arch, args.pack_len, args.reps), ppo, np.random.default_rng(args.seed))
    np.savez(os.path.join(os.path.dirname(check_path), "buffer.npz"),
             **{k: np.asarray(getattr(batch, k)) for k in _BUFFER_FIELDS})
    out["update_segment_lengths"] = _seg_tokens(batch.segment_ids).tolist()
    out["update_tokens"] = int(sum(out["update_segment_lengths"]))
    fns = PPOFunctions.build(ppo)
    dbatch = jax.device_put(batch)
    out["update"] = {}
    # One train state (params + AdamW moments: 3x the float32 weights) at a time unless the e2e row
    # needs both: a 0.5B model's pair is ~12 GB.
    actor = critic = None
    for name in ("actor", "critic"):
        if name == "actor":
            st = actor = create_train_state(policy, ppo.actor, layers=train_layers(ppo))  # the trainer's layout
            del policy
        else:
            if not args.e2e_prompts:
                actor = None
            gc.collect()
            model = create_model("critic", arch, dataclasses.replace(f32, dtype=args.dtype), seed=args.seed + 1)
            st = critic = create_train_state(model, ppo.critic, layers=train_layers(ppo))
            del model
        gc.collect()
        step = fns.actor_step if name == "actor" else fns.critic_step
        t0 = time.perf_counter()
        st, m = step(st, dbatch)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            st, m = step(st, dbatch)
            jax.block_until_ready((st.params, m))
            times.append(time.perf_counter() - t0)
        out["update"][name] = dict(stats(times), first_call_s=first)
        if name == "actor":
            actor = st
        else:
            critic = st
        del st
        print(f"jax update {name}: {out['update'][name]['median_s']:.3f} s (first call {first:.1f} s)", flush=True)
    del dbatch

    # --- e2e: the trainer's phases on a small batch (rewards random: the rule reward is host string work)
    if args.e2e_prompts > 0:
        n = args.e2e_prompts * args.e2e_samples
        pack_len = args.prompt_len + args.e2e_new_tokens
        cfg = RolloutConfig(temperature=1.0, max_prompt_len=args.prompt_len, prefill_buckets=[args.prompt_len],
                            max_response_len=args.e2e_new_tokens, max_concurrent_decodes=n, stop_strings=[])
        engine = RolloutEngine(actor.module(), cfg, _BenchTokenizer(arch.vocab_size))
        rng = np.random.default_rng(args.seed)
        phases: dict[str, list[float]] = {k: [] for k in ("rollout", "pack", "logprobs_values", "critic_update",
                                                           "actor_update", "weight_sync", "total")}
        for rep in range(args.reps + 1):  # rep 0 compiles
            t = {}
            t0 = time.perf_counter()
            ro = generate_rollouts(engine, e2e_prompts[:args.e2e_prompts].tolist(), args.e2e_samples, rep, cfg,
                                   driver="batched", check_every=args.check_every)
            t["rollout"] = time.perf_counter()
            packed, layout = pack_samples(ro.prompt_ids, ro.prompt_lens, ro.response_ids, ro.response_mask,
                                          pack_len, row_multiple=args.micro_rows, seed=rep)
            rewards = rng.integers(0, 2, n).astype(np.float32)
            t["pack"] = time.perf_counter()
            packed = fns.prepare_batch(actor, critic, packed, layout.response_index, ro.response_mask, rewards,
                                       ro.prompt_index)
            jax.block_until_ready(packed.advantages)
            t["logprobs_values"] = time.perf_counter()
            critic, _ = fns.critic_step(critic, packed)
            jax.block_until_ready(critic.step)
            t["critic_update"] = time.perf_counter()
            actor, _ = fns.actor_step(actor, packed)
            jax.block_until_ready(actor.step)
            t["actor_update"] = time.perf_counter()
            engine.update_params(actor.params)  # as the trainer syncs (one process: to_serving is the identity)
            t["weight_sync"] = time.perf_counter()
            if rep:
                prev = t0
                for k, v in t.items():
                    phases[k].append(v - prev)
                    prev = v
                phases["total"].append(prev - t0)
        out["e2e"] = {k: stats(v) for k, v in phases.items()}
        out["e2e_layout"] = dict(rows=int(packed.tokens.shape[0]), pack_len=pack_len, samples=n,
                                 train_tokens=int(_seg_tokens(packed.segment_ids).sum()))
        print(f"jax e2e iteration: {out['e2e']['total']['median_s']:.3f} s ("
              + ", ".join(f"{k} {v['median_s']:.3f}" for k, v in out["e2e"].items() if k != "total") + ")", flush=True)
        del engine
    del actor, critic
    gc.collect()
    return out


_BUFFER_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask", "old_logprobs", "old_values", "advantages",
                  "returns")


# ----------------------------------------------------------------------------------------------
# PyTorch side (a fresh process; never touches a JAX backend)
# ----------------------------------------------------------------------------------------------


def torch_side(spec: dict) -> dict:
    import torch
    import transformers

    from orz_jax.bench.train import bench_torch, torch_matmul_peak
    from orz_jax.ppo.packing import pack_samples

    args = SimpleNamespace(**spec["args"])
    arch = ArchConfig(**spec["arch"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, args.dtype)
    out: dict = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
                 "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    # --- equal work: our logits on the same weights, before any timing
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).to(dev).eval()
    ref = np.load(spec["check_path"])
    check, prompts, e2e_prompts = _inputs(args, arch)
    with torch.no_grad():
        got = hf32(torch.as_tensor(check, dtype=torch.long, device=dev), use_cache=False).logits.float().cpu().numpy()
    diff = float(np.abs(got - ref).max())
    out["logit_check"] = dict(max_abs_diff=diff, max_abs_logit=float(np.abs(ref).max()), atol=args.check_atol,
                              ok=diff <= args.check_atol)
    print(f"torch logit check: max |diff| {diff:.2e} (atol {args.check_atol})", flush=True)
    if not out["logit_check"]["ok"]:
        return out  # the parent reports the mismatch and refuses the comparison

    out["matmul_peak_flops"] = torch_matmul_peak(args.matmul or (8192 if dev == "cuda" else 2048))

    # --- prefill (eager): same weights in the compute dtype, as served
    hf = hf32 if dt == torch.float32 else \
        transformers.AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=dt).to(dev).eval()
    del hf32
    out["prefill"] = {}
    for b in _ints(args.prefill_sizes):
        ids = torch.as_tensor(prompts[b], dtype=torch.long, device=dev)

        def call():
            with torch.no_grad():
                hf(ids, use_cache=False)
            sync()

        call()
        out["prefill"][str(b)] = st = stats([_timed(call) for _ in range(args.reps)])
        print(f"torch prefill b={b}: {st['median_s']:.4f} s", flush=True)

    # --- decode: HF generate, greedy, exactly new_tokens per sample
    def generate(ids, new, sample):
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            pad_token_id=0, eos_token_id=None, **kw)
        sync()
        return g

    out["decode"] = {}
    for b in _ints(args.sizes):
        ids = torch.as_tensor(prompts[b], dtype=torch.long, device=dev)
        g = generate(ids, args.new_tokens, False)
        assert g.shape == (b, args.prompt_len + args.new_tokens), g.shape
        st = stats([_timed(lambda: generate(ids, args.new_tokens, False)) for _ in range(args.reps)])
        out["decode"][str(b)] = {"hf_generate": st}
        print(f"torch decode b={b}: {st['median_s']:.3f} s", flush=True)

    # --- update: bench/train's torch update on the very buffer the JAX side used
    if not args.e2e_prompts:
        del hf  # only the e2e row generates again; free the weights for the update's optimizer state
        gc.collect()
    buf = np.load(spec["buffer_path"])
    batch = SimpleNamespace(**{k: buf[k] for k in _BUFFER_FIELDS})
    ppo = _ppo(args, args.pack_len)
    ns = _train_ns(args, arch, args.pack_len, args.reps)
    out["update"] = {}
    for impl, compiled in (("torch eager", False), ("torch.compile", True)):
        if args.torch in ("both", "eager" if not compiled else "compile"):
            res = bench_torch(ns, arch, ppo, batch, compiled=compiled)
            out["update"][impl] = {k: dict(stats(v["times"]), first_call_s=v["first_call_s"]) for k, v in res.items()}
            print(f"{impl} update: " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in out["update"][impl].items()),
                  flush=True)

    # --- e2e (eager): HF generate (sampled) + no-grad log-probs / values on the packed buffer, one loop;
    # the updates are bench_torch's on that buffer (same code as the update row)
    if args.e2e_prompts > 0:
        body = hf.model  # the critic trunk has the policy's shape; a value head on top
        head = torch.nn.Linear(arch.hidden_size, 1, bias=False).to(dev).to(dt)
        ids = torch.as_tensor(np.repeat(e2e_prompts[:args.e2e_prompts], args.e2e_samples, 0), dtype=torch.long,
                              device=dev)
        pack_len = args.prompt_len + args.e2e_new_tokens
        rng = np.random.default_rng(args.seed)
        phases: dict[str, list[float]] = {"rollout": [], "pack": [], "logprobs_values": []}
        packed = None
        for rep in range(args.reps + 1):
            t0 = time.perf_counter()
            g = generate(ids, args.e2e_new_tokens, True).cpu().numpy()
            t1 = time.perf_counter()
            n, P = g.shape[0], args.prompt_len
            packed, _ = pack_samples(g[:, :P], np.full(n, P), g[:, P:], np.ones_like(g[:, P:]), pack_len,
                                     row_multiple=args.micro_rows, seed=rep)
            t2 = time.perf_counter()
            seg = torch.as_tensor(packed.segment_ids, device=dev)
            L = seg.shape[1]
            causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=dev))
            mask = (((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & causal)
                    | torch.eye(L, dtype=torch.bool, device=dev))[:, None]
            tok = torch.as_tensor(packed.tokens, dtype=torch.long, device=dev)
            pos = torch.as_tensor(packed.positions, dtype=torch.long, device=dev)
            with torch.no_grad():
                for s in range(0, tok.shape[0], args.micro_rows):
                    sl = slice(s, s + args.micro_rows)
                    logits = hf(input_ids=tok[sl], attention_mask=mask[sl], position_ids=pos[sl]).logits.float()
                    torch.log_softmax(logits, -1).gather(-1, torch.roll(tok[sl], -1, 1)[..., None])
                    h = body(input_ids=tok[sl], attention_mask=mask[sl], position_ids=pos[sl]).last_hidden_state
                    head(h).float()
            sync()
            t3 = time.perf_counter()
            if rep:
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                    phases[k].append(v)
        lm = packed.loss_mask
        f = lambda s, o: (rng.normal(size=lm.shape) * s + o).astype(np.float32) * lm  # noqa: E731
        ebatch = SimpleNamespace(tokens=packed.tokens, positions=packed.positions, segment_ids=packed.segment_ids,
                                 loss_mask=lm, old_logprobs=f(0.5, -2.0), old_values=f(0.5, 0.0),
                                 advantages=f(1.0, 0.0), returns=f(0.5, 0.5))
        res = bench_torch(SimpleNamespace(**{**vars(ns), "pack_len": pack_len}), arch, _ppo(args, pack_len), ebatch,
                          compiled=False)
        e2e = {k: stats(v) for k, v in phases.items()}
        e2e["critic_update"] = stats(res["critic"]["times"])
        e2e["actor_update"] = stats(res["actor"]["times"])
        e2e["total"] = dict(median_s=sum(v["median_s"] for v in e2e.values()),
                            min_s=sum(v["min_s"] for v in e2e.values()), max_s=sum(v["max_s"] for v in e2e.values()),
                            n=args.reps, note="sum of the phase medians (min / max: sums of the phase extremes)")
        out["e2e"] = e2e
        print(f"torch e2e iteration: {e2e['total']['median_s']:.3f} s", flush=True)
    return out


def _run_child(side: str, spec: dict, workdir: str) -> dict:
    """Run one side in a fresh process and return its results. Each side gets a process of its own:
    on a CPU the two runtimes' thread pools compete, and on a GPU JAX's allocator keeps (by default
    75% of) the device memory until its process exits."""
    path = os.path.join(workdir, f"{side}_spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "orz_jax.bench.report", f"--{side}-child", path]
    env = dict(os.environ)
    # torch's OpenMP threads spin-wait by default; on a CPU shared with other work (or with more
    # threads than free cores) that made every torch call 10-30x slower here (a 4-layer forward:
    # 0.18-0.65 s spinning, 0.012-0.018 s passive). Passive waiting costs nothing measurable when idle.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    for ln in proc.stdout:  # stream progress; stderr passes through
        if ln.startswith(_TAG):
            lines.append(ln)
        else:
            sys.stdout.write(f"  [{side}] {ln}")
            sys.stdout.flush()
    if proc.wait() != 0 or not lines:
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1][len(_TAG):])


def _op_category(name: str, shape: str) -> str:
    if "dot" in name or "ynn" in name or "gemm" in name or "cublas" in name or "convolution" in name:
        return "dots and library fusions (CPU: YNNPACK, matmuls with fused elementwise; GPU: cuBLAS)"
    if "copy" in name or "transpose" in name or "bitcast" in name:
        return "copies / transposes / layout"
    return "other fusions (elementwise, reductions, softmax)"


def profile_update(args, arch: ArchConfig, reps: int = 2) -> dict:
    """Trace ``reps`` JAX actor updates (after a compile call) on the benchmark buffer and summarise the
    device ops: time per op name (summed over the micro-batch loop), its output shape from the compiled
    HLO, and time per category, next to the time the matmul FLOPs would take at the measured peak."""
    import collections
    import glob
    import gzip
    import re

    import jax

    from orz_jax.bench.train import make_buffer, matmul_peak, train_flops
    from orz_jax.config import ModelConfig
    from orz_jax.models.build import create_model
    from orz_jax.ppo.train import PPOFunctions, create_train_state, train_layers

    ppo = _ppo(args, args.pack_len)
    batch = make_buffer(_train_ns(args, arch, args.pack_len, 1), ppo, np.random.default_rng(args.seed))
    seg = _seg_tokens(batch.segment_ids)
    batch = jax.device_put(batch)
    mcfg = ModelConfig(arch=arch, dtype=args.dtype, param_dtype="float32", remat=args.remat,
                       attention_block=args.attention_block)
    state = create_train_state(create_model("policy", arch, mcfg, seed=args.seed), ppo.actor, layers=train_layers(ppo))
    step = PPOFunctions.build(ppo).actor_step
    hlo = step.lower(state, batch).compile().as_text()
    shapes = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", hlo, re.M))
    state, m = step(state, batch)
    jax.block_until_ready(m)
    logdir = tempfile.mkdtemp(prefix="orz_profile_")
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir):
        for _ in range(reps):
            state, m = step(state, batch)
            jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / reps
    trace = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    per_op = collections.Counter()
    for e in events:  # device ops only: names that are HLO instructions of this executable
        if e.get("ph") == "X" and e.get("name") in shapes and not e["name"].startswith("while"):
            per_op[e["name"]] += e.get("dur", 0.0) / 1e6 / reps
    cats = collections.Counter()
    for name, sec in per_op.items():
        cats[_op_category(name, shapes[name])] += sec
    peak = matmul_peak(args.matmul or (2048 if jax.default_backend() == "cpu" else 8192))
    flops = train_flops(arch, seg, arch.vocab_size)
    attn_flops = 3.0 * 4.0 * arch.num_layers * arch.num_heads * arch.resolved_head_dim * float(
        np.sum(seg * (seg + 1) / 2))
    out = dict(wall_s=wall, ops_s=sum(per_op.values()), categories=dict(cats.most_common()),
               top_ops=[dict(name=n, seconds=s, shape=shapes[n]) for n, s in per_op.most_common(15)],
               model_flops=flops, attention_flops=attn_flops, matmul_peak_flops=peak,
               matmul_time_at_peak_s=flops / peak, tokens=int(seg.sum()), backend=jax.default_backend())
    # The trace's path is printed, not written into profile.json: reports get committed, temp paths do not belong.
    print(f"JAX trace (TensorBoard / Perfetto): {trace}")
    print(f"JAX actor update, {args.rows} x {args.pack_len}: {wall:.3f} s/update, device ops {out['ops_s']:.3f} s; "
          f"model FLOPs at the measured peak ({peak / 1e12:.3f} TFLOP/s) would take {flops / peak:.3f} s "
          f"(causal attention {attn_flops / flops:.1%} of the FLOPs)")
    _print_breakdown(out, "shape", 32)
    return out


def _print_breakdown(prof: dict, shape_key: str, width: int) -> None:
    """Time per category (with its share of op time), then the top ops with their shapes."""
    for k, v in prof["categories"].items():
        print(f"  {v:8.3f} s  {v / max(prof['ops_s'], 1e-12):6.1%}  {k}")
    for r in prof["top_ops"]:
        print(f"  {r['seconds']:8.4f} s  {r['name']:<{width}} {r[shape_key]}")


def _torch_op_category(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm") or "mkldnn" in name or "gemm" in name:
        return "matmuls (BLAS / oneDNN)"
    if "scaled_dot_product" in name or "flash" in name or "efficient_attention" in name:
        return "fused attention (SDPA kernels, forward and backward)"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat", "aten::index",
                "aten::fill_", "aten::zero_", "aten::zeros_like"):
        return "copies / layout"
    return "other (elementwise, reductions, optimizer, autograd bookkeeping)"


def profile_torch_update(args, arch: ArchConfig, reps: int = 2) -> dict:
    """The PyTorch counterpart of ``profile_update``: trace ``reps`` eager actor updates (after a warm-up)
    of ``bench/train.bench_torch`` on the same buffer with ``torch.profiler`` and sum each op's own
    (self) CPU time per update, by op and by category."""
    import collections

    import torch

    from orz_jax.bench.train import bench_torch, make_buffer

    ppo = _ppo(args, args.pack_len)
    batch = make_buffer(_train_ns(args, arch, args.pack_len, 1), ppo, np.random.default_rng(args.seed))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    res = bench_torch(_train_ns(args, arch, args.pack_len, reps), arch, ppo, batch, compiled=False,
                      names=("actor",), timed_ctx=lambda: prof)
    per_op, shapes = collections.Counter(), {}
    for e in prof.key_averages(group_by_input_shape=True):
        per_op[e.key] += e.self_cpu_time_total / 1e6 / reps
        if e.self_cpu_time_total > 0 and (e.key not in shapes or e.self_cpu_time_total > shapes[e.key][0]):
            shapes[e.key] = (e.self_cpu_time_total, str(e.input_shapes)[:120])
    cats = collections.Counter()
    for name, sec in per_op.items():
        cats[_torch_op_category(name)] += sec
    wall = float(np.median(res["actor"]["times"]))
    out = dict(wall_s=wall, ops_s=sum(per_op.values()), categories=dict(cats.most_common()),
               top_ops=[dict(name=n, seconds=v, input_shapes=shapes.get(n, (0, ""))[1])
                        for n, v in per_op.most_common(15)],
               torch_version=torch.__version__, threads=torch.get_num_threads())
    print(f"torch eager actor update, {args.rows} x {args.pack_len}: {wall:.3f} s/update (profiled), "
          f"op self time {out['ops_s']:.3f} s")
    _print_breakdown(out, "input_shapes", 40)
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def build_rows(args, arch: ArchConfig, jx: dict, th: dict) -> tuple[list[dict], dict]:
    """One row per (measurement, implementation): median / spread, throughput and the hardware bound."""
    from orz_jax.bench.train import train_flops

    peak = max(jx["matmul_peak_flops"], th.get("matmul_peak_flops", 0.0))
    bw = jx["copy_bandwidth_Bps"]
    itemsize = 2 if args.dtype == "bfloat16" else 4
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.resolved_head_dim * itemsize
    rows = []

    def add(kind, shape, impl, st, tokens, flops=None, bound=None, **extra):
        if st is None:
            return
        med = st["median_s"]
        r = dict(kind=kind, shape=shape, impl=impl, median_s=med, min_s=st["min_s"], max_s=st["max_s"],
                 q1_s=st.get("q1_s"), q3_s=st.get("q3_s"), reps=st.get("n"), tokens=tokens,
                 tokens_per_s=tokens / med if tokens else None,
                 tflops=flops / med / 1e12 if flops else None, mfu=flops / med / peak if flops else None,
                 bound_tokens_per_s=bound, of_bound=(tokens / med / bound) if bound else None, **extra)
        rows.append(r)

    P = args.prompt_len
    for b in _ints(args.prefill_sizes):
        fl = train_flops(arch, np.full(b, P), arch.vocab_size) / 3.0  # forward only
        add("prefill", f"b={b} x {P}", "jax", jx["prefill"][str(b)], b * P, fl)
        add("prefill", f"b={b} x {P}", "torch eager", th.get("prefill", {}).get(str(b)), b * P, fl)
    for b in _ints(args.sizes):
        avg_ctx = P + args.new_tokens / 2
        bound = b * bw / (jx["decode_weight_bytes"] + b * avg_ctx * kv_per_token)
        as_run = b * bw / (jx["decode_weight_bytes"] + b * jx["decode"][str(b)]["max_len"] * kv_per_token)
        shape = f"b={b}, {P}+{args.new_tokens}"
        for drv in [d for d in args.drivers.split(",") if d]:
            add("decode", shape, f"jax {drv}", jx["decode"][str(b)].get(drv), b * args.new_tokens, bound=bound,
                bound_as_run=as_run)
        add("decode", shape, "torch generate", th.get("decode", {}).get(str(b), {}).get("hf_generate"),
            b * args.new_tokens, bound=bound)
    seg = np.asarray(jx["update_segment_lengths"])
    shape = f"{args.rows} x {args.pack_len}"
    for name in ("actor", "critic"):
        fl = train_flops(arch, seg, arch.vocab_size if name == "actor" else 1)
        add(f"update {name}", shape, "jax", jx["update"][name], jx["update_tokens"], fl,
            first_call_s=jx["update"][name]["first_call_s"])
        for impl, res in th.get("update", {}).items():
            add(f"update {name}", shape, impl, res[name], jx["update_tokens"], fl,
                first_call_s=res[name]["first_call_s"])
    if "e2e" in jx:
        lay = jx["e2e_layout"]
        shape = f"{args.e2e_prompts}x{args.e2e_samples} samples, {P}+{args.e2e_new_tokens}"
        for impl, e in (("jax", jx["e2e"]), ("torch eager", th.get("e2e"))):
            if e:
                add("e2e iteration", shape, impl, e["total"], lay["train_tokens"],
                    phases={k: round(v["median_s"], 4) for k, v in e.items() if k != "total"})
    meta = dict(model=args.model, arch=dataclasses.asdict(arch), params=jx["params"], dtype=args.dtype,
                jax_device=jx["device"], jax_backend=jx["backend"], torch_device=th.get("device"),
                jax_version=jx["jax_version"], torch_version=th.get("torch_version"),
                transformers_version=th.get("transformers_version"), python=platform.python_version(),
                host=platform.node(), cpu_count=os.cpu_count(),
                # other work on a shared machine skews CPU timings (torch's OpenMP pool suffers most)
                load_average_at_end=os.getloadavg(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                matmul_peak_tflops={"jax": jx["matmul_peak_flops"] / 1e12,
                                    "torch": th.get("matmul_peak_flops", 0.0) / 1e12, "n": jx["matmul_n"]},
                copy_bandwidth_GBps=bw / 1e9, decode_weight_MB=jx["decode_weight_bytes"] / 1e6,
                logit_check=th.get("logit_check"),
                settings={k: v for k, v in vars(args).items() if not k.startswith("_") and not k.endswith("_child")})
    return rows, meta


def _fmt(v, spec: str) -> str:
    """``format(v, spec)``, or a right-aligned "-" of the same width for a missing value."""
    return "-".rjust(int(spec.lstrip(">").split(".")[0] or 1)) if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'measurement':<16} {'shape':<22} {'impl':<18} {'median s':>9} {'min..max s':>17} {'tokens/s':>10} "
            f"{'MFU':>6} {'bound tok/s':>11} {'of bound':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kind']:<16} {r['shape']:<22} {r['impl']:<18} {r['median_s']:>9.4f} "
                     f"{r['min_s']:>8.4f}..{r['max_s']:<8.4f} {_fmt(r['tokens_per_s'], '>10.1f')} "
                     f"{_fmt(r['mfu'], '>6.1%')} {_fmt(r['bound_tokens_per_s'], '>11.1f')} "
                     f"{_fmt(r['of_bound'], '>8.1%')}")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The table as GitHub markdown (for docs/bench/README.md)."""
    lines = ["| measurement | shape | impl | median s | min..max s | tokens/s | MFU | bound tok/s | of bound |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["kind"], r["shape"], r["impl"], f"{r['median_s']:.4f}", f"{r['min_s']:.4f}..{r['max_s']:.4f}",
                 _fmt(r["tokens_per_s"], ".1f").strip(), _fmt(r["mfu"], ".1%").strip() if r["mfu"] else "-",
                 _fmt(r["bound_tokens_per_s"], ".1f").strip() if r["bound_tokens_per_s"] else "-",
                 _fmt(r["of_bound"], ".1%").strip() if r["of_bound"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: str, rows: list[dict], meta: dict) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"report.{k}") for k in ("json", "csv", "png", "md")}
    with open(paths["md"], "w") as f:
        f.write(markdown(rows) + "\n")
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    cols = ["kind", "shape", "impl", "median_s", "min_s", "max_s", "q1_s", "q3_s", "reps", "tokens", "tokens_per_s",
            "tflops", "mfu", "bound_tokens_per_s", "of_bound", "first_call_s"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(paths["png"], rows, meta)
    return paths


def plot(path: str, rows: list[dict], meta: dict) -> None:
    """One panel per measurement kind: tokens/s per implementation, min..max as error bars, the
    bandwidth bound as a line on decode panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4.2), squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(impls)}
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in rows if r["kind"] == kind]
        shapes = list(dict.fromkeys(r["shape"] for r in rs))
        ims = list(dict.fromkeys(r["impl"] for r in rs))
        w = 0.8 / len(ims)
        for j, im in enumerate(ims):
            for i, s in enumerate(shapes):
                r = next((r for r in rs if r["impl"] == im and r["shape"] == s), None)
                if r is None or not r["tokens_per_s"]:
                    continue
                y, lo, hi = r["tokens_per_s"], r["tokens"] / r["max_s"], r["tokens"] / r["min_s"]
                ax.bar(i + j * w, y, w, color=colors[im], label=im if i == 0 else None,
                       yerr=[[y - lo], [hi - y]], capsize=3)
                if r.get("mfu"):
                    ax.text(i + j * w, y, f"{r['mfu']:.0%}", ha="center", va="bottom", fontsize=7)
        for i, s in enumerate(shapes):
            b = next((r["bound_tokens_per_s"] for r in rs if r["shape"] == s and r["bound_tokens_per_s"]), None)
            if b:
                ax.hlines(b, i - w / 2, i + 0.8 - w / 2, colors="k", linestyles="--",
                          label="bandwidth bound" if i == 0 else None)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(shapes))], shapes, fontsize=7)
        ax.set_title(kind + (" (labels: MFU)" if any(r.get("mfu") for r in rs) else ""), fontsize=9)
        ax.set_ylabel("tokens/s (median, min..max)" if kind != "e2e iteration" else "train tokens/s per iteration")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['model']} ({meta['params'] / 1e6:.1f} M params, {meta['dtype']}) on {meta['jax_device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    for side, fn in (("torch", lambda spec: torch_side(spec)),
                     ("torch_profile", lambda spec: profile_torch_update(SimpleNamespace(**spec["args"]),
                                                                         ArchConfig(**spec["arch"]))),
                     ("jax", lambda spec: jax_side(SimpleNamespace(**spec["args"]), ArchConfig(**spec["arch"]),
                                                   spec["hf_dir"], spec["check_path"]))):
        if getattr(args, f"{side}_child"):
            with open(getattr(args, f"{side}_child")) as f:
                spec = json.load(f)
            print(_TAG + json.dumps(fn(spec)), flush=True)
            return {}
    arch, name = load_arch(args.model)
    if args.profile:
        prof = {"jax": profile_update(args, arch)}
        if args.torch != "none":
            with tempfile.TemporaryDirectory() as work:
                spec = dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")},
                            arch=dataclasses.asdict(arch))
                prof["torch eager"] = _run_child("torch-profile", spec, work)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(prof, f, indent=1)
        return prof
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        args._work = work
        hf_dir, check_path = os.path.join(work, "hf"), os.path.join(work, "check_logits.npy")
        spec = dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")},
                    arch=dataclasses.asdict(arch), hf_dir=hf_dir, check_path=check_path,
                    buffer_path=os.path.join(work, "buffer.npz"))
        jx = _run_child("jax", spec, work)  # writes the weights, the check logits and the update buffer
        th = {}
        if args.torch != "none":
            th = _run_child("torch", spec, work)
            if not th["logit_check"]["ok"]:
                raise RuntimeError(f"the two sides disagree on the same weights: max |logit diff| "
                                   f"{th['logit_check']['max_abs_diff']:.3g} > {args.check_atol}; not comparing")
        rows, meta = build_rows(args, arch, jx, th)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["model"] = name
    paths = write_outputs(args.out, rows, meta)
    print(f"\n{name}: {meta['params'] / 1e6:.1f} M params, compute {args.dtype}; JAX {meta['jax_version']} on "
          f"{meta['jax_device']}, torch {meta['torch_version']} on {meta['torch_device']}")
    print(f"matmul peak ({meta['matmul_peak_tflops']['n']}^3): JAX {meta['matmul_peak_tflops']['jax']:.3f}, torch "
          f"{meta['matmul_peak_tflops']['torch']:.3f} TFLOP/s; copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s; "
          f"logit check {meta['logit_check']}")
    print(table(rows))
    print(f"wrote {', '.join(paths.values())} ({meta['wall_s']:.0f} s)")
    return {"rows": rows, "meta": meta, "paths": paths}


if __name__ == "__main__":
    main()
