"""Parameter, memory and roofline-time arithmetic for the decoder family of :class:`ArchConfig`.

Pure Python: no JAX import, no device work. Used to pick a TPU slice and a mesh before paying for
one (see ``tpu/README.md``), and by tests to pin the parameter formula against the published Qwen2.5
sizes.

    python -m orz_jax.memory --arch qwen2.5-7b --accelerator v5p-8 --mesh 1,4,1
    python -m orz_jax.memory --config configs/orz_7b.yaml --accelerator v5p-32

What is modelled, and what is not:

* parameters: exact count for the Qwen2 / Llama layout (embeddings, optional untied LM head, per layer
  q/k/v (+ bias) / o / SwiGLU gate-up-down / two RMSNorms, final RMSNorm); the critic is the trunk
  plus a ``hidden_size -> 1`` value head without bias;
* optimizer: AdamW keeps two moments per parameter (float32 by default; ``moment_dtype``), plus an
  optional float32 master copy when the parameters themselves are kept in a low-precision dtype;
* per-device: parameters, optimizer state and gradients are sharded over ``fsdp * tensor`` (ZeRO-3
  plus Megatron, see ``orz_jax/sharding.py``);
* rollouts as the code runs them (checked against the compiler, ``python -m orz_jax.compile`` and
  ``docs/tpu/README.md``): each process (host, 4 chips on v5p / v5e / v6e) runs its own engine with
  ``rollout.max_concurrent_decodes`` slots on its *serving mesh* (the training mesh with one process; with
  several, the host's chips with tensor = gcd(mesh.tensor, chips per host)). The engine holds a compute-dtype
  copy of the policy sharded over the serving ``tensor`` axis only (no fsdp shards: a decode step gathers
  no weights); its KV cache is sharded over the serving mesh's slot shards (``data * fsdp``) and over kv
  heads (``tensor``, when it divides ``num_kv_heads``, else replicated);
* activations, XLA temporaries and fragmentation are NOT modelled; ``reserve_frac`` of HBM is held
  back for them when the largest number of decode slots is computed. The compile tool measures them;
* the roofline gives a lower bound on time: every phase runs at the chip's peak FLOP/s or HBM
  bandwidth, whichever binds; ICI collectives, host work (reward scoring, tokenization), compile
  time and pipeline bubbles are not counted. It is an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from orz_jax.config import ArchConfig, ConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}

GIB = 1024**3

# ----------------------------------------------------------------------------------------------
# Reference architectures: the Qwen2.5 base models (numbers from their config.json files).
# ----------------------------------------------------------------------------------------------


def _qwen25(hidden, inter, layers, heads, kv, vocab, tied, eps) -> ArchConfig:
    return ArchConfig(architecture="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv, rope_theta=1e6, rms_norm_eps=eps,
                      tie_word_embeddings=tied, attention_bias=True)


ARCH_PRESETS: dict[str, ArchConfig] = {
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, 151936, True, 1e-6),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, 151936, True, 1e-6),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, 152064, False, 1e-6),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, 152064, False, 1e-5),
}

# ----------------------------------------------------------------------------------------------
# TPU chips. Per-chip figures from Google Cloud's public system-architecture pages:
#   v4   https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2,  1200 GB/s
#   v5e  https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2,    819 GB/s
#   v5p  https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GB HBM2e,  2765 GB/s
#   v6e  https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM,    1638 GB/s
# v4 and v5p chips hold two TensorCores run as one JAX device (megacore), and their accelerator-type
# suffix counts TensorCores (v5p-8 = 4 chips); v5e and v6e have one TensorCore per chip and their
# suffix counts chips (v6e-8 = 8 chips). Every generation here shows one JAX device per chip.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bytes: float  # HBM capacity per chip
    hbm_bw: float  # HBM bandwidth per chip, bytes/s
    cores_per_chip: int  # TensorCores per chip, i.e. what the accelerator-type suffix counts per chip
    type_prefix: str  # accelerator-type prefix: "v5p" in "v5p-128", "v5litepod" in "v5litepod-16"
    source: str
    # Chips per host (JAX process) in a multi-host slice: libtpu's topology descriptions
    # (jax.experimental.topologies) give 4 devices per process for v5p 2x2x4, v5e 4x4 and v6e 4x4.
    chips_per_host: int = 4

    def hosts(self, chips: int) -> int:
        return max(1, chips // self.chips_per_host)


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 275e12, 32 * GIB, 1200e9, 2, "v4", "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("v5e", 197e12, 16e9, 819e9, 1, "v5litepod", "https://cloud.google.com/tpu/docs/v5e"),
    # v5p: the page gives "HBM capacity per chip (GiB) 95"; the TPU compiler allows 95.74 GiB per chip.
    "v5p": ChipSpec("v5p", 459e12, 95 * GIB, 2765e9, 2, "v5p", "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("v6e", 918e12, 32e9, 1638e9, 1, "v6e", "https://cloud.google.com/tpu/docs/v6e"),
}


def parse_accelerator_type(accelerator_type: str) -> tuple[ChipSpec, int]:
    """``"v5p-128"`` -> (v5p spec, 64 chips); ``"v5litepod-16"`` / ``"v5e-16"`` -> (v5e, 16)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator_type.strip())
    if not m:
        raise ValueError(f"accelerator type {accelerator_type!r}: expected one of v4-N, v5p-N, v5litepod-N "
                         f"(or v5e-N), v6e-N")
    prefix, count = m.group(1), int(m.group(2))
    chip = CHIPS["v5e" if prefix in ("v5e", "v5litepod") else prefix]
    if count % chip.cores_per_chip:
        raise ValueError(f"accelerator type {accelerator_type!r}: {count} is not a multiple of the "
                         f"{chip.cores_per_chip} TensorCores per {chip.name} chip")
    return chip, count // chip.cores_per_chip


# ----------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Parameter count of one model, by part. ``total`` is what ``sum(p.numel())`` reports."""

    embed: int  # vocab x hidden token embedding
    lm_head: int  # untied vocab x hidden output projection (0 when tied); value head for a critic
    per_layer: int  # one decoder layer
    layers: int  # per_layer * num_layers
    final_norm: int
    total: int
    # Parameters that take part in a matmul for every token: the decoder layers plus the output
    # projection (the tied embedding matrix when tied). The embedding lookup is a gather, not a
    # matmul, so it is not counted. 2 * matmul FLOPs per token forward.
    matmul: int


def layer_param_count(arch: ArchConfig) -> int:
    h, hd = arch.hidden_size, arch.resolved_head_dim
    q_out, kv_out = arch.num_heads * hd, arch.num_kv_heads * hd
    bias = arch.attention_bias
    q = h * q_out + (q_out if bias else 0)
    k = h * kv_out + (kv_out if bias else 0)
    v = h * kv_out + (kv_out if bias else 0)
    o = q_out * h  # no bias on o_proj in Qwen2 / Llama
    mlp = 3 * h * arch.intermediate_size  # SwiGLU gate, up, down; no biases
    norms = 2 * h  # input and post-attention RMSNorm weights
    return q + k + v + o + mlp + norms


def param_count(arch: ArchConfig, kind: str = "policy") -> ParamCount:
    """Exact parameter count of the policy (trunk + LM head) or the critic (trunk + value head)."""
    if kind not in ("policy", "critic"):
        raise ValueError(f"kind must be 'policy' or 'critic', got {kind!r}")
    embed = arch.vocab_size * arch.hidden_size
    per_layer = layer_param_count(arch)
    layers = per_layer * arch.num_layers
    final_norm = arch.hidden_size
    if kind == "policy":
        head = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
        head_matmul = arch.vocab_size * arch.hidden_size
    else:
        head = arch.hidden_size  # value head: hidden -> 1, no bias
        head_matmul = head
    total = embed + layers + final_norm + head
    return ParamCount(embed=embed, lm_head=head, per_layer=per_layer, layers=layers, final_norm=final_norm,
                      total=total, matmul=layers + head_matmul)


def num_params(arch: ArchConfig, kind: str = "policy") -> int:
    return param_count(arch, kind).total


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def param_bytes(n_params: int, dtype: str) -> int:
    return n_params * _dtype_bytes(dtype)


def optimizer_bytes(n_params: int, master_copy: bool = False, moment_dtype: str = "float32") -> int:
    """AdamW state: first and second moments (float32 unless told otherwise; optax's default is the
    parameter dtype), plus a float32 master copy of the parameters if asked."""
    return n_params * (2 * _dtype_bytes(moment_dtype) + (4 if master_copy else 0))


def grad_bytes(n_params: int, dtype: str) -> int:
    return n_params * _dtype_bytes(dtype)


def kv_cache_bytes(slots: int, max_len: int, layers: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    """K and V, each ``[layers, slots, max_len, kv_heads, head_dim]`` (the KVCache layout)."""
    return 2 * layers * slots * max_len * kv_heads * head_dim * _dtype_bytes(dtype)


def kv_bytes_per_token(arch: ArchConfig, dtype: str) -> int:
    return kv_cache_bytes(1, 1, arch.num_layers, arch.num_kv_heads, arch.resolved_head_dim, dtype)


# ----------------------------------------------------------------------------------------------
# Mesh and per-device memory
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mesh3:
    data: int
    fsdp: int
    tensor: int

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:  # the "batch" / "slots" logical axes shard over (data, fsdp)
        return self.data * self.fsdp

    @property
    def param_shards(self) -> int:  # parameters shard over fsdp (embed) and tensor (heads/mlp/vocab)
        return self.fsdp * self.tensor

    def __str__(self) -> str:
        return f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}"


def resolve_mesh(data: int, fsdp: int, tensor: int, devices: int) -> Mesh3:
    """Sizes of (data, fsdp, tensor) for ``devices`` devices; one size may be -1 ("the rest").
    Mirrors ``orz_jax.sharding.make_mesh`` without needing JAX."""
    sizes = [data, fsdp, tensor]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"mesh: sizes must be >= 1 with at most one -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % known:
            raise ConfigError(f"mesh: {devices} devices cannot be split with data={data}, fsdp={fsdp}, "
                              f"tensor={tensor} ({devices} is not divisible by {known})")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise ConfigError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                          f"devices, but the slice has {devices}")
    return Mesh3(*sizes)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def serving_mesh(mesh: Mesh3, processes: int = 1) -> Mesh3:
    """The rollout engine's mesh (mirrors ``orz_jax.config.serving_mesh_shape``): the training mesh with one
    process; with several, one host's devices with tensor = gcd(mesh.tensor, devices per host), the rest fsdp."""
    if processes <= 1:
        return mesh
    local = mesh.size // processes
    t = math.gcd(mesh.tensor, local)
    return Mesh3(1, local // t, t)



@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device. ``*_total`` fields are peaks of the phases, not a sum of everything."""

    mesh: Mesh3
    actor_params: int
    actor_opt: int
    actor_grads: int
    critic_params: int
    critic_opt: int
    critic_grads: int
    rollout_weights: int  # the engine's compute-dtype copy of the policy, over the serving tensor axis (0 if none)
    kv_cache: int
    slots: int  # decode slots per process (rollout.max_concurrent_decodes)
    slots_per_device: int
    kv_heads_per_device: int
    max_len: int
    serving: Mesh3 = None  # the engine's mesh (one host's devices when processes > 1)
    processes: int = 1

    @property
    def resident(self) -> int:
        """Lives for the whole run: both models' parameters and optimizer states."""
        return self.actor_params + self.actor_opt + self.critic_params + self.critic_opt

    @property
    def rollout_peak(self) -> int:
        return self.resident + self.rollout_weights + self.kv_cache

    @property
    def train_peak(self) -> int:
        """Without activations: one model is trained at a time, so one set of gradients."""
        return self.resident + max(self.actor_grads, self.critic_grads)


def _kv_heads_per_device(arch: ArchConfig, tensor: int) -> int:
    # kv heads shard over `tensor` only when it divides them; otherwise the rules leave them replicated.
    return arch.num_kv_heads // tensor if arch.num_kv_heads % tensor == 0 else arch.num_kv_heads


def per_device_memory(arch: ArchConfig, mesh: Mesh3, *, slots: int, max_len: int,
                      param_dtype: str = "float32", compute_dtype: str = "bfloat16", master_copy: bool = False,
                      moment_dtype: str = "float32", with_critic: bool = True,
                      rollout_weight_copy: Optional[bool] = None, processes: int = 1) -> MemoryBreakdown:
    """Per-device bytes on ``mesh`` (``processes`` hosts) for PPO with an actor, a critic and, on every host, a
    decode engine of ``slots`` KV-cache rows of ``max_len`` positions. ``rollout_weight_copy``: the engine holds
    its own compute-dtype copy of the policy, sharded over the serving mesh's ``tensor`` axis only; default as
    the engine decides: a copy unless the trainer's parameters already are in the serving dtype and layout (one
    process, no fsdp shards, compute dtype = parameter dtype), which it then shares."""
    if rollout_weight_copy is None:
        rollout_weight_copy = compute_dtype != param_dtype or processes > 1 or mesh.fsdp > 1
    actor_n = num_params(arch, "policy")
    critic_n = num_params(arch, "critic") if with_critic else 0
    ps = mesh.param_shards
    serve = serving_mesh(mesh, processes)
    kv_heads_dev = _kv_heads_per_device(arch, serve.tensor)
    slots_dev = _ceil_div(slots, serve.batch_shards)
    return MemoryBreakdown(
        mesh=mesh,
        actor_params=_ceil_div(param_bytes(actor_n, param_dtype), ps),
        actor_opt=_ceil_div(optimizer_bytes(actor_n, master_copy, moment_dtype), ps),
        actor_grads=_ceil_div(grad_bytes(actor_n, param_dtype), ps),
        critic_params=_ceil_div(param_bytes(critic_n, param_dtype), ps),
        critic_opt=_ceil_div(optimizer_bytes(critic_n, master_copy, moment_dtype), ps),
        critic_grads=_ceil_div(grad_bytes(critic_n, param_dtype), ps),
        rollout_weights=_ceil_div(param_bytes(actor_n, compute_dtype), serve.tensor) if rollout_weight_copy else 0,
        kv_cache=kv_cache_bytes(slots_dev, max_len, arch.num_layers, kv_heads_dev, arch.resolved_head_dim,
                                compute_dtype),
        slots=slots, slots_per_device=slots_dev, kv_heads_per_device=kv_heads_dev, max_len=max_len,
        serving=serve, processes=processes)


def max_decode_slots(arch: ArchConfig, mesh: Mesh3, hbm_bytes: float, *, max_len: int, cap: Optional[int] = None,
                     reserve_frac: float = 0.1, processes: int = 1, **memory_kwargs) -> int:
    """Largest slot count per process (a multiple of the serving mesh's ``data * fsdp``, at most ``cap``) whose
    KV cache fits in ``(1 - reserve_frac) * hbm_bytes`` per device next to the resident state and the engine's
    weights. 0 when not even the resident state fits."""
    base = per_device_memory(arch, mesh, slots=0, max_len=max_len, processes=processes, **memory_kwargs)
    free = (1.0 - reserve_frac) * hbm_bytes - base.rollout_peak
    per_slot = kv_cache_bytes(1, max_len, arch.num_layers, base.kv_heads_per_device, arch.resolved_head_dim,
                              memory_kwargs.get("compute_dtype", "bfloat16"))
    if free <= 0:
        return 0
    shards = base.serving.batch_shards
    slots = int(free // per_slot) * shards
    if cap is not None:
        slots = min(slots, _ceil_div(cap, shards) * shards)
    return slots


# ----------------------------------------------------------------------------------------------
# Roofline of one ORZ iteration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutShape:
    """One PPO iteration's rollout: ``n_prompts * n_samples`` sequences. ``*_len`` bound the cache;
    ``mean_*_len`` (default: the bounds) set the tokens trained on and the decode-step count of a wave."""

    n_prompts: int = 128
    n_samples: int = 64
    prompt_len: int = 2048
    response_len: int = 8000
    mean_prompt_len: Optional[int] = None
    mean_response_len: Optional[int] = None

    @property
    def n_seqs(self) -> int:
        return self.n_prompts * self.n_samples

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def p(self) -> int:
        return self.mean_prompt_len if self.mean_prompt_len is not None else self.prompt_len

    @property
    def r(self) -> int:
        return self.mean_response_len if self.mean_response_len is not None else self.response_len


def attention_flops(arch: ArchConfig, seq_len: int) -> float:
    """Forward score + weighted-sum FLOPs of causal self-attention over one sequence of ``seq_len``
    tokens: token t (1-based) attends to t keys, 2*head_dim FLOPs per key for q.k and 2*head_dim for
    p.v, per head per layer -> 2 * L * heads * head_dim * T * (T + 1)."""
    return 2.0 * arch.num_layers * arch.num_heads * arch.resolved_head_dim * seq_len * (seq_len + 1)


@dataclass(frozen=True)
class RooflineEstimate:
    """Seconds per phase of one iteration (lower bounds), plus what bound each."""

    prefill_s: float
    decode_s: float
    decode_step_s: float
    decode_waves: int
    decode_bound: str  # "HBM" or "FLOPs"
    forward_s: float  # experience making: actor log-probs + critic values
    train_s: float  # actor and critic updates
    tokens: int  # tokens trained on per iteration
    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s + self.forward_s + self.train_s


def roofline_iteration(arch: ArchConfig, chip: ChipSpec, mesh: Mesh3, *, slots: int, shape: RolloutShape,
                       compute_dtype: str = "bfloat16", with_critic: bool = True, actor_epochs: int = 1,
                       critic_epochs: int = 1, remat: bool = False, processes: int = 1) -> RooflineEstimate:
    """Lower-bound time of one ORZ iteration on ``mesh.size`` chips of ``chip`` (``processes`` hosts).

    * prefill: compute bound, 2 * matmul params per prompt token + causal attention, one LM-head
      row per sequence;
    * decode: every host decodes its ``n_seqs / processes`` sequences in ``ceil(that / slots)`` waves of
      ``mean_response_len`` steps (a static batch runs until its longest member stops, so the bound
      ``response_len`` is the honest default), all hosts at once. One step on one device reads the engine's
      compute-dtype weights (sharded over the serving ``tensor`` axis only; no gathers) plus its slots' KV at
      the wave's mean context ``p + r/2``; its time is max(bytes / HBM bandwidth, FLOPs / peak);
    * forward passes: 2 * N * tokens (+ attention) for the actor's log-probs and the critic's values;
    * training: 6 * N * tokens (+ 3x attention) per epoch for actor and critic; 8 * N with remat.
      One epoch each by default: ``ppo.{actor,critic}_steps_per_batch`` split the buffer into that
      many mini-batches (ORZ: 1 and 12), they do not repeat it.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots} (the model may not fit: see max_decode_slots)")
    d = mesh.size
    peak, bw = chip.peak_flops * d, chip.hbm_bw
    actor = param_count(arch, "policy")
    critic = param_count(arch, "critic")
    n, p, r = shape.n_seqs, shape.p, shape.r
    seq = p + r

    # Prefill: trunk matmuls for every prompt token, the LM head for the last one only.
    trunk_matmul = actor.layers
    prefill_flops = n * (2.0 * trunk_matmul * p + attention_flops(arch, p) + 2.0 * (actor.matmul - trunk_matmul))
    prefill_s = prefill_flops / peak

    serve = serving_mesh(mesh, processes)
    n_host = _ceil_div(n, processes)
    waves = _ceil_div(n_host, slots)
    slots_dev = _ceil_div(min(slots, n_host), serve.batch_shards)
    ctx = p + r / 2.0
    kv_tok_dev = kv_cache_bytes(1, 1, arch.num_layers, _kv_heads_per_device(arch, serve.tensor),
                                arch.resolved_head_dim, compute_dtype)
    step_bytes = param_bytes(actor.matmul, compute_dtype) / serve.tensor + slots_dev * ctx * kv_tok_dev
    step_flops = slots_dev * (2.0 * actor.matmul + 4.0 * arch.num_layers * arch.num_heads
                              * arch.resolved_head_dim * ctx) / serve.tensor
    t_mem, t_flop = step_bytes / bw, step_flops / chip.peak_flops
    step_s = max(t_mem, t_flop)
    decode_s = waves * r * step_s

    tokens = n * seq
    attn = n * attention_flops(arch, seq)
    fwd = 2.0 * actor.matmul * tokens + attn
    if with_critic:
        fwd += 2.0 * critic.matmul * tokens + attn
    train_mult = 8.0 if remat else 6.0
    train = actor_epochs * (train_mult * actor.matmul * tokens + train_mult / 2.0 * attn)
    if with_critic:
        train += critic_epochs * (train_mult * critic.matmul * tokens + train_mult / 2.0 * attn)
    return RooflineEstimate(prefill_s=prefill_s, decode_s=decode_s, decode_step_s=step_s, decode_waves=waves,
                            decode_bound="HBM" if t_mem >= t_flop else "FLOPs", forward_s=fwd / peak,
                            train_s=train / peak, tokens=tokens)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _gib(b: float) -> str:
    return f"{b / GIB:9.2f} GiB"


def _dur(s: float) -> str:
    if s < 60:
        return f"{s:8.1f} s"
    if s < 3600:
        return f"{s / 60:8.1f} min"
    return f"{s / 3600:8.2f} h"


def format_report(arch: ArchConfig, *, name: str, chip: Optional[ChipSpec], mesh: Mesh3, shape: RolloutShape,
                  slots: Optional[int], param_dtype: str = "float32", compute_dtype: str = "bfloat16",
                  master_copy: bool = False, moment_dtype: str = "float32", with_critic: bool = True,
                  reserve_frac: float = 0.1, remat: bool = False, accelerator: Optional[str] = None,
                  processes: Optional[int] = None) -> str:
    """A plain-text table: parameter counts, per-device memory, and (with a chip) the roofline.
    ``slots=None``: the largest slot count per process that fits (needs ``chip``). ``processes``: hosts
    (default: ``chip.hosts(mesh.size)`` with a chip, else 1)."""
    if processes is None:
        processes = chip.hosts(mesh.size) if chip is not None else 1
    mem_kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, master_copy=master_copy,
                  moment_dtype=moment_dtype, with_critic=with_critic, processes=processes)
    lines = []
    actor, critic = param_count(arch, "policy"), param_count(arch, "critic")
    where = accelerator or (f"{mesh.size} x {chip.name}" if chip else f"{mesh.size} devices")
    lines.append(f"== {name} on {where}: mesh {mesh}, {processes} process(es) ==")
    lines.append(f"policy params {actor.total:>16,d}  (embed {actor.embed:,}, lm_head {actor.lm_head:,}, "
                 f"{arch.num_layers} x {actor.per_layer:,} per layer, final norm {actor.final_norm:,})")
    if with_critic:
        lines.append(f"critic params {critic.total:>16,d}  (trunk + value head {critic.lm_head:,})")
    lines.append(f"dtypes: params {param_dtype}, compute {compute_dtype}, AdamW moments {moment_dtype}"
                 f"{', float32 master copy' if master_copy else ''}")
    lines.append(f"rollout: {shape.n_prompts} prompts x {shape.n_samples} samples = {shape.n_seqs} sequences, "
                 f"prompt <= {shape.prompt_len} + response <= {shape.response_len} tokens "
                 f"(mean {shape.p} + {shape.r} used for time)")
    if slots is None:
        if chip is None:
            raise ValueError("slots=None (largest that fits) needs a chip")
        slots = max_decode_slots(arch, mesh, chip.hbm_bytes, max_len=shape.max_len, cap=_ceil_div(shape.n_seqs, processes),
                                 reserve_frac=reserve_frac, **mem_kw)
        slot_note = f"largest that fits in {1 - reserve_frac:.0%} of HBM"
    else:
        slot_note = "given"
    m = per_device_memory(arch, mesh, slots=slots, max_len=shape.max_len, **mem_kw)
    lines.append("")
    lines.append(f"per-device memory (params/optimizer/grads over fsdp*tensor = {mesh.param_shards}; each "
                 f"process's engine on serving mesh {m.serving}: weights over tensor = {m.serving.tensor}, KV over "
                 f"{m.serving.batch_shards} slot shards, {m.kv_heads_per_device} of {arch.num_kv_heads} kv heads "
                 f"per device)")
    rows = [("actor params", m.actor_params), ("actor AdamW state", m.actor_opt), ("actor grads", m.actor_grads)]
    if with_critic:
        rows += [("critic params", m.critic_params), ("critic AdamW state", m.critic_opt),
                 ("critic grads", m.critic_grads)]
    rows += [("rollout weights (the engine's compute-dtype copy of the policy)", m.rollout_weights),
             (f"KV cache: {slots} slots per process, {m.slots_per_device}/device x {shape.max_len} positions",
              m.kv_cache),
             ("= resident: params + AdamW state of both models", m.resident),
             ("= peak in rollout: resident + rollout weights + KV", m.rollout_peak),
             ("= peak in training: resident + grads of one model", m.train_peak)]
    width = 64
    for label, b in rows:
        lines.append(f"  {label:<{width}s}{_gib(b)}")
    lines.append(f"  (slots: {slot_note}; activations and XLA temporaries are not counted: "
                 f"python -m orz_jax.compile measures them)")
    if chip is not None:
        fits = slots > 0 and m.rollout_peak <= chip.hbm_bytes and m.train_peak <= chip.hbm_bytes
        lines.append(f"  {'HBM per chip (' + chip.name + ')':<{width}s}{_gib(chip.hbm_bytes)}"
                     f"  -> {'fits' if fits else 'DOES NOT FIT'}")
        if slots > 0:
            est = roofline_iteration(arch, chip, mesh, slots=slots, shape=shape, compute_dtype=compute_dtype,
                                     with_critic=with_critic, remat=remat, processes=processes)
            lines.append("")
            lines.append(f"roofline estimate of one iteration (ideal lower bound, not a measurement; per chip "
                         f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bw / 1e9:.0f} GB/s HBM, "
                         f"from {chip.source})")
            trows = [
                ("prefill (FLOPs bound)", est.prefill_s),
                (f"decode: {est.decode_waves} waves x {shape.r} steps x {est.decode_step_s * 1e3:.2f} ms "
                 f"({est.decode_bound} bound)", est.decode_s),
                ("forward passes: actor log-probs" + (" + critic values" if with_critic else ""), est.forward_s),
                (f"training: {'8' if remat else '6'}N per token, actor" + (" + critic" if with_critic else ""),
                 est.train_s),
                (f"= iteration ({est.tokens:,} tokens trained on)", est.total_s),
            ]
            for label, t in trows:
                lines.append(f"  {label:<{width}s}{_dur(t)}")
    return "\n".join(lines)


def print_report(arch: ArchConfig, **kwargs) -> None:
    print(format_report(arch, **kwargs))


def format_comparison(cases: Sequence[tuple[str, str, tuple[int, int, int]]], shape: RolloutShape, *,
                      reserve_frac: float = 0.1, remat: bool = False, **memory_kwargs) -> str:
    """A markdown table, one row per ``(preset, accelerator type, (data, fsdp, tensor))``, each with
    the largest slot count that fits and its roofline iteration time."""
    head = ("| model | slice (chips) | mesh data/fsdp/tensor | params + AdamW / device | grads / device "
            "| decode slots per host (per device) | KV cache / device | decode | prefill + forward + train | iteration |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for preset, accelerator, sizes in cases:
        if preset not in ARCH_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(ARCH_PRESETS)}")
        arch = ARCH_PRESETS[preset]
        chip, chips = parse_accelerator_type(accelerator)
        mesh = resolve_mesh(*sizes, devices=chips)
        hosts = chip.hosts(chips)
        slots = max_decode_slots(arch, mesh, chip.hbm_bytes, max_len=shape.max_len, cap=_ceil_div(shape.n_seqs, hosts),
                                 reserve_frac=reserve_frac, processes=hosts, **memory_kwargs)
        m = per_device_memory(arch, mesh, slots=slots, max_len=shape.max_len, processes=hosts, **memory_kwargs)
        row = [preset, f"{accelerator} ({chips})", f"{mesh.data}/{mesh.fsdp}/{mesh.tensor}",
               f"{m.resident / GIB:.1f} GiB", f"{max(m.actor_grads, m.critic_grads) / GIB:.1f} GiB"]
        if slots == 0:
            row += ["0 (does not fit)", "-", "-", "-", "-"]
        else:
            compute_dtype = memory_kwargs.get("compute_dtype", "bfloat16")
            e = roofline_iteration(arch, chip, mesh, slots=slots, shape=shape, compute_dtype=compute_dtype,
                                   with_critic=memory_kwargs.get("with_critic", True), remat=remat,
                                   processes=hosts)
            row += [f"{slots} ({m.slots_per_device})", f"{m.kv_cache / GIB:.1f} GiB", _dur(e.decode_s).strip(),
                    _dur(e.prefill_s + e.forward_s + e.train_s).strip(), _dur(e.total_s).strip()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _arch_from_hf_dir(path: str) -> ArchConfig:
    """The few config.json keys the count needs (Qwen2 / Llama). Kept here so this module needs no JAX."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"model.checkpoint={path!r}: no config.json there; pass --arch "
                          f"({', '.join(ARCH_PRESETS)}) or give the config a model.arch block")
    with open(cfg_path) as f:
        hf = json.load(f)
    try:
        model_type = hf.get("model_type", "qwen2")
        return ArchConfig(
            architecture="llama" if model_type == "llama" else "qwen2",
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]), head_dim=hf.get("head_dim"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and its config.json has no such key; Llama says so explicitly.
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta", 10000.0))
    except KeyError as e:
        raise ConfigError(f"{cfg_path}: missing key {e.args[0]!r}") from None


def _parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR, e.g. 1,-1,4")
    return parts[0], parts[1], parts[2]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m orz_jax.memory",
        description="Parameter count, per-device memory and roofline iteration time for an ORZ run. "
                    "Without --config the rollout defaults are ORZ's: 128 prompts x 64 samples, "
                    "prompt <= 2048 + response <= 8000 tokens.")
    ap.add_argument("--config", help="YAML experiment config (model, mesh, rollout, dtypes are read from it)")
    ap.add_argument("--arch", choices=sorted(ARCH_PRESETS), help="a preset architecture (overrides the config's)")
    ap.add_argument("--accelerator", help="TPU accelerator type, e.g. v5p-128, v6e-8, v5litepod-16")
    ap.add_argument("--chip", choices=sorted(CHIPS), help="chip generation when --accelerator is not given")
    ap.add_argument("--devices", type=int, help="device count (default: the accelerator's chip count)")
    ap.add_argument("--mesh", type=_parse_mesh, help="DATA,FSDP,TENSOR (one may be -1); default: the config's")
    ap.add_argument("--prompts", type=int, help="prompts per iteration")
    ap.add_argument("--samples", type=int, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, help="max prompt tokens")
    ap.add_argument("--response-len", type=int, help="max response tokens")
    ap.add_argument("--mean-response-len", type=int, help="mean response tokens for the time estimate")
    ap.add_argument("--slots", type=int, help="decode slots (KV cache rows) per process (host); default: the "
                                              "config's rollout.max_concurrent_decodes, else the largest that fits")
    ap.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--compute-dtype", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--master-copy", action="store_true", help="count a float32 master copy of the parameters")
    ap.add_argument("--moment-dtype", choices=sorted(DTYPE_BYTES), default="float32",
                    help="AdamW moment dtype (float32; optax's default is the parameter dtype)")
    ap.add_argument("--no-critic", action="store_true", help="GRPO-style run without a critic")
    ap.add_argument("--remat", action="store_true", help="training recomputes the forward pass (8N instead of 6N)")
    ap.add_argument("--reserve", type=float, default=0.1, help="HBM fraction held back for activations (0.1)")
    ap.add_argument("--compare", nargs="+", metavar="PRESET:ACCELERATOR:D,F,T",
                    help="print a markdown table instead, one row per case, e.g. qwen2.5-7b:v5p-32:1,4,4")
    args = ap.parse_args(argv)

    if args.compare:
        try:
            cases = []
            for spec in args.compare:
                parts = spec.split(":")
                if len(parts) != 3:
                    raise ValueError(f"--compare {spec!r}: expected PRESET:ACCELERATOR:DATA,FSDP,TENSOR")
                cases.append((parts[0], parts[1], _parse_mesh(parts[2])))
            shape = RolloutShape(n_prompts=args.prompts or 128, n_samples=args.samples or 64,
                                 prompt_len=args.prompt_len or 2048, response_len=args.response_len or 8000,
                                 mean_response_len=args.mean_response_len)
            print(format_comparison(cases, shape, reserve_frac=args.reserve, remat=args.remat,
                                    param_dtype=args.param_dtype or "float32",
                                    compute_dtype=args.compute_dtype or "bfloat16", master_copy=args.master_copy,
                                    moment_dtype=args.moment_dtype, with_critic=not args.no_critic))
        except (ConfigError, ValueError, argparse.ArgumentTypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    try:
        cfg = None
        if args.config:
            from orz_jax.config import load_config
            cfg = load_config(args.config)
        if args.arch:
            arch, name = ARCH_PRESETS[args.arch], args.arch
        elif cfg is not None and cfg.model.arch is not None:
            arch, name = cfg.model.arch, args.config
        elif cfg is not None and cfg.model.checkpoint:
            arch, name = _arch_from_hf_dir(cfg.model.checkpoint), cfg.model.checkpoint
        else:
            ap.error("give --arch (one of " + ", ".join(ARCH_PRESETS) + ") or a --config with a model")

        chip, devices = None, args.devices
        if args.accelerator:
            chip, chips = parse_accelerator_type(args.accelerator)
            devices = devices or chips
        elif args.chip:
            chip = CHIPS[args.chip]
        if devices is None:
            ap.error("give --accelerator (e.g. v5p-8) or --devices N")
        mesh_sizes = args.mesh or ((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if cfg else (1, -1, 1))
        mesh = resolve_mesh(*mesh_sizes, devices=devices)

        r = cfg.rollout if cfg else None
        pick = lambda flag, from_cfg, default: flag if flag is not None else (from_cfg if cfg else default)
        shape = RolloutShape(
            n_prompts=pick(args.prompts, cfg and cfg.data.prompts_per_iter, 128),
            n_samples=pick(args.samples, r and r.n_samples_per_prompt, 64),
            prompt_len=pick(args.prompt_len, r and r.max_prompt_len, 2048),
            response_len=pick(args.response_len, r and r.max_response_len, 8000),
            mean_response_len=args.mean_response_len)
        slots = pick(args.slots, r and r.max_concurrent_decodes, None)
        if slots is None and chip is None:
            ap.error("give --slots N, or --accelerator / --chip so the largest slot count that fits can be found")
        param_dtype = pick(args.param_dtype, cfg and cfg.model.param_dtype, "float32")
        compute_dtype = pick(args.compute_dtype, cfg and cfg.model.dtype, "bfloat16")
        remat = args.remat or bool(cfg and cfg.model.remat != "none")
        print_report(arch, name=name, chip=chip, mesh=mesh, shape=shape, slots=slots, param_dtype=param_dtype,
                     compute_dtype=compute_dtype, master_copy=args.master_copy, moment_dtype=args.moment_dtype,
                     with_critic=not args.no_critic,
                     reserve_frac=args.reserve, remat=remat, accelerator=args.accelerator)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
