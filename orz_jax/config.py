"""Typed experiment configuration: dataclasses loaded from YAML, with ``key.sub=value`` overrides.

Every number the code uses comes from here. Loading is strict: an unknown key, a value of the wrong
type, or a value outside its allowed range raises :class:`ConfigError` naming the dotted key, before
any device work starts.

    cfg = load_config("configs/orz_0p5b.yaml", ["ppo.actor.lr=2e-6", "rollout.temperature=0.7"])
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


DEFAULT_ATTENTION_BLOCK = 256  # ModelConfig.attention_block; fastest of 64-512 for 2048-token rows on a CPU
SPLASH_BLOCK = 512  # ModelConfig.splash_block_*: MaxText's default splash tiles
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")
DECODE_ATTENTION_IMPLS = ("auto", "xla", "pallas")  # model.decode_attention_impl
DECODE_BLOCK_KV = 512  # model.decode_block_kv (see there)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ArchConfig:
    """Decoder architecture (Qwen2 / Llama family). For pretrained models these numbers are read
    from the checkpoint's config.json; a YAML ``model.arch`` block is for random init and for
    shape-only (``jax.eval_shape``) checks of full-size models."""

    architecture: Literal["qwen2", "llama"] = "qwen2"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}); None = plain RoPE.
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v projections carry a bias (Qwen2: yes, Llama: no)
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    # A local Hugging Face directory (config.json + *.safetensors + tokenizer files), the name of a
    # bundled model ("smollm2-135m"), "demo" (the built-in demo model, pretrained on first use), a Hugging
    # Face hub id "namespace/name[@revision]" that is not a local path (fetched into the HF cache), or
    # None for random init from ``arch``.
    checkpoint: Optional[str] = None
    arch: Optional[ArchConfig] = None
    tokenizer: Optional[str] = None  # tokenizer.json / .model path or directory; None: the checkpoint's
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    remat: Literal["none", "full", "dots"] = "none"
    # Megatron-style sequence parallelism of the full-row (training / scoring) path: between the attention and
    # MLP sublayers the residual stream [batch, seq, embed] is split along seq over the ``tensor`` mesh axis (the
    # rules table's ``act_seq``), not replicated on every tensor device. The norms run on a quarter of the row (at
    # tensor 4), each sublayer gathers its normalised input, and what remat keeps per layer, the layer's input, is
    # 1/tensor as large (7B on v5p-32: 3.06 -> 0.77 GiB per device for a 16,384-token row). Cost: expressed as
    # sharding constraints, XLA keeps the sublayers' all-reduce and adds the gathers (7B actor step: +62 TB of
    # all-gather per device, docs/tpu/README.md). Decode / prefill with a KV cache are unchanged. No effect
    # without a tensor axis > 1. Default off; configs/orz_7b.yaml sets it.
    sequence_parallel: bool = False
    # Positions per chunk of the MLP's backward pass on full rows (orz_jax/models/mlp.py): its [batch, seq, mlp]
    # activations then exist for one chunk at a time, with the same FLOPs under remat (7B, 16,384-token rows:
    # ~6 x 148 MiB -> 6 x 37 MiB per device at 4096). 0: whole rows. Rows it does not divide run whole.
    mlp_chunk: int = 0
    # Keep the layer inputs that remat saves in host memory, not in device memory: each goes to the host as its
    # layer runs forward and comes back just before its layer's backward (the in-place layer scan,
    # orz_jax/models/layer_scan.py; needs ppo.grad_accumulation: in_place). 7B on v5p-32: the actor step's
    # temporaries 1.4 GiB lower, for 2 x 28 x 28 MiB of host transfers per device per micro-batch (3.4 TB per
    # actor step). Default off.
    remat_offload: bool = False
    # Std of the critic's freshly initialised value head (0: zeros). "auto": ORZ's 1 / (hidden_size + 1)
    # (its critic is the base model plus a new head; the ORZ configs use it). See models/build.py.
    critic_head_init_std: Union[float, Literal["auto"]] = 0.0
    # Start from the latest checkpoint of another run (its run directory, or its checkpoint directory): the
    # policy and critic parameters only, with a fresh optimizer, data order and iteration count (ORZ-32B's
    # annealing stage). The model's architecture and tokenizer still come from model.checkpoint. A run
    # that has checkpoints of its own resumes from those instead.
    init_from_run: Optional[str] = None
    # Training / scoring attention (the full-row path; decode: model.decode_attention_impl). "xla": XLA ops in causal
    # blocks of attention_block (the [q, k] scores are materialised; the reference every kernel is tested
    # against). "splash": the Pallas splash-attention kernel (TPU only). "cudnn": cuDNN's fused attention via
    # jax.nn.dot_product_attention (GPU only). "auto": splash on a TPU mesh, cudnn on a GPU mesh, xla on a CPU,
    # decided by the platform of the mesh's devices (orz_jax/models/attention.py).
    attention_impl: Literal["auto", "xla", "splash", "cudnn"] = "auto"
    # Splash tiles (query rows x key columns per grid step; the backward kernels use the same tiles). 512 is
    # MaxText's default for every splash block (base.yml sa_block_*); the kernel needs multiples of 128 (the TPU
    # lane width). A block larger than the row is cut to the row length; the row length must divide by each.
    splash_block_q: int = SPLASH_BLOCK
    splash_block_kv: int = SPLASH_BLOCK
    splash_block_kv_compute: int = SPLASH_BLOCK  # key columns per inner matmul; divides splash_block_kv
    # Training / scoring attention runs in causal query blocks of this many tokens, each against only the
    # keys at or before its end: the same numbers as one dense block, about half the score FLOPs and bytes
    # on long rows (2048-token rows on a CPU: 2.0x faster updates). 0: one dense [q, k] block. Compile time
    # grows with the number of blocks per row: keep rows / block small (the ORZ configs use 2048 for 16384).
    attention_block: int = DEFAULT_ATTENTION_BLOCK
    # Decode attention (the KV-cache step, one new token per slot). "pallas": a Pallas kernel that reads only each
    # slot's live KV blocks: on a TPU orz_jax/models/decode_attention.py (Mosaic), on a GPU
    # orz_jax/models/gpu_decode_attention.py (Triton; tested in interpret mode only, never compiled on a GPU yet:
    # "xla" is the fallback). "xla": folded_attention over the decode window, so every slot reads the longest live
    # slot's window (the reference, and the CPU path). "auto": pallas on a TPU or GPU mesh, xla on a CPU. Prefill
    # (many tokens per row) always takes the XLA path.
    decode_attention_impl: Literal["auto", "xla", "pallas"] = "auto"
    # KV positions per kernel block (a multiple of 128: the score tile's lane dim). A slot reads its live positions
    # rounded up to a block, and each window block is a grid step (a fixed cost per step, however little it moves):
    # 512 = rollout.decode_window_block's default, so each window is whole blocks and a slot over-reads < 512
    # positions (a few % of ORZ's multi-thousand-token responses) while a 10k-position window is 20 steps per slot
    # group. Untimed on a TPU: the trade-off above is by construction, not measured.
    decode_block_kv: int = DECODE_BLOCK_KV


@dataclass
class MeshConfig:
    """Device mesh. Sizes multiply to the device count; one axis may be -1 ("the rest")."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class RolloutConfig:
    driver: Literal["orchestrator", "batched"] = "batched"
    n_samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_prompt_len: int = 128
    max_response_len: int = 128
    prefill_buckets: list[int] = field(default_factory=lambda: [32, 64, 128])
    max_concurrent_decodes: int = 32  # decode slots in the KV cache
    stop_strings: list[str] = field(default_factory=lambda: ["</answer>"])
    # Prompts longer than max_prompt_len: drop them (counted), keep their last tokens, or fail.
    long_prompt: Literal["filter", "left_truncate", "error"] = "filter"
    # Batched driver: decode steps per device call between host checks for finished samples / stop strings.
    check_every: int = 8
    # Decode reads the KV cache only up to a window holding every live slot: windows are this many positions
    # x 1, 2, 4, ... up to the cache length (each compiles once). 512: a few programs for ORZ's 10k-position
    # cache (<= 5) while a step reads under 2x the live KV; 0 reads the whole cache every step.
    decode_window_block: int = 512
    # How the engine's serving copy holds the decoder layers. "stacked": one [layers, ...] array per weight, read
    # by the layer scan (compile time does not grow with depth). "per_layer": one array per layer, read by an
    # unrolled loop: XLA:CPU (and XLA:GPU without dynamic-slice fusion, openxla/xla #43831) copies each layer's
    # slice of a stacked weight before its matmul, so a memory-bound decode step moved the weights three times
    # (read, write, read: Qwen2.5-0.5B decode on a CPU ran 1.6-2.2x slower, docs/bench). The TPU compiler reads
    # the slice in place (decode bytes ~ weights + KV, docs/tpu). "auto": stacked on TPU, per_layer elsewhere.
    serving_layers: Literal["auto", "stacked", "per_layer"] = "auto"
    # Orchestrator driver: give up (a clear error naming what was outstanding) when no token has been generated
    # and no request prefilled for this many seconds: a stuck request or thread. Covers first-call compiles.
    timeout_s: float = 1800.0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 50
    # After warmup: "constant" at lr, or "linear" / "cosine" decay from lr to final_lr over decay_steps
    # optimizer steps (then final_lr). Steps count optimizer steps (ppo.*_steps_per_batch per iteration),
    # kept in the optimizer state, so a resumed run continues where it was.
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    final_lr: float = 0.0
    decay_steps: int = 0


@dataclass
class PPOConfig:
    # "grpo": group mean and std; "grpo_mean_only": ORZ's own GRPO baseline, which only subtracts the group
    # mean (its code never divides by the std: an operator-precedence slip). See ppo/advantages.py.
    advantage_estimator: Literal["gae", "grpo", "grpo_mean_only"] = "gae"
    gamma: float = 1.0
    lam: float = 1.0
    normalize_advantages: bool = True  # global mean/std over every valid token of the buffer
    clip_eps: float = 0.2
    value_clip: Optional[float] = 0.2  # None: unclipped value loss
    kl_coef: float = 0.0  # ORZ: no KL; non-zero only for ablations
    kl_estimator: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0
    actor: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    critic: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6))
    actor_steps_per_batch: int = 1  # optimizer steps per rollout buffer (ORZ: 1)
    critic_steps_per_batch: int = 12  # ORZ: 12
    micro_batch_rows: int = 8  # packed rows per micro-batch (gradient accumulation)
    pack_len: int = 512  # tokens per packed row
    # Token log-probs (actor loss, old log-probs) apply the LM head this many positions at a time, so no
    # [rows, pack_len, vocab] logits tensor exists (forward or backward); >= pack_len: one chunk.
    logprob_chunk: int = 1024
    # Report actor/entropy (costs one extra pass over each logits chunk). Computed anyway when entropy_coef > 0.
    entropy_metric: bool = True
    # How micro-batch gradients are summed. "add": each micro-batch's gradient is computed whole, then added to the
    # float32 accumulator (two float32 copies of the gradient live at once). "in_place": the decoder layers'
    # backward pass adds each layer's gradient straight into the accumulator (orz_jax/models/layer_scan.py), so
    # the stacked layers' gradient exists once (7B on v5p-32: 1.63 GiB less per device). The same sums in the same
    # order; needs model.remat: full (it recomputes every layer in the backward pass) and float32 parameters.
    grad_accumulation: Literal["add", "in_place"] = "add"
    # How the actor's and critic's train states hold the decoder layers. "stacked": [layers, ...] arrays, run by the
    # layer scan. "per_layer": one array per layer (parameters and optimizer moments), run by an unrolled layer loop
    # (compile time grows with depth). XLA:CPU copies a layer's slice of a stacked weight out of the stack before its
    # matmul, in every micro-batch's forward and backward pass: with short micro-batches that copy cost more than
    # the matmuls (Qwen2.5-0.5B, 24-token rows: the CPU e2e bench iteration 1.20x slower than with the per-layer
    # modules before issue 14, docs/bench), and splitting the stack once per step still paid a copy per program.
    # Checkpoints, exports and TrainState.module() hold the stacked layout in both cases, so a run can resume on
    # another platform. "auto": per_layer on CPU, stacked on TPU (its compiler reads the slice in place) and GPU (a
    # slice copy is small next to a real micro-batch's matmuls), and stacked with grad_accumulation: in_place
    # (which scans the stacked layers).
    train_layers: Literal["auto", "stacked", "per_layer"] = "auto"


@dataclass
class DataFileConfig:
    path: str = ""
    weight: float = 1.0


@dataclass
class SyntheticTaskConfig:
    """Built-in verifiable arithmetic task (no files needed)."""

    num_train: int = 20000
    num_eval: int = 200
    min_ops: int = 1
    max_ops: int = 2
    max_operand: int = 20
    ops: str = "+-*"  # operators to draw from (a subset of "+-*")
    seed: int = 0


@dataclass
class DataConfig:
    source: Literal["synthetic", "files"] = "synthetic"
    # Where bare file names (no directory part) in data.train_files[].path and eval.files are looked up; paths
    # with a directory part are used as written. `python -m orz_jax.data download --dest data/orz` fills it.
    dir: str = "data/orz"
    train_files: list[DataFileConfig] = field(default_factory=list)
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    prompts_per_iter: int = 8  # global; each JAX process gets prompts_per_iter // process_count
    shuffle_seed: int = 0
    num_epochs: Optional[int] = None  # None: repeat forever
    on_bad_record: Literal["error", "skip"] = "error"
    template: Literal["orz", "orz_paraphrase", "plain", "compact", "fewshot"] = "orz"

    def resolve(self, path: str) -> str:
        """A data file as configured -> the path to open: bare names live in ``dir`` ("x.json" ->
        "data/orz/x.json"); "synthetic" and paths with a directory part ("./x.json", "runs/a/x.json") stay."""
        if path == "synthetic" or os.path.dirname(path):
            return path
        return os.path.join(self.dir, path)


@dataclass
class RewardConfig:
    """Rule-based reward (``orz_jax/reward``): 1 for a correct boxed answer in a response that stopped."""

    # How the answer is read (orz_jax/reward/extract.py): "orz" as ORZ's code (a closed <answer>...</answer>
    # holding \boxed{}; the ORZ configs), "lenient" (an unclosed last <answer> and "\boxed {" count too).
    extraction: Literal["orz", "lenient"] = "lenient"
    timeout_s: float = 5.0  # per math-verify check (parse reference + parse answer + verify); over it: 0
    num_workers: int = 2  # math-verify worker processes
    # A worker that has not answered timeout_s + this many seconds after starting a check is stuck in code a
    # signal cannot interrupt: it is killed and replaced.
    kill_grace_s: float = 2.0
    soft_timeout: bool = True  # interrupt a check inside the worker (SIGALRM) instead of killing the worker
    worker_memory_mb: int = 4096  # address-space limit per worker (0: none); sympy can build huge integers
    worker_start_timeout_s: float = 120.0  # importing sympy + math-verify in a fresh worker
    chunk_size: int = 16  # checks sent to a worker per message
    fast_checks: bool = True  # exact / normalised-string / numeric checks before math-verify
    float_rounding: int = 6  # math_verify.verify(float_rounding=...)
    numeric_precision: int = 15  # math_verify.verify(numeric_precision=...)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: <experiment.out_dir>/checkpoints
    save_every: int = 50
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    export_hf_at_end: bool = True


@dataclass
class EvalConfig:
    every: int = 10
    files: list[str] = field(default_factory=list)  # empty + synthetic data: the synthetic eval split
    n_samples: int = 1
    temperature: float = 1.0
    max_prompts: Optional[int] = None


@dataclass
class DemoConfig:
    """The built-in demo base model (``model.checkpoint: demo``): a small char-level decoder that
    the project pretrains itself on the synthetic task, cached on disk after the first run.

    Pretraining targets always hold the true answer, but only a ``boxed_prob`` share of them writes
    it as ``\\boxed{}`` inside ``<answer>`` (the form the rule-based reward reads); the rest write it
    bare. The base model thus 'knows' the arithmetic but rarely answers in a gradable way: the
    situation ORZ starts from, where the format emerges from the correctness reward alone."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    boxed_prob: float = 0.5
    seed: int = 0
    cache_dir: Optional[str] = None  # None: $ORZ_JAX_CACHE or ~/.cache/orz_jax


@dataclass
class ExperimentConfig:
    name: str = "demo"
    seed: int = 0
    out_dir: str = "runs/demo"
    num_iterations: int = 20
    tensorboard: bool = True
    progress_bar: bool = True
    # Rollout dumps to <out_dir>/rollouts/ (orz_jax/rollout_dump.py, read by python -m orz_jax.inspect): every
    # this many iterations (null: num_iterations // 4; 0: off), plus the first, the last and every eval iteration.
    dump_rollouts_every: Optional[int] = None
    dump_rollouts_samples: int = 8  # per dump: best, worst, median by advantage, then random ones


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-6' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known keys here: {sorted(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any, cls: type) -> None:
    """Set ``tree[path] = value``, checking every path element against the dataclass schema."""
    node, node_cls = tree, cls
    for i, part in enumerate(path):
        dotted = ".".join(path[: i + 1])
        if node_cls is None or not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"unknown config key '{dotted}'")
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in fields:
            raise ConfigError(f"unknown config key '{dotted}' (known keys here: {sorted(fields)})")
        if i == len(path) - 1:
            node[part] = value
            return
        hint = typing.get_type_hints(node_cls)[part]
        sub_cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, node_cls = node[part], sub_cls


def _merge(base: dict, over: dict) -> dict:
    """``over`` laid on ``base``: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """One config file as a dict. A top-level ``base: other.yaml`` (relative to this file) is read first and this
    file's keys are laid over it, so a variant states only what differs (e.g. configs/orz_32b_anneal.yaml)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of another config file, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    if base_path in _seen:
        raise ConfigError(f"{path}: base: {base} makes a cycle ({' -> '.join(_seen + (base_path,))})")
    try:
        return _merge(_read_yaml(base_path, _seen + (os.path.normpath(path),)), data)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load ``path`` (YAML; None: the built-in defaults), apply overrides, validate, return Config."""
    data: dict = _read_yaml(path) if path is not None else {}
    for text in overrides or []:
        keys, value = _parse_override(text)
        _set_path(data, keys, value, Config)
    try:
        cfg = _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float in the config must be a finite number: YAML reads ``inf`` / ``.nan`` as floats, and an
    infinite learning rate or timeout would otherwise pass every range check below."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite(v, f"{prefix}[{i}]")
    elif isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{prefix}.{k}")
    elif isinstance(node, float):
        _check(math.isfinite(node), prefix, f"must be a finite number, got {node}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that need more than the type. Raises ConfigError naming the key."""
    _check_finite(cfg)
    m = cfg.model
    if m.arch is not None:
        a = m.arch
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(getattr(a, name) > 0, f"model.arch.{name}", "must be > 0")
        _check(a.num_heads % a.num_kv_heads == 0, "model.arch.num_kv_heads",
               f"num_heads={a.num_heads} must be a multiple of num_kv_heads={a.num_kv_heads}")
        _check(a.head_dim is not None or a.hidden_size % a.num_heads == 0, "model.arch.head_dim",
               "hidden_size must divide by num_heads when head_dim is not given")
        _check(a.head_dim is None or a.head_dim > 0, "model.arch.head_dim", "must be > 0 or null")
        _check(a.rope_theta > 0, "model.arch.rope_theta", "must be > 0")
        _check(a.rms_norm_eps > 0, "model.arch.rms_norm_eps", "must be > 0")
        _check(a.max_position_embeddings > 0, "model.arch.max_position_embeddings", "must be > 0")
        _check(a.initializer_range >= 0, "model.arch.initializer_range", "must be >= 0")
    for key in ("splash_block_q", "splash_block_kv", "splash_block_kv_compute"):
        v = getattr(m, key)
        _check(v >= 128 and v % 128 == 0, f"model.{key}", f"must be a multiple of 128 (the TPU lane width), got {v}")
    _check(m.splash_block_kv % m.splash_block_kv_compute == 0, "model.splash_block_kv_compute",
           f"{m.splash_block_kv_compute} must divide model.splash_block_kv={m.splash_block_kv}")
    _check(m.decode_attention_impl in DECODE_ATTENTION_IMPLS, "model.decode_attention_impl",
           f"must be one of {DECODE_ATTENTION_IMPLS}, got {m.decode_attention_impl!r}")
    _check(m.decode_block_kv >= 128 and m.decode_block_kv % 128 == 0, "model.decode_block_kv",
           f"must be a multiple of 128 (the TPU lane width), got {m.decode_block_kv}")
    if m.attention_impl == "splash":
        _check(splash_blocks(splash_tiles(m), cfg.ppo.pack_len) is not None, "ppo.pack_len",
               splash_blocks_problem(splash_tiles(m), cfg.ppo.pack_len, "ppo.pack_len"))
    _check(m.mlp_chunk >= 0, "model.mlp_chunk", f"must be >= 0 (positions per MLP backward chunk; 0: whole rows), "
           f"got {m.mlp_chunk}")
    _check(m.critic_head_init_std == "auto" or m.critic_head_init_std >= 0, "model.critic_head_init_std",
           f"must be >= 0 or 'auto' (1 / (hidden_size + 1), as ORZ), got {m.critic_head_init_std}")
    _check(m.init_from_run is None or bool(m.init_from_run), "model.init_from_run",
           "must be a run directory or null")
    _check(m.attention_block >= 0, "model.attention_block", f"must be >= 0 (0 = dense), got {m.attention_block}")
    _check(m.checkpoint is not None or m.arch is not None, "model.checkpoint",
           "set a checkpoint directory, a Hugging Face hub id (or 'demo' / 'smollm2-135m') or a model.arch "
           "block for random init")
    for axis in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, axis)
        _check(v == -1 or v >= 1, f"mesh.{axis}", f"must be >= 1 or -1 (the rest), got {v}")
    _check([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1, "mesh", "at most one axis may be -1")

    r = cfg.rollout
    _check(r.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt", "must be >= 1")
    _check(r.temperature >= 0, "rollout.temperature", "must be >= 0 (0 = greedy)")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _check(r.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)")
    _check(r.max_prompt_len > 0 and r.max_response_len > 0, "rollout.max_response_len", "lengths must be > 0")
    _check(len(r.prefill_buckets) > 0 and sorted(r.prefill_buckets) == r.prefill_buckets,
           "rollout.prefill_buckets", "must be a non-empty ascending list")
    _check(r.prefill_buckets[-1] >= r.max_prompt_len, "rollout.prefill_buckets",
           f"largest bucket {r.prefill_buckets[-1]} must be >= rollout.max_prompt_len={r.max_prompt_len}")
    _check(r.max_concurrent_decodes >= 1, "rollout.max_concurrent_decodes", "must be >= 1")
    _check(r.check_every >= 1, "rollout.check_every", "must be >= 1")
    _check(r.decode_window_block >= 0, "rollout.decode_window_block", "must be >= 0 (0: no window)")
    _check(0 < r.timeout_s < float("inf"), "rollout.timeout_s", "must be a number of seconds > 0")

    p = cfg.ppo
    _check(0 <= p.gamma <= 1, "ppo.gamma", "must be in [0, 1]")
    _check(0 <= p.lam <= 1, "ppo.lam", "must be in [0, 1]")
    _check(p.clip_eps > 0, "ppo.clip_eps", "must be > 0")
    _check(p.value_clip is None or p.value_clip > 0, "ppo.value_clip", "must be > 0 or null")
    _check(p.kl_coef >= 0, "ppo.kl_coef", "must be >= 0")
    _check(p.entropy_coef >= 0, "ppo.entropy_coef", "must be >= 0")
    for who in ("actor", "critic"):
        o = getattr(p, who)
        _check(o.lr > 0, f"ppo.{who}.lr", "must be > 0")
        _check(0 <= o.b1 < 1, f"ppo.{who}.b1", "must be in [0, 1)")
        _check(0 <= o.b2 < 1, f"ppo.{who}.b2", "must be in [0, 1)")
        _check(o.eps > 0, f"ppo.{who}.eps", "must be > 0")
        _check(o.weight_decay >= 0, f"ppo.{who}.weight_decay", "must be >= 0")
        _check(o.grad_clip > 0, f"ppo.{who}.grad_clip", "must be > 0")
        _check(o.warmup_steps >= 0, f"ppo.{who}.warmup_steps", "must be >= 0")
        if o.schedule != "constant":
            _check(o.decay_steps >= 1, f"ppo.{who}.decay_steps",
                   f"must be >= 1 with schedule={o.schedule!r} (optimizer steps from lr to final_lr), got {o.decay_steps}")
            _check(0 <= o.final_lr <= o.lr, f"ppo.{who}.final_lr",
                   f"must be in [0, lr={o.lr}] with schedule={o.schedule!r}, got {o.final_lr}")
    _check(p.actor_steps_per_batch >= 1, "ppo.actor_steps_per_batch", "must be >= 1")
    _check(p.critic_steps_per_batch >= 0, "ppo.critic_steps_per_batch", "must be >= 0")
    _check(p.micro_batch_rows >= 1, "ppo.micro_batch_rows", "must be >= 1")
    _check(p.logprob_chunk >= 1, "ppo.logprob_chunk", "must be >= 1 (positions per LM-head chunk)")
    if p.grad_accumulation == "in_place":
        _check(m.remat == "full", "ppo.grad_accumulation",
               f"'in_place' recomputes every layer in the backward pass: it needs model.remat: full, got {m.remat!r}")
        _check(m.param_dtype == "float32", "ppo.grad_accumulation",
               f"'in_place' adds into the float32 accumulator through the parameters' own gradient: it needs "
               f"model.param_dtype: float32, got {m.param_dtype!r}")
    _check(p.train_layers in ("auto", "stacked", "per_layer"), "ppo.train_layers",
           f"must be one of ('auto', 'stacked', 'per_layer'), got {p.train_layers!r}")
    _check(not (p.train_layers == "per_layer" and p.grad_accumulation == "in_place"), "ppo.train_layers",
           "'per_layer' cannot run with ppo.grad_accumulation: in_place (the in-place sum scans the stacked layers); "
           "use 'auto' or 'stacked'")
    _check(not m.remat_offload or p.grad_accumulation == "in_place", "model.remat_offload",
           "the saved layer inputs go to the host in the in-place layer scan: it needs ppo.grad_accumulation: "
           f"in_place, got {p.grad_accumulation!r}")
    _check(p.pack_len >= r.max_prompt_len + r.max_response_len, "ppo.pack_len",
           f"must hold one whole sample: >= rollout.max_prompt_len + rollout.max_response_len "
           f"= {r.max_prompt_len + r.max_response_len}, got {p.pack_len}")

    d = cfg.data
    _check(bool(d.dir), "data.dir", "must be a directory (where bare data file names are looked up)")
    _check(d.prompts_per_iter >= 1, "data.prompts_per_iter", "must be >= 1")
    _check(d.num_epochs is None or d.num_epochs >= 1, "data.num_epochs", "must be >= 1 or null (forever)")
    if d.source == "files":
        _check(len(d.train_files) > 0, "data.train_files", "data.source is 'files' but no train_files are given")
        for i, f in enumerate(d.train_files):
            _check(bool(f.path), f"data.train_files[{i}].path", "must be set")
            _check(f.weight > 0, f"data.train_files[{i}].weight", "must be > 0")
    s = d.synthetic
    _check(1 <= s.min_ops <= s.max_ops, "data.synthetic.max_ops", "need 1 <= min_ops <= max_ops")
    _check(s.max_operand >= 1, "data.synthetic.max_operand", "must be >= 1")
    _check(s.num_train >= 1, "data.synthetic.num_train", "must be >= 1")
    _check(s.num_eval >= 1, "data.synthetic.num_eval", "must be >= 1")
    _check(len(s.ops) > 0 and set(s.ops) <= set("+-*") and len(set(s.ops)) == len(s.ops), "data.synthetic.ops",
           f"must be distinct operators from '+-*', got {s.ops!r}")

    validate_reward(cfg.reward)
    _check(cfg.checkpoint.save_every >= 1, "checkpoint.save_every", "must be >= 1")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.eval.every >= 0, "eval.every", "must be >= 0 (0 = never)")
    _check(cfg.eval.n_samples >= 1, "eval.n_samples", "must be >= 1")
    _check(cfg.eval.temperature >= 0, "eval.temperature", "must be >= 0 (0 = greedy)")
    _check(cfg.eval.max_prompts is None or cfg.eval.max_prompts >= 1, "eval.max_prompts",
           f"must be >= 1 or null (all prompts), got {cfg.eval.max_prompts}")
    _check(cfg.experiment.num_iterations >= 0, "experiment.num_iterations", "must be >= 0")
    _check(cfg.experiment.dump_rollouts_every is None or cfg.experiment.dump_rollouts_every >= 0,
           "experiment.dump_rollouts_every", "must be >= 0 (0 = no dumps) or null (about four per run)")
    _check(cfg.experiment.dump_rollouts_samples >= 0, "experiment.dump_rollouts_samples", "must be >= 0")
    _check(0 < cfg.demo.boxed_prob <= 1, "demo.boxed_prob", "must be in (0, 1]")
    _check(cfg.demo.steps >= 1, "demo.steps", "must be >= 1")
    _check(cfg.demo.batch_size >= 1, "demo.batch_size", "must be >= 1")
    _check(cfg.demo.lr > 0, "demo.lr", "must be > 0")
    _check(cfg.demo.warmup_steps >= 0, "demo.warmup_steps", "must be >= 0")
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _check(getattr(cfg.demo, name) >= 1, f"demo.{name}", "must be >= 1")
    _check(cfg.demo.num_heads % cfg.demo.num_kv_heads == 0, "demo.num_kv_heads",
           f"num_heads={cfg.demo.num_heads} must be a multiple of num_kv_heads={cfg.demo.num_kv_heads}")


def validate_reward(rw: RewardConfig) -> None:
    """Range checks of the ``reward`` section (also used by ``python -m orz_jax.reward``)."""
    _check_finite(rw, "reward")
    _check(rw.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _check(rw.num_workers >= 1, "reward.num_workers", "must be >= 1")
    _check(rw.kill_grace_s > 0, "reward.kill_grace_s", "must be > 0")
    _check(rw.worker_memory_mb >= 0, "reward.worker_memory_mb", "must be >= 0 (0 = no limit)")
    _check(rw.worker_start_timeout_s > 0, "reward.worker_start_timeout_s", "must be > 0")
    _check(rw.chunk_size >= 1, "reward.chunk_size", "must be >= 1")
    _check(rw.float_rounding >= 0, "reward.float_rounding", "must be >= 0")
    _check(rw.numeric_precision >= 1, "reward.numeric_precision", "must be >= 1")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Checks against the device mesh: config arithmetic that needs only the device count, run at start-up
# (``orz_jax.trainer.check_inputs``) and by ``python -m orz_jax.compile``, before any rollout.
# ----------------------------------------------------------------------------------------------


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """{data, fsdp, tensor} sizes for ``n_devices`` devices (the one -1 axis takes the rest), or ConfigError
    naming ``mesh``. The same arithmetic as ``orz_jax.sharding.make_mesh``, without any device."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    known = 1
    for v in sizes.values():
        known *= v if v != -1 else 1
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        _check(n_devices % known == 0, f"mesh.{free[0]}",
               f"{n_devices} devices cannot be split with data={mesh.data}, fsdp={mesh.fsdp}, tensor={mesh.tensor} "
               f"({n_devices} is not divisible by {known})")
        sizes[free[0]] = n_devices // known
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    _check(total == n_devices, "mesh", f"data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} "
           f"= {total} devices, but the slice has {n_devices}")
    return sizes


def serving_mesh_shape(cfg: Config, mesh_shape: dict[str, int], local_devices: int, num_processes: int = 1
                       ) -> dict[str, int]:
    """The rollout engine's mesh sizes: the training mesh with one process; with several, the process's own
    devices: tensor = gcd(mesh.tensor, local devices), the rest on fsdp (as ``orz_jax.multihost.serving_mesh``)."""
    if num_processes <= 1:
        return dict(mesh_shape)
    t = math.gcd(cfg.mesh.tensor, local_devices) if cfg.mesh.tensor > 0 else 1
    return {"data": 1, "fsdp": local_devices // t, "tensor": t}


def check_against_mesh(cfg: Config, mesh_shape: dict[str, int], num_processes: int = 1,
                       local_devices: Optional[int] = None) -> None:
    """Everything config arithmetic can decide about ``cfg`` on a mesh of ``mesh_shape`` ({data, fsdp,
    tensor}) before the first rollout. Raises ConfigError (one line, naming the key) on the first problem.

    num_processes / local_devices: JAX processes (hosts) and devices per process; with several processes the
    rollout engine serves from each process's own devices (``orz_jax.multihost``)."""
    data, fsdp, tensor = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
    n_dev = data * fsdp * tensor
    local_devices = n_dev // num_processes if local_devices is None else local_devices
    shards = data * fsdp  # the logical "batch" / "slots" axes (orz_jax/sharding.py)
    where = f"the mesh data={data} x fsdp={fsdp} x tensor={tensor} ({n_dev} devices)"
    p, r = cfg.ppo, cfg.rollout

    # Parameters: every dimension the rules table shards must divide over its mesh axis.
    a = cfg.model.arch
    if a is not None:
        for key, size, axis, n in (("model.arch.hidden_size", a.hidden_size, "fsdp", fsdp),
                                   ("model.arch.vocab_size", a.vocab_size, "tensor", tensor),
                                   ("model.arch.intermediate_size", a.intermediate_size, "tensor", tensor),
                                   ("model.arch.num_heads", a.num_heads, "tensor", tensor),
                                   ("model.arch.num_kv_heads", a.num_kv_heads, "tensor", tensor)):
            _check(size % n == 0, key, f"{size} does not divide over mesh axis {axis}={n} of {where}")

    # PPO: every micro-batch is split over the batch shards (ppo/train.py _check_rows, which otherwise
    # raises only when the first update is traced, i.e. after a whole rollout).
    _check(p.micro_batch_rows % shards == 0, "ppo.micro_batch_rows",
           f"{p.micro_batch_rows} rows per micro-batch do not divide over the {shards} batch shards (data x fsdp) "
           f"of {where}; use a multiple of {shards}")
    samples = cfg.data.prompts_per_iter * r.n_samples_per_prompt
    for key, steps in (("ppo.actor_steps_per_batch", p.actor_steps_per_batch),
                       ("ppo.critic_steps_per_batch", p.critic_steps_per_batch)):
        _check(steps <= samples, key, f"{steps} optimizer steps per buffer exceed its {samples} samples "
               f"(data.prompts_per_iter x rollout.n_samples_per_prompt): some steps would see only padding")

    # Rollouts: decode slots are split over the serving mesh's batch shards, prompts over the processes.
    serve = serving_mesh_shape(cfg, mesh_shape, local_devices, num_processes)
    slot_shards = serve["data"] * serve["fsdp"]
    _check(r.max_concurrent_decodes % slot_shards == 0, "rollout.max_concurrent_decodes",
           f"{r.max_concurrent_decodes} decode slots do not divide over the {slot_shards} slot shards (data x fsdp) "
           f"of the serving mesh data={serve['data']} x fsdp={serve['fsdp']} x tensor={serve['tensor']}")
    if a is not None:
        _check(a.num_kv_heads % serve["tensor"] == 0, "model.arch.num_kv_heads",
               f"{a.num_kv_heads} KV heads do not divide over the serving mesh's tensor={serve['tensor']}")
    _check(cfg.data.prompts_per_iter % num_processes == 0, "data.prompts_per_iter",
           f"{cfg.data.prompts_per_iter} prompts do not divide over the {num_processes} processes")


# ----------------------------------------------------------------------------------------------
# Attention implementation: ``model.attention_impl`` against the platform of the mesh's devices.
# ----------------------------------------------------------------------------------------------


def splash_tiles(m: ModelConfig) -> tuple[int, int, int]:
    """(model.splash_block_q, model.splash_block_kv, model.splash_block_kv_compute)."""
    return m.splash_block_q, m.splash_block_kv, m.splash_block_kv_compute


def splash_blocks(tiles: tuple[int, int, int], seq: int) -> Optional[tuple[int, int, int]]:
    """(block_q, block_kv, block_kv_compute) of the splash kernel for rows of ``seq`` tokens, from the configured
    ``tiles`` (:func:`splash_tiles`): each cut to ``seq`` when larger; None when ``seq`` does not divide by them
    (or a cut block is not a multiple of 128)."""
    q, kv = min(tiles[0], seq), min(tiles[1], seq)
    kvc = min(tiles[2], kv)
    if seq % q or seq % kv or kv % kvc or kvc % 128 or q % 128:
        return None
    return q, kv, kvc


def splash_blocks_problem(tiles: tuple[int, int, int], seq: int, what: str) -> str:
    """The one-line reason :func:`splash_blocks` refused ``seq``."""
    return (f"splash attention needs {what}={seq} to be a multiple of model.splash_block_q={tiles[0]}, "
            f"model.splash_block_kv={tiles[1]} and model.splash_block_kv_compute={tiles[2]} "
            "(each cut to the row length when larger; rows shorter than a block must be a multiple of 128)")


def resolve_attention_impl(impl: str, platform: str, interpret: bool = False) -> str:
    """The training attention for devices of ``platform`` ("tpu", "gpu"/"cuda"/"rocm", "cpu"): ``auto`` ->
    splash on TPU, cudnn on CUDA GPUs, xla elsewhere. An explicit kernel on the wrong platform is a ConfigError
    naming ``model.attention_impl``; ``interpret`` (tests only: Pallas interpret mode) lets splash run anywhere."""
    _check(impl in ATTENTION_IMPLS, "model.attention_impl", f"must be one of {ATTENTION_IMPLS}, got {impl!r}")
    gpu = platform in ("gpu", "cuda")
    if impl == "auto":
        return "splash" if platform == "tpu" else "cudnn" if gpu else "xla"
    if impl == "splash":
        _check(platform == "tpu" or interpret, "model.attention_impl",
               f"'splash' is a TPU kernel but the mesh's devices are {platform!r}; use 'auto' or 'xla'")
    if impl == "cudnn":
        _check(gpu, "model.attention_impl",
               f"'cudnn' needs NVIDIA GPUs but the mesh's devices are {platform!r}; use 'auto' or 'xla'")
    return impl


def resolve_serving_layers(layout: str, platform: str) -> str:
    """The serving copy's layer layout (``rollout.serving_layers``) for devices of ``platform``: ``auto`` ->
    ``stacked`` on TPU, ``per_layer`` elsewhere (see RolloutConfig)."""
    _check(layout in ("auto", "stacked", "per_layer"), "rollout.serving_layers",
           f"must be one of ('auto', 'stacked', 'per_layer'), got {layout!r}")
    return ("stacked" if platform == "tpu" else "per_layer") if layout == "auto" else layout


def resolve_train_layers(layout: str, platform: str, grad_accumulation: str = "add") -> str:
    """The train states' layer layout (``ppo.train_layers``) for devices of ``platform``: ``auto`` -> ``per_layer``
    on a CPU unless ``grad_accumulation`` is ``in_place``, else ``stacked`` (see PPOConfig)."""
    _check(layout in ("auto", "stacked", "per_layer"), "ppo.train_layers",
           f"must be one of ('auto', 'stacked', 'per_layer'), got {layout!r}")
    _check(not (layout == "per_layer" and grad_accumulation == "in_place"), "ppo.train_layers",
           "'per_layer' cannot run with ppo.grad_accumulation: in_place; use 'auto' or 'stacked'")
    if layout != "auto":
        return layout
    return "per_layer" if platform == "cpu" and grad_accumulation != "in_place" else "stacked"


def resolve_decode_attention_impl(impl: str, platform: str, interpret: Optional[str] = None) -> str:
    """The decode attention for devices of ``platform``: "pallas" (the TPU kernel), "pallas_gpu" (the GPU kernel)
    or "xla". ``auto`` -> the platform's kernel on TPU / GPU, xla elsewhere. ``pallas`` on a CPU is a ConfigError
    naming ``model.decode_attention_impl``, unless ``interpret`` (tests only: Pallas interpret mode) names the
    kernel to interpret there ("tpu" or "gpu")."""
    _check(impl in DECODE_ATTENTION_IMPLS, "model.decode_attention_impl",
           f"must be one of {DECODE_ATTENTION_IMPLS}, got {impl!r}")
    gpu = platform in ("gpu", "cuda", "rocm")
    kernel = "pallas" if platform == "tpu" else "pallas_gpu" if gpu else None
    if impl == "auto":
        return kernel or "xla"
    if impl == "pallas":
        if kernel is None and interpret:
            return "pallas_gpu" if interpret == "gpu" else "pallas"
        _check(kernel is not None, "model.decode_attention_impl",
               f"'pallas' has kernels for TPU and GPU but the mesh's devices are {platform!r}; use 'auto' or 'xla'")
        return kernel
    return impl


def check_attention(cfg: Config, platform: str) -> str:
    """Start-up check of the training attention on devices of ``platform``: the implementation the training rows
    (``ppo.pack_len`` tokens) get, or a one-line ConfigError (a kernel named on the wrong platform; splash named
    with a ``ppo.pack_len`` its tiles do not divide). ``auto`` takes the XLA path for rows splash cannot tile
    (e.g. the demo's 88-token rows on a TPU), as ``AttentionSpec.resolve`` does at trace time."""
    resolve_decode_attention_impl(cfg.model.decode_attention_impl, platform)  # a decode kernel on the wrong platform
    impl = resolve_attention_impl(cfg.model.attention_impl, platform)
    if impl == "splash" and splash_blocks(splash_tiles(cfg.model), cfg.ppo.pack_len) is None:
        _check(cfg.model.attention_impl == "auto", "ppo.pack_len",
               splash_blocks_problem(splash_tiles(cfg.model), cfg.ppo.pack_len, "ppo.pack_len"))
        return "xla"
    return impl
