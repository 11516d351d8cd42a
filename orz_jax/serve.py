"""Serve a policy over JetStream's gRPC API.

    python -m orz_jax.serve --checkpoint /models/Qwen2.5-0.5B --port 9000 --temperature 0

``--checkpoint`` is a Hugging Face directory (config.json + safetensors + tokenizer files), loaded with
``orz_jax.models.hf_io.load_hf``. The engine is :class:`orz_jax.rollout.RolloutEngine`; requests are
scheduled by JetStream's orchestrator (continuous batching) behind ``jetstream.core.server_lib.run``.
Sampling settings come from the flags (temperature 0 = greedy) and apply to every request.

Client (see also ``tests/test_serve.py``):

    import grpc
    from orz_jax.rollout.jetstream_compat import jetstream_pb2, jetstream_pb2_grpc

    with grpc.insecure_channel("localhost:9000") as channel:
        stub = jetstream_pb2_grpc.OrchestratorStub(channel)
        request = jetstream_pb2.DecodeRequest(
            text_content=jetstream_pb2.DecodeRequest.TextContent(text="1 + 1 ="), max_tokens=64)
        pieces = [s.text for r in stub.Decode(request) for s in r.stream_content.samples]
        print("".join(pieces))

The stream carries one piece of text and the token id(s) per generated token; the EOS token itself is not
streamed (JetStream's convention). Prompts longer than the largest prefill bucket keep their last tokens
(a warning is logged): a server must not stop on one long request.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Optional, Sequence

import grpc
import jax

from orz_jax.config import load_config
from orz_jax.rollout.engine import RolloutEngine
from orz_jax.rollout.jetstream_compat import config_lib, server_lib

log = logging.getLogger(__name__)

# JetStream's token-id request path pads with its own fixed bucket list and needs our largest bucket in it.
_JETSTREAM_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def start_server(engine: RolloutEngine, port: int, credentials=None, threads: Optional[int] = None):
    """Start JetStream's gRPC server (``server_lib.run``) on ``port`` with ``engine`` doing both prefill and
    decode on its mesh. Returns the ``JetStreamServer`` (``.stop()`` / ``.wait_for_termination()``)."""
    devices = list(engine.mesh.devices.flat)
    server_config = config_lib.ServerConfig(
        interleaved_slices=(f"{devices[0].platform}={len(devices)}",),
        interleaved_engine_create_fns=(lambda _devices: engine,))
    if engine.max_prefill_length not in _JETSTREAM_BUCKETS:
        log.warning("largest prefill bucket %d is not one of JetStream's %s: token-id requests will fail; "
                    "text requests are fine", engine.max_prefill_length, _JETSTREAM_BUCKETS)
    return server_lib.run(port=port, config=server_config, devices=devices,
                          credentials=credentials or grpc.insecure_server_credentials(), threads=threads,
                          jax_padding=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orz_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="Hugging Face model directory")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--config", default=None, help="optional YAML config (model dtype, mesh, rollout section)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint directory)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--max-tokens", type=int, default=None, help="longest response (rollout.max_response_len)")
    p.add_argument("--slots", type=int, default=None, help="concurrent decodes (rollout.max_concurrent_decodes)")
    p.add_argument("--prefill-buckets", type=str, default=None, help="comma-separated, e.g. 64,128,256,512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p


def build_engine(args: argparse.Namespace) -> RolloutEngine:
    """Config (YAML + overrides + flags) -> mesh -> ``load_hf`` policy -> tokenizer -> engine."""
    overrides = list(args.overrides) + [f"model.checkpoint={args.checkpoint}"]
    flag_keys = {"temperature": "rollout.temperature", "top_p": "rollout.top_p", "top_k": "rollout.top_k",
                 "max_tokens": "rollout.max_response_len", "slots": "rollout.max_concurrent_decodes"}
    overrides += [f"{key}={getattr(args, name)}" for name, key in flag_keys.items() if getattr(args, name) is not None]
    if args.prefill_buckets:
        buckets = [int(b) for b in args.prefill_buckets.split(",")]
        overrides += [f"rollout.prefill_buckets={buckets}", f"rollout.max_prompt_len={buckets[-1]}"]
    # Serving never packs training rows: keep the trainer's check (ppo.pack_len >= prompt + response) from
    # rejecting long serving lengths.
    overrides.append(f"ppo.pack_len={1 << 30}")
    cfg = load_config(args.config, overrides)

    from orz_jax.models.hf_io import load_hf
    from orz_jax.sharding import make_mesh
    from orz_jax.tokenizer import load_tokenizer

    mesh = make_mesh(cfg.mesh)
    policy, _ = load_hf("policy", args.checkpoint, cfg.model, mesh)
    tokenizer = load_tokenizer(args.tokenizer or cfg.model.tokenizer or args.checkpoint)
    return RolloutEngine(policy, cfg.rollout, tokenizer, mesh=mesh, seed=args.seed)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = build_engine(args)
    log.info("serving %s on port %d (%s, %d slots, sampling %s)", args.checkpoint, args.port,
             jax.default_backend(), engine.max_concurrent_decodes, dataclasses.asdict(engine.sampling))
    server = start_server(engine, args.port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
