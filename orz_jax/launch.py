"""Entry point: ``python -m orz_jax.launch [--config FILE] [key.sub=value ...]``.

With no config it runs the built-in demo (``orz_jax/demo.yaml``): a small char-level base model the
project pretrains itself on a synthetic arithmetic task, then ORZ-style PPO from it, on a CPU in
minutes. With ``--config configs/orz_0p5b.yaml`` (1.5B, 7B, 32B) it runs the ORZ recipe.

On several hosts (TPU pod slices, multi-node GPU), every process runs this same command; JAX's
multi-controller runtime (``jax.distributed.initialize``) connects them before any device is touched.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "demo.yaml")


def _multi_host() -> bool:
    """True when launched as one of several processes (TPU pod slice workers or explicit env)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_NUM_PROCESSES"):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS") or ""
    return "," in hosts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orz_jax.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in demo)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. ppo.actor.lr=2e-6")
    p.add_argument("--log-level", default="INFO")
    # intermixed: overrides may come before and after --config (``a.b=1 --config X c.d=2``)
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import jax

    if _multi_host():
        # CPU-only multi-process runs (tests, debugging) need a collectives backend; TPU/GPU ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # coordinator / process ids come from the TPU or cluster environment

    from orz_jax.config import load_config
    from orz_jax.tokenizer import TokenizerError
    from orz_jax.run_guard import TrainingError
    from orz_jax.trainer import STARTUP_ERRORS, Trainer

    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        log = logging.getLogger("orz_jax.launch")
        log.info("platform %s, %d devices (%d processes), mesh data=%d fsdp=%d tensor=%d, config %s",
                 jax.default_backend(), jax.device_count(), jax.process_count(), cfg.mesh.data, cfg.mesh.fsdp,
                 cfg.mesh.tensor, args.config or "built-in demo")
        trainer = Trainer(cfg)
    except (*STARTUP_ERRORS, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
    except TrainingError as e:  # non-finite update, full disk: one line, non-zero exit, nothing bad saved
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    lines = [f"done: iterations {s['start_iteration']} -> {s['end_iteration']} in {s['seconds']:.0f}s"]
    before, after = s.get("eval_before", {}), s.get("eval_after", {})
    for k in sorted(set(before) | set(after)):
        b, a = before.get(k), after.get(k)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"  {k:40s} before {fmt(b):>8s}   after {fmt(a):>8s}")
    if s.get("plots"):
        lines.append(f"  plots: {', '.join(sorted(s['plots'].values()))}")
    if s.get("exported_to"):
        lines.append(f"  final policy exported to {s['exported_to']}")
    if s.get("stopped_by_signal"):
        lines.append("  stopped by signal; checkpoint saved, rerun the same command to resume")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
