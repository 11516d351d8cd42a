"""Tests that fail for a broken trainer: it learns, its buffer stays aligned, its critic fits, SIGTERM saves and
resumes, its rollout metrics are right, GRPO runs with no critic.

The in-process tests share one tiny Trainer (the demo's code path at toy size: one compile for all of them) and
replace only its reward (``Trainer.score``) with one whose value the test can predict. They drive
``train_iteration`` directly: everything between the reward and the update (gather_rollouts, packing,
values, advantages, the critic and actor steps, the weight sync) is the trainer's own code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest

from conftest import REPO
from orz_jax.rollout.rollouts import RolloutBatch
from orz_jax.trainer import rollout_metrics

# The tiny demo of tests/test_trainer.py, with more samples per iteration (iterations take ~0.2 s once compiled,
# the compile is the cost) and short responses.
TINY = [
    "demo.steps=30", "demo.warmup_steps=5", "demo.hidden_size=32", "demo.intermediate_size=64", "demo.num_layers=1",
    "data.prompts_per_iter=8", "rollout.n_samples_per_prompt=8", "rollout.max_concurrent_decodes=64",
    "rollout.max_response_len=12", "ppo.pack_len=64", "ppo.micro_batch_rows=8", "ppo.critic_steps_per_batch=2",
    "data.synthetic.num_eval=16", "eval.max_prompts=4", "eval.n_samples=2", "experiment.progress_bar=false",
    "experiment.tensorboard=false",
]


def _crc(*arrays) -> int:
    return zlib.crc32(b"".join(np.ascontiguousarray(a, np.int32).tobytes() for a in arrays))


def sample_code(prompt: np.ndarray, response: np.ndarray) -> float:
    """A reward in [0.001, 0.999] that names its sample: a hash of its prompt and response token ids."""
    return (1 + (31 * _crc(prompt) + _crc(prompt, response)) % 999) / 1000.0


def coded_score(ro: RolloutBatch, answers) -> tuple[np.ndarray, dict]:
    """Trainer.score replacement: each sample's reward encodes its own prompt and response."""
    r = [sample_code(ro.prompt_ids[i, :ro.prompt_lens[i]], ro.response_ids[i, :ro.response_lens[i]])
         for i in range(ro.num_samples)]
    return np.asarray(r, np.float32), {}


def marker_score(marker: str):
    """Trainer.score replacement for the learning task: reward 1 for a response that writes ``marker``."""
    def score(ro: RolloutBatch, answers) -> tuple[np.ndarray, dict]:
        return np.asarray([float(marker in t) for t in ro.texts], np.float32), {}
    return score


def pick_marker(trainer, rate: float) -> str:
    """The character the policy writes in the share of its responses closest to ``rate`` (sampled on the eval
    prompts, 16 samples each), so the task is neither solved nor hopeless at the start."""
    items = trainer.eval_sets["synthetic"]
    ro = trainer.rollout([it.prompt_ids for it in items], 16, jax.random.key(7))
    chars = sorted(set("".join(ro.texts)))
    share = {c: np.mean([c in t for t in ro.texts]) for c in chars}
    return min(chars, key=lambda c: abs(share[c] - rate))


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One demo-model cache for this module's in-process and subprocess runs (pretrained once)."""
    return str(tmp_path_factory.mktemp("demo_cache"))


def _make_trainer(out_dir, cache, extra=()):
    from orz_jax.config import load_config
    from orz_jax.launch import DEMO_CONFIG
    from orz_jax.trainer import Trainer

    cfg = load_config(DEMO_CONFIG, [*TINY, f"demo.cache_dir={cache}", f"experiment.out_dir={out_dir}", *extra])
    return Trainer(cfg)


class Spy:
    """Wraps the trainer's rollout and PPO entry points to record what flows through one iteration."""

    def __init__(self, trainer, freeze_actor: bool = False):
        self.trainer, self.rollouts, self.prepared, self.actor_batches = trainer, [], [], []
        fns = trainer.fns
        real_rollout, real_prepare, real_actor = trainer.rollout, fns.prepare_batch, fns.actor_step

        def rollout(*a, **k):
            ro = real_rollout(*a, **k)
            self.rollouts.append(ro)
            return ro

        def prepare(*a, **k):
            out = real_prepare(*a, **k)
            self.prepared.append(jax.device_get(out))
            return out

        def actor(state, batch):
            self.actor_batches.append(jax.device_get(batch))
            return (state, {}) if freeze_actor else real_actor(state, batch)

        trainer.rollout = rollout
        trainer.fns = type(fns)(**{**fns.__dict__, "prepare_batch": prepare, "actor_step": actor})

    def fix_buffer(self):
        """From now on every iteration trains on the rollouts of the first one (a fixed buffer)."""
        real = self.trainer.rollout

        def rollout(*a, **k):
            return self.rollouts[0] if self.rollouts else real(*a, **k)

        self.trainer.rollout = rollout


@pytest.fixture(scope="module")
def shared_trainer(tmp_path_factory, demo_cache):
    tr = _make_trainer(tmp_path_factory.mktemp("run"), demo_cache, ["ppo.actor.lr=3e-3", "ppo.critic.lr=3e-3"])
    yield tr
    tr.scorer.close()
    tr.ckpt.close()


@pytest.fixture
def trainer(shared_trainer):
    """The shared trainer, with whatever a test replaced (reward, spies, a fixed buffer) put back afterwards."""
    tr = shared_trainer
    fns, score = tr.fns, tr.score
    yield tr
    tr.fns, tr.score = fns, score
    tr.__dict__.pop("rollout", None)  # the spies set an instance attribute over the method


def _iterate(tr, n):
    out = []
    for _ in range(n):
        out.append(tr.train_iteration())
        tr.iteration += 1
    return out


def _segments(batch):
    """(prompt tokens, response tokens, response positions) of every packed sample of a PackedBatch."""
    out = []
    for r in range(batch.tokens.shape[0]):
        for s in np.unique(batch.segment_ids[r]):
            if s == 0:
                continue
            cols = np.nonzero(batch.segment_ids[r] == s)[0]
            resp = cols[batch.loss_mask[r, cols] > 0]
            prm = cols[batch.loss_mask[r, cols] == 0]
            out.append((batch.tokens[r, prm], batch.tokens[r, resp], (r, resp)))
    return out


def test_packed_batch_keeps_every_sample_with_its_prompt_reward_and_advantage(trainer):
    """After gather_rollouts and packing, each packed sample's return is the reward of its own (prompt, response)
    and its advantage is (return - value) normalised over the buffer, exactly as the actor step receives it."""
    trainer.score = coded_score
    spy = Spy(trainer)
    _iterate(trainer, 1)
    ro, batch = spy.rollouts[-1], spy.actor_batches[-1]
    segs = _segments(batch)
    assert len(segs) == ro.num_samples == 64
    want = {}
    for i in range(ro.num_samples):  # the rollouts themselves: prompt i's samples follow its own prompt
        key = (tuple(ro.prompt_ids[i, :ro.prompt_lens[i]]), tuple(ro.response_ids[i, :ro.response_lens[i]]))
        want[key] = want.get(key, 0) + 1
    got, raw = {}, []
    for prm, resp, (r, cols) in segs:
        key = (tuple(prm), tuple(resp))
        got[key] = got.get(key, 0) + 1
        np.testing.assert_array_equal(batch.returns[r, cols], np.float32(sample_code(prm, resp)))
        raw.append(batch.returns[r, cols] - batch.old_values[r, cols])
    assert got == want  # every (prompt, response) pair packed once, none mixed up
    raw = np.concatenate(raw).astype(np.float64)
    adv = np.concatenate([batch.advantages[r, cols] for _, _, (r, cols) in segs]).astype(np.float64)
    # ppo.normalize_advantages (the default): global mean/std over every response token of the buffer
    # float32 normalisation of O(1) values over <= 768 tokens is exact to ~1e-6; 1e-4 leaves a wide margin while
    # a single sample with another's advantage moves it by O(0.1)
    np.testing.assert_allclose(adv, (raw - raw.mean()) / raw.std(), atol=1e-4)


def test_critic_values_move_toward_returns_on_a_fixed_buffer(trainer):
    """On one fixed buffer the critic's values approach the returns: squared error falls, explained variance
    rises (values measured by the trainer's own prepare_batch, before each iteration's critic update)."""
    trainer.score = marker_score(pick_marker(trainer, 0.5))  # 0/1 rewards that depend on the response
    spy = Spy(trainer, freeze_actor=True)  # the policy stays as it is for the learning test
    spy.fix_buffer()
    _iterate(trainer, 30)
    stats = []
    for b in spy.prepared:
        m = b.loss_mask > 0
        v, ret = b.old_values[m].astype(np.float64), b.returns[m].astype(np.float64)
        stats.append((np.mean((v - ret) ** 2), 1 - np.var(ret - v) / max(np.var(ret), 1e-12)))
    assert np.var(spy.prepared[0].returns[spy.prepared[0].loss_mask > 0]) > 0.01, "rewards all equal: no signal"
    mse0, ev0 = stats[0]
    mse, ev = stats[-1]
    print(f"critic on a fixed buffer: squared error {mse0:.4f} -> {mse:.4f}, explained variance {ev0:.3f} -> {ev:.3f}")
    assert mse < 0.5 * mse0, stats
    assert ev > ev0 + 0.1, stats


def test_ppo_raises_the_reward_of_a_learnable_task(trainer):
    """Reward 1 for writing a marker character: the mean reward of the last iterations clearly exceeds the first
    ones'."""
    trainer.score = marker_score(pick_marker(trainer, 0.2))
    rewards = [m["reward_mean"] for m in _iterate(trainer, 40)]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    print(f"marker task: mean reward of iterations 1-5 {first:.3f}, 36-40 {last:.3f}")
    assert last > first + 0.25 and last > 2 * first, rewards


def test_grpo_through_the_trainer_builds_no_critic(tmp_path, demo_cache):
    tr = _make_trainer(tmp_path / "run", demo_cache, ["ppo.advantage_estimator=grpo", "ppo.critic_steps_per_batch=0",
                                                      "experiment.num_iterations=2", "checkpoint.save_every=1",
                                                      "checkpoint.export_hf_at_end=false"])
    assert tr.critic is None
    tr.score = coded_score
    spy = Spy(tr)
    summary = tr.run()
    assert summary["end_iteration"] == 2
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if "reward_mean" in r] == [1, 2]
    assert not any(k.startswith("critic/") for r in rows for k in r)
    # GRPO: a sample's advantage is its reward standardised within its prompt's group, then normalised
    ro, batch = spy.rollouts[1], spy.actor_batches[0]  # rollouts[0] is the evaluation before training
    codes = {}
    for i in range(ro.num_samples):
        codes.setdefault(tuple(ro.prompt_ids[i, :ro.prompt_lens[i]]), []).append(
            sample_code(ro.prompt_ids[i, :ro.prompt_lens[i]], ro.response_ids[i, :ro.response_lens[i]]))
    want, got = [], []
    for prm, resp, (r, cols) in _segments(batch):
        np.testing.assert_array_equal(batch.old_values[r, cols], 0.0)  # no critic, no values
        np.testing.assert_array_equal(batch.returns[r, cols], np.float32(sample_code(prm, resp)))
        group = np.asarray(codes[tuple(prm)], np.float64)
        a = (sample_code(prm, resp) - group.mean()) / group.std() if group.std() > 0 else 0.0
        want.append(np.full(len(cols), a))
        got.append(batch.advantages[r, cols])
    want = np.concatenate(want)  # then normalised over every response token of the buffer
    np.testing.assert_allclose(np.concatenate(got), (want - want.mean()) / want.std(), atol=1e-4)
    # the checkpoint holds no critic and restores into the actor alone
    from orz_jax.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"), tr.cfg.checkpoint)
    actor, critic, _, meta = ck.restore(2, tr.actor, None)
    ck.close()
    assert critic is None and meta["iteration"] == 2


# ----------------------------------------------------------------------------------------------
# SIGTERM (a subprocess, as TPU maintenance or preemption would send it)
# ----------------------------------------------------------------------------------------------


def _launch(out_dir, cache, iters, extra=()):
    cmd = [sys.executable, "-m", "orz_jax.launch", *TINY, f"demo.cache_dir={cache}", f"experiment.out_dir={out_dir}",
           f"experiment.num_iterations={iters}", "checkpoint.save_every=1000", "eval.every=0",
           "checkpoint.export_hf_at_end=false", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return cmd, env


def _train_iterations(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(x)["iteration"] for x in f if x.strip() and "reward_mean" in x]


@pytest.mark.timeout(900)
def test_sigterm_saves_exits_zero_and_resumes_at_that_iteration(tmp_path, demo_cache, shared_trainer):
    """One real process: SIGTERM after its first iteration; it finishes the iteration under way, saves, exits 0.
    The checkpoint holds that iteration and restores into a trainer of the same config (the resume path itself,
    latest finalised step -> state, is tests/test_trainer.py's kill -9 test; a second process would double the
    time of this one)."""
    from orz_jax.checkpoint import Checkpointer

    out = tmp_path / "run"
    cmd, env = _launch(out, demo_cache, 1000)  # far more iterations than it will get to run
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not _train_iterations(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    proc.send_signal(signal.SIGTERM)
    try:  # it finishes the iteration under way (~0.2 s), saves, draws the plots and exits
        log = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not exit within 120 s of SIGTERM:\n" + proc.communicate()[0][-4000:])
    assert proc.returncode == 0, log[-4000:]
    summary = json.load(open(out / "summary.json"))
    stopped = summary["end_iteration"]
    assert summary["stopped_by_signal"] and 1 <= stopped < 1000, summary
    assert _train_iterations(out) == list(range(1, stopped + 1))

    ck = Checkpointer(str(out / "checkpoints"), shared_trainer.cfg.checkpoint)
    try:
        assert ck.latest_step() == stopped  # what a restart resumes from
        actor, critic, data_state, meta = ck.restore(stopped, shared_trainer.actor, shared_trainer.critic)
    finally:
        ck.close()
    assert meta["iteration"] == stopped and int(actor.step) == stopped and int(critic.step) == 2 * stopped
    assert data_state  # the data iterator's position is saved with it


# ----------------------------------------------------------------------------------------------
# rollout_metrics against hand-computed values
# ----------------------------------------------------------------------------------------------


def test_rollout_metrics_hand_computed():
    loop = "1 + 1 = 2 " * 8  # 80 chars of period 10: the 20-char spans at 0, 10, 20 are equal
    texts = ["<answer>\\boxed{3}</answer>", "Wait, let me recheck. \\boxed{4}", loop, "x",
             "however it is 5", "no reflection: waiting is not a word match"]
    lens = np.array([5, 7, 12, 1, 4, 9])
    n, width = len(texts), 12
    ro = RolloutBatch(prompt_ids=np.zeros((n, 3), np.int32), prompt_lens=np.full(n, 3, np.int32),
                      response_ids=np.zeros((n, width), np.int32),
                      response_mask=(np.arange(width)[None] < lens[:, None]).astype(np.int32),
                      logprobs=np.zeros((n, width), np.float32), prompt_index=np.array([0, 0, 1, 1, 2, 2]),
                      stop_reason=["stop", "stop", "length", "stop", "stop", "length"], texts=texts)
    rewards = np.array([1, 0, 0, 0, 0, 1], np.float32)
    m = rollout_metrics(ro, rewards, n_samples=2, prefix="t/")
    assert m["t/reward_mean"] == pytest.approx(2 / 6)
    assert m["t/accuracy"] == pytest.approx(2 / 6)
    assert m["t/pass@2"] == pytest.approx(2 / 3)  # groups 0 and 2 have a correct sample, group 1 none
    assert m["t/response_len_mean"] == pytest.approx(38 / 6)
    assert m["t/response_len_max"] == 12
    assert m["t/response_len_correct"] == pytest.approx((5 + 9) / 2)
    assert m["t/response_len_incorrect"] == pytest.approx((7 + 12 + 1 + 4) / 4)
    assert m["t/truncated_frac"] == pytest.approx(2 / 6)
    assert m["t/repetition_frac"] == pytest.approx(1 / 6)  # only the loop
    assert m["t/reflection_frac"] == pytest.approx(2 / 6)  # "Wait"/"recheck" and "however"; "waiting" is not
    assert m["t/num_samples"] == 6
