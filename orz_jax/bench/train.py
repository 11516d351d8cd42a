"""Benchmark of the PPO update: tokens/s of forward + backward + optimizer for the actor and the critic,
next to the same update in PyTorch (transformers Qwen2ForCausalLM / Qwen2Model + value head, torch
AdamW; eager and torch.compile), and MFU against the measured matmul peak of this machine.

Random weights, a packed buffer of random samples (ORZ-like length mix), the same loss both sides:
PPO clipped surrogate for the actor, clipped value loss for the critic, micro-batch accumulation,
global-norm clipping, AdamW. One optimizer step per buffer for both (the per-token cost does not
depend on how many mini-batches the critic splits a buffer into).

    python -m orz_jax.bench.train                      # small CPU config, ~2 minutes
    python -m orz_jax.bench.train --hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 \\
        --vocab 151936 --pack-len 4096 --rows 8 --micro-rows 1 --dtype bfloat16 --remat full --torch none

MFU counts model FLOPs only (6 x matmul parameters per token + causal attention within each
sample), not the padding or the masked-out attention the kernels may compute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from orz_jax.config import DEFAULT_ATTENTION_BLOCK, ArchConfig, OptimConfig, PPOConfig


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orz_jax.bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--pack-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=4, help="packed rows per buffer (one optimizer step)")
    p.add_argument("--micro-rows", type=int, default=2, help="rows per micro-batch (gradient accumulation)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--remat", choices=["none", "full", "dots"], default="none")
    p.add_argument("--attention-block", type=int, default=DEFAULT_ATTENTION_BLOCK,
                   help="JAX: causal query block of the training attention (0: dense)")
    p.add_argument("--iters", type=int, default=2, help="timed updates after one warm-up (compile) call")
    p.add_argument("--torch", choices=["both", "eager", "compile", "none"], default="both")
    p.add_argument("--matmul", type=int, default=0, help="matmul size for the peak (0: 2048 on CPU, 8192 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie", action="store_true", help="tie the LM head to the embedding (Qwen2.5 <= 3B)")
    p.add_argument("--no-jax", action="store_true",
                   help="the torch side only; a full run starts itself with this flag in a fresh process")
    p.add_argument("--packing-only", action="store_true",
                   help="only report the padding saved by packing on an ORZ-like length mix")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Data and FLOPs
# ----------------------------------------------------------------------------------------------


def orz_like_lengths(rng: np.random.Generator, n: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_lens, response_lens): prompts ~ 40..250 tokens, responses log-normal with a long tail
    (ORZ responses: a few hundred to several thousand tokens, a share truncated at the cap), all scaled
    to fit ``max_len``."""
    prompt = np.clip(rng.lognormal(np.log(110), 0.45, n), 30, 400)
    resp = rng.lognormal(np.log(1400), 0.8, n)
    scale = max_len / 8192.0  # ORZ: prompt + response <= ~8k tokens
    prompt = np.maximum(1, (prompt * scale)).astype(np.int64)
    resp = np.clip((resp * scale).astype(np.int64), 1, max_len - prompt)
    return prompt, resp


def make_buffer(args, ppo: PPOConfig, rng: np.random.Generator):
    from orz_jax.ppo.packing import pack_samples

    prompt_lens, resp_lens, total = [], [], 0
    while total < args.rows * args.pack_len * 0.97:
        p, r = orz_like_lengths(rng, 1, args.pack_len)
        prompt_lens.append(int(p[0]))
        resp_lens.append(int(r[0]))
        total += int(p[0] + r[0])
    n = len(prompt_lens)
    P, R = max(prompt_lens), max(resp_lens)
    prompt_ids = rng.integers(1, args.vocab, (n, P)).astype(np.int32)
    response_ids = rng.integers(1, args.vocab, (n, R)).astype(np.int32)
    mask = (np.arange(R)[None] < np.asarray(resp_lens)[:, None]).astype(np.float32)
    batch, layout = pack_samples(prompt_ids, np.asarray(prompt_lens), response_ids, mask, args.pack_len,
                                 row_multiple=args.micro_rows, seed=args.seed)
    # Trim to the requested row count (the packer may need one or two more for the tail).
    keep = min(layout.num_rows, args.rows)
    lm = batch.loss_mask[:keep]
    f32 = lambda s, o: (rng.normal(size=lm.shape) * s + o).astype(np.float32) * lm  # noqa: E731
    batch = batch.replace(tokens=batch.tokens[:keep], positions=batch.positions[:keep],
                          segment_ids=batch.segment_ids[:keep], loss_mask=lm, old_logprobs=f32(0.5, -2.0),
                          old_values=f32(0.5, 0.0), advantages=f32(1.0, 0.0), returns=f32(0.5, 0.5))
    return batch


def packing_report(n: int = 8192, max_len: int = 8192, pack_lens=(8192, 16384), seed: int = 0) -> dict:
    """Token slots spent by three layouts of one ORZ-sized buffer (128 prompts x 64 samples): every
    sample padded to the config maximum, to the longest sample of the buffer, to the longest of its
    micro-batch of 8, or packed first-fit decreasing."""
    from orz_jax.ppo.packing import first_fit_decreasing

    p, r = orz_like_lengths(np.random.default_rng(seed), n, max_len)
    lengths = p + r
    real = int(lengths.sum())
    micro = lengths[: n - n % 8].reshape(-1, 8)  # unpacked micro-batches of 8 samples, in sampling order
    rows = {"pad to max_len": n * max_len, "pad to longest": n * int(lengths.max()),
            "pad per 8 samples": int(micro.max(axis=1).sum()) * 8}
    for L in pack_lens:
        rows[f"packed {L}"] = first_fit_decreasing(lengths, L)[2] * L
    print(f"packing: {n} samples, prompt median {int(np.median(p))}, response median {int(np.median(r))} / "
          f"p90 {int(np.percentile(r, 90))} / max {int(r.max())}, {real} real tokens")
    for name, slots in rows.items():
        print(f"  {name:<18} {slots:>11} slots  fill {real / slots:6.1%}  compute vs pad-to-max {slots / rows['pad to max_len']:6.1%}")
    return {"real": real, **rows}


def segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    out = []
    for row in segment_ids:
        ids, counts = np.unique(row[row > 0], return_counts=True)
        out.extend(counts.tolist())
    return np.asarray(out)


def train_flops(arch: ArchConfig, seg_lens: np.ndarray, head_out: int) -> float:
    """Model FLOPs of forward + backward (3x forward) over samples of lengths ``seg_lens``."""
    hd = arch.resolved_head_dim
    h, nh, nkv = arch.hidden_size, arch.num_heads, arch.num_kv_heads
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * arch.intermediate_size
    matmul_params = arch.num_layers * per_layer + h * head_out
    tokens = float(seg_lens.sum())
    # causal attention: query i of a length-s sample sees i + 1 keys; QK^T and PV: 2 * 2 * nh * hd each
    attended = float(np.sum(seg_lens * (seg_lens + 1) / 2))
    fwd = 2.0 * matmul_params * tokens + 4.0 * arch.num_layers * nh * hd * attended
    return 3.0 * fwd


def matmul_peak(n: int) -> float:
    """Measured FLOP/s of a big square matmul in JAX (bf16 on accelerators, f32 on CPU)."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    reps, t = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t < 1.0:
        f(a, a).block_until_ready()
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t)


def torch_matmul_peak(n: int) -> float:
    import torch

    cuda = torch.cuda.is_available()
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    a @ a
    if cuda:
        torch.cuda.synchronize()
    reps, t = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t < 1.0:
        a @ a
        if cuda:
            torch.cuda.synchronize()
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t)


# ----------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------


def bench_jax(args, arch: ArchConfig, ppo: PPOConfig, batch) -> dict:
    from flax import nnx

    from orz_jax.models.transformer import CausalLM, Critic
    from orz_jax.ppo.train import PPOFunctions, create_train_state, train_layers

    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    kw = dict(dtype=dt, param_dtype=jnp.float32, remat=args.remat, attention_block=args.attention_block)
    pol = CausalLM(arch, rngs=nnx.Rngs(args.seed), **kw)
    cri = Critic(arch, head_init_std=0.01, rngs=nnx.Rngs(args.seed + 1), **kw)
    layers = train_layers(ppo)  # the trainer's layout for this platform
    actor = create_train_state(pol, ppo.actor, layers=layers)
    critic = create_train_state(cri, ppo.critic, layers=layers)
    fns = PPOFunctions.build(ppo)
    batch = jax.device_put(batch)
    out = {}
    for name, fn, state in (("actor", fns.actor_step, actor), ("critic", fns.critic_step, critic)):
        t = time.perf_counter()
        state, m = fn(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        times = []  # per update (each blocked on), so callers can report a median and a spread
        for _ in range(args.iters):
            t = time.perf_counter()
            state, m = fn(state, batch)
            jax.block_until_ready((state.params, m))
            times.append(time.perf_counter() - t)
        out[name] = dict(seconds=sum(times) / len(times), first_call_s=compile_s, times=times,
                         loss=float(m[f"{name}/loss" if name == "actor" else "critic/value_loss"]))
    return out


# ----------------------------------------------------------------------------------------------
# PyTorch reference (same update)
# ----------------------------------------------------------------------------------------------


def bench_torch(args, arch: ArchConfig, ppo: PPOConfig, batch, compiled: bool, names=("actor", "critic"),
                timed_ctx=None) -> dict:
    """The same update in PyTorch for each model in ``names``. ``timed_ctx``: a context manager entered
    around the timed updates only (bench/report's ``--profile`` passes a ``torch.profiler`` there)."""
    import contextlib

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    torch.manual_seed(args.seed)
    cfg = Qwen2Config(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                      intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                      num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                      rope_theta=arch.rope_theta, rms_norm_eps=arch.rms_norm_eps,
                      max_position_embeddings=max(arch.max_position_embeddings, args.pack_len),
                      tie_word_embeddings=arch.tie_word_embeddings, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    class ValueModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Qwen2Model(cfg)
            self.head = torch.nn.Linear(arch.hidden_size, 1, bias=False)

        def forward(self, input_ids, attention_mask, position_ids):
            h = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
            return self.head(h.float())[..., 0]

    t = {k: torch.as_tensor(np.asarray(getattr(batch, k))) for k in
         ("tokens", "positions", "segment_ids", "loss_mask", "old_logprobs", "old_values", "advantages", "returns")}
    t["tokens"], t["positions"] = t["tokens"].long(), t["positions"].long()
    seg = t["segment_ids"]
    L = seg.shape[1]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    # same segment and causal; padding attends to itself only (an all-False row would give NaNs)
    mask4d = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & causal) | torch.eye(L, dtype=torch.bool)
    t["mask"] = mask4d[:, None]
    t = {k: v.to(dev) for k, v in t.items()}

    def shift(x):
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)

    def actor_micro(model, mb, denom):
        with torch.autocast(dev, dtype=dt, enabled=dt != torch.float32):
            logits = model(input_ids=mb["tokens"], attention_mask=mb["mask"], position_ids=mb["positions"]).logits
        logits = logits.float()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.roll(mb["tokens"], -1, 1)[..., None])[..., 0]
        logp = shift(logp)
        m = mb["loss_mask"]
        ratio = torch.exp((logp - mb["old_logprobs"]) * m)
        a = mb["advantages"]
        pg = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - ppo.clip_eps, 1 + ppo.clip_eps))
        return (pg * m).sum() / denom

    def critic_micro(model, mb, denom):
        with torch.autocast(dev, dtype=dt, enabled=dt != torch.float32):
            v = model(mb["tokens"], mb["mask"], mb["positions"])
        v = shift(v.float())
        old, ret, m = mb["old_values"], mb["returns"], mb["loss_mask"]
        vc = old + torch.clamp(v - old, -ppo.value_clip, ppo.value_clip)
        per = 0.5 * torch.max((v - ret) ** 2, (vc - ret) ** 2)
        return (per * m).sum() / denom

    out = {}
    for name, make, micro_fn, o in (("actor", lambda: Qwen2ForCausalLM(cfg), actor_micro, ppo.actor),
                                    ("critic", ValueModel, critic_micro, ppo.critic)):
        if name not in names:
            continue
        model = make().to(dev)  # float32 master weights, autocast compute (as the JAX side)
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay)
        fn = torch.compile(micro_fn) if compiled else micro_fn
        rows = t["tokens"].shape[0]

        def update():
            opt.zero_grad(set_to_none=True)
            denom = t["loss_mask"].sum().clamp(min=1.0)
            total = 0.0
            for s in range(0, rows, args.micro_rows):
                mb = {k: v[s:s + args.micro_rows] for k, v in t.items()}
                loss = fn(model, mb, denom)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            return total

        tt = time.perf_counter()
        update()
        sync()
        first = time.perf_counter() - tt
        times = []  # per update (loss.item() syncs; sync() for the optimizer step)
        with (timed_ctx or contextlib.nullcontext)():
            for _ in range(args.iters):
                tt = time.perf_counter()
                loss = update()
                sync()
                times.append(time.perf_counter() - tt)
        out[name] = dict(seconds=sum(times) / len(times), first_call_s=first, times=times, loss=loss)
        del model, opt
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------


def _torch_in_subprocess(argv: list[str]) -> tuple[dict, float]:
    """Run the PyTorch side in a fresh process: JAX's CPU thread pool (or its GPU allocator) in the
    same process slows torch down, which would flatter the JAX numbers."""
    cmd = [sys.executable, "-m", "orz_jax.bench.train", *argv, "--no-jax"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(_JSON_TAG)]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"torch benchmark failed ({' '.join(cmd)}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    out = json.loads(lines[-1][len(_JSON_TAG):])
    return out["results"], out["peak"]


_JSON_TAG = "BENCH_JSON "


def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.packing_only:
        return packing_report(seed=args.seed)
    arch = ArchConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=max(32768, args.pack_len), tie_word_embeddings=args.tie)
    opt = OptimConfig(lr=1e-6, warmup_steps=0)
    ppo = PPOConfig(actor=opt, critic=opt, actor_steps_per_batch=1, critic_steps_per_batch=1,
                    micro_batch_rows=args.micro_rows, pack_len=args.pack_len)
    rng = np.random.default_rng(args.seed)
    batch = make_buffer(args, ppo, rng)
    seg_lens = segment_lengths(np.asarray(batch.segment_ids))
    tokens = int(seg_lens.sum())
    rows = batch.tokens.shape[0]
    flops = {"actor": train_flops(arch, seg_lens, arch.vocab_size), "critic": train_flops(arch, seg_lens, 1)}

    if args.no_jax:  # the torch side only (normally as the child of a full run); never touches a JAX backend
        import torch

        n = args.matmul or (8192 if torch.cuda.is_available() else 2048)
        results = {}
        if args.torch in ("both", "eager"):
            results["torch eager"] = bench_torch(args, arch, ppo, batch, compiled=False)
        if args.torch in ("both", "compile"):
            results["torch.compile"] = bench_torch(args, arch, ppo, batch, compiled=True)
        peaks = {"torch": torch_matmul_peak(n)}
    else:
        results, peaks = {}, {}
        if args.torch != "none":
            results, peaks["torch"] = _torch_in_subprocess(argv)
        n = args.matmul or (2048 if jax.default_backend() == "cpu" else 8192)
        peaks["JAX"] = matmul_peak(n)
        results = {"jax": bench_jax(args, arch, ppo, batch), **results}
    peak = max(peaks.values())

    device = "torch-only process" if args.no_jax else \
        f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    print(f"device: {device}; measured matmul peak ({n}^3): "
          + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()))
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, mlp "
          f"{args.intermediate}, vocab {args.vocab}, compute {args.dtype}, remat {args.remat}, "
          f"attention block {args.attention_block or 'dense'}")
    print(f"buffer: {rows} rows x {args.pack_len} = {rows * args.pack_len} slots, {len(seg_lens)} samples, "
          f"{tokens} real tokens ({tokens / (rows * args.pack_len):.1%} fill); micro-batch {args.micro_rows} rows")
    print(f"{'impl':<14} {'model':<7} {'s/update':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'1st call s':>10} {'loss':>10}")
    for impl, res in results.items():
        for name, r in res.items():
            achieved = flops[name] / r["seconds"]
            r.update(tokens_per_s=tokens / r["seconds"], tflops=achieved / 1e12, mfu=achieved / peak)
            print(f"{impl:<14} {name:<7} {r['seconds']:>9.3f} {r['tokens_per_s']:>10.0f} {r['tflops']:>8.3f} "
                  f"{r['mfu']:>6.1%} {r['first_call_s']:>10.1f} {r['loss']:>10.4f}")
    if args.no_jax:
        print(_JSON_TAG + json.dumps({"results": results, "peak": peaks["torch"]}))
    return results


if __name__ == "__main__":
    main()
