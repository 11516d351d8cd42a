"""The Flax decoder against Hugging Face transformers (PyTorch), KV-cache decoding, export, bad checkpoints."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from orz_jax.config import ArchConfig, ModelConfig
from orz_jax.models.build import create_model
from orz_jax.models.hf_io import CheckpointError, export_hf, load_hf, open_checkpoint_tensors, write_safetensors
from orz_jax.models.transformer import KVCache, positions_from_segments

from conftest import PARITY_K, assert_float32_parity, float64_logits, parity_errors

# Bounds are relative to transformers' own float32 error against a float64 forward (conftest.PARITY_K says why):
# an absolute figure such as 1e-4 rests on one CPU's rounding.
SEQ = 256  # long enough that a wrong rope theta shows up far above the float32 error

CONFIGS = {
    # name: (HF config class, kwargs)
    "qwen2_gqa2_untied": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                                           tie_word_embeddings=False, rope_theta=5000.0,
                                                           rms_norm_eps=1e-5)),
    "qwen2_mha_tied": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=4,
                                                       tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)),
    "llama_gqa4_tied": (transformers.LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=2,
                                                        tie_word_embeddings=True, rope_theta=1e5,
                                                        rms_norm_eps=1e-5)),
    "llama_mha_untied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4,
                                                         tie_word_embeddings=False, rope_theta=500.0,
                                                         rms_norm_eps=1e-6)),
}


def _make_hf(tmp_path, name, seed=0):
    cls, kw = CONFIGS[name]
    cfg = cls(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2, initializer_range=0.2,
              max_position_embeddings=1024, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; random biases make a dropped bias visible
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    path = str(tmp_path / name)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (2, SEQ))
    attn = np.ones((2, SEQ), np.int64)
    attn[1, SEQ - 57:] = 0  # right padding in the second row
    return ids, attn


def _ours(model, ids, attn):
    seg = attn.astype(np.int32)
    pos = np.where(seg > 0, np.arange(ids.shape[1])[None], 0).astype(np.int32)
    logits, _ = jax.jit(lambda t, p, s: model(t, p, s))(jnp.asarray(ids, jnp.int32), jnp.asarray(pos),
                                                         jnp.asarray(seg))
    return np.asarray(logits)


def _ref(model, ids, attn):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(attn)).logits.float().numpy()


def _maxdiff(a, b, attn):
    m = attn.astype(bool)
    return float(np.abs(a[m] - b[m]).max())


@pytest.mark.parametrize("block", [0, 48])  # one dense block; causal blocks of 48 (the last one ragged)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name, block):
    hf, path = _make_hf(tmp_path, name)
    ids, attn = _batch(hf.config.vocab_size)
    model, arch = load_hf("policy", path, ModelConfig(attention_block=block))
    assert arch.architecture == CONFIGS[name][0].model_type
    ref = _ref(hf, ids, attn)
    assert np.abs(ref).max() > 1.0  # logits are not trivially small
    assert_float32_parity(_ours(model, ids, attn), ref, float64_logits(hf, ids, attn), attn)


@pytest.mark.parametrize("mutation", ["rope_theta", "rms_norm_eps", "drop_bias"])
def test_parity_test_can_fail(tmp_path, mutation):
    """A wrong rope theta, norm eps or a dropped q/k/v bias must move logits well beyond the tolerance."""
    hf, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    ids, attn = _batch(hf.config.vocab_size)
    ref = _ref(hf, ids, attn)
    ref64 = float64_logits(hf, ids, attn)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if mutation == "rope_theta":
        cfg["rope_parameters"]["rope_theta"] = 10000.0  # the common default instead of 5000
    elif mutation == "rms_norm_eps":
        cfg["rms_norm_eps"] = 1e-1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    model, _ = load_hf("policy", path, ModelConfig())
    if mutation == "drop_bias":
        blk = model.transformer.layers.attn  # stacked over layers: zero every layer's bias
        for b in (blk.q_bias, blk.k_bias, blk.v_bias):
            b.value = jnp.zeros_like(b.value)
    e_ours, e_hf = parity_errors(_ours(model, ids, attn), ref, ref64, attn)
    assert e_ours > 10 * PARITY_K * e_hf, (e_ours, e_hf)


def test_rope_theta_read_from_rope_parameters_and_legacy_key(tmp_path):
    _, path = _make_hf(tmp_path, "llama_mha_untied")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    _, arch = load_hf("policy", path, ModelConfig())
    assert arch.rope_theta == 500.0 and arch.rms_norm_eps == 1e-6 and not arch.attention_bias
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 123.0
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    _, arch = load_hf("policy", path, ModelConfig())
    assert arch.rope_theta == 123.0


def _float32_error(hf, ids, attn=None) -> float:
    """transformers' float32 error against float64 on these inputs: max |hf32 - hf64| over real tokens."""
    attn = np.ones_like(ids) if attn is None else np.asarray(attn)
    ref = _ref(hf, ids, attn)
    return parity_errors(ref, ref, float64_logits(hf, ids, attn), attn)[1]


def test_kv_cache_decoding_matches_full_forward(tmp_path):
    hf, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    model, arch = load_hf("policy", path, ModelConfig())
    ids = np.random.RandomState(1).randint(0, arch.vocab_size, (2, 40)).astype(np.int32)
    lens = np.array([40, 31])  # row 1 is shorter: right-padded
    seg = (np.arange(40)[None] < lens[:, None]).astype(np.int32)
    pos = np.where(seg > 0, np.arange(40)[None], 0).astype(np.int32)
    full, _ = model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))

    # prefill the first 12 tokens of each row, then decode one token at a time
    cache = KVCache.init(arch, batch=2, max_len=48)
    step = jax.jit(lambda m, t, p, s, c: m(t, p, s, c))
    logits, cache = step(model, jnp.asarray(ids[:, :12]), jnp.asarray(pos[:, :12]), jnp.asarray(seg[:, :12]), cache)
    got = [logits]
    for t in range(12, 40):
        logits, cache = step(model, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]),
                             jnp.asarray(seg[:, t:t + 1]), cache)
        got.append(logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    assert np.asarray(cache.lengths).tolist() == lens.tolist()
    m = seg.astype(bool)
    # Two float32 forwards of ours in different orders, each within PARITY_K x transformers' float32 error of the
    # float64 forward: they differ by at most twice that.
    assert np.abs(got[m] - np.asarray(full)[m]).max() <= 2 * PARITY_K * _float32_error(hf, ids, seg)


def test_kv_cache_right_padded_prefill_then_decode(tmp_path):
    """Prefill rows of different lengths padded to one bucket; decoding continues each row correctly."""
    hf, path = _make_hf(tmp_path, "llama_gqa4_tied")
    model, arch = load_hf("policy", path, ModelConfig())
    rng = np.random.RandomState(2)
    prompts = [rng.randint(0, arch.vocab_size, n).astype(np.int32) for n in (9, 16)]
    cont = rng.randint(0, arch.vocab_size, (2, 5)).astype(np.int32)
    bucket = 16
    toks = np.zeros((2, bucket), np.int32)
    seg = np.zeros((2, bucket), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)], seg[i, :len(p)] = p, 1
    pos = np.where(seg > 0, np.arange(bucket)[None], 0).astype(np.int32)
    cache = KVCache.init(arch, batch=2, max_len=32)
    _, cache = model(jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(seg), cache)
    outs = []
    for t in range(5):
        p = np.array([[len(prompts[0]) + t], [len(prompts[1]) + t]], np.int32)
        lg, cache = model(jnp.asarray(cont[:, t:t + 1]), jnp.asarray(p), jnp.ones((2, 1), jnp.int32), cache)
        outs.append(np.asarray(lg)[:, 0])
    for i, prm in enumerate(prompts):
        seq = np.concatenate([prm, cont[i]])[None]
        n = seq.shape[1]
        full, _ = model(jnp.asarray(seq), jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
        np.testing.assert_allclose(np.stack([o[i] for o in outs]), np.asarray(full)[0, len(prm):], rtol=0,
                                   atol=2 * PARITY_K * _float32_error(hf, seq))


def test_packed_rows_equal_separate_sequences():
    arch = ArchConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      initializer_range=0.2)
    model = create_model("policy", arch, ModelConfig(arch=arch))
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, 50, 7), rng.randint(0, 50, 11)
    tokens = np.concatenate([a, b, np.zeros(4, int)])[None].astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 11 + [0] * 4], np.int32)
    pos = np.array([list(range(7)) + list(range(11)) + [0] * 4], np.int32)
    packed, _ = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    for x, sl in ((a, slice(0, 7)), (b, slice(7, 18))):
        alone, _ = model(jnp.asarray(x[None], jnp.int32), jnp.arange(len(x))[None], jnp.ones((1, len(x)), jnp.int32))
        np.testing.assert_allclose(np.asarray(packed)[0, sl], np.asarray(alone)[0], atol=1e-5)


def test_blocked_attention_equals_dense_in_value_and_gradient():
    """Causal query blocks compute the same function as one dense block: packed rows, padding, GQA, a
    ragged last block; logits and parameter gradients."""
    from flax import nnx

    arch = ArchConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      initializer_range=0.2)
    rng = np.random.RandomState(4)
    tokens = jnp.asarray(rng.randint(0, 50, (2, 100)), jnp.int32)
    seg = np.zeros((2, 100), np.int32)
    seg[0, :37], seg[0, 37:90] = 1, 2  # two samples, then padding
    seg[1, :100] = 1
    seg = jnp.asarray(seg)
    pos = positions_from_segments(seg)

    def run(block):
        model = create_model("policy", arch, ModelConfig(arch=arch, attention_block=block), seed=0)

        def loss(m):
            logits, _ = m(tokens, pos, seg)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * (seg > 0)), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return np.asarray(logits), jax.tree.leaves(nnx.state(grads))

    dense_logits, dense_grads = run(0)
    for block in (16, 30):
        logits, grads = run(block)
        m = np.asarray(seg) > 0
        np.testing.assert_allclose(logits[m], dense_logits[m], atol=1e-5, rtol=0)
        for g, d in zip(grads, dense_grads):  # float32 summation order differs: compare at each tensor's scale
            assert np.abs(np.asarray(g) - np.asarray(d)).max() <= 1e-5 * np.abs(np.asarray(d)).max()


@pytest.mark.parametrize("name", ["qwen2_gqa2_untied", "llama_gqa4_tied"])
def test_export_then_transformers_reload(tmp_path, name):
    _, path = _make_hf(tmp_path, name)
    model, _ = load_hf("policy", path, ModelConfig())
    # change the weights so the export cannot pass by copying the input files
    model.transformer.layers.mlp.up.value = model.transformer.layers.mlp.up.value.at[0].multiply(1.5)
    out = export_hf(model, str(tmp_path / "export"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, attn = _batch(reloaded.config.vocab_size, seed=4)
    assert_float32_parity(_ours(model, ids, attn), _ref(reloaded, ids, attn), float64_logits(reloaded, ids, attn), attn)
    # and our loader reads our own export back bit-exactly
    again, _ = load_hf("policy", out, ModelConfig())
    np.testing.assert_array_equal(np.asarray(again.transformer.layers.mlp.up.value),
                                  np.asarray(model.transformer.layers.mlp.up.value))


def test_critic_loads_trunk_from_base_and_small_head(tmp_path):
    hf, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    critic, _ = load_hf("critic", path, ModelConfig(critic_head_init_std=0.0))
    policy, _ = load_hf("policy", path, ModelConfig())
    np.testing.assert_array_equal(np.asarray(critic.transformer.embed.value),
                                  np.asarray(policy.transformer.embed.value))
    assert float(jnp.abs(critic.value_head.value).max()) == 0.0
    ids, attn = _batch(hf.config.vocab_size)
    seg = attn.astype(np.int32)
    v = critic(jnp.asarray(ids, jnp.int32), jnp.asarray(np.where(seg, np.arange(SEQ), 0), jnp.int32), jnp.asarray(seg))
    assert v.shape == (2, SEQ) and v.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------


def _rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = {k: np.array(v) for k, v in open_checkpoint_tensors(path).items()}
    fn(tensors)
    write_safetensors(f, tensors)


def test_missing_tensor_error(tmp_path):
    _, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_hf("policy", path, ModelConfig())


def test_wrong_shape_error(tmp_path):
    _, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", np.zeros((100, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(100, 64\).*"
                                              r"\(112, 64\)"):
        load_hf("policy", path, ModelConfig())


def test_unexpected_tensor_error(tmp_path):
    _, path = _make_hf(tmp_path, "llama_mha_untied")
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros(64, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_hf("policy", path, ModelConfig())


def test_unknown_architecture_error(tmp_path):
    _, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    # a CheckpointError naming the file (one line at start-up), with the architecture it found
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architecture model_type='gpt2'"):
        load_hf("policy", path, ModelConfig())


def test_missing_directory_and_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_hf("policy", str(tmp_path / "nope"), ModelConfig())
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf("policy", str(tmp_path / "empty"), ModelConfig())
    _, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf("policy", path, ModelConfig())


def test_sharded_index_checkpoint(tmp_path):
    """A model.safetensors.index.json checkpoint (as large models ship) loads the same."""
    hf, path = _make_hf(tmp_path, "qwen2_gqa2_untied")
    model, _ = load_hf("policy", path, ModelConfig())
    out = export_hf(model, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    again, _ = load_hf("policy", out, ModelConfig())
    ids, attn = _batch(hf.config.vocab_size)
    np.testing.assert_array_equal(_ours(again, ids, attn), _ours(model, ids, attn))
