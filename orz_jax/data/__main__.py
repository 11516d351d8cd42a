"""``python -m orz_jax.data COMMAND ...``: the data subcommands.

    download   fetch ORZ's training and evaluation files, verified by git blob id (orz_jax/data/download.py)
    hard-set   write the prompts a run rarely solved, in ORZ's training schema (orz_jax/data/hard_set.py)

Each command's module is imported only when it runs, so one command's imports never stop another.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "download": ("orz_jax.data.download", "fetch ORZ's training and evaluation files, verified by git blob id"),
    "hard-set": ("orz_jax.data.hard_set", "mine the prompts at or below a pass rate from a run's pass-rate log"),
}


def _usage() -> str:
    lines = ["usage: python -m orz_jax.data COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n'python -m orz_jax.data COMMAND --help' describes a command's arguments.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {sorted(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the command's module exists but one of its imports does not
            raise
        print(f"error: the '{name}' command is not available in this installation ({module_name} is missing)",
              file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
