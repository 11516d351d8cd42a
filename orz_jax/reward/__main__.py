import sys

from orz_jax.reward.cli import main

if __name__ == "__main__":
    sys.exit(main())
