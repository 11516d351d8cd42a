"""Chunked LM-head log-probs (``CausalLM.token_logprobs`` / ``chunked_token_logprobs``) against the
full-logits path (``token_logprobs(model(...)[0])``) and a float64 reference: values, entropies and
parameter gradients, with and without packing, for chunk sizes that do and do not divide the row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from orz_jax.config import ArchConfig
from orz_jax.models.transformer import CausalLM
from orz_jax.ppo.losses import chunked_token_logprobs, token_logprobs

# Wide logits (init std 0.2 over 3 layers) so log-probs spread over several nats and tokens disagree with
# the argmax: a wrong gather or normaliser would move them by O(1).
ARCH = ArchConfig(vocab_size=211, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                  initializer_range=0.2)
B, S = 3, 37  # 37 is prime: every chunk size below except >= S leaves a padded last chunk


def _batch(packed: bool):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, ARCH.vocab_size, (B, S)).astype(np.int32)
    seg = np.ones((B, S), np.int32)
    if packed:  # two samples in row 0, three in row 1, one and trailing padding in row 2
        seg[0, 20:] = 2
        seg[1, 9:] = 2
        seg[1, 25:] = 3
        seg[2, 30:] = 0
        tokens[seg == 0] = 0
    idx = np.arange(S)[None]
    starts = np.maximum.accumulate(np.where(np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], 1),
                                            idx, 0), axis=1)
    pos = np.where(seg > 0, idx - starts, 0).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _model(tied: bool):
    arch = ArchConfig(**{**ARCH.__dict__, "tie_word_embeddings": tied})
    return CausalLM(arch, rngs=nnx.Rngs(1))


def _f64_reference(model, tokens, pos, seg):
    """log-probs and entropies from float64 logits of the same float32 hidden states."""
    h, _ = model.transformer(tokens, pos, seg)
    logits = np.asarray(h, np.float64) @ np.asarray(model.head_weight(), np.float64)  # [b, s, vocab]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nxt = np.concatenate([np.asarray(tokens)[:, 1:], np.zeros((B, 1), np.int64)], 1)
    lp = np.take_along_axis(logits, nxt[..., None], -1)[..., 0] - lse
    p = np.exp(logits - lse[..., None])
    ent = lse - (p * logits).sum(-1)
    shift = lambda x: np.concatenate([np.zeros((B, 1)), x[:, :-1]], 1)  # noqa: E731
    return shift(lp), shift(ent)


@pytest.mark.parametrize("packed,tied,chunk", [(False, False, 8), (True, True, 5), (True, False, 1),
                                               (False, True, 64)])
def test_chunked_logprobs_match_full_logits_and_float64(packed, tied, chunk):
    model = _model(tied)
    tokens, pos, seg = _batch(packed)
    graphdef, params = nnx.split(model)

    @jax.jit
    def both(params):
        m = nnx.merge(graphdef, params)
        full = token_logprobs(m(tokens, pos, seg)[0], tokens, with_entropy=True)
        return full, m.token_logprobs(tokens, pos, seg, chunk=chunk, with_entropy=True), \
            m.token_logprobs(tokens, pos, seg, chunk=chunk)

    (full_lp, full_ent), (lp, ent), (lp_only, none) = both(params)
    assert lp.shape == (B, S) and ent.shape == (B, S) and none is None
    ref_lp, ref_ent = _f64_reference(model, tokens, pos, seg)
    assert np.abs(ref_lp).max() > 3.0  # the check is not vacuous: log-probs span several nats
    # Both paths compute the same float32 dot products over embed=32 then a float32 logsumexp over 211
    # entries: |error| vs float64 is a few ulp of |logit| ~ 5, i.e. ~1e-6; 1e-5 leaves a 10x margin.
    for got in (lp, full_lp):
        np.testing.assert_allclose(np.asarray(got), ref_lp, atol=1e-5, rtol=0)
    for got in (ent, full_ent):
        np.testing.assert_allclose(np.asarray(got), ref_ent, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(full_lp), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lp_only), np.asarray(lp), atol=1e-6, rtol=0)


@pytest.mark.parametrize("packed,tied", [(False, False), (True, True)])
def test_chunked_logprob_gradients_match_full_logits(packed, tied):
    model = _model(tied)
    tokens, pos, seg = _batch(packed)
    rng = np.random.default_rng(1)
    weights = jnp.asarray(rng.normal(size=(B, S)).astype(np.float32)) * (seg > 0)  # like advantages x mask
    graphdef, params = nnx.split(model)

    def loss(params, chunk):
        m = nnx.merge(graphdef, params)
        if chunk == 0:
            lp, ent = token_logprobs(m(tokens, pos, seg)[0], tokens, with_entropy=True)
        else:
            lp, ent = m.token_logprobs(tokens, pos, seg, chunk=chunk, with_entropy=True)
        return jnp.sum(lp * weights) + 0.3 * jnp.sum(ent * weights)  # the entropy bonus is differentiated too

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    full = jax.tree.leaves(grad(params, 0))
    for chunk in (7,):  # 6 chunks, the last one padded
        got = jax.tree.leaves(grad(params, chunk))
        assert len(got) == len(full)
        for g, d in zip(got, full):  # float32 summation order differs: compare at each tensor's scale
            scale = float(np.abs(np.asarray(d)).max())
            assert scale > 0
            assert float(np.abs(np.asarray(g) - np.asarray(d)).max()) <= 1e-5 * scale, (chunk, g.shape)


def test_chunked_logprobs_never_build_full_logits():
    """The compiled gradient of the chunked path holds no [b, s, vocab] buffer; the full path does."""
    b, s, e, v = 2, 512, 32, 4096
    hidden = jax.ShapeDtypeStruct((b, s, e), jnp.float32)
    head = jax.ShapeDtypeStruct((e, v), jnp.float32)
    tokens = jax.ShapeDtypeStruct((b, s), jnp.int32)

    def loss(h, w, t, chunk):
        if chunk == 0:
            return jnp.sum(token_logprobs(jnp.einsum("bse,ev->bsv", h, w), t, with_entropy=True)[1])
        return jnp.sum(chunked_token_logprobs(h, w, t, chunk=chunk, with_entropy=True)[1])

    def temp(chunk):
        return jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3).lower(hidden, head, tokens, chunk) \
            .compile().memory_analysis().temp_size_in_bytes

    full_logits = b * s * v * 4  # one float32 [b, s, vocab]: 16 MiB
    # The full path's backward keeps several of them (measured: 80 MiB = 5 x 16 MiB). A chunk of 64
    # positions is 1/8 of a row, so each live logits-sized tensor shrinks 8x (measured: 10.3 MiB).
    full = temp(0)
    assert full >= 4 * full_logits, full
    assert temp(64) <= full / 6, (temp(64), full)
