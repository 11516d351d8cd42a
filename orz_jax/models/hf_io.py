"""Hugging Face checkpoints in and out.

Loading reads ``config.json`` for the architecture and memory-maps the ``*.safetensors`` files; each
of our parameters is built with ``jax.make_array_from_callback`` so every device (and every host)
reads only the slice of each tensor that its shard needs: a 32B model is never materialised whole
on one host.

Export writes ``config.json`` + ``model.safetensors`` (+ index when sharded) + the tokenizer files,
in the layout ``transformers`` loads (``Qwen2ForCausalLM`` / ``LlamaForCausalLM``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orz_jax.config import ArchConfig, ModelConfig
from orz_jax.models.build import abstract_model, arch_from_hf_config, constructor, hf_config_from_arch
from orz_jax.sharding import state_shardings


class CheckpointError(ValueError):
    """A problem with a checkpoint directory; the message names the file / tensor."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------------------------
# safetensors, read lazily (memory-mapped) and written directly (bf16 included)
# ----------------------------------------------------------------------------------------------


def _read_safetensors_index(path: str) -> dict[str, np.ndarray]:
    """name -> read-only memmap view of one .safetensors file (no tensor bytes are read here)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        out[name] = mm[8 + n + start: 8 + n + end].view(dt).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    header, offset = {}, 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


def open_checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of an HF directory (single file or sharded with an index), memory-mapped."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        views = {}
        for fname in sorted(set(weight_map.values())):
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{index}: names shard {fname!r}, which is missing")
            views.update(_read_safetensors_index(fpath))
        return views
    if os.path.isfile(single):
        return _read_safetensors_index(single)
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found "
                          "(PyTorch .bin checkpoints are not supported: convert them with save_pretrained)")


# ----------------------------------------------------------------------------------------------
# Name / layout mapping between HF tensors and our parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorMap:
    hf_name: str
    to_ours: Callable[[np.ndarray], np.ndarray]  # HF layout -> our layout (views where possible)
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: tuple


def _linear_in(shape_out_split):  # HF [out, in] -> ours [in, *out_split]
    return lambda w: w.T.reshape((w.shape[1],) + shape_out_split)


def tensor_maps(arch: ArchConfig, kind: Literal["policy", "critic"]) -> dict[str, tuple[TensorMap, ...]]:
    """Our parameter path -> how to read/write it in HF format: one TensorMap per HF tensor.

    The decoder blocks' parameters are stacked over layers ('transformer/layers/attn/q' is
    ``[layers, embed, heads, head_dim]``), so their entries hold one map per layer, in layer order
    (HF 'model.layers.{i}....'); every other entry holds one map."""
    e, h, kvh, d, m, v = (arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.resolved_head_dim,
                          arch.intermediate_size, arch.vocab_size)
    ident = lambda w: w  # noqa: E731
    T = lambda w: w.T  # noqa: E731
    maps = {"transformer/embed": (TensorMap("model.embed_tokens.weight", ident, ident, (v, e)),),
            "transformer/final_norm/scale": (TensorMap("model.norm.weight", ident, ident, (e,)),)}

    def layer_map(i: int) -> dict[str, TensorMap]:
        hp = f"model.layers.{i}"
        out = {"attn_norm/scale": TensorMap(f"{hp}.input_layernorm.weight", ident, ident, (e,)),
               "mlp_norm/scale": TensorMap(f"{hp}.post_attention_layernorm.weight", ident, ident, (e,))}
        for ours, theirs, heads in (("q", "q_proj", h), ("k", "k_proj", kvh), ("v", "v_proj", kvh)):
            out[f"attn/{ours}"] = TensorMap(
                f"{hp}.self_attn.{theirs}.weight", _linear_in((heads, d)),
                lambda w: w.reshape(w.shape[0], -1).T, (heads * d, e))
            if arch.attention_bias:
                out[f"attn/{ours}_bias"] = TensorMap(
                    f"{hp}.self_attn.{theirs}.bias", lambda b, n=heads: b.reshape(n, d),
                    lambda b: b.reshape(-1), (heads * d,))
        out["attn/o"] = TensorMap(f"{hp}.self_attn.o_proj.weight", lambda w: w.T.reshape(h, d, e),
                                  lambda w: w.reshape(h * d, e).T, (e, h * d))
        out["mlp/gate"] = TensorMap(f"{hp}.mlp.gate_proj.weight", T, T, (m, e))
        out["mlp/up"] = TensorMap(f"{hp}.mlp.up_proj.weight", T, T, (m, e))
        out["mlp/down"] = TensorMap(f"{hp}.mlp.down_proj.weight", T, T, (e, m))
        return out

    per_layer = [layer_map(i) for i in range(arch.num_layers)]
    for sub in per_layer[0]:
        maps[f"transformer/layers/{sub}"] = tuple(lm[sub] for lm in per_layer)
    if kind == "policy" and not arch.tie_word_embeddings:
        maps["lm_head"] = (TensorMap("lm_head.weight", T, T, (v, e)),)
    return maps


def _stacked(name: str) -> bool:
    return name.startswith("transformer/layers/")


# HF tensors that carry no parameters of ours (buffers some exporters keep).
_IGNORABLE = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attn\.bias)$")


def _flat(state) -> dict[str, nnx.Variable]:
    out = {}
    for path, var in nnx.to_flat_state(state):
        out["/".join(str(p) for p in path)] = var
    return out


def read_hf_arch(cfg_path: str) -> ArchConfig:
    """The architecture of an HF ``config.json``; every problem (unreadable file, invalid JSON, a missing
    key, an unsupported or sliding-window model) is a one-line CheckpointError naming the file."""
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(hf).__name__}")
    try:
        return arch_from_hf_config(hf, source=cfg_path)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # UnsupportedArchitectureError, a missing key, a bad value
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(cfg_path) else f"{cfg_path}: {msg}") from None


def load_hf(kind: Literal["policy", "critic"], path: str, model_cfg: ModelConfig,
            mesh: Optional[Mesh] = None) -> tuple[nnx.Module, ArchConfig]:
    """Load an HF directory into a policy (``CausalLM``) or critic (``Critic``: trunk from the checkpoint,
    value head freshly initialised as ``model_cfg.critic_head_init_std`` says).

    Returns (module, arch). Parameters are placed straight into their mesh sharding.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    arch = read_hf_arch(cfg_path)
    if model_cfg.arch is not None and model_cfg.arch != arch:
        diff = {k: (getattr(model_cfg.arch, k), getattr(arch, k)) for k in arch.__dataclass_fields__
                if getattr(model_cfg.arch, k) != getattr(arch, k) and k != "initializer_range"}
        if diff:
            raise CheckpointError(f"{cfg_path}: disagrees with model.arch in the config on {diff} "
                                  "(config value, checkpoint value)")
    tensors = open_checkpoint_tensors(path)
    maps = tensor_maps(arch, kind)

    expected = {tm.hf_name for ms in maps.values() for tm in ms}
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(n for n in set(tensors) - expected if not _IGNORABLE.search(n))
    if kind == "critic":  # the base model's LM head is not part of the critic
        unexpected = [n for n in unexpected if n != "lm_head.weight"]
    if kind == "policy" and arch.tie_word_embeddings:
        unexpected = [n for n in unexpected if n != "lm_head.weight"]  # some exporters keep the tied copy
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} not used by a "
                              f"{arch.architecture} model with this config.json" +
                              (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for tm in (tm for ms in maps.values() for tm in ms):
        got = tuple(tensors[tm.hf_name].shape)
        if got != tm.hf_shape:
            raise CheckpointError(f"{path}: tensor {tm.hf_name!r} has shape {got}, but config.json implies "
                                  f"{tm.hf_shape}")

    abstract = abstract_model(kind, arch, model_cfg)
    graphdef, abs_state = nnx.split(abstract)
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    shardings = _flat(state_shardings(mesh, abs_state))
    flat_abs = _flat(abs_state)

    fresh = None
    values = {}
    for name, var in flat_abs.items():
        shape, dtype = var.value.shape, var.value.dtype
        if name in maps:
            stacked = _stacked(name)
            srcs = [tm.to_ours(tensors[tm.hf_name]) for tm in maps[name]]  # lazy views in our layout
            want = shape[1:] if stacked else shape
            for tm, src in zip(maps[name], srcs):
                if src.shape != want:
                    raise CheckpointError(f"{path}: tensor {tm.hf_name!r} maps to shape {src.shape}, "
                                          f"expected {want}")
            if stacked:  # [layers, ...]: each shard reads its layers' slices and stacks them
                def read(idx, srcs=srcs, dt=dtype):
                    return np.stack([np.asarray(srcs[i][idx[1:]]).astype(dt)
                                     for i in range(len(srcs))[idx[0]]])
            else:
                def read(idx, src=srcs[0], dt=dtype):
                    return np.asarray(src[idx]).astype(dt)
            values[name] = jax.make_array_from_callback(shape, shardings[name], read)
        else:  # parameters the checkpoint does not have (the critic's value head): fresh init
            if fresh is None:
                fresh = _flat(jax.jit(lambda: nnx.split(constructor(kind, arch, model_cfg)(nnx.Rngs(0)))[1],
                                      out_shardings=state_shardings(mesh, abs_state))())
            values[name] = fresh[name].value
    state = nnx.from_flat_state([(tuple(_key(p) for p in n.split("/")), flat_abs[n].replace(values[n]))
                                 for n in flat_abs])
    return nnx.merge(graphdef, state), arch


def _key(p: str):
    return int(p) if p.isdigit() else p


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "generation_config.json", "tokenizer.model", "added_tokens.json")


def export_hf(policy: nnx.Module, out_dir: str, tokenizer_src: Optional[str] = None,
              dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> str:
    """Write ``policy`` (a ``CausalLM``) as an HF directory that ``transformers`` loads.

    Tensors are gathered to the host one parameter at a time (a stacked decoder parameter holds every layer). Single-process only: on several hosts, call it on
    process 0 after ``multihost_utils.process_allgather``.
    """
    arch = policy.arch
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    os.makedirs(out_dir, exist_ok=True)
    flat = _flat(nnx.state(policy, nnx.Param))
    shards, current, size = [], {}, 0
    for name, ms in tensor_maps(arch, "policy").items():
        ours = np.asarray(jax.device_get(flat[name].value)).astype(np_dtype)
        for i, tm in enumerate(ms):
            arr = tm.to_hf(ours[i] if _stacked(name) else ours)
            if current and size + arr.nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[tm.hf_name] = np.ascontiguousarray(arr)
            size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0], {"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fname), shard, {"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_from_arch(arch, dtype), f, indent=2)
    if tokenizer_src is not None:
        src_dir = tokenizer_src if os.path.isdir(tokenizer_src) else os.path.dirname(tokenizer_src)
        for fname in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src_dir, fname)):
                shutil.copy(os.path.join(src_dir, fname), os.path.join(out_dir, fname))
    return out_dir
