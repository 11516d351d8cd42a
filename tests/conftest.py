"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

# XLA's CPU backend runs float32 matmuls through YNNPACK fusions by default; they accumulate with about twice
# the rounding error of Eigen or MKL (relative 1.5e-6 vs 8.7e-7 on a [116, 576] x [576, 1536] product,
# measured). The suite runs Eigen's (set before JAX initialises its backend; conftest is imported before any test
# module), but the parity tests do not need it: their bounds are relative to transformers' own float32 error (PARITY_K
# below) and hold on XLA's default path too (measured: our error / transformers' <= 1.74 with either; SmolLM2
# 1.22 with this flag, 1.45 without). Subprocess tests that set their own XLA_FLAGS run XLA's default path.
if "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()

# libtpu is installed for the ahead-of-time TPU compile tests (the tpu-aot extra); with no TPU here, JAX would
# still try to open one in every test process (noise, seconds, and libtpu's host-wide lock). Compiling for a TPU
# topology needs no TPU backend (tests/test_compile.py), so the suite runs on the CPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


# Parity against transformers: how far our float32 logits may be from a float64 forward, in units of
# transformers' own float32 error against that same float64 forward. Both float32 forwards do the same
# operations on the same weights; they differ only in summation order and blocking (BLAS / XLA kernels) and in
# the float32 transcendentals. The standard rounding bound of a length-n dot product, gamma_n * sum |x_i y_i|,
# is the same for every order, so a correct float32 forward has an error of the same size as transformers'.
# Measured: XLA's default CPU matmuls (YNNPACK fusions) accumulate with about 2x the error of Eigen/MKL, and the
# max over a few thousand logits is itself a noisy statistic, hence k = 4 (2x for the kernels, 2x margin).
# A real bug (a wrong rope theta, norm eps, a dropped bias) is 10^3-10^5 x off (tests/test_model.py).
PARITY_K = 4.0


def float64_logits(hf_model, ids, attention_mask=None) -> np.ndarray:
    """Logits ``[batch, seq, vocab]`` of a float64 copy of a transformers model (the reference both float32
    forwards are measured against). ``ids``/``attention_mask``: int arrays ``[batch, seq]``."""
    import copy

    import torch

    m64 = copy.deepcopy(hf_model).double().eval()
    kw = {} if attention_mask is None else dict(attention_mask=torch.tensor(attention_mask))
    with torch.no_grad():
        return m64(torch.tensor(ids), **kw).logits.numpy()


def parity_errors(ours, hf32, hf64, mask=None) -> tuple[float, float]:
    """(max |ours - hf64|, max |hf32 - hf64|) over the positions where ``mask`` ``[batch, seq]`` is set."""
    ours, hf32, hf64 = (np.asarray(a, np.float64) for a in (ours, hf32, hf64))
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        ours, hf32, hf64 = ours[m], hf32[m], hf64[m]
    return float(np.abs(ours - hf64).max()), float(np.abs(hf32 - hf64).max())


def assert_float32_parity(ours, hf32, hf64, mask=None, k: float = PARITY_K) -> tuple[float, float]:
    """Our float32 logits are within ``k`` x transformers' own float32 error of the float64 forward."""
    e_ours, e_hf = parity_errors(ours, hf32, hf64, mask)
    assert e_hf > 0, "the float32 and float64 references are identical: the float64 copy did not take"
    assert e_ours <= k * e_hf, f"our float32 error {e_ours:.3g} > {k} x transformers' float32 error {e_hf:.3g}"
    return e_ours, e_hf


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


def run_aot_script(script: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a libtpu ahead-of-time compile script (compile-only TPU devices; JAX itself on the CPU backend) in its
    own process, from the repository root with this checkout first on the path. Asserts exit status 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-6000:]
    return p


def tiny_tpu_yaml(tensor: int, slots: int) -> str:
    """A two-layer bfloat16 config for the v5p:2x2x1 ahead-of-time decode tests: ``tensor`` ways of tensor
    parallelism, ``slots`` concurrent decodes, a 32-token prompt bucket and 2016-token responses."""
    return f"""\
model:
  arch: {{vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2,
         head_dim: 64}}
  tokenizer: unused
  dtype: bfloat16
mesh: {{data: 1, fsdp: -1, tensor: {tensor}}}
rollout: {{n_samples_per_prompt: 4, max_prompt_len: 32, max_response_len: 2016, prefill_buckets: [32],
          max_concurrent_decodes: {slots}, driver: orchestrator, decode_window_block: 256}}
ppo: {{micro_batch_rows: 4, pack_len: 2048}}
data: {{prompts_per_iter: 8}}
"""
