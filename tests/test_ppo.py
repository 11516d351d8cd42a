"""PPO math (advantages, losses, packing) against hand-computed numbers and an independent PyTorch
implementation written here (naive per-sample loops in float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from orz_jax.config import PPOConfig
from orz_jax.ppo.advantages import (compute_advantages, gae, gae_unit, grpo_advantages, masked_normalize,
                                    terminal_rewards)
from orz_jax.ppo.losses import finalize_metrics, policy_loss, shift_right, token_logprobs, value_loss
from orz_jax.ppo.packing import first_fit_decreasing, pack_response, pack_samples, unpack_response

ATOL = 1e-6


def _close(a, b, atol=ATOL, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)


def _random_case(seed, n=6, T=9, holes=False):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, T + 1, n)
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.float32)
    if holes:  # a few masked-out tokens inside responses
        mask = mask * (rng.random((n, T)) > 0.2)
        mask[:, 0] = 1.0
    values = rng.normal(size=(n, T)).astype(np.float32)
    rewards = rng.integers(0, 2, n).astype(np.float32) + rng.normal(size=n).astype(np.float32) * 0.1
    return rewards, values, mask


# ---------------------------------------------------------------------------------------------- torch refs


def torch_gae(token_rewards, values, mask, gamma, lam):
    """Per sample: keep the valid tokens, run textbook GAE on that sequence, scatter back."""
    r, v, m = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (token_rewards, values, mask))
    adv = torch.zeros_like(r)
    ret = torch.zeros_like(r)
    for i in range(r.shape[0]):
        idx = torch.nonzero(m[i] > 0).flatten().tolist()
        a_next, v_next = 0.0, 0.0
        for t in reversed(idx):
            delta = r[i, t] + gamma * v_next - v[i, t]
            a_next = delta + gamma * lam * a_next
            v_next = v[i, t]
            adv[i, t] = a_next
            ret[i, t] = a_next + v[i, t]
    return adv.numpy(), ret.numpy()


def torch_terminal(rewards, mask):
    m = torch.tensor(np.asarray(mask))
    out = torch.zeros(m.shape, dtype=torch.float64)
    for i in range(m.shape[0]):
        idx = torch.nonzero(m[i] > 0).flatten()
        if len(idx):
            out[i, idx[-1]] = float(rewards[i])
    return out.numpy()


def torch_normalize(x, mask):
    x = torch.tensor(np.asarray(x), dtype=torch.float64)
    m = torch.tensor(np.asarray(mask)) > 0
    sel = x[m]
    return (((x - sel.mean()) / (sel.std(unbiased=False) + 1e-8)) * m).numpy()


def torch_grpo(rewards, groups):
    r = torch.tensor(np.asarray(rewards), dtype=torch.float64)
    out = torch.zeros_like(r)
    for g in set(np.asarray(groups).tolist()):
        sel = torch.tensor(np.asarray(groups) == g)
        centered = r[sel] - r[sel].mean()
        std = r[sel].std(unbiased=False)
        out[sel] = centered / std if std > 0 else centered
    return out.numpy()


def torch_policy_loss(logp, old_logp, adv, mask, clip_eps, kl_coef=0.0, kl_est="k3", ent=None, ent_coef=0.0):
    logp = torch.tensor(np.asarray(logp), dtype=torch.float64, requires_grad=True)
    old, a, m = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (old_logp, adv, mask))
    ratio = torch.exp(logp - old)
    obj = torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    loss = -(obj * m).sum() / m.sum()
    if kl_coef:
        lr = logp - old
        kl = -lr if kl_est == "k1" else (torch.exp(lr) - 1) - lr
        loss = loss + kl_coef * (kl * m).sum() / m.sum()
    if ent_coef:
        loss = loss - ent_coef * (torch.tensor(np.asarray(ent), dtype=torch.float64) * m).sum() / m.sum()
    loss.backward()
    return loss.item(), logp.grad.numpy()


def torch_value_loss(v, old_v, ret, mask, clip):
    v = torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
    old, R, m = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (old_v, ret, mask))
    if clip is None:
        per = 0.5 * (v - R) ** 2
    else:
        vc = old + torch.clamp(v - old, -clip, clip)
        per = 0.5 * torch.max((vc - R) ** 2, (v - R) ** 2)
    loss = (per * m).sum() / m.sum()
    loss.backward()
    return loss.item(), v.grad.numpy()


# ---------------------------------------------------------------------------------------------- advantages


def test_terminal_rewards_hand():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    out = terminal_rewards(jnp.array([2.0, -1.0, 5.0]), jnp.asarray(mask))
    _close(out, [[0, 0, 2, 0], [-1, 0, 0, 0], [0, 0, 0, 0]])


def test_gae_hand_computed():
    # one sample, 3 valid tokens + 1 pad, reward 1 at the last valid token, gamma 0.9, lambda 0.8
    v = np.array([[0.5, 0.2, 0.1, 7.0]], np.float32)
    m = np.array([[1, 1, 1, 0]], np.float32)
    r = np.array([[0, 0, 1, 0]], np.float32)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), 0.9, 0.8)
    d2 = 1 - 0.1                       # 0.9
    d1 = 0 + 0.9 * 0.1 - 0.2           # -0.11
    d0 = 0 + 0.9 * 0.2 - 0.5           # -0.32
    a2 = d2
    a1 = d1 + 0.72 * a2                # 0.538
    a0 = d0 + 0.72 * a1                # 0.06736
    _close(adv, [[a0, a1, a2, 0]])
    _close(ret, [[a0 + 0.5, a1 + 0.2, a2 + 0.1, 0]])


@pytest.mark.parametrize("gamma,lam,holes", [(1.0, 1.0, False), (0.99, 0.95, False), (0.9, 0.5, True), (0.0, 1.0, False)])
def test_gae_matches_torch_loop(gamma, lam, holes):
    rewards, values, mask = _random_case(1, holes=holes)
    tok_r = terminal_rewards(jnp.asarray(rewards), jnp.asarray(mask))
    _close(tok_r, torch_terminal(rewards, mask))
    adv, ret = gae(tok_r, jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = torch_gae(np.asarray(tok_r), values, mask, gamma, lam)
    _close(adv, ref_adv)
    _close(ret, ref_ret)


def test_closed_form_equals_gae_at_unit_gamma_lambda():
    rewards, values, mask = _random_case(2, n=8, T=13)
    # dense (non-terminal) rewards too, to exercise the reverse cumulative sum
    tok_r = np.random.default_rng(3).normal(size=values.shape).astype(np.float32)
    a1, r1 = gae(jnp.asarray(tok_r), jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
    a2, r2 = gae_unit(jnp.asarray(tok_r), jnp.asarray(values), jnp.asarray(mask))
    _close(a1, a2, atol=2e-6)
    _close(r1, r2, atol=2e-6)
    # ORZ fact: terminal reward -> every token's return is R, advantage R - V
    tr = terminal_rewards(jnp.asarray(rewards), jnp.asarray(mask))
    a, r = gae_unit(tr, jnp.asarray(values), jnp.asarray(mask))
    _close(r, rewards[:, None] * mask)
    _close(a, (rewards[:, None] - values) * mask)


def test_masked_normalize_global_matches_torch():
    _, values, mask = _random_case(4, n=7, T=11)
    out = masked_normalize(jnp.asarray(values * 3 + 1), jnp.asarray(mask))
    _close(out, torch_normalize(values * 3 + 1, mask), atol=2e-6)
    sel = np.asarray(out)[mask > 0]
    assert abs(sel.mean()) < 1e-6 and abs(sel.std() - 1) < 1e-5
    assert np.all(np.asarray(out)[mask == 0] == 0)


def test_grpo_groups_match_torch_and_hand():
    rewards = np.array([1, 0, 0, 1, 1, 1, 0.5, 0.0, 2.0], np.float32)
    groups = np.array([100, 100, 100, 100, 7, 7, 3, 3, 3])  # arbitrary ids; group 7 has std 0
    mask = np.ones((9, 3), np.float32)
    mask[0, 2] = 0
    adv, ret = grpo_advantages(jnp.asarray(rewards), jnp.asarray(groups), jnp.asarray(mask))
    ref = torch_grpo(rewards, groups)
    _close(adv, ref[:, None] * mask)
    _close(adv[:4, 0], [1, -1, -1, 1])  # mean 0.5, population std 0.5
    _close(adv[4:6], 0.0)  # identical rewards -> no signal
    _close(ret, rewards[:, None] * mask)


def test_compute_advantages_dispatch():
    rewards, values, mask = _random_case(5)
    groups = np.array([0, 0, 1, 1, 2, 2])
    cfg = PPOConfig()  # ORZ defaults: gae, gamma = lam = 1, normalised
    adv, ret = compute_advantages(cfg, jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), jnp.asarray(groups))
    _close(adv, torch_normalize((rewards[:, None] - values) * mask, mask), atol=2e-6)
    _close(ret, rewards[:, None] * mask)
    cfg = PPOConfig(gamma=0.95, lam=0.9, normalize_advantages=False)
    adv, _ = compute_advantages(cfg, jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), jnp.asarray(groups))
    _close(adv, torch_gae(torch_terminal(rewards, mask), values, mask, 0.95, 0.9)[0])
    cfg = PPOConfig(advantage_estimator="grpo", normalize_advantages=False)
    adv, _ = compute_advantages(cfg, jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), jnp.asarray(groups))
    _close(adv, torch_grpo(rewards, groups)[:, None] * mask)


# ---------------------------------------------------------------------------------------------- losses


def test_policy_loss_clipping_hand_computed():
    eps = 0.2
    # tokens: (ratio, adv) = (1.5, +1) clipped at 1.2; (0.5, -1) clipped at 0.8; (1.5, -1) unclipped;
    # (0.5, +1) unclipped; (1.1, 2) inside; last token masked with a huge ratio.
    ratios = np.array([1.5, 0.5, 1.5, 0.5, 1.1, 100.0])
    adv = np.array([1.0, -1.0, -1.0, 1.0, 2.0, 5.0], np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    old = np.zeros(6, np.float32)[None]
    logp = np.log(ratios).astype(np.float32)[None]

    def f(lp):
        return policy_loss(lp, jnp.asarray(old), jnp.asarray(adv[None]), jnp.asarray(mask[None]), jnp.float32(5.0),
                           clip_eps=eps)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    per_token = [-1.2, 0.8, 1.5, -0.5, -2.2]
    _close(loss, sum(per_token) / 5)
    _close(metrics["actor/clip_frac"], 2 / 5)
    # clipped tokens get no gradient; unclipped: d(-A r)/dlogp = -A r / 5; the masked token nothing
    _close(grad[0], [0, 0, 1.5 / 5, -0.5 / 5, -2 * 1.1 / 5, 0])
    k3 = [(r - 1) - math.log(r) for r in ratios[:5]]
    _close(metrics["actor/approx_kl"], sum(k3) / 5, atol=1e-6)


@pytest.mark.parametrize("kl_coef,kl_est,ent_coef", [(0.0, "k3", 0.0), (0.1, "k1", 0.0), (0.05, "k3", 0.01)])
def test_policy_loss_matches_torch(kl_coef, kl_est, ent_coef):
    rng = np.random.default_rng(6)
    shape = (4, 10)
    old = rng.normal(size=shape).astype(np.float32) - 2
    logp = old + rng.normal(size=shape).astype(np.float32) * 0.4  # ratios on both sides of the clip range
    adv = rng.normal(size=shape).astype(np.float32)
    ent = rng.random(shape).astype(np.float32)
    mask = (rng.random(shape) > 0.3).astype(np.float32)
    denom = jnp.float32(mask.sum())

    def f(lp):
        return policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), denom, clip_eps=0.2,
                           kl_coef=kl_coef, kl_estimator=kl_est, entropy=jnp.asarray(ent), entropy_coef=ent_coef)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    ref_loss, ref_grad = torch_policy_loss(logp, old, adv, mask, 0.2, kl_coef, kl_est, ent, ent_coef)
    _close(loss, ref_loss)
    _close(grad, ref_grad)
    _close(metrics["actor/entropy"], (ent * mask).sum() / mask.sum())
    ratio = np.exp(logp - old)
    assert ((ratio > 1.2) & (mask > 0)).any() and ((ratio < 0.8) & (mask > 0)).any()


def test_value_loss_hand_computed():
    # V_old = 0, R = 1, clip 0.2: V = 0.5 -> V_clip = 0.2, max((0.2-1)^2, (0.5-1)^2) = 0.64 (clipped wins)
    #                               V = 1.5 -> V_clip = 0.2, max(0.64, 0.25) = 0.64 (clipped wins again)
    #                               V = 0.1 -> inside, (0.9)^2 = 0.81;  V = -1 -> V_clip = -0.2: max(1.44, 4) = 4
    v = np.array([[0.5, 1.5, 0.1, -1.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    zeros, ones = np.zeros_like(v), np.ones_like(v)

    def f(vv, clip):
        return value_loss(vv, jnp.asarray(zeros), jnp.asarray(ones), jnp.asarray(mask), jnp.float32(4.0),
                          value_clip=clip)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(v), 0.2)
    _close(loss, 0.5 * (0.64 + 0.64 + 0.81 + 4.0) / 4)
    _close(grad[0], [0, 0, 0.5 * 2 * (0.1 - 1) / 4, 0.5 * 2 * (-1 - 1) / 4, 0])
    _close(metrics["critic/clip_frac"], 2 / 4)
    (loss, _), _ = jax.value_and_grad(f, has_aux=True)(jnp.asarray(v), None)
    _close(loss, 0.5 * (0.25 + 0.25 + 0.81 + 4.0) / 4)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_torch(clip):
    rng = np.random.default_rng(7)
    shape = (3, 12)
    old = rng.normal(size=shape).astype(np.float32)
    v = old + rng.normal(size=shape).astype(np.float32) * 0.5
    ret = rng.normal(size=shape).astype(np.float32)
    mask = (rng.random(shape) > 0.25).astype(np.float32)

    def f(vv):
        return value_loss(vv, jnp.asarray(old), jnp.asarray(ret), jnp.asarray(mask), jnp.float32(mask.sum()),
                          value_clip=clip)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(v))
    ref_loss, ref_grad = torch_value_loss(v, old, ret, mask, clip)
    _close(loss, ref_loss)
    _close(grad, ref_grad)
    sel = mask > 0
    ev = 1 - np.var((ret - v)[sel].astype(np.float64)) / np.var(ret[sel].astype(np.float64))
    out = finalize_metrics(metrics)
    _close(out["critic/explained_variance"], ev, atol=2e-6)
    _close(out["critic/value_error"], np.mean(((v - ret)[sel]) ** 2))
    assert not any(k.split("/")[-1].startswith("_") for k in out)


def test_token_logprobs_alignment_matches_torch():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, (2, 6)).astype(np.int32)
    logp, ent = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), with_entropy=True)
    lsm = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    ref = np.zeros((2, 6))
    ref_ent = np.zeros((2, 6))
    for b in range(2):
        for i in range(1, 6):  # token i is predicted at position i - 1
            ref[b, i] = lsm[b, i - 1, tokens[b, i]].item()
            ref_ent[b, i] = -(lsm[b, i - 1].exp() * lsm[b, i - 1]).sum().item()
    _close(logp, ref, atol=2e-6)
    _close(ent, ref_ent, atol=2e-6)
    _close(shift_right(jnp.arange(4.0)[None]), [[0, 0, 1, 2]])


# ---------------------------------------------------------------------------------------------- packing


def _rollout(seed, n=9, P=5, R=8):
    rng = np.random.default_rng(seed)
    plens = rng.integers(1, P + 1, n)
    rlens = rng.integers(0, R + 1, n)
    prompt_ids = rng.integers(1, 50, (n, P)).astype(np.int32)
    response_ids = rng.integers(1, 50, (n, R)).astype(np.int32)
    mask = (np.arange(R)[None] < rlens[:, None]).astype(np.int32)
    return prompt_ids, plens, response_ids, mask


def test_pack_samples_layout_and_roundtrip():
    prompt_ids, plens, response_ids, mask = _rollout(9)
    batch, layout = pack_samples(prompt_ids, plens, response_ids, mask, pack_len=16, row_multiple=4, seed=3)
    assert layout.num_rows % 4 == 0
    tok, pos, seg, lm = batch.tokens, batch.positions, batch.segment_ids, batch.loss_mask
    assert int((seg > 0).sum()) == layout.num_tokens == int(plens.sum() + mask.sum())
    for i in range(len(plens)):
        r, s, p, q = layout.row[i], layout.start[i], plens[i], mask[i].sum()
        np.testing.assert_array_equal(tok[r, s:s + p], prompt_ids[i, :p])
        np.testing.assert_array_equal(tok[r, s + p:s + p + q], response_ids[i, :q])
        np.testing.assert_array_equal(pos[r, s:s + p + q], np.arange(p + q))
        assert len(set(seg[r, s:s + p + q].tolist())) == 1 and seg[r, s] > 0
        np.testing.assert_array_equal(lm[r, s:s + p + q], [0] * p + [1] * q)
    # segment ids are 1..k left to right within each row, and no sample overlaps another
    for r in range(layout.num_rows):
        ids = [k for k in seg[r] if k > 0]
        assert ids == sorted(ids) and (not ids or set(ids) == set(range(1, max(ids) + 1)))
    x = np.random.default_rng(0).normal(size=mask.shape).astype(np.float32) * mask
    packed = pack_response(jnp.asarray(x), jnp.asarray(layout.response_index), layout.num_rows, 16)
    assert np.all(np.asarray(packed)[lm == 0] == 0)
    np.testing.assert_array_equal(unpack_response(packed, jnp.asarray(layout.response_index)), x)


def test_first_fit_decreasing_hand():
    row, start, n = first_fit_decreasing(np.array([3, 7, 5, 2, 4]), 10)
    # sorted 7,5,4,3,2: 7->row0, 5->row1, 4->row1, 3->row0, 2->row2
    assert n == 3
    assert row.tolist() == [0, 0, 1, 2, 1] and start.tolist() == [7, 0, 0, 0, 5]


def test_pack_samples_errors():
    prompt_ids, plens, response_ids, mask = _rollout(10)
    bad = mask.copy()
    bad[2, 0] = 0
    bad[2, 1] = 1
    with pytest.raises(ValueError, match="sample 2 is not right-padded"):
        pack_samples(prompt_ids, plens, response_ids, bad, pack_len=16)
    with pytest.raises(ValueError, match="ppo.pack_len=8"):
        pack_samples(prompt_ids, plens, response_ids, np.ones_like(mask), pack_len=8)
    zero = plens.copy()
    zero[4] = 0
    with pytest.raises(ValueError, match="sample 4 has prompt_len 0"):
        pack_samples(prompt_ids, zero, response_ids, mask, pack_len=16)
