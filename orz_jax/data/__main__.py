"""``python -m orz_jax.data COMMAND ...``: data tools. ``hard-set``: mine a run's hard prompts
(:mod:`orz_jax.data.hard_set`)."""

from __future__ import annotations

import sys

COMMANDS = {"hard-set": "orz_jax.data.hard_set"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m orz_jax.data {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
