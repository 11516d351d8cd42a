"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# XLA's CPU backend runs float32 matmuls through YNNPACK fusions by default; they accumulate with about twice
# the rounding error of Eigen or MKL (relative 1.5e-6 vs 8.7e-7 on a [116, 576] x [576, 1536] product,
# measured). Through SmolLM2's 30 real layers that alone moves logits 1.5e-4 away from transformers' float32
# forward, against 7.5e-5 with Eigen. The parity tests compare float32 against float32, so the suite uses
# Eigen (set before JAX initialises its backend; conftest is imported before any test module). Speed on
# this CPU is the same either way. Subprocess tests that set their own XLA_FLAGS run XLA's default path.
if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

REPO = Path(__file__).resolve().parents[1]
# Small real ORZ records in ORZ's schemas, shipped with the tests (tests/fixtures/README.md): every data test
# runs on them, so a fresh clone skips nothing for want of data.
FIXTURE_DATA = REPO / "tests" / "fixtures" / "orz"
# ORZ's larger files, when present beside the repository (or where $ORZ_SHARED_DATA points; a path that does
# not exist turns the extra tests off): optional extra coverage, never the only coverage.
SHARED_DATA = Path(os.environ.get("ORZ_SHARED_DATA") or REPO.parent / "shared" / "data" / "orz")


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600) -> str:
    """Run ``code`` in a fresh Python with ``n_devices`` fake CPU devices (XLA_FLAGS must be set before
    JAX is imported, so this cannot happen inside the pytest process). Returns stdout; raises on failure."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def orz_fixtures() -> Path:
    """The directory of the shipped ORZ-schema fixtures (always present)."""
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """ORZ's larger files, for extra tests only; skips when absent (the fixture-based tests still run)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"extra coverage only: ORZ's larger data files are not at {SHARED_DATA} "
                    "(set $ORZ_SHARED_DATA); the same checks ran on tests/fixtures/orz")
    return SHARED_DATA
