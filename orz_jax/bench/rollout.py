"""Rollout throughput: generated tokens/s of both rollout drivers, HF ``transformers`` ``generate`` on the
same weights, and the memory-bandwidth bound, for several batch sizes.

    python -m orz_jax.bench.rollout                                  # small random model, CPU-friendly
    python -m orz_jax.bench.rollout --batch-sizes 1,8,32 --new-tokens 128 --hidden 896 --layers 24 ...

Every sample generates exactly ``--new-tokens`` tokens (greedy, and the EOS id is one the model cannot
sample), so all implementations do the same work. Times are wall-clock for the whole call (prefill +
decode + host work), best of ``--repeat`` runs after a warm-up run that compiles.

Bandwidth bound: one decode step must read every weight once plus the filled part of the KV cache, so
tokens/s <= batch / ((weight bytes + KV bytes) / copy bandwidth), with the copy bandwidth measured here
(a large array copy counts its bytes twice: read + write). Our decode step attends over the whole
preallocated cache row (masked), so the KV bytes it actually reads are also shown ("as run"). The bound
assumes weights stream from main memory every step: a model small enough to stay in the CPU caches (the
default one here) can beat it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx

from orz_jax.config import ArchConfig, MeshConfig, ModelConfig, RolloutConfig
from orz_jax.models.build import create_model, param_count
from orz_jax.rollout import RolloutEngine, generate_rollouts
from orz_jax.sharding import make_mesh


class _BenchTokenizer:
    """Ids only: EOS is an id outside the vocabulary, so no sample stops early."""

    def __init__(self, vocab_size: int):
        self.eos_id, self.eos_ids, self.pad_id, self.bos_id = vocab_size, (vocab_size,), 0, None

    def encode(self, text, add_bos=False):
        raise NotImplementedError("the benchmark feeds token ids")

    def decode(self, ids, skip_special=True):
        return ""


def copy_bandwidth(nbytes: Optional[int] = None, repeat: int = 5) -> float:
    """Measured memory bandwidth in bytes/s of the default JAX device: a large copy, read + write counted.

    On CPU a ``numpy.copyto`` into a preallocated array (XLA's CPU copy into a fresh output pays page
    faults and measures ~7x less); on accelerators a jitted, donated ``a + 1`` (in place, no allocation;
    ``a + 0`` would be folded away to no copy at all).
    """
    if jax.default_backend() == "cpu":
        nbytes = nbytes or 256 << 20
        src = np.ones((nbytes // 4,), np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeat))
    else:
        nbytes = nbytes or 1 << 30  # H100: 256 MiB reads ~1.7 TB/s (launch-bound), 1 GiB ~2.4 TB/s
        copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
        box = [copy(jax.numpy.ones((nbytes // 4,), jax.numpy.float32)).block_until_ready()]

        def step():
            box[0] = copy(box[0]).block_until_ready()

        best = min(_timed(step) for _ in range(repeat))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _hf_generate_tps(policy, prompts: np.ndarray, new_tokens: int, repeat: int, dtype: str) -> Optional[float]:
    """transformers ``generate`` on the same weights (exported with ``export_hf``), timed in a fresh process:
    on a CPU, PyTorch next to a JAX runtime that has run computations is slowed down many times over by
    the two thread pools competing (seen here: 2 s instead of 0.04 s for the same call)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return None
    import multiprocessing

    from orz_jax.models.hf_io import export_hf

    with tempfile.TemporaryDirectory() as d:
        export_hf(policy, d, dtype=dtype)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_hf_worker, (d, prompts, new_tokens, repeat, dtype))


def _hf_worker(path: str, prompts: np.ndarray, new_tokens: int, repeat: int, dtype: str) -> float:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=0, eos_token_id=None)

    def call():
        hf.generate(ids, **kw)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        call()  # warm-up
        best = min(_timed(call) for _ in range(repeat))
    return prompts.shape[0] * new_tokens / best


def run(arch: ArchConfig, batch_sizes: Sequence[int], prompt_len: int, new_tokens: int, drivers: Sequence[str],
        repeat: int, with_hf: bool, dtype: str = "float32", check_every: int = 8, seed: int = 0) -> list[dict]:
    model_cfg = ModelConfig(arch=arch, dtype=dtype, param_dtype=dtype)
    policy = create_model("policy", arch, model_cfg, make_mesh(MeshConfig()), seed=seed)
    n_params = param_count(policy)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))
    bw = copy_bandwidth()
    itemsize = np.dtype(dtype if dtype != "bfloat16" else np.float16).itemsize
    kv_per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.resolved_head_dim * itemsize
    rng = np.random.RandomState(seed)
    rows = []
    for b in batch_sizes:
        cfg = RolloutConfig(temperature=0.0, max_prompt_len=prompt_len, prefill_buckets=[prompt_len],
                            max_response_len=new_tokens, max_concurrent_decodes=b, stop_strings=[])
        engine = RolloutEngine(policy, cfg, _BenchTokenizer(arch.vocab_size))
        prompts = rng.randint(1, arch.vocab_size, (b, prompt_len))
        avg_ctx = prompt_len + new_tokens / 2
        row = {"batch": b, "params": n_params, "weight_MB": weight_bytes / 1e6, "copy_GBps": bw / 1e9,
               "bound_tps": b * bw / (weight_bytes + b * avg_ctx * kv_per_token),
               "bound_tps_as_run": b * bw / (weight_bytes + b * engine.max_len * kv_per_token)}
        outputs = {}
        for drv in drivers:
            call = lambda: generate_rollouts(engine, prompts.tolist(), 1, 0, cfg, driver=drv,  # noqa: E731
                                             check_every=check_every)
            outputs[drv] = call()  # warm-up: compiles
            assert int(outputs[drv].response_mask.sum()) == b * new_tokens
            row[f"{drv}_tps"] = b * new_tokens / min(_timed(call) for _ in range(repeat))
        if len(outputs) == 2:
            row["drivers_agree"] = bool(np.array_equal(*(o.response_ids for o in outputs.values())))
        if with_hf:
            row["hf_tps"] = _hf_generate_tps(policy, prompts, new_tokens, repeat, dtype)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
    return rows


def _format(rows: list[dict]) -> str:
    cols = ["batch", "batched_tps", "orchestrator_tps", "hf_tps", "bound_tps", "bound_tps_as_run", "drivers_agree"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = [" | ".join(f"{c:>16}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>16.1f}" if isinstance(v, float) else f"{str(v):>16}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m orz_jax.bench.rollout", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--drivers", default="batched,orchestrator")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--check-every", type=int, default=8, help="batched driver: decode steps per host check")
    # model shape (random weights); defaults: a small model that runs in minutes on a CPU
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    arch = ArchConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), arch: {dataclasses.asdict(arch)}")
    print(f"prompt {a.prompt_len} tokens, {a.new_tokens} new tokens per sample, greedy, dtype {a.dtype}")
    rows = run(arch, [int(b) for b in a.batch_sizes.split(",")], a.prompt_len, a.new_tokens,
               [d for d in a.drivers.split(",") if d], a.repeat, not a.no_hf, a.dtype, a.check_every)
    r0 = rows[0]
    print(f"params {r0['params'] / 1e6:.2f} M ({r0['weight_MB']:.1f} MB), measured copy bandwidth "
          f"{r0['copy_GBps']:.1f} GB/s; generated tokens/s:")
    print(_format(rows))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
