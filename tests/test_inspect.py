"""Rollout dumps and the inspect page (issue 18).

The dump is checked against the packed batch the update consumed, unpacked here by hand (row, start and
prompt length of each sample, not ``unpack_response``), and the advantages against float64 arithmetic:
raw = R - V(s_t) (gamma = lambda = 1), normalised = (raw - mean) / (std + 1e-8) over every response token
of the buffer. The page is opened in headless Chromium (Debian's ``chromium`` package) and its rendered DOM
is checked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from orz_jax.launch import DEMO_CONFIG
from orz_jax.config import ArchConfig, Config, ConfigError, ExperimentConfig, PPOConfig, load_config
from orz_jax.models.transformer import CausalLM, Critic
from orz_jax.ppo.packing import pack_samples
from orz_jax.ppo.train import PPOFunctions, create_train_state, required_row_multiple
from orz_jax.rollout.rollouts import RolloutBatch
from orz_jax.rollout_dump import (RolloutDumper, is_dump_iteration, list_iterations, load_dump, load_stats,
                                  repetition_spans)
from orz_jax.tokenizer import CharTokenizer
from orz_jax.trainer import _repetition

N_PROMPTS, N_PER, P, R = 4, 4, 10, 24
N = N_PROMPTS * N_PER
K = 6  # dumped samples: best, worst, median, 3 random


def _tiny_rollout(tok, seed=0):
    """A rollout buffer of N samples with random lengths, rewards, log-probs; texts from the char tokenizer."""
    rng = np.random.default_rng(seed)
    plens = rng.integers(3, P + 1, N).astype(np.int32)
    rlens = rng.integers(1, R + 1, N)
    rlens[0] = R  # one sample that hits the length limit
    chars = np.asarray(tok.encode("0123456789+-=<>/abcx \\{}"))
    prompt_ids = np.zeros((N, P), np.int32)
    response_ids = np.zeros((N, R), np.int32)
    for i in range(N):
        prompt_ids[i, :plens[i]] = rng.choice(chars, plens[i])
        response_ids[i, :rlens[i]] = rng.choice(chars, rlens[i])
    mask = (np.arange(R)[None] < rlens[:, None]).astype(np.int32)
    logprobs = (rng.normal(-2.0, 0.5, (N, R)) * mask).astype(np.float32)
    texts = [tok.decode(response_ids[i, :rlens[i]]) for i in range(N)]
    texts[1] = "<answer>\\boxed{7}</answer>"
    ro = RolloutBatch(prompt_ids=prompt_ids, prompt_lens=plens, response_ids=response_ids, response_mask=mask,
                      logprobs=logprobs, prompt_index=np.repeat(np.arange(N_PROMPTS), N_PER).astype(np.int32),
                      stop_reason=["length" if m == R else "stop" for m in rlens], texts=texts)
    rewards = (rng.random(N) < 0.4).astype(np.float32)
    rewards[:2] = [0.0, 1.0]
    return ro, rewards


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """A real prepare_batch on tiny random models, then one dump through the trainer's dumper."""
    tok = CharTokenizer()
    arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2)
    pol = CausalLM(arch, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", rngs=nnx.Rngs(0))
    cri = Critic(arch, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", head_init_std=0.5,
                 rngs=nnx.Rngs(1))
    cfg = Config(ppo=PPOConfig(micro_batch_rows=2, pack_len=P + R, critic_steps_per_batch=1),
                 experiment=ExperimentConfig(dump_rollouts_every=1, dump_rollouts_samples=K, num_iterations=3))
    actor, critic = create_train_state(pol, cfg.ppo.actor), create_train_state(cri, cfg.ppo.critic)
    fns = PPOFunctions.build(cfg.ppo)
    ro, rewards = _tiny_rollout(tok)
    packed, layout = pack_samples(ro.prompt_ids, ro.prompt_lens, ro.response_ids, ro.response_mask, cfg.ppo.pack_len,
                                  row_multiple=required_row_multiple(cfg.ppo), seed=0)
    packed = fns.prepare_batch(actor, critic, packed, layout.response_index, ro.response_mask, rewards,
                               ro.prompt_index)
    run_dir = tmp_path_factory.mktemp("run")
    dumper = RolloutDumper(cfg, tok, out_dir=str(run_dir))
    pending = dumper.dispatch(2, packed, layout, ro, rewards)
    answers = [f"{a}" for a in (7, 11, 3, 5)]
    path = dumper.write(pending, ro, answers)
    return dict(run_dir=str(run_dir), path=path, packed=jax.device_get(packed), layout=layout, ro=ro,
                rewards=rewards, answers=answers, tok=tok)


def _by_hand(d, i, field):
    """Response-token slice of a packed [rows, pack_len] field for sample i, located via the pack layout."""
    lay = d["layout"]
    r, s, p, q = int(lay.row[i]), int(lay.start[i]), int(lay.prompt_len[i]), int(lay.response_len[i])
    return np.asarray(getattr(d["packed"], field))[r, s + p:s + p + q]


def test_dump_round_trips_the_arrays_the_update_used(dumped):
    d = dumped
    assert list_iterations(d["run_dir"]) == [2]
    recs = load_dump(d["run_dir"], 2)
    assert len(recs) == K and len({r["sample"] for r in recs}) == K
    assert [r["selected_by"] for r in recs][:3] == ["best", "worst", "median"]
    ro = d["ro"]
    for r in recs:
        i = r["sample"]
        n = int(ro.response_mask[i].sum())
        # bit-exact: the JSON floats read back to the very float32 of the packed batch
        np.testing.assert_array_equal(r["values"], _by_hand(d, i, "old_values"))
        np.testing.assert_array_equal(r["advantages"], _by_hand(d, i, "advantages"))
        np.testing.assert_array_equal(r["returns"], _by_hand(d, i, "returns"))
        np.testing.assert_array_equal(r["old_logprobs"], _by_hand(d, i, "old_logprobs"))
        np.testing.assert_array_equal(r["sampling_logprobs"], ro.logprobs[i, :n])
        assert r["reward"] == float(d["rewards"][i])
        assert r["response_ids"] == ro.response_ids[i, :n].tolist()
        assert r["prompt_ids"] == ro.prompt_ids[i, :ro.prompt_lens[i]].tolist()
        assert "".join(r["response_pieces"]) == d["tok"].decode(r["response_ids"], skip_special=False)
        assert r["stop_reason"] == ro.stop_reason[i]
        assert r["reference"] == d["answers"][ro.prompt_index[i]]
    # the mean normalised advantage orders the picks: best >= median >= worst
    s = {r["selected_by"]: r["score"] for r in recs[:3]}
    assert s["best"] >= s["median"] >= s["worst"]


def test_dump_advantages_are_reward_minus_value(dumped):
    """gamma = lambda = 1: raw advantage = R - V(s_t); the normalised one uses the buffer's float64 mean / std."""
    d = dumped
    ro, rewards = d["ro"], d["rewards"].astype(np.float64)
    all_raw = np.concatenate([rewards[i] - _by_hand(d, i, "old_values").astype(np.float64) for i in range(N)])
    mean, std = all_raw.mean(), all_raw.std()
    for r in load_dump(d["run_dir"], 2):
        v = r["values"].astype(np.float64)
        raw = r["reward"] - v
        # float32 subtraction of two float32 numbers of size ~1: within 1 ulp of the float64 difference
        np.testing.assert_allclose(r["advantages_raw"], raw, rtol=0, atol=2 * np.finfo(np.float32).eps)
        np.testing.assert_allclose(r["returns"], r["reward"], rtol=0, atol=0)
        # float32 reductions over N*R tokens: relative error ~1e-6 of std; margin x20
        np.testing.assert_allclose(r["advantages"], (raw - mean) / (std + 1e-8), rtol=0, atol=2e-5)
    st = load_stats(d["run_dir"])
    assert [s["iteration"] for s in st] == [2]
    assert st[0]["num_samples"] == N and st[0]["num_tokens"] == float(ro.response_mask.sum())
    assert sum(st[0]["adv_hist"]) == float(ro.response_mask.sum())
    v_first = np.asarray([_by_hand(d, i, "old_values")[0] for i in range(N)], np.float64)
    ok = rewards > 0.5
    np.testing.assert_allclose(st[0]["value_first_correct"], v_first[ok].mean(), rtol=1e-5)
    np.testing.assert_allclose(st[0]["value_first_incorrect"], v_first[~ok].mean(), rtol=1e-5)
    all_v = np.concatenate([_by_hand(d, i, "old_values") for i in range(N)]).astype(np.float64)
    all_ret = np.concatenate([np.full(int(ro.response_mask[i].sum()), rewards[i]) for i in range(N)])
    ev = 1 - np.var(all_ret - all_v) / np.var(all_ret)
    np.testing.assert_allclose(st[0]["explained_variance"], ev, rtol=1e-4, atol=1e-5)


def test_repetition_spans_agree_with_the_trainer():
    rng = np.random.default_rng(3)
    texts = ["x" * 70, "abc", "the answer is 12. " * 5, "<answer>" + "wait, 1+1 " * 8, "ab" * 40]
    texts += ["".join(rng.choice(list("abcdefgh "), int(rng.integers(0, 300)))) for _ in range(40)]
    for t in texts:
        spans = repetition_spans(t)
        assert bool(spans) == _repetition(t), t
        for a, b in spans:
            assert 0 <= a < b <= len(t)
    # every occurrence of the chunks the detector samples (every 5th position) is marked, the prefix is not
    assert repetition_spans("<answer>" + "wait, 1+1 " * 8) == [(10, 85)]
    assert repetition_spans("x" * 70) == [(0, 70)]


def test_dump_schedule_and_config_errors():
    cfg = load_config(DEMO_CONFIG, ["experiment.num_iterations=100", "eval.every=30"])
    its = [i for i in range(1, 101) if is_dump_iteration(cfg, i)]
    assert its == [1, 25, 30, 50, 60, 75, 90, 100]
    off = load_config(DEMO_CONFIG, ["experiment.dump_rollouts_every=0"])
    assert not any(is_dump_iteration(off, i) for i in range(1, 50))
    with pytest.raises(ConfigError, match="experiment.dump_rollouts_every"):
        load_config(DEMO_CONFIG, ["experiment.dump_rollouts_every=-1"])


def _run_inspect(run_dir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "orz_jax.inspect", run_dir, *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_inspect_cli_writes_page_and_png(dumped, tmp_path):
    out = _run_inspect(dumped["run_dir"], "--png", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    page = (tmp_path / "iter_000002.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert (tmp_path / "summary.html").is_file()
    png = (tmp_path / "iter_000002.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    bad = _run_inspect(str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "no rollout dumps" in bad.stderr and bad.stderr.count("\n") == 1


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless browser test: Chromium is not installed (Debian: apt-get install -y chromium)")


def _dom(html_path, tmp_path):
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                           f"file://{html_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_page_renders_in_headless_chromium(dumped, tmp_path):
    from orz_jax.inspect import build
    paths = build(dumped["run_dir"], out_dir=str(tmp_path / "out"))
    dom = _dom(paths["iteration"], tmp_path)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert "data-errors" not in body, body
    assert 'data-rendered="1"' in body
    recs = load_dump(dumped["run_dir"], 2)
    n_tok = sum(len(r["response_ids"]) for r in recs)
    # counted on the rendered DOM: one span per response token, one card per sample, one value chart each
    assert len(re.findall(r'<span class="tok(?: rep)?" data-t="\d+" data-s="\d+"', dom)) == n_tok
    assert len(re.findall(r'<div class="card sample"', dom)) == len(recs) == K
    assert len(re.findall(r'<svg[^>]*class="chart value-curve', dom)) == K
    assert f'data-tokens="{n_tok}"' in body and f'data-samples="{K}"' in body

    # hover: a mouseover on the first token fills the tooltip with its value, advantage and log-prob
    probe = ("<script>var t = document.querySelector('#samples .tok'); t.dispatchEvent(new MouseEvent('mouseover', "
             "{bubbles: true})); document.body.setAttribute('data-tip', document.getElementById('tip').textContent);"
             "</script></body>")
    hover = tmp_path / "hover.html"
    hover.write_text(open(paths["iteration"]).read().replace("</body>", probe))
    tip = re.search(r'data-tip="([^"]*)"', _dom(hover, tmp_path)).group(1)
    r0 = recs[0]
    for label, v in (("V(s_t)", r0["values"][0]), ("advantage", r0["advantages"][0]),
                     ("log-prob", r0["sampling_logprobs"][0])):
        v = float(str(v))  # the page holds the shortest float32 repr, read as a double
        assert re.search(re.escape(label) + r"\s+" + re.escape(f"{v:.4f}"), tip), (label, v, tip)

    one = build(dumped["run_dir"], sample=recs[1]["sample"], out_dir=str(tmp_path / "one"))
    dom1 = _dom(one["iteration"], tmp_path)
    assert len(re.findall(r'<span class="tok(?: rep)?" data-t="\d+" data-s="\d+"', dom1)) == len(recs[1]["response_ids"])

    sdom = _dom(paths["summary"], tmp_path)
    sbody = re.search(r"<body([^>]*)>", sdom).group(1)
    assert "data-errors" not in sbody and 'data-iterations="1"' in sbody, sbody
    assert len(re.findall(r'class="bin"', sdom)) == 32


def test_page_reports_script_errors(tmp_path):
    """The error capture itself works: a page whose data breaks the renderer carries data-errors."""
    from orz_jax.inspect import JS_COMMON, JS_ITERATION, _page
    page = _page("broken", '<div id="legend"></div><div id="samples"></div>', {"cap": 3, "samples": [{}]},
                 JS_ITERATION)
    assert JS_COMMON in page
    path = tmp_path / "broken.html"
    path.write_text(page)
    body = re.search(r"<body([^>]*)>", _dom(path, tmp_path)).group(1)
    assert "data-errors=" in body
