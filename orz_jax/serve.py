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
streamed (JetStream's convention).

Every request is checked before it reaches the engine; a bad one is answered ``INVALID_ARGUMENT`` with a
message and nothing else happens (no request can stop the server):

* a text prompt is tokenized here (with the tokenizer's BOS, if it has one); a token-id prompt gets the
  BOS prepended too (JetStream's convention) and every id must be in ``[0, vocab_size)``;
* the prompt must have at least one token and at most the largest prefill bucket;
* ``max_tokens`` must be in ``[1, rollout.max_response_len]``; 0 (the proto default) means that maximum;
* ``session_cache`` (prefix reuse) is not supported.

A request whose prefill still fails gets ``INTERNAL`` with the reason; the server carries on. The port is
bound exclusively: a second server on a port that is taken stops at start-up with a one-line error
(gRPC would otherwise share it through ``SO_REUSEPORT`` and split requests between two models).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import queue
import socket
import sys
import threading
from concurrent import futures
from typing import Any, Optional, Sequence

import grpc
import jax
import numpy as np

from orz_jax.config import load_config
from orz_jax.rollout.engine import RolloutEngine
from orz_jax.rollout.jetstream_compat import jetstream_pb2, jetstream_pb2_grpc, orchestrator

log = logging.getLogger(__name__)


class ServeError(ValueError):
    """Bad serve flags or a port that is taken; the message is one line."""


class _BadRequest(ValueError):
    """A request the server answers with INVALID_ARGUMENT (the message says why)."""


class _PrefillFailed(RuntimeError):
    """The engine raised on one request's prefill; that request gets INTERNAL, the server carries on."""


def check_request(engine: RolloutEngine, request: Any) -> tuple[list[int], int, bool]:
    """Validate one ``DecodeRequest`` against the engine -> (prompt ids incl. BOS, max_tokens, token request).

    Raises ``_BadRequest`` naming the field and what was expected.
    """
    if request.session_cache:
        raise _BadRequest("session_cache is not supported by this server (no prefix reuse); leave it empty")
    which = request.WhichOneof("content")
    bos = engine.tokenizer.bos_id
    if which == "text_content":
        ids = [int(t) for t in engine.tokenizer.encode(request.text_content.text, add_bos=bos is not None)]
    elif which == "token_content":
        ids = list(request.token_content.token_ids)
        vocab = engine.arch.vocab_size
        bad = [(k, t) for k, t in enumerate(ids) if not 0 <= t < vocab]
        if bad:
            k, t = bad[0]
            raise _BadRequest(f"token_content.token_ids[{k}] = {t} is outside the vocabulary [0, {vocab}) "
                              f"({len(bad)} such id(s))")
        ids = ([int(bos)] if bos is not None else []) + ids
    else:
        raise _BadRequest("request has no prompt: set text_content or token_content")
    if not ids:
        raise _BadRequest(f"the prompt is empty ({which} gives no tokens); need at least one token")
    if len(ids) > engine.max_prefill_length:
        raise _BadRequest(f"the prompt has {len(ids)} tokens, more than this server's largest prefill bucket "
                          f"{engine.max_prefill_length} (rollout.prefill_buckets)")
    limit = engine.token_limit
    max_tokens = request.max_tokens or limit  # 0 is the proto default: "as many as the server allows"
    if not 1 <= max_tokens <= limit:
        raise _BadRequest(f"max_tokens = {request.max_tokens} must be in [1, {limit}] "
                          f"(0: {limit}, this server's rollout.max_response_len)")
    return ids, max_tokens, which == "token_content"


class _ServeDriver(orchestrator.Driver):
    """JetStream's driver with a prefill thread that cannot take the process down: prompts arrive as checked
    token ids (``check_request``) and go to the engine unpadded (it pads to its own buckets), and an exception
    in one prefill fails that request only (JetStream's ``JetThread`` SIGKILLs the process instead)."""

    def _prefill_thread(self, idx: int):
        engine, params = self._prefill_engines[idx], self._prefill_params[idx]
        transfer = self._transfer_backlogs[idx]
        while self.live:
            request = self._prefill_backlog.get(block=True)
            if request is None:
                break
            try:
                ids = np.asarray(request.prefill_content, np.int32)  # [L]
                request.prefill_result = engine.prefill(params=params, padded_tokens=ids, true_length=ids.size)
            except Exception as e:  # noqa: BLE001 -- one request's failure, reported to its client
                log.exception("prefill failed for one request; answering it with INTERNAL")
                if request.return_channel is not None:
                    request.return_channel.set_exception(_PrefillFailed(f"{type(e).__name__}: {e}"))
                continue
            transfer.put(request, block=True)


class _Servicer(orchestrator.LLMOrchestrator):
    """JetStream's servicer with every request checked first (``check_request``)."""

    def __init__(self, driver: orchestrator.Driver, engine: RolloutEngine):
        super().__init__(driver=driver)
        self._engine = engine

    async def Decode(self, request, context=None):  # noqa: N802 -- gRPC method name
        try:
            ids, max_tokens, token_request = check_request(self._engine, request)
        except _BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        channel = orchestrator.async_multifuture.AsyncMultifuture()
        context.add_done_callback(channel.cancel)
        active = orchestrator.ActiveRequest(max_tokens=max_tokens, return_channel=channel, prefill_content=ids,
                                            is_client_side_tokenization=token_request)
        try:
            self._driver.place_request_on_prefill_queue(active)
        except queue.Full:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the prefill queue is full; retry later")
            return
        buffered = []
        try:
            async for samples in channel:
                if token_request:
                    yield self.process_client_side_tokenization_response(samples)
                elif self.should_buffer_response(samples):  # a partial UTF-8 character: wait for the rest
                    buffered.append(samples)
                else:
                    yield self.process_server_side_tokenization_response(samples, buffered)
                    buffered = []
        except _PrefillFailed as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {e}")

    async def HealthCheck(self, request, context=None):  # noqa: N802 -- gRPC method name
        return jetstream_pb2.HealthCheckResponse(is_live=self._driver.live)


def check_port_free(port: int) -> None:
    """ServeError if ``port`` is taken (checked before the slow model load; the gRPC bind checks again)."""
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: must be in [1, 65535]")
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        try:
            # SO_REUSEADDR: a port with connections in TIME_WAIT from an earlier server is free; one with a
            # listener is still refused (Linux).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"--port {port}: the port is already in use (another server?)") from None
            if family == socket.AF_INET6:
                continue
            raise ServeError(f"--port {port}: cannot bind: {e.strerror}") from None
        finally:
            sock.close()


class Server:
    """The gRPC server: ``_Servicer`` over a ``_ServeDriver``, on an asyncio loop in its own thread.
    ``stop()`` / ``wait_for_termination()`` as JetStream's ``JetStreamServer``."""

    def __init__(self, engine: RolloutEngine, port: int, credentials=None, threads: Optional[int] = None):
        threads = threads or max(engine.max_concurrent_decodes, 64)
        self._executor = futures.ThreadPoolExecutor(max_workers=threads)
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        self._driver = None
        try:
            self._grpc = self._call(self._create(port, credentials or grpc.insecure_server_credentials()))
            params = engine.load_params()
            self._driver = _ServeDriver(prefill_engines=[engine], generate_engines=[engine],
                                        prefill_params=[params], generate_params=[params],
                                        interleaved_mode=True, jax_padding=False)
            jetstream_pb2_grpc.add_OrchestratorServicer_to_server(_Servicer(self._driver, engine), self._grpc)
            self._call(self._grpc.start())
        except BaseException:
            self._shutdown()
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _create(self, port: int, credentials):
        # so_reuseport 0: gRPC sets SO_REUSEPORT by default, which lets a second server bind the same port.
        server = grpc.aio.server(self._executor, options=[("grpc.so_reuseport", 0)])
        try:
            bound = server.add_secure_port(f"[::]:{port}", credentials)
        except RuntimeError:  # grpc >= 1.5x raises where older versions returned 0
            bound = 0
        if not bound:
            raise ServeError(f"--port {port}: the port is already in use (another server?)")
        return server

    def _shutdown(self) -> None:
        if self._driver is not None:
            self._driver.stop()
        if getattr(self, "_grpc", None) is not None:
            self._call(self._grpc.stop(grace=5))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._executor.shutdown(wait=False)

    def stop(self) -> None:
        self._shutdown()

    def wait_for_termination(self) -> None:
        try:
            self._call(self._grpc.wait_for_termination())
        finally:
            self.stop()


def start_server(engine: RolloutEngine, port: int, credentials=None, threads: Optional[int] = None) -> Server:
    """Start the gRPC server on ``port`` with ``engine`` doing both prefill and decode on its mesh.
    Returns the :class:`Server` (``.stop()`` / ``.wait_for_termination()``); ServeError if the port is taken."""
    return Server(engine, port, credentials, threads)


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


def _parse_buckets(text: str) -> list[int]:
    try:
        buckets = [int(b) for b in text.split(",")]
    except ValueError:
        raise ServeError(f"--prefill-buckets {text!r}: expected comma-separated integers, e.g. 64,128,256") from None
    if not buckets or any(b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
        raise ServeError(f"--prefill-buckets {text!r}: expected positive integers in ascending order")
    return buckets


def build_engine(args: argparse.Namespace) -> RolloutEngine:
    """Config (YAML + overrides + flags) -> mesh -> ``load_hf`` policy -> tokenizer -> engine."""
    overrides = list(args.overrides) + [f"model.checkpoint={args.checkpoint}"]
    flag_keys = {"temperature": "rollout.temperature", "top_p": "rollout.top_p", "top_k": "rollout.top_k",
                 "max_tokens": "rollout.max_response_len", "slots": "rollout.max_concurrent_decodes"}
    overrides += [f"{key}={getattr(args, name)}" for name, key in flag_keys.items() if getattr(args, name) is not None]
    if args.prefill_buckets:
        buckets = _parse_buckets(args.prefill_buckets)
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


def _flag_message(e: BaseException) -> str:
    """A config key in an error message -> the serve flag that sets it, so the user sees what they typed."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    for flag, key in (("--temperature", "rollout.temperature"), ("--top-p", "rollout.top_p"),
                      ("--top-k", "rollout.top_k"), ("--max-tokens", "rollout.max_response_len"),
                      ("--slots", "rollout.max_concurrent_decodes")):
        if key in msg:
            return f"{msg} (flag {flag})"
    return msg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from orz_jax.tokenizer import TokenizerError
    from orz_jax.trainer import STARTUP_ERRORS

    try:
        check_port_free(args.port)  # before the model load, which can take minutes
        engine = build_engine(args)
        log.info("serving %s on port %d (%s, %d slots, sampling %s)", args.checkpoint, args.port,
                 jax.default_backend(), engine.max_concurrent_decodes, dataclasses.asdict(engine.sampling))
        server = start_server(engine, args.port)
    except (ServeError, TokenizerError, FileNotFoundError, *STARTUP_ERRORS) as e:
        print(f"error: {_flag_message(e)}", file=sys.stderr)
        return 2
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
