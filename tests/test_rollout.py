"""Rollouts served by the JetStream engine: sampling, greedy correctness against a full-forward loop and
against ``transformers``, driver equivalence, stop handling, log-probs, weight sync, long prompts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from orz_jax.config import ArchConfig, MeshConfig, ModelConfig, RolloutConfig
from orz_jax.models.build import abstract_model, create_model
from orz_jax.rollout import (CompileCounter, LongPromptError, RolloutEngine, SampleCollector, SamplingParams,
                             generate_rollouts, sample_tokens, sampling_logprobs)
from orz_jax.sharding import make_mesh
from orz_jax.tokenizer import CharTokenizer

MAX_NEW = 10
PROMPTS = ["1+2=", "x", "hello there!", "abcdefgh", "(3*4)-5 = ?"]  # lengths 4, 1, 12, 8 (= a bucket), 11
CFG = RolloutConfig(driver="batched", temperature=0.0, max_prompt_len=16, prefill_buckets=[8, 16],
                    max_response_len=MAX_NEW, max_concurrent_decodes=4, stop_strings=[], long_prompt="error")


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def arch(tok):
    # A large init scale gives peaked, prompt-dependent next-token distributions (no near-ties in argmax).
    return ArchConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, initializer_range=0.5, rope_theta=1000.0)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig())  # one device; with a mesh, create_model initialises under jit (fast)


@pytest.fixture(scope="module")
def policy(arch, mesh):
    return create_model("policy", arch, ModelConfig(arch=arch), mesh, seed=0)


@pytest.fixture(scope="module")
def engine(policy, tok):
    return RolloutEngine(policy, CFG, tok, seed=0)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.encode(p) for p in PROMPTS]


_SPLITS: dict = {}
_GREEDY: dict = {}


def _full_logprobs(model, ids):
    """Reference: log_softmax of the full (no-cache) forward at every position. ids: list -> [len, vocab]."""
    n = 32  # one padded length for every call: compiles once
    x = np.zeros((1, n), np.int32)
    x[0, :len(ids)] = ids
    seg = (np.arange(n) < len(ids)).astype(np.int32)[None]
    split = _SPLITS.setdefault(id(model), nnx.split(model))
    return np.asarray(_forward_logprobs(split, x, seg))[0, :len(ids)]


@jax.jit
def _forward_logprobs(split, tokens, seg):
    model = nnx.merge(*split)
    return jax.nn.log_softmax(model(tokens, jnp.arange(tokens.shape[1])[None], seg)[0], axis=-1)


def _naive_greedy(model, prompt, n, eos_ids):
    """Step-by-step argmax of the full forward (no KV cache), stopping after an EOS id."""
    key = (id(model), tuple(prompt), n, frozenset(eos_ids))
    if key not in _GREEDY:
        ids, out = list(prompt), []
        for _ in range(n):
            t = int(np.argmax(_full_logprobs(model, ids)[-1]))
            out.append(t)
            ids.append(t)
            if t in eos_ids:
                break
        _GREEDY[key] = out
    return list(_GREEDY[key])


def _responses(batch):
    return [batch.response_ids[i, :batch.response_mask[i].sum()].tolist() for i in range(batch.num_samples)]


# ----------------------------------------------------------------------------------------------
# The sampling function on distributions we construct
# ----------------------------------------------------------------------------------------------


def _ref_sampling_logprobs(logits, temperature, top_k, top_p):
    """Independent numpy reference of the HF order: temperature -> top-k -> top-p -> renormalise."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(x, bool)
    if top_k:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    order = np.argsort(-p)
    kept_p = set()
    mass = 0.0
    for j in order:
        if not keep[j] or mass >= top_p:
            break
        kept_p.add(j)
        mass += p[j]
    keep &= np.isin(np.arange(x.size), list(kept_p))
    out = np.full(x.shape, -np.inf)
    out[keep] = x[keep] - np.log(np.exp(x[keep]).sum())
    return out


@pytest.mark.parametrize("temperature,top_k,top_p,support", [
    (1.0, 3, 1.0, {7, 2, 5}),  # the three largest logits
    (1.0, 0, 0.7, {7, 2}),  # p = .5, .3, ...: the mass before token 5 is .8 >= .7
    (0.5, 0, 0.9, {7, 2}),  # sharper: the top two already hold > .9
    (2.0, 4, 0.8, {7, 2, 5}),  # flatter, then top-k 4, then top-p
])
def test_top_k_top_p_restrict_the_support(temperature, top_k, top_p, support):
    probs = np.full(10, 0.01)
    probs[[7, 2, 5, 0]] = [0.5, 0.3, 0.12, 0.04]  # sums to 1.0 with the six 0.01s
    logits = np.log(probs)[None].astype(np.float32)  # [1, 10]
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(jax.jit(sampling_logprobs, static_argnums=1)(jnp.asarray(logits), sp))[0]
    ref = _ref_sampling_logprobs(logits[0], temperature, top_k, top_p)
    assert set(np.flatnonzero(np.isfinite(got))) == support == set(np.flatnonzero(np.isfinite(ref)))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], atol=1e-5)

    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    tokens, lps = jax.jit(sample_tokens, static_argnums=2)(jnp.asarray(np.repeat(logits, n, 0)), keys, sp)
    tokens = np.asarray(tokens)
    assert set(tokens.tolist()) == support  # only kept tokens, and every kept token appears
    freq = np.bincount(tokens, minlength=10) / n
    np.testing.assert_allclose(freq, np.exp(ref), atol=0.03)  # frequencies follow the renormalised probs
    np.testing.assert_allclose(np.asarray(lps), ref[tokens], atol=1e-5)  # returned log-prob of each draw


def test_greedy_sampling_is_argmax_with_policy_logprob():
    logits = jax.random.normal(jax.random.key(1), (5, 50)) * 3
    tokens, lps = sample_tokens(logits, jax.random.split(jax.random.key(0), 5), SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), -1))
    ref = np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(5), np.asarray(tokens)]
    np.testing.assert_allclose(np.asarray(lps), ref, atol=1e-6)


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


# ----------------------------------------------------------------------------------------------
# Greedy correctness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["batched", "orchestrator"])
def test_greedy_equals_full_forward_argmax(engine, policy, prompts, tok, driver):
    # 5 prompts x 2 samples = 10 requests over 4 slots: several waves / slot reuse, both buckets.
    batch = generate_rollouts(engine, prompts, 2, 0, CFG, driver=driver, timeout_s=120)
    assert batch.num_samples == 10
    np.testing.assert_array_equal(batch.prompt_index, np.repeat(np.arange(5), 2))
    for r, resp in enumerate(_responses(batch)):
        p = prompts[batch.prompt_index[r]]
        assert batch.prompt_ids[r, :len(p)].tolist() == p and batch.prompt_lens[r] == len(p)
        assert not batch.prompt_ids[r, len(p):].any()
        assert resp == _naive_greedy(policy, p, MAX_NEW, set(tok.eos_ids))
        assert batch.stop_reason[r] == ("stop" if resp[-1] in tok.eos_ids else "length")
        assert batch.texts[r] == tok.decode(resp)
        # greedy log-probs are the policy's own log-softmax at the chosen token
        ref = _full_logprobs(policy, p + resp)[len(p) - 1:-1][np.arange(len(resp)), resp]
        np.testing.assert_allclose(batch.logprobs[r, :len(resp)], ref, atol=2e-5)
        assert not batch.logprobs[r, len(resp):].any() and not batch.response_ids[r, len(resp):].any()


def test_greedy_equals_transformers_generate(policy, prompts, tok, tmp_path, engine):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from orz_jax.models.hf_io import export_hf

    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(policy, str(tmp_path / "hf")),
                                                           dtype=torch.float32).eval()
    batch = generate_rollouts(engine, prompts, 1, 0, CFG)
    for p, resp in zip(prompts, _responses(batch)):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id)
        assert out[0, len(p):].tolist() == resp


# ----------------------------------------------------------------------------------------------
# Sampling through the engine
# ----------------------------------------------------------------------------------------------


def test_sampled_rollouts_reproducible_and_driver_independent(engine, prompts):
    cfg = dataclasses.replace(CFG, temperature=0.8, top_k=20, top_p=0.95)
    a = generate_rollouts(engine, prompts, 3, 7, cfg, driver="batched")
    b = generate_rollouts(engine, prompts, 3, 7, cfg, driver="orchestrator", timeout_s=120)
    c = generate_rollouts(engine, prompts, 3, 7, cfg, driver="batched")
    d = generate_rollouts(engine, prompts, 3, 8, cfg, driver="batched")
    for other in (b, c):  # same seed: identical samples, whichever driver (request-keyed RNG)
        np.testing.assert_array_equal(a.response_ids, other.response_ids)
        np.testing.assert_array_equal(a.response_mask, other.response_mask)
        np.testing.assert_allclose(a.logprobs, other.logprobs, atol=1e-6)
    assert not np.array_equal(a.response_ids, d.response_ids)  # another seed, other samples
    r = a.response_ids.reshape(5, 3, MAX_NEW)
    assert any(not np.array_equal(r[i, 0], r[i, 1]) for i in range(5))  # samples of one prompt differ


def test_logprobs_are_policy_log_softmax_at_temperature_one(engine, policy, prompts):
    cfg = dataclasses.replace(CFG, temperature=1.0)
    batch = generate_rollouts(engine, prompts[:3], 2, 3, cfg)
    for r, resp in enumerate(_responses(batch)):
        p = prompts[batch.prompt_index[r]]
        ref = _full_logprobs(policy, p + resp)[len(p) - 1:-1][np.arange(len(resp)), resp]
        np.testing.assert_allclose(batch.logprobs[r, :len(resp)], ref, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Stopping
# ----------------------------------------------------------------------------------------------


def test_sample_collector_rules(tok):
    ids = tok.encode("ab</answer>cd")
    c = SampleCollector(tok, tok.eos_ids, ["</answer>"], limit=50)
    fed = [c.feed(t, -0.5) for t in ids]
    assert fed.index(True) == len(tok.encode("ab</answer>")) - 1 and c.reason == "stop"
    assert tok.decode(c.tokens) == "ab</answer>"  # the stop string is kept, nothing after it
    c = SampleCollector(tok, tok.eos_ids, ["</answer>"], limit=3)
    assert [c.feed(t, 0.0) for t in ids[:3]] == [False, False, True] and c.reason == "length"
    c = SampleCollector(tok, tok.eos_ids, [], limit=10)
    assert [c.feed(t, 0.0) for t in [ids[0], tok.eos_id]] == [False, True] and c.reason == "stop"


@pytest.mark.parametrize("driver", ["batched", "orchestrator"])
def test_stop_string_ends_a_sample(engine, prompts, tok, driver):
    free = _responses(generate_rollouts(engine, prompts[:1], 1, 0, CFG))[0]
    # a two-character string the greedy response produces around tokens 4-5 (perhaps also earlier)
    stop = next(tok.decode(free[j:j + 2]) for j in range(4, MAX_NEW - 1) if len(tok.decode(free[j:j + 2])) == 2)
    first = next(j + 1 for j in range(MAX_NEW) if stop in tok.decode(free[:j + 1]))  # the token completing it
    cfg = dataclasses.replace(CFG, stop_strings=["never-produced", stop])
    batch = generate_rollouts(engine, prompts[:1], 1, 0, cfg, driver=driver, timeout_s=120)
    assert batch.stop_reason == ["stop"]
    assert _responses(batch)[0] == free[:first]
    assert batch.texts[0] == tok.decode(free[:first]) and batch.texts[0].endswith(stop)
    np.testing.assert_array_equal(batch.response_mask[0], np.arange(MAX_NEW) < first)
    assert not batch.response_ids[0, first:].any() and not batch.logprobs[0, first:].any()


class _EosTokenizer:
    """CharTokenizer with another id as EOS, to stop a random model's greedy output at a known place."""

    def __init__(self, base, eos):
        self.base, self.eos_id, self.eos_ids, self.pad_id, self.bos_id = base, eos, (eos,), base.pad_id, None

    def encode(self, text, add_bos=False):
        return self.base.encode(text)

    def decode(self, ids, skip_special=True):
        return self.base.decode(ids)


def test_eos_ends_a_sample_on_device(engine, policy, prompts, tok):
    eos = _responses(generate_rollouts(engine, prompts[:1], 1, 0, CFG))[0][3]  # prompt 0's 4th greedy token
    expected = [_naive_greedy(policy, p, MAX_NEW, {eos}) for p in prompts]
    assert len(expected[0]) <= 4
    eng = RolloutEngine(policy, CFG, _EosTokenizer(tok, eos))
    for driver in ("batched", "orchestrator"):
        batch = generate_rollouts(eng, prompts, 1, 0, CFG, driver=driver, timeout_s=120)
        assert _responses(batch) == expected
        assert batch.stop_reason == ["stop" if e[-1] == eos else "length" for e in expected]
        np.testing.assert_array_equal(batch.response_mask.sum(1), [len(e) for e in expected])


# ----------------------------------------------------------------------------------------------
# Weight sync
# ----------------------------------------------------------------------------------------------


def test_weight_update_changes_outputs_without_compiling(engine, policy, prompts, arch, tok, mesh):
    before = {d: generate_rollouts(engine, prompts, 1, 0, CFG, driver=d, timeout_s=120)
              for d in ("batched", "orchestrator")}  # also warms up every compiled shape
    new_policy = create_model("policy", arch, ModelConfig(arch=arch), mesh, seed=1)
    expected = [_naive_greedy(new_policy, p, MAX_NEW, set(tok.eos_ids)) for p in prompts]
    old_state = nnx.state(policy)
    try:
        with CompileCounter() as cc:
            engine.update_params(nnx.state(new_policy))
            after = {d: generate_rollouts(engine, prompts, 1, 0, CFG, driver=d, timeout_s=120)
                     for d in ("batched", "orchestrator")}
        assert cc.count == 0
        for d in after:
            assert _responses(after[d]) == expected
            assert not np.array_equal(after[d].response_ids, before[d].response_ids)
        # the engine's own copy (per layer on a CPU), not the trainer's buffers
        assert engine.layer_layout == "per_layer"
        new_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(nnx.state(new_policy))}
        assert not new_ptrs & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(engine.params)}
    finally:
        engine.update_params(old_state)


def test_update_params_rejects_another_shape(engine, tok):
    other = ArchConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2)
    with pytest.raises(ValueError, match=r"update_params: .* is float32\[48, 100\], the served policy has float32\[32"):
        engine.update_params(nnx.state(abstract_model("policy", other, ModelConfig(arch=other))))


# ----------------------------------------------------------------------------------------------
# Long prompts
# ----------------------------------------------------------------------------------------------


def test_long_prompt_error_names_the_prompt(engine, prompts):
    long = list(range(4, 24))  # 20 tokens > max_prompt_len 16
    with pytest.raises(LongPromptError, match="prompt 1 has 20 tokens"):
        generate_rollouts(engine, [prompts[0], long], 1, 0, CFG)


def test_long_prompt_filter_and_left_truncate(engine, prompts):
    long = list(range(4, 24))
    filt = generate_rollouts(engine, [prompts[0], long, prompts[2]], 2, 0,
                             dataclasses.replace(CFG, long_prompt="filter"))
    assert filt.dropped_prompts == (1,) and filt.prompt_index.tolist() == [0, 0, 2, 2]
    ref = generate_rollouts(engine, [prompts[0], prompts[2]], 2, 0, CFG)
    np.testing.assert_array_equal(filt.response_ids, ref.response_ids)

    trunc = generate_rollouts(engine, [long], 1, 0, dataclasses.replace(CFG, long_prompt="left_truncate"))
    assert trunc.truncated_prompts == (0,) and trunc.prompt_ids[0].tolist() == long[-16:]
    direct = generate_rollouts(engine, [long[-16:]], 1, 0, CFG)
    np.testing.assert_array_equal(trunc.response_ids, direct.response_ids)


# ----------------------------------------------------------------------------------------------
# Sharded serving
# ----------------------------------------------------------------------------------------------


def test_sharded_engine_greedy_equals_full_forward():
    """4 fake CPU devices, mesh fsdp=2 x tensor=2: the KV cache is sharded over slots and kv heads, and greedy
    rollouts (both drivers) equal the step-by-step argmax of the full forward of the same sharded model."""
    from conftest import run_with_devices

    out = run_with_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from orz_jax.config import ArchConfig, MeshConfig, ModelConfig, RolloutConfig
        from orz_jax.models.build import create_model
        from orz_jax.rollout import RolloutEngine, generate_rollouts
        from orz_jax.sharding import make_mesh
        from orz_jax.tokenizer import CharTokenizer

        tok = CharTokenizer()
        arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, initializer_range=0.5)
        cfg = RolloutConfig(temperature=0.0, max_prompt_len=16, prefill_buckets=[16], max_response_len=8,
                            max_concurrent_decodes=4, stop_strings=[])
        policy = create_model("policy", arch, ModelConfig(arch=arch), make_mesh(MeshConfig(fsdp=2, tensor=2)))
        prompts = [tok.encode(s) for s in ["1+2=", "x", "hello there!", "abcdefgh", "(3*4)-5"]]

        @jax.jit
        def next_token(split, x, n):  # full forward, no cache: argmax after the first n tokens
            logits = nnx.merge(*split)(x, jnp.arange(32)[None], (jnp.arange(32) < n)[None].astype(jnp.int32))[0]
            return jnp.argmax(logits[0, n - 1])

        split = nnx.split(policy)
        expected = []
        for p in prompts:
            ids = list(p)
            for _ in range(8):
                x = np.zeros((1, 32), np.int32); x[0, :len(ids)] = ids
                ids.append(int(next_token(split, x, len(ids))))
                if ids[-1] in tok.eos_ids:
                    break
            expected.append(ids[len(p):])
        eng = RolloutEngine(policy, cfg, tok)
        print("cache spec", eng.init_decode_state().cache.k.sharding.spec)
        for driver in ("batched", "orchestrator"):
            got = generate_rollouts(eng, prompts, 1, 0, cfg, driver=driver, timeout_s=120)
            assert [got.response_ids[i, :got.response_mask[i].sum()].tolist() for i in range(5)] == expected
        print("OK")
    """, n_devices=4, timeout=300)
    assert "cache spec P(None, ('data', 'fsdp'), None, 'tensor')" in out
    assert "OK" in out
