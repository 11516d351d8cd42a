"""The gRPC server survives hostile requests, refuses a taken port, and gives one-line start-up errors
(issue 19, failures 1, 10 and the serve part of 8)."""

from __future__ import annotations

import grpc
import pytest

from orz_jax.config import ArchConfig, MeshConfig, ModelConfig, RolloutConfig
from orz_jax.models.build import create_model
from orz_jax.rollout import RolloutEngine
from orz_jax.rollout.jetstream_compat import jetstream_pb2, jetstream_pb2_grpc
from orz_jax.serve import ServeError, check_port_free, main, start_server
from orz_jax.sharding import make_mesh
from orz_jax.tokenizer import CharTokenizer

portpicker = pytest.importorskip("portpicker")

MAX_TOKENS = 4
BUCKET = 16


@pytest.fixture(scope="module")
def served():
    """A tiny policy served with a tokenizer that has no BOS (as Qwen2.5's), so an empty text is no tokens."""
    tok = CharTokenizer()
    tok.bos_id = None
    arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1)
    mesh = make_mesh(MeshConfig())
    policy = create_model("policy", arch, ModelConfig(arch=arch), mesh, seed=0)
    cfg = RolloutConfig(temperature=0.0, max_prompt_len=BUCKET, max_response_len=MAX_TOKENS,
                        prefill_buckets=[BUCKET], max_concurrent_decodes=2, stop_strings=[])
    engine = RolloutEngine(policy, cfg, tok, mesh=mesh)
    port = portpicker.pick_unused_port()
    server = start_server(engine, port)
    channel = grpc.insecure_channel(f"localhost:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield jetstream_pb2_grpc.OrchestratorStub(channel), tok, port, engine
    channel.close()
    server.stop()


def _text(text, **kw):
    return jetstream_pb2.DecodeRequest(text_content=jetstream_pb2.DecodeRequest.TextContent(text=text), **kw)


def _ids(ids, **kw):
    return jetstream_pb2.DecodeRequest(token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids), **kw)


def _decode(stub, request):
    return [t for r in stub.Decode(request, timeout=120) for s in r.stream_content.samples for t in s.token_ids]


def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(served):
    stub, tok, _, _ = served
    vocab = tok.vocab_size
    bad = {
        "empty text (no BOS)": (_text("", max_tokens=2), "empty"),
        "empty token_ids": (_ids([], max_tokens=2), "empty"),
        "session_cache": (_text("1+1", max_tokens=2, session_cache="s"), "session_cache"),
        "id 10**6": (_ids([5, 10**6], max_tokens=2), "token_ids[1] = 1000000"),
        "id == vocab": (_ids([vocab], max_tokens=2), f"[0, {vocab})"),
        "negative id": (_ids([-1], max_tokens=2), "token_ids[0] = -1"),
        "no content": (jetstream_pb2.DecodeRequest(max_tokens=2), "text_content or token_content"),
        "negative max_tokens": (_text("1+1", max_tokens=-3), "max_tokens = -3"),
        "max_tokens over the limit": (_text("1+1", max_tokens=MAX_TOKENS + 1), f"[1, {MAX_TOKENS}]"),
        "prompt too long": (_text("1" * (BUCKET + 1), max_tokens=2), f"{BUCKET + 1} tokens"),
    }
    for name, (request, words) in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            _decode(stub, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.code(), err.value.details())
        assert words in err.value.details(), (name, err.value.details())
    # Still alive and serving: a prompt of exactly the largest bucket, and max_tokens 0 = the server's limit.
    assert stub.HealthCheck(jetstream_pb2.HealthCheckRequest(), timeout=10).is_live
    assert 1 <= len(_decode(stub, _text("1" * BUCKET, max_tokens=0))) <= MAX_TOKENS
    assert 1 <= len(_decode(stub, _ids(tok.encode("7*6"), max_tokens=2))) <= 2


def test_a_taken_port_is_refused(served, capsys):
    _, _, port, engine = served
    with pytest.raises(ServeError, match=f"--port {port}: the port is already in use"):
        check_port_free(port)
    # The gRPC bind itself refuses too: gRPC's default SO_REUSEPORT would let a second server share the port.
    with pytest.raises(ServeError, match="already in use"):
        start_server(engine, port)
    check_port_free(portpicker.pick_unused_port())  # a free port passes
    assert main(["--checkpoint", "unused", "--port", str(port)]) == 2  # the command line: before the model load
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --port {port}: the port is already in use " \
                                                               f"(another server?)"


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "-1"], "rollout.temperature: must be >= 0 (0 = greedy) (flag --temperature)"),
    (["--top-p", "0"], "rollout.top_p"),
    (["--slots", "0"], "rollout.max_concurrent_decodes"),
    (["--prefill-buckets", "64,abc"], "--prefill-buckets '64,abc': expected comma-separated integers"),
    (["--prefill-buckets", "64,32"], "ascending"),
    (["--port", "70000"], "--port 70000"),
])
def test_bad_serve_flags_give_one_line_errors(tmp_path, capsys, flags, words):
    """Flags are checked before the checkpoint is loaded (the checkpoint here does not even exist)."""
    argv = ["--checkpoint", str(tmp_path / "none"), "--port", str(portpicker.pick_unused_port()), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and words in err[-1], err
