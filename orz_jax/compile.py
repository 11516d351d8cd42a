"""Compile every program of an ORZ run for a TPU slice, ahead of time, on any host (a CPU is enough).

    python -m orz_jax.compile --config configs/orz_7b.yaml --topology v5p-32 [--num-slices N]
                              [key=value ...] [--json OUT]

With libtpu installed (``pip install -e '.[tpu-aot]'``), JAX builds compile-only TPU devices for a named
topology (``jax.experimental.topologies.get_topology_desc``) and lowers + compiles jitted functions for them
without a TPU (MaxText's ``train_compile.py`` checks its configs the same way). This tool builds the
trainer's mesh from those devices, the actor / critic train states and the rollout engine as abstract
values (``jax.eval_shape``: no weights, no host memory) and compiles the trainer's and the engine's OWN
jitted functions (``PPOFunctions.build``, ``RolloutEngine``) with the shapes ``python -m orz_jax.launch``
gives them:

* ``prefill[B]`` for each bucket B of ``rollout.prefill_buckets``, ``insert[B]`` of its prefix into a slot,
  ``init_decode_state`` (the KV cache), ``decode`` (``generate``: one step of ``max_concurrent_decodes``
  slots; the batched driver's ``generate_steps`` + ``release``), compiled as ``decode[W=...]`` at two
  decode windows (the rollout's first and the whole cache) when the cache has several, ``eval_decode``
  when evaluation samples at another temperature;
* ``weight_sync``: the parameters from the training layout into the engine's (one process: an identity
  that XLA reduces to nothing when the layouts agree; several processes: the all-gather of
  ``multihost.to_serving``);
* ``prepare_batch`` (old log-probs and values + advantages), ``critic_step``, ``actor_step`` on the worst
  case buffer (every sample of maximal length, one sample per row unless two fit: ``memory.py``'s bound).

Per program: per-device argument / output / alias / temporary bytes (``memory_analysis``), compile time, and
FLOPs, bytes accessed and collectives (with their result bytes) from ``orz_jax.hlo_cost``'s reading of the
compiled HLO, every loop body multiplied by its trip count (the PPO steps scan over mini-batches and
micro-batches, the decoder layers are a scan inside those, the loss a chunk scan). XLA's own
``cost_analysis`` counts a while-loop body ONCE; its raw figures stay in the JSON as
``xla_cost_analysis_loop_bodies_once``. A loop whose count the HLO does not fix (the batched driver's decode
``while_loop``, which stops early) is listed and counted ``unknown_trips`` times (an upper bound: ``check_every``).
Beside the compiled FLOPs: model FLOPs per device, matmul parameters x tokens x 2 per pass plus causal
attention (4 x attended positions x heads x head_dim x layers per token and pass); passes = 1 for
prepare_batch / prefill / decode (decode attends over the whole cache), 3 for a train step, 4 with remat
(the forward recomputed); and the compiled / model ratio. For the PPO programs the tokens are every packed
position (rows x pack_len, padding included: a static-shape program computes padding like tokens) with
attention causal over each whole row, so compiled / model measures the kernels' and the compiler's overhead,
not the buffer's fill; the real sample tokens' figure is kept beside it (``model_flops_real_tokens``).
Splash attention kernels carry no Pallas cost estimate; ``orz_jax.models.attention`` puts each kernel's exact
FLOPs in a named scope that ``orz_jax.hlo_cost`` reads from the compiled HLO.

For the run: resident bytes per device (both train states, the engine's serving copy when it has one,
the KV cache during rollouts) and each program's phase peak (resident + its arguments, outputs and
temporaries) against the chip's HBM; a roofline time per program and per iteration from the scaled
compiled costs at the chip's published peak FLOP/s, HBM bandwidth and ICI bandwidth (CHIP_ICI), beside
``python -m orz_jax.memory``'s analytic estimate. Exit status 1 naming the program and the shortfall when a
program does not compile or does not fit; 2 on a bad config.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import os
import re
import sys
import time
import types
from typing import Any, Optional, Sequence

from orz_jax.hlo_cost import COLLECTIVES, analyze_hlo  # noqa: F401  (COLLECTIVES: re-exported)
from orz_jax.config import (Config, ConfigError, check_against_mesh, load_config, resolve_mesh_shape,
                            serving_mesh_shape)
from orz_jax.memory import CHIPS, GIB, ChipSpec, RolloutShape, param_count, roofline_iteration

# Inter-chip interconnect bandwidth per chip (all links, one direction summed as Google publishes it), bytes/s.
# Sources: Cloud TPU system architecture pages, "Interchip Interconnect BW":
#   v4  https://cloud.google.com/tpu/docs/v4   2,400 Gbps     v5e https://cloud.google.com/tpu/docs/v5e  1,600 Gbps
#   v5p https://cloud.google.com/tpu/docs/v5p  4,800 Gbps     v6e https://cloud.google.com/tpu/docs/v6e  3,584 Gbps
CHIP_ICI = {"v4": 2400e9 / 8, "v5e": 1600e9 / 8, "v5p": 4800e9 / 8, "v6e": 3584e9 / 8}
# HBM a program may use per chip where it differs from orz_jax.memory.CHIPS: the v5p page gives "HBM capacity per
# chip (GiB) 95" (96 GiB physical, 1 GiB held by the runtime); memory.py's 95e9 bytes (88.5 GiB) undercounts it,
# and the TPU compiler itself reports 95.74G available. https://cloud.google.com/tpu/docs/v5p
HBM_BYTES = {"v5p": 95 * GIB}
# The name libtpu's topology descriptions use for each chip.
_TOPO_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}


class CompileCheckError(RuntimeError):
    """A program failed to compile or does not fit; the message names it and the shortfall."""


# ----------------------------------------------------------------------------------------------
# Topology
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: ChipSpec
    name: str  # libtpu's form, e.g. "v5p:2x2x4"
    chips: int  # per slice


def _grid(chips: int, dims: int) -> list[int]:
    """A power-of-two chip count as the slice grid Cloud TPU uses (v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4;
    v5e / v6e 2x2, 2x4, 4x4, 4x8): double the smallest dimension, the last one on a tie."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: only power-of-two slices are named; pass the raw form, e.g. v5p:2x2x3")
    g = [1] * dims
    if dims == 3 and chips >= 4:
        g = [2, 2, 1]
    while math.prod(g) < chips:
        i = max(j for j in range(dims) if g[j] == min(g))
        g[i] *= 2
    if math.prod(g) != chips:  # fewer chips than the 3-D start grid (v5p-2 / v5p-4)
        g = [chips, 1, 1][:dims]
    return g


def parse_topology(text: str) -> Topology:
    """``v5p-32`` (accelerator type: v4 / v5p count TensorCores, 2 per chip), ``v5e-16`` / ``v5litepod-16`` /
    ``v6e-8`` (chips), or libtpu's raw ``v5p:2x2x4`` -> Topology."""
    text = text.strip()
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)+)", text)
    if m:
        chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
        return Topology(chip, f"{_TOPO_PREFIX[chip.name]}:{m.group(2)}", math.prod(map(int, m.group(2).split("x"))))
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if not m:
        raise ValueError(f"--topology {text!r}: expected v5p-32, v5e-16, v6e-8 (accelerator types) or a raw "
                         f"libtpu topology such as v5p:2x2x4")
    chip = CHIPS["v5e" if m.group(1) in ("v5e", "v5litepod") else m.group(1)]
    count = int(m.group(2))
    if count % chip.cores_per_chip:
        raise ValueError(f"--topology {text!r}: {count} is not a multiple of the {chip.cores_per_chip} "
                         f"TensorCores per {chip.name} chip")
    chips = count // chip.cores_per_chip
    g = _grid(chips, 3 if chip.name in ("v4", "v5p") else 2)
    return Topology(chip, f"{_TOPO_PREFIX[chip.name]}:{'x'.join(map(str, g))}", chips)


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
    """Compile-only TPU devices of ``num_slices`` slices of ``topo`` (needs libtpu; no TPU)."""
    # libtpu takes a host-wide lock file on load; compile-only devices touch no TPU, so several compiles
    # (parallel test runs, a compile beside a benchmark) may share the host. Set before the plugin loads.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topo.name, **kw).devices)


# ----------------------------------------------------------------------------------------------
# Compiled-program figures
# ----------------------------------------------------------------------------------------------


def hlo_collectives(hlo: str) -> dict[str, dict[str, float]]:
    """{op: {"count", "bytes"}} of the collectives in compiled HLO text, per device, loop trip counts applied
    (``orz_jax.hlo_cost``; an async ``-start`` counts its output buffer once, ``-done`` is skipped)."""
    return analyze_hlo(hlo).collectives


@dataclasses.dataclass
class ProgramReport:
    name: str
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float  # compiled HLO per device per call, loop trip counts applied (orz_jax.hlo_cost)
    bytes_accessed: float  # the same, XLA's operands + results convention
    collectives: dict  # {op: {"count", "bytes"}} per device per call, trip counts applied
    xla_cost_analysis_loop_bodies_once: dict = dataclasses.field(default_factory=dict)  # raw cost_analysis()
    loops: list = dataclasses.field(default_factory=list)  # [{"name", "trips", "known", "times"}]
    unknown_loops: list = dataclasses.field(default_factory=list)  # loops counted unknown_trips times
    unknown_trips: int = 1  # the hint for loops whose trip count the HLO does not fix
    calls_per_iteration: float = 1.0
    model_flops: Optional[float] = None  # per device per call: 2N per token per pass + causal attention
    # PPO programs: model_flops counts every packed position; this, the buffer's real sample tokens only
    model_flops_real_tokens: Optional[float] = None
    resident_in_args: int = 0  # argument bytes that are resident state (not added twice to the peak)
    phase: str = ""
    peak_bytes: int = 0
    roofline_s: float = 0.0  # per call
    bound: str = ""

    @property
    def collective_bytes(self) -> int:
        return sum(v["bytes"] for v in self.collectives.values())


def compile_program(name: str, jitted, *args, static: Sequence[Any] = (), unknown_trips: int = 1) -> ProgramReport:
    """Lower ``jitted(*args, *static)`` (abstract args with shardings) and compile it for their devices; costs from
    its HLO with loop trip counts applied (``unknown_trips``: the count for loops the HLO leaves open)."""
    t0 = time.perf_counter()
    try:
        compiled = jitted.lower(*args, *static).compile()
    except Exception as e:  # the compiler's own message (e.g. RESOURCE_EXHAUSTED) names the shortfall
        msg = " ".join(str(e).split())[:600]
        raise CompileCheckError(f"program {name} failed to compile: {type(e).__name__}: {msg}") from e
    dt = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older JAX: one dict per device program
        ca = ca[0] if ca else {}
    ca = ca or {}
    hc = analyze_hlo(compiled.as_text(), unknown_trips=unknown_trips)
    return ProgramReport(
        name=name, compile_s=dt, argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
        alias_bytes=int(ma.alias_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
        code_bytes=int(ma.generated_code_size_in_bytes), flops=hc.flops, bytes_accessed=hc.bytes_accessed,
        collectives=hc.collectives,
        xla_cost_analysis_loop_bodies_once={k: float(ca[k]) for k in ("flops", "bytes accessed", "transcendentals")
                                            if k in ca},
        loops=hc.loops, unknown_loops=hc.unknown_loops, unknown_trips=unknown_trips)


# ----------------------------------------------------------------------------------------------
# Abstract values
# ----------------------------------------------------------------------------------------------


def per_device_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes one device holds of ``tree`` (ShapeDtypeStructs with shardings, or ``shardings`` given as a
    matching tree / prefix); replicated leaves count whole. The largest shard when shards differ."""
    import jax

    leaves = jax.tree.leaves(tree)
    if shardings is None:
        shs = [getattr(x, "sharding", None) for x in leaves]
    else:
        shs = []
        for s, sub in zip(*_prefix_pairs(shardings, tree)):
            shs += [s] * len(jax.tree.leaves(sub))
    total = 0
    for x, s in zip(leaves, shs):
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def _prefix_pairs(prefix: Any, tree: Any):
    import jax

    flat_prefix, treedef = jax.tree.flatten(prefix, is_leaf=lambda x: x is None)
    subtrees = treedef.flatten_up_to(tree)
    return flat_prefix, subtrees


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a matching tree or prefix of it)."""
    import jax

    flat, subtrees = _prefix_pairs(shardings, tree)
    treedef = jax.tree.structure(shardings, is_leaf=lambda x: x is None)
    out = [jax.tree.map(lambda x, s=s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub)
           for s, sub in zip(flat, subtrees)]
    return jax.tree.unflatten(treedef, out)


def _placeholder_tokenizer(cfg: Config):
    """The engine reads only eos ids and the pad id from its tokenizer (constants of the decode step). Without
    a model directory: Qwen2.5's ``<|endoftext|>`` (id 151643; any in-vocab id compiles the same program)."""
    path = cfg.model.tokenizer or cfg.model.checkpoint
    if path and path not in ("demo", "smollm2-135m"):
        try:
            from orz_jax.tokenizer import load_tokenizer
            return load_tokenizer(path)
        except Exception:
            pass
    eos = min(151643, cfg.model.arch.vocab_size - 1)
    return types.SimpleNamespace(eos_id=eos, eos_ids=(eos,), pad_id=eos, bos_id=None, source="placeholder")


@dataclasses.dataclass(frozen=True)
class BufferShape:
    """The rollout buffer the PPO programs are compiled for (worst case, as ``orz_jax.memory`` bounds it)."""

    samples: int  # global samples per iteration
    samples_per_process: int
    rows: int  # packed rows
    pack_len: int
    max_response_len: int
    per_row: int  # samples per row


def buffer_shape(cfg: Config, row_multiple: int, num_processes: int, rows: Optional[int] = None) -> BufferShape:
    r = cfg.rollout
    samples = cfg.data.prompts_per_iter * r.n_samples_per_prompt
    per_row = max(1, cfg.ppo.pack_len // (r.max_prompt_len + r.max_response_len))
    if rows is None:
        rows = -(-samples // per_row)
    rows = -(-rows // row_multiple) * row_multiple
    return BufferShape(samples, samples // num_processes, rows, cfg.ppo.pack_len, r.max_response_len, per_row)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunReport:
    config: str
    topology: str
    num_slices: int
    devices: int
    processes: int
    mesh: dict
    serving_mesh: dict
    chip: dict
    buffer: dict
    resident: dict  # per device bytes
    programs: list
    phases: dict  # phase -> {"peak_bytes", "roofline_s", "program"}
    iteration_roofline_s: float
    memory_py_roofline: dict
    memory_py_resident: dict  # python -m orz_jax.memory's per-device bytes of the same parts
    total_compile_s: float
    fits: bool
    failures: list


def _train_passes(cfg: Config) -> int:
    """Forward-equivalent passes of a train step: forward + backward (2x), plus the forward again under remat."""
    return 4 if cfg.model.remat != "none" else 3


def _model_flops(arch, matmul_params: float, tokens: float, attended: float, passes: float) -> float:
    """Model FLOPs of ``tokens`` tokens: per token and pass 2 x ``matmul_params`` plus causal attention,
    4 x ``attended`` positions (mean over the tokens) x heads x head_dim x layers (QK^T and PV, 2 flops per
    multiply-add). A causal sample of S tokens attends to (S + 1) / 2 positions on average."""
    attn = 4.0 * attended * arch.num_heads * arch.resolved_head_dim * arch.num_layers
    return passes * tokens * (2.0 * matmul_params + attn)


def compile_run(cfg: Config, topo: Topology, num_slices: int = 1, rows: Optional[int] = None,
                only: Optional[Sequence[str]] = None, config_name: str = "", log=print) -> RunReport:
    """Compile every program of ``cfg`` for ``num_slices`` x ``topo``; see the module docstring."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from orz_jax.models.build import abstract_model
    from orz_jax.ppo.train import (PPOFunctions, _batch_shards, abstract_train_state, batch_shardings,
                                   required_row_multiple, train_state_shardings)
    from orz_jax.ppo.packing import PackedBatch
    from orz_jax.config import MeshConfig
    from orz_jax.rollout.engine import RolloutEngine
    from orz_jax.rollout.sampling import SamplingParams
    from orz_jax.sharding import make_mesh

    if cfg.model.arch is None:
        raise ConfigError("model.arch: the compile check needs the architecture block (no weights are read)")
    devices = topology_devices(topo, num_slices)
    n_dev = len(devices)
    procs = sorted({d.process_index for d in devices})
    n_proc = len(procs)
    local = [d for d in devices if d.process_index == procs[0]]
    mesh_shape = resolve_mesh_shape(cfg.mesh, n_dev)
    check_against_mesh(cfg, mesh_shape, n_proc, len(local))
    mesh = make_mesh(cfg.mesh, devices)
    serve_shape = serving_mesh_shape(cfg, mesh_shape, len(local), n_proc)
    # multihost.serving_mesh: one process serves from the training mesh, several from their own devices
    smesh = mesh if n_proc == 1 else make_mesh(MeshConfig(data=1, fsdp=-1, tensor=serve_shape["tensor"]), local)
    chip = dataclasses.replace(topo.chip, hbm_bytes=HBM_BYTES.get(topo.chip.name, topo.chip.hbm_bytes))
    want = (lambda name: True) if not only else (lambda name: any(name.startswith(o) for o in only))

    # Abstract models and train states: the trainer's create_model / create_train_state, as shapes.
    policy = abstract_model("policy", cfg.model.arch, cfg.model)
    critic = abstract_model("critic", cfg.model.arch, cfg.model)
    actor_abs = abstract_train_state(policy, cfg.ppo.actor)
    critic_abs = abstract_train_state(critic, cfg.ppo.critic)
    ash, csh = train_state_shardings(mesh, actor_abs), train_state_shardings(mesh, critic_abs)
    actor_in, critic_in = with_shardings(actor_abs, ash), with_shardings(critic_abs, csh)
    actor_b, critic_b = per_device_bytes(actor_in), per_device_bytes(critic_in)
    actor_param_b = per_device_bytes(actor_in.params)
    fns = PPOFunctions.build(cfg.ppo, mesh, actor_abs, critic_abs)

    # The engine, built from the abstract policy on the serving mesh (nothing placed).
    engine = RolloutEngine(policy, cfg.rollout, _placeholder_tokenizer(cfg), mesh=smesh, seed=cfg.experiment.seed)
    # The engine's own copy of the policy (rollout.engine): compute dtype, serving layout (no fsdp).
    sparams = engine.params
    serving_b = per_device_bytes(sparams)
    # It shares the trainer's arrays only where the cast and reshard are the identity (one process, parameters
    # already in the compute dtype and serving layout); otherwise it is resident next to the actor state.
    shared = n_proc == 1 and all(a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, len(a.shape))
                                 for a, b in zip(jax.tree.leaves(actor_in.params), jax.tree.leaves(sparams)))
    serving_copy_b = 0 if shared else serving_b
    state_abs = jax.eval_shape(engine._init_impl)
    state_in = with_shardings(state_abs, engine._state_shardings)
    kv_b = per_device_bytes(state_in)

    rep = NamedSharding(mesh, PartitionSpec())
    srep = NamedSharding(smesh, PartitionSpec())
    i32 = lambda sh: jax.ShapeDtypeStruct((), jnp.int32, sharding=sh)  # noqa: E731
    key_abs = jax.eval_shape(lambda: jax.random.key(0))
    key_in = jax.ShapeDtypeStruct(key_abs.shape, key_abs.dtype, sharding=srep)

    row_multiple = required_row_multiple(cfg.ppo, mesh)
    buf = buffer_shape(cfg, row_multiple, n_proc, rows)
    bsh = batch_shardings(mesh)
    batch_in = PackedBatch(*[jax.ShapeDtypeStruct((buf.rows, buf.pack_len), dt, sharding=s) for dt, s in zip(
        (jnp.int32, jnp.int32, jnp.int32) + (jnp.float32,) * 5, dataclasses.astuple(bsh))])
    # prepare_batch's per-sample inputs come from the host (jit places them replicated)
    n, R = buf.samples, buf.max_response_len
    resp_in = [jax.ShapeDtypeStruct((n, R), jnp.int32, sharding=rep), jax.ShapeDtypeStruct((n, R), jnp.int32, sharding=rep),
               jax.ShapeDtypeStruct((n,), jnp.float32, sharding=rep), jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep)]

    shards = _batch_shards(mesh)
    pc_actor = param_count(cfg.model.arch, "policy")
    pc_critic = param_count(cfg.model.arch, "critic")
    arch = cfg.model.arch
    tensor = mesh_shape["tensor"]
    slots = cfg.rollout.max_concurrent_decodes
    per_proc = buf.samples_per_process
    waves = -(-per_proc // slots)
    decode_steps = waves * cfg.rollout.max_response_len  # worst case: every wave runs to the token limit

    programs: list[ProgramReport] = []
    failures: list[str] = []

    def run(name, jitted, *args, static=(), unknown_trips=1, calls=1.0, model_flops=None, resident_in_args=0,
            phase=""):
        if not want(name):
            return None
        log(f"compiling {name} ...")
        try:
            p = compile_program(name, jitted, *args, static=static, unknown_trips=unknown_trips)
        except CompileCheckError as e:
            failures.append(str(e))
            log(f"  FAILED: {e}")
            return None
        p.calls_per_iteration, p.model_flops = calls, model_flops
        p.resident_in_args, p.phase = resident_in_args, phase
        programs.append(p)
        # the whole row as soon as it is known: a long run that is stopped still leaves its figures
        log(f"  {name}: compile {p.compile_s:.1f} s; per device args {p.argument_bytes / GIB:.3f} GiB, out "
            f"{p.output_bytes / GIB:.3f}, alias {p.alias_bytes / GIB:.3f}, temp {p.temp_bytes / GIB:.3f} GiB; "
            f"compiled {p.flops:.4g} FLOPs, {p.bytes_accessed:.4g} bytes (HLO, loop trips applied"
            + (f"; {len(p.unknown_loops)} loop(s) of unknown count x {unknown_trips}" if p.unknown_loops else "")
            + f"; model {model_flops or 0:.4g}; XLA cost_analysis, loop bodies once: "
            f"{p.xla_cost_analysis_loop_bodies_once.get('flops', 0):.4g} FLOPs); "
            f"collectives {json.dumps(p.collectives)}")
        return p

    # -- rollout ---------------------------------------------------------------------------------
    for b in engine.buckets:
        tok_in = jax.ShapeDtypeStruct((1, b), jnp.int32, sharding=srep)
        run(f"prefill[{b}]", engine._prefill_jit, sparams, tok_in, i32(srep),
            calls=per_proc if b == engine.buckets[-1] else 0.0,  # worst case: every prompt in the largest bucket
            model_flops=_model_flops(arch, pc_actor.layers, b, (b + 1) / 2, 1) / serve_shape["tensor"],  # last-token logits only
            resident_in_args=serving_b, phase="rollout")
        prefix_abs = jax.eval_shape(engine._prefill_impl, sparams, tok_in, i32(srep))
        prefix_in = with_shardings(prefix_abs, engine._prefix_shardings)
        run(f"insert[{b}]", engine._insert_jit, prefix_in, state_in, i32(srep), key_in, i32(srep), i32(srep),
            calls=per_proc if b == engine.buckets[-1] else 0.0, resident_in_args=kv_b, phase="rollout")
    # its output is the resident KV cache itself: counted once in the phase peak
    run("init_decode_state", engine._init_jit, calls=waves, resident_in_args=kv_b, phase="rollout")
    slots_dev = slots / (serve_shape["data"] * serve_shape["fsdp"])

    def decode_model(w):  # one token per slot, attending over the window's W positions (masked beyond a slot's)
        return _model_flops(arch, pc_actor.matmul, slots_dev, w, 1) / serve_shape["tensor"]

    # Decode reads the KV cache up to a window (RolloutEngine.window_for). Compiled at two windows: the first
    # window of a rollout (the longest prompt bucket + 1 step) and the whole cache (the memory peak). Costs are
    # affine in the window (the attention reads W positions; weights and the rest are fixed), so the mean step
    # cost over a wave's window schedule (bucket + n for n = 0 .. max_response_len - 1, the worst case that
    # every sample runs to the limit) is the cost at the schedule's mean window W_mean, i.e. the two compiled
    # programs weighted (W_max - W_mean) / (W_max - W_lo) and the rest: those weights split the decode calls.
    k = 1 if cfg.rollout.driver == "orchestrator" else cfg.rollout.check_every
    sched = [engine.windows[min(bisect.bisect_left(engine.windows, min(engine.buckets[-1] + n + k, engine.max_len)),
                                len(engine.windows) - 1)] for n in range(0, cfg.rollout.max_response_len, k)]
    w_lo, w_hi = sched[0], engine.windows[-1]
    lam = (w_hi - sum(sched) / len(sched)) / (w_hi - w_lo) if w_hi > w_lo else 0.0
    decode_windows = [("decode", w_hi, 1.0)] if w_hi == w_lo else [(f"decode[W={w_lo}]", w_lo, lam),
                                                                   (f"decode[W={w_hi}]", w_hi, 1.0 - lam)]
    for name, w, share in decode_windows:
        if cfg.rollout.driver == "orchestrator":
            run(name, engine._generate_jit, sparams, state_in, static=(engine.sampling, w),
                calls=decode_steps * share, model_flops=decode_model(w), resident_in_args=serving_b + kv_b,
                phase="rollout")
        else:
            run(name, engine._steps_jit, sparams, state_in, static=(k, engine.sampling, w), unknown_trips=k,
                calls=decode_steps / k * share, model_flops=decode_model(w) * k, resident_in_args=serving_b + kv_b,
                phase="rollout")
    if cfg.rollout.driver != "orchestrator":
        mask_in = jax.ShapeDtypeStruct((slots,), jnp.bool_, sharding=srep)
        run("release", engine._release_jit, state_in, mask_in, calls=decode_steps / k, resident_in_args=kv_b,
            phase="rollout")
    if cfg.eval.every and cfg.eval.temperature != cfg.rollout.temperature:
        eval_sampling = SamplingParams.from_config(dataclasses.replace(cfg.rollout, temperature=cfg.eval.temperature))
        run("eval_decode", engine._generate_jit, sparams, state_in, static=(eval_sampling, w_hi), calls=0.0,
            resident_in_args=serving_b + kv_b, phase="rollout")

    # -- weight sync (trainer: engine.update_params(to_serving(actor.params))) ----------------------
    if shared:
        # update_params shares the arrays: no program runs
        if want("weight_sync"):
            log("weight_sync: no program (one process, the parameters already are in the serving dtype and layout)")
    elif n_proc > 1:
        # several processes: multihost.to_serving casts each leaf to the serving dtype on its devices, then
        # process_allgather(tiled=True)s it piece by piece (at most SYNC_PIECE_BYTES, sliced along the layers
        # axis), an identity to fully replicated arrays, then a host copy the engine places. Compile the gather
        # of the largest piece (the device peak); its costs are scaled to the whole policy by bytes (calls =
        # total bytes / the piece's bytes)
        from orz_jax.multihost import SYNC_PIECE_BYTES

        def serving_aval(x):
            dt = engine._serving_dtype(x.dtype)
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)

        leaves = [serving_aval(x) for x in jax.tree.leaves(actor_in.params)]
        nbytes = lambda x: math.prod(x.shape) * x.dtype.itemsize  # noqa: E731
        big = max(leaves, key=nbytes)
        if big.ndim > 0 and big.shape[0] > 1 and nbytes(big) > SYNC_PIECE_BYTES:
            rows = max(1, big.shape[0] * SYNC_PIECE_BYTES // nbytes(big))
            # a piece of a leaf sharded along dim 0 (the LM head's embed on fsdp, when it is the largest leaf: a
            # model of few layers) must stay divisible by that dim's shards
            per_shard = big.shape[0] // big.sharding.shard_shape(big.shape)[0]
            rows = max(per_shard, rows - rows % per_shard)
            big = jax.ShapeDtypeStruct((rows, *big.shape[1:]), big.dtype, sharding=big.sharding)
        sync = jax.jit(lambda p: p, out_shardings=rep)
        run("weight_sync", sync, big, calls=sum(map(nbytes, leaves)) / nbytes(big),
            resident_in_args=per_device_bytes(big), phase="weight_sync")
    else:
        # one process: the engine's jitted cast-and-reshard from the actor's layout, donating the old copy
        run("weight_sync", engine._refresh_jit, actor_in.params, sparams, resident_in_args=actor_param_b + serving_b,
            phase="weight_sync")

    # -- PPO ---------------------------------------------------------------------------------------
    # model FLOPs per packed position: the programs have static [rows, pack_len] shapes, so every position of
    # every row (padding included) runs the matmuls, and attention is causal over each whole row (the segment
    # mask only zeroes weights). compiled / model then measures the kernels' and the compiler's overhead, not
    # how full the buffer is.
    positions_dev = buf.rows * buf.pack_len / shards
    row_attended = (buf.pack_len + 1) / 2
    # beside it (model_flops_real_tokens): the worst-case buffer's real tokens per batch shard, per_row samples
    # of prompt + response per row, each attending causally within its sample
    seq = min(buf.pack_len, cfg.rollout.max_prompt_len + cfg.rollout.max_response_len)
    sample_tokens_dev = buf.rows * min(buf.pack_len, buf.per_row * seq) / shards
    attended = (seq + 1) / 2

    def ppo_model(pcs, passes, real=False):
        tokens, att = (sample_tokens_dev, attended) if real else (positions_dev, row_attended)
        return sum(_model_flops(arch, pc.matmul, tokens, att, passes) / tensor for pc in pcs)

    def ppo_run(name, jitted, *args, pcs, passes, **kw):
        p = run(name, jitted, *args, model_flops=ppo_model(pcs, passes), **kw)
        if p is not None:
            p.model_flops_real_tokens = ppo_model(pcs, passes, real=True)

    ppo_run("prepare_batch", fns.prepare_batch, actor_in, critic_in, batch_in, *resp_in, pcs=(pc_actor, pc_critic),
            passes=1, resident_in_args=actor_param_b + per_device_bytes(critic_in.params), phase="prepare")
    # (prepare_batch reads only the parameters: jit prunes the unused optimizer states from the arguments)
    if cfg.ppo.critic_steps_per_batch > 0:
        ppo_run("critic_step", fns.critic_step, critic_in, batch_in, pcs=(pc_critic,), passes=_train_passes(cfg),
                resident_in_args=critic_b, phase="critic_update")
    ppo_run("actor_step", fns.actor_step, actor_in, batch_in, pcs=(pc_actor,), passes=_train_passes(cfg),
            resident_in_args=actor_b, phase="actor_update")

    # -- memory and roofline ----------------------------------------------------------------------
    resident = {"actor_state": actor_b, "critic_state": critic_b, "serving_params_copy": serving_copy_b,
                "kv_cache_during_rollout": kv_b}
    base = actor_b + critic_b + serving_copy_b
    ici = CHIP_ICI[chip.name]
    phases: dict[str, dict] = {}
    fits = True
    for p in programs:
        live = base + (kv_b if p.phase == "rollout" else 0)
        p.peak_bytes = int(live - p.resident_in_args + p.argument_bytes + p.output_bytes - p.alias_bytes
                           + p.temp_bytes)
        t_flop = p.flops / chip.peak_flops  # HLO costs: loop trip counts already applied
        t_hbm = p.bytes_accessed / chip.hbm_bw
        t_ici = p.collective_bytes / ici
        p.roofline_s = max(t_flop, t_hbm, t_ici)
        p.bound = ("FLOPs", "HBM", "ICI")[[t_flop, t_hbm, t_ici].index(p.roofline_s)]
        ph = phases.setdefault(p.phase, {"peak_bytes": 0, "peak_program": "", "roofline_s": 0.0})
        if p.peak_bytes > ph["peak_bytes"]:
            ph["peak_bytes"], ph["peak_program"] = p.peak_bytes, p.name
        ph["roofline_s"] += p.roofline_s * p.calls_per_iteration
        if p.peak_bytes > chip.hbm_bytes:
            fits = False
            failures.append(f"program {p.name} does not fit: {p.peak_bytes / GIB:.2f} GiB per device at its peak "
                            f"> {chip.hbm_bytes / GIB:.2f} GiB HBM of a {chip.name} chip (short by "
                            f"{(p.peak_bytes - chip.hbm_bytes) / GIB:.2f} GiB)")
    iteration_s = sum(ph["roofline_s"] for ph in phases.values())

    from orz_jax.memory import Mesh3, per_device_memory
    mb = per_device_memory(cfg.model.arch, Mesh3(**mesh_shape), slots=slots, max_len=engine.max_len,
                           param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.dtype, processes=n_proc)
    mem_py_resident = {"actor_state": mb.actor_params + mb.actor_opt, "critic_state": mb.critic_params + mb.critic_opt,
                       "serving_params_copy": mb.rollout_weights, "kv_cache_during_rollout": mb.kv_cache}
    try:
        est = roofline_iteration(cfg.model.arch, chip, Mesh3(**mesh_shape), slots=slots,
                                 shape=RolloutShape(cfg.data.prompts_per_iter, cfg.rollout.n_samples_per_prompt,
                                                    cfg.rollout.max_prompt_len, cfg.rollout.max_response_len),
                                 compute_dtype=cfg.model.dtype, remat=cfg.model.remat != "none", processes=n_proc)
        mem_py = {"prefill_s": est.prefill_s, "decode_s": est.decode_s, "forward_s": est.forward_s,
                  "train_s": est.train_s, "total_s": est.total_s}
    except ValueError as e:
        mem_py = {"error": str(e)}

    return RunReport(
        config=config_name, topology=topo.name, num_slices=num_slices, devices=n_dev, processes=n_proc,
        mesh=mesh_shape, serving_mesh=serve_shape,
        chip={"name": chip.name, "peak_flops": chip.peak_flops, "hbm_bytes": chip.hbm_bytes, "hbm_bw": chip.hbm_bw,
              "ici_bw": ici, "source": chip.source},
        buffer=dataclasses.asdict(buf) | {"decode_waves_per_process": waves, "decode_steps": decode_steps},
        resident=resident, programs=[dataclasses.asdict(p) | {"collective_bytes": p.collective_bytes}
                                     for p in programs],
        phases=phases, iteration_roofline_s=iteration_s, memory_py_roofline=mem_py, memory_py_resident=mem_py_resident,
        total_compile_s=sum(p.compile_s for p in programs), fits=fits and not failures, failures=failures)


# ----------------------------------------------------------------------------------------------
# Printing and the command line
# ----------------------------------------------------------------------------------------------


def _g(b: float) -> str:
    return f"{b / GIB:8.2f}"


def _dur(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def format_report(r: RunReport) -> str:
    hbm = r.chip["hbm_bytes"]
    lines = [f"== {r.config} on {r.topology} x{r.num_slices} ({r.devices} devices, {r.processes} processes); "
             f"mesh data={r.mesh['data']} fsdp={r.mesh['fsdp']} tensor={r.mesh['tensor']}; serving mesh "
             f"data={r.serving_mesh['data']} fsdp={r.serving_mesh['fsdp']} tensor={r.serving_mesh['tensor']} ==",
             f"buffer: {r.buffer['samples']} samples, {r.buffer['rows']} rows x {r.buffer['pack_len']} tokens "
             f"(worst case: {r.buffer['per_row']} sample(s) per row); decode {r.buffer['decode_steps']} steps per "
             f"process ({r.buffer['decode_waves_per_process']} wave(s) x max_response_len)",
             "per device, GiB (memory_analysis); TFLOP / GB acc / coll GB: compiled HLO with loop trip counts "
             "applied (orz_jax.hlo_cost); model = 2N per token per pass + causal attention (x1 forward, x3 train, "
             "x4 train with remat); c/m = compiled / model; XLA = cost_analysis TFLOP, loop bodies once",
             f"{'program':22s} {'compile':>8s} {'args':>8s} {'out':>8s} {'alias':>8s} {'temp':>8s} {'peak':>8s} "
             f"{'TFLOP':>9s} {'model':>9s} {'c/m':>5s} {'XLA':>9s} {'GB acc':>9s} {'coll GB':>8s} {'roofline':>10s} "
             f"bound  collectives"]
    for p in r.programs:
        coll = ", ".join(f"{k} {v['count']}x {v['bytes'] / 1e6:.1f} MB" for k, v in sorted(p["collectives"].items()))
        mf = f"{p['model_flops'] / 1e12:9.3f}" if p["model_flops"] else f"{'-':>9s}"
        ratio = f"{p['flops'] / p['model_flops']:5.2f}" if p["model_flops"] else f"{'-':>5s}"
        xla = p["xla_cost_analysis_loop_bodies_once"].get("flops", 0.0)
        if p["unknown_loops"]:
            coll = f"[{len(p['unknown_loops'])} loop(s) of unknown count, x{p['unknown_trips']}] " + coll
        lines.append(
            f"{p['name']:22s} {p['compile_s']:7.1f}s {_g(p['argument_bytes'])} {_g(p['output_bytes'])} "
            f"{_g(p['alias_bytes'])} {_g(p['temp_bytes'])} {_g(p['peak_bytes'])} "
            f"{p['flops'] / 1e12:9.3f} {mf} {ratio} {xla / 1e12:9.3f} {p['bytes_accessed'] / 1e9:9.2f} "
            f"{p['collective_bytes'] / 1e9:8.2f} {_dur(p['roofline_s']):>10s} {p['bound']:5s}  {coll}")
    lines.append("resident per device (abstract shapes x shardings): " + ", ".join(
        f"{k} {v / GIB:.2f} GiB (memory.py {r.memory_py_resident[k] / GIB:.2f})" for k, v in r.resident.items()))
    lines.append(f"phases (peak per device vs {hbm / GIB:.2f} GiB HBM of a {r.chip['name']} chip; roofline per "
                 f"iteration at {r.chip['peak_flops'] / 1e12:.0f} TFLOP/s, {r.chip['hbm_bw'] / 1e9:.0f} GB/s HBM, "
                 f"{r.chip['ici_bw'] / 1e9:.0f} GB/s ICI per chip; {r.chip['source']}):")
    for name, ph in r.phases.items():
        lines.append(f"  {name:15s} peak {_g(ph['peak_bytes'])} GiB ({100 * ph['peak_bytes'] / hbm:5.1f}% of HBM, "
                     f"{ph['peak_program']})   roofline {_dur(ph['roofline_s'])}")
    lines.append(f"iteration roofline (compiled costs): {_dur(r.iteration_roofline_s)};  python -m orz_jax.memory "
                 f"estimate: " + (_dur(r.memory_py_roofline['total_s']) if 'total_s' in r.memory_py_roofline
                                  else r.memory_py_roofline.get('error', '?')))
    lines.append(f"total compile time {r.total_compile_s:.1f} s; " + ("fits" if r.fits else "DOES NOT FIT / FAILED"))
    lines += [f"error: {f}" for f in r.failures]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orz_jax.compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--topology", required=True, help="v5p-32, v5e-16, v6e-8 or raw v5p:2x2x4")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--rows", type=int, default=None, help="packed rows of the buffer (default: the worst case)")
    p.add_argument("--programs", default=None, help="comma-separated name prefixes to compile (default: all)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        topo = parse_topology(args.topology)
        if args.num_slices < 1:
            raise ValueError(f"--num-slices must be >= 1, got {args.num_slices}")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = compile_run(cfg, topo, args.num_slices, rows=args.rows,
                             only=args.programs.split(",") if args.programs else None, config_name=args.config,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(report) | {"command": " ".join(["python -m orz_jax.compile", *(argv or sys.argv[1:])])},
                      f, indent=1)
    return 0 if report.fits else 1


if __name__ == "__main__":
    sys.exit(main())
