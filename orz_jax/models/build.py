"""Build policy / critic modules, sharded on a mesh from the start (no full copy on one device)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import jax
from flax import nnx
from jax.sharding import Mesh

from orz_jax.config import ArchConfig, ModelConfig
from orz_jax.models.attention import AttentionSpec
from orz_jax.models.transformer import DTYPES, CausalLM, Critic
from orz_jax.sharding import state_shardings

SUPPORTED_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


class UnsupportedArchitectureError(ValueError):
    pass


def arch_from_hf_config(hf: dict, source: str = "config.json") -> ArchConfig:
    """Read every architecture number from an HF ``config.json`` dict.

    Handles both the classic ``rope_theta`` / ``rope_scaling`` keys and the ``rope_parameters`` block of
    recent ``transformers``.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = hf.get("architectures")
        raise UnsupportedArchitectureError(
            f"{source}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if hf.get("use_sliding_window", False):
        raise UnsupportedArchitectureError(f"{source}: sliding-window attention is not supported")
    rope_params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    heads = hf["num_attention_heads"]
    bias_default = model_type == "qwen2"  # Qwen2 always has q/k/v bias; Llama has a flag (default off)
    return ArchConfig(
        architecture=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", bias_default)) if model_type == "llama" else True,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


def hf_config_from_arch(arch: ArchConfig, dtype: str = "float32") -> dict:
    """The inverse of :func:`arch_from_hf_config`, for export."""
    cfg = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch.architecture]],
        "model_type": arch.architecture,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.resolved_head_dim,
        "hidden_act": "silu",
        "rope_theta": arch.rope_theta,
        "rope_scaling": arch.rope_scaling,
        "rms_norm_eps": arch.rms_norm_eps,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "max_position_embeddings": arch.max_position_embeddings,
        "initializer_range": arch.initializer_range,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch.architecture == "llama":
        cfg["attention_bias"] = arch.attention_bias
        cfg["mlp_bias"] = False
    else:
        cfg["use_sliding_window"] = False
    return cfg


def model_kwargs(model_cfg: ModelConfig) -> dict:
    return dict(dtype=DTYPES[model_cfg.dtype], param_dtype=DTYPES[model_cfg.param_dtype], remat=model_cfg.remat,
                sequence_parallel=model_cfg.sequence_parallel, mlp_chunk=model_cfg.mlp_chunk,
                remat_offload=model_cfg.remat_offload, attention_block=model_cfg.attention_block,
                attention=AttentionSpec.from_config(model_cfg))


def critic_head_std(model_cfg: ModelConfig, arch: ArchConfig) -> float:
    """The value head's init std: ``model.critic_head_init_std``, where ``"auto"`` is ORZ's
    1 / (hidden_size + 1) (ORZ's critic is the base model with a new N(0, std) scalar head)."""
    std = model_cfg.critic_head_init_std
    return 1.0 / (arch.hidden_size + 1) if std == "auto" else float(std)


def constructor(kind: Literal["policy", "critic"], arch: ArchConfig, model_cfg: ModelConfig):
    kw = model_kwargs(model_cfg)
    if kind == "policy":
        return lambda rngs: CausalLM(arch, rngs=rngs, **kw)
    if kind == "critic":
        std = critic_head_std(model_cfg, arch)
        return lambda rngs: Critic(arch, head_init_std=std, rngs=rngs, **kw)
    raise ValueError(f"kind must be 'policy' or 'critic', got {kind!r}")


def abstract_model(kind, arch: ArchConfig, model_cfg: ModelConfig) -> nnx.Module:
    """The module with ShapeDtypeStruct leaves: no memory, for shape checks and shardings."""
    ctor = constructor(kind, arch, model_cfg)
    return nnx.eval_shape(lambda: ctor(nnx.Rngs(0)))


def param_count(module_or_state: Any) -> int:
    state = nnx.state(module_or_state, nnx.Param) if isinstance(module_or_state, nnx.Module) else module_or_state
    return sum(int(x.size) for x in jax.tree.leaves(state))


def create_model(kind: Literal["policy", "critic"], arch: ArchConfig, model_cfg: ModelConfig,
                 mesh: Optional[Mesh] = None, seed: int = 0) -> nnx.Module:
    """Randomly initialised module whose parameters are created directly in their mesh sharding."""
    ctor = constructor(kind, arch, model_cfg)
    if mesh is None:
        return ctor(nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(abstract_model(kind, arch, model_cfg))
    shardings = state_shardings(mesh, abstract_state)

    @jax.jit
    def init():
        return nnx.split(ctor(nnx.Rngs(seed)))[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def with_arch(model_cfg: ModelConfig, arch: ArchConfig) -> ModelConfig:
    return dataclasses.replace(model_cfg, arch=arch)
