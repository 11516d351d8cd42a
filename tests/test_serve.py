"""``python -m orz_jax.serve``: an HF directory served by JetStream's gRPC server answers requests with the
same greedy tokens as the in-process rollouts."""

from __future__ import annotations

import grpc
import pytest

from orz_jax.config import ArchConfig, MeshConfig, ModelConfig
from orz_jax.models.build import create_model
from orz_jax.models.hf_io import export_hf
from orz_jax.rollout import generate_rollouts
from orz_jax.rollout.jetstream_compat import jetstream_pb2, jetstream_pb2_grpc
from orz_jax.serve import build_engine, build_parser, start_server
from orz_jax.sharding import make_mesh
from orz_jax.tokenizer import CharTokenizer

portpicker = pytest.importorskip("portpicker")


def _decode(stub, request, timeout=60):
    texts, ids = [], []
    for response in stub.Decode(request, timeout=timeout):
        for sample in response.stream_content.samples:
            texts.append(sample.text)
            ids.extend(sample.token_ids)
    return "".join(texts), ids


def test_grpc_server_answers_with_greedy_tokens(tmp_path):
    tok = CharTokenizer()
    arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, initializer_range=0.5)
    ckpt = str(tmp_path / "ckpt")
    export_hf(create_model("policy", arch, ModelConfig(arch=arch), make_mesh(MeshConfig()), seed=0), ckpt)
    tok.save(ckpt)

    args = build_parser().parse_args(["--checkpoint", ckpt, "--temperature", "0", "--max-tokens", "8", "--slots", "2",
                                      "--prefill-buckets", "16,32"])
    engine = build_engine(args)
    assert engine.sampling.greedy and engine.max_prefill_length == 32
    text_prompt = [tok.bos_id] + tok.encode("1+2=")  # text requests get a BOS when the tokenizer has one
    id_prompt = [tok.bos_id] + tok.encode("7*6")
    expected = generate_rollouts(engine, [text_prompt, id_prompt], 1, 0, engine.cfg)

    port = portpicker.pick_unused_port()
    server = start_server(engine, port)
    try:
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = jetstream_pb2_grpc.OrchestratorStub(channel)
            text, ids = _decode(stub, jetstream_pb2.DecodeRequest(
                text_content=jetstream_pb2.DecodeRequest.TextContent(text="1+2="), max_tokens=8))
            _, ids2 = _decode(stub, jetstream_pb2.DecodeRequest(
                token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=tok.encode("7*6")), max_tokens=8))
    finally:
        server.stop()
    for got, r in ((ids, 0), (ids2, 1)):
        want = expected.response_ids[r, :expected.response_mask[r].sum()].tolist()
        if expected.stop_reason[r] == "stop":
            want = want[:-1]  # JetStream does not stream the EOS token
        assert got == want and len(got) > 0
    assert text == tok.decode(ids)
