"""``python -m orz_jax.bench {rollout,train,all} [options]``: throughput benchmarks, JAX next to PyTorch.

* ``rollout``: generated tokens/s of our JetStream engine (both drivers) vs transformers ``generate``,
  next to the memory-bandwidth bound.
* ``train``: PPO update tokens/s (actor and critic) vs the same update in PyTorch (eager and
  ``torch.compile``), with model FLOPs utilisation against the measured matmul peak.
* ``all``: everything above plus prefill and an end-to-end iteration, as one report (JSON, CSV, PNG).

Each subcommand takes ``--help``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"rollout": "orz_jax.bench.rollout", "train": "orz_jax.bench.train", "all": "orz_jax.bench.report"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
