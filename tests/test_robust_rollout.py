"""The orchestrator rollout driver never hangs or dies silently (issue 19, failure 13): a stuck engine call
raises ``RolloutTimeout`` after ``rollout.timeout_s`` without progress, naming what was outstanding; an
exception in one of JetStream's threads reaches the caller as ``RolloutDriverError`` naming the thread
(JetStream's own threads SIGKILL the process)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from orz_jax.config import ArchConfig, ConfigError, MeshConfig, ModelConfig, RolloutConfig, load_config
from orz_jax.models.build import create_model
from orz_jax.rollout import RolloutEngine, generate_rollouts
from orz_jax.rollout.rollouts import RolloutDriverError, RolloutTimeout
from orz_jax.sharding import make_mesh
from orz_jax.tokenizer import CharTokenizer

CFG = RolloutConfig(driver="orchestrator", temperature=0.0, max_prompt_len=8, prefill_buckets=[8],
                    max_response_len=4, max_concurrent_decodes=2, stop_strings=[], timeout_s=1.0)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def engine(tok):
    arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1)
    mesh = make_mesh(MeshConfig())
    engine = RolloutEngine(create_model("policy", arch, ModelConfig(arch=arch), mesh, seed=0), CFG, tok, mesh=mesh)
    # Compile prefill and decode once, so the 1 s watchdog below measures a stuck call, not a compile.
    generate_rollouts(engine, [tok.encode("1+2")], 1, 0, dataclasses.replace(CFG, timeout_s=600.0))
    return engine


def _patched(engine, name, replacement):
    original = getattr(engine, name)
    setattr(engine, name, replacement(original))
    return lambda: delattr(engine, name)  # the instance attribute shadows the method; deleting restores it


def test_a_stuck_generate_call_times_out_with_what_was_outstanding(engine, tok):
    release = threading.Event()
    calls = [0]

    def stuck_after_two(generate):
        def wrapper(params, state):
            calls[0] += 1
            if calls[0] > 2:
                release.wait(60)  # a hung device call
            return generate(params, state)
        return wrapper

    restore = _patched(engine, "generate", stuck_after_two)
    t0 = time.monotonic()
    try:
        with pytest.raises(RolloutTimeout) as err:
            generate_rollouts(engine, [tok.encode("1+2"), tok.encode("3*4")], 2, 0, CFG)
    finally:
        release.set()
        restore()
    msg = str(err.value)
    assert "rollout.driver=orchestrator: no progress for" in msg and "rollout.timeout_s=1" in msg, msg
    assert "4 of 4 requests unfinished" in msg and "decoding in slots [0, 1]" in msg, msg
    assert isinstance(err.value, TimeoutError)
    assert time.monotonic() - t0 < 30  # watchdog 1 s + stop grace 1 s, with slack for a loaded CPU


@pytest.mark.parametrize("method, thread", [("prefill", "prefill-0"), ("generate", "generate-0"),
                                            ("insert", "generate-0")])
def test_an_exception_in_a_driver_thread_reaches_the_caller(engine, tok, method, thread):
    def boom(original):
        def wrapper(*args, **kwargs):
            raise FloatingPointError(f"injected {method} failure")
        return wrapper

    restore = _patched(engine, method, boom)
    try:
        with pytest.raises(RolloutDriverError) as err:
            generate_rollouts(engine, [tok.encode("1+2")], 2, 0, CFG)
    finally:
        restore()
    msg = str(err.value)
    assert f"the {thread} thread raised FloatingPointError: injected {method} failure" in msg, msg
    assert "2 of 2 requests unfinished" in msg, msg
    # The engine still serves after the failure.
    ok = generate_rollouts(engine, [tok.encode("1+2")], 1, 0, dataclasses.replace(CFG, timeout_s=600.0))
    assert ok.response_mask.sum() >= 1


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_rollout_timeout_is_validated(value):
    with pytest.raises(ConfigError, match="rollout.timeout_s"):
        load_config(None, ["model.checkpoint=demo", f"rollout.timeout_s={value}"])
