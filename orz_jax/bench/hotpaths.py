"""Compile time and temporaries of the hot programs at ORZ shapes, on this host (issue #14 figures).

    python -m orz_jax.bench.hotpaths --arch qwen2.5-0.5b --rows 2 --pack-len 256 --micro-rows 1

Lowers and compiles, from abstract shapes (nothing is allocated), the policy forward, the actor step
and the old-log-prob pass, and prints each program's compile seconds and ``memory_analysis()``
temporaries. Use it for before/after comparisons of model-structure changes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from orz_jax.config import ModelConfig, PPOConfig
from orz_jax.memory import ARCH_PRESETS
from orz_jax.models.build import abstract_model
from orz_jax.ppo.packing import PackedBatch
from orz_jax.ppo.train import PPOFunctions, create_train_state


def _abstract_batch(rows: int, pack_len: int) -> PackedBatch:
    i = jax.ShapeDtypeStruct((rows, pack_len), jnp.int32)
    f = jax.ShapeDtypeStruct((rows, pack_len), jnp.float32)
    return PackedBatch(tokens=i, positions=i, segment_ids=i, loss_mask=f, old_logprobs=f, old_values=f,
                       advantages=f, returns=f)


def _compile(fn, *args):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    return t1 - t0, t2 - t1, temp


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="qwen2.5-0.5b", choices=sorted(ARCH_PRESETS))
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--pack-len", type=int, default=256)
    p.add_argument("--micro-rows", type=int, default=1)
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--logprob-chunk", type=int, default=getattr(PPOConfig, "logprob_chunk", 0))
    p.add_argument("--programs", default="forward,logprobs,actor_step")
    args = p.parse_args(argv)
    arch = ARCH_PRESETS[args.arch]
    if args.layers:
        arch = dataclasses.replace(arch, num_layers=args.layers)
    mcfg = ModelConfig(arch=arch, remat=args.remat, dtype=args.dtype)
    ppo = PPOConfig(micro_batch_rows=args.micro_rows, pack_len=args.pack_len)
    if hasattr(ppo, "logprob_chunk"):  # so that the same script measures trees without chunked log-probs
        ppo = dataclasses.replace(ppo, logprob_chunk=args.logprob_chunk)
    policy = abstract_model("policy", arch, mcfg)
    state = jax.eval_shape(lambda: create_train_state(policy, ppo.actor))
    fns = PPOFunctions.build(ppo)
    batch = _abstract_batch(args.rows, args.pack_len)
    print(f"{args.arch} layers={arch.num_layers} rows={args.rows} pack_len={args.pack_len} "
          f"micro_rows={args.micro_rows} remat={args.remat} dtype={args.dtype} backend={jax.default_backend()}")
    graphdef, params = nnx.split(policy)

    @jax.jit
    def forward(params, tokens):
        logits, _ = nnx.merge(graphdef, params)(tokens, tokens, tokens)
        return logits

    progs = {
        "forward": lambda: _compile(forward, params, batch.tokens),
        "logprobs": lambda: _compile(fns.compute_logprobs, state, batch),
        "actor_step": lambda: _compile(fns.actor_step, state, batch),
    }
    for name in args.programs.split(","):
        lower_s, compile_s, temp = progs[name]()
        print(f"{name:12s} lower {lower_s:7.2f} s  compile {compile_s:7.2f} s  temporaries {temp / 2**20:10.1f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
