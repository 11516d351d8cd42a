"""PPO rollouts: prompts in, a ``RolloutBatch`` out, served by the JetStream engine.

    engine = RolloutEngine(policy, cfg.rollout, tokenizer)
    batch = generate_rollouts(engine, prompt_ids, n_samples=4, rng=0, cfg=cfg.rollout)
    ...  # PPO update
    engine.update_params(nnx.state(policy))

Two drivers over the same engine, chosen by ``rollout.driver``:

* ``"batched"``: static batching in waves of ``max_concurrent_decodes`` requests. Each distinct prompt of a
  wave is prefilled once and inserted into its n slots; then ``rollout.check_every`` decode steps run per device
  call, after which the host fetches the new tokens once (the only sync) to look for stop strings. A wave
  ends when all of its slots have finished.
* ``"orchestrator"``: JetStream's own ``orchestrator.Driver`` in process (prefill, transfer, generate
  threads; continuous batching: a finished slot takes the next request at once). Only its detokenize
  thread is replaced (see :class:`_RolloutDriver`), to keep each token's log-prob and to finish a request on
  a stop string.

Failures in the orchestrator driver: JetStream 0.2.2's threads SIGKILL the process on an exception
(``JetThread``); ours catch it and the caller gets :class:`RolloutDriverError` naming the thread. A request
or thread that stops making progress (no token generated, nothing prefilled) for ``rollout.timeout_s``
seconds raises :class:`RolloutTimeout` naming what was outstanding. A slot finished by a stop string keeps
decoding on the device until it is reused (the generate thread owns the decode state); the batched driver
releases such slots.

An engine serves one caller at a time: ``generate_rollouts`` resets its request counter and sampling
settings, so do not run it on an engine that a gRPC server is using.

Completion of a sample (the same rules in both drivers; the device applies the first two as well):
EOS id sampled -> "stop"; ``max_response_len`` tokens -> "length"; a string of ``rollout.stop_strings``
appears in the decoded response -> "stop". The token that ends a sample is kept (mask 1); nothing after it
is. Token ids are the sampled ones (decoded text is only inspected, never re-tokenised).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Optional, Sequence, Union

import flax.struct
import jax
import numpy as np

from orz_jax.config import RolloutConfig
from orz_jax.rollout.engine import RolloutEngine
from orz_jax.rollout.jetstream_compat import engine_api, orchestrator
from orz_jax.rollout.sampling import SamplingParams

log = logging.getLogger(__name__)


@flax.struct.dataclass
class RolloutBatch:
    """Rollouts aligned with their prompts; numpy on host. n = kept prompts x samples per prompt, ordered
    prompt-major (the samples of prompt i are consecutive)."""

    prompt_ids: np.ndarray  # [n, max_prompt_len] int32, left-aligned, 0-padded
    prompt_lens: np.ndarray  # [n] int32
    response_ids: np.ndarray  # [n, max_response_len] int32, 0-padded after the end
    response_mask: np.ndarray  # [n, max_response_len] int32: 1 for generated tokens incl. the stop token
    # [n, max_response_len] float32: log-prob of each token under the sampling distribution (after temperature,
    # top-k, top-p; see orz_jax.rollout.sampling), 0 where masked. With temperature 1, top_p 1, top_k 0 this is
    # the policy's log_softmax: PPO's old log-probs.
    logprobs: np.ndarray
    prompt_index: np.ndarray  # [n] int32: index of the prompt in the caller's list
    stop_reason: list[str] = flax.struct.field(pytree_node=False)  # "stop" (EOS / stop string) | "length"
    texts: list[str] = flax.struct.field(pytree_node=False)  # decoded response (special tokens skipped)
    dropped_prompts: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # too long, "filter"
    truncated_prompts: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())  # "left_truncate"

    @property
    def num_samples(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lens(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)


class LongPromptError(ValueError):
    """A prompt longer than ``rollout.max_prompt_len`` with ``rollout.long_prompt: error``."""


class RolloutDriverError(RuntimeError):
    """A thread of the orchestrator driver raised; the message names the thread and the exception."""


class RolloutTimeout(RolloutDriverError, TimeoutError):
    """The orchestrator driver made no progress for ``rollout.timeout_s`` seconds."""


# ----------------------------------------------------------------------------------------------
# Host-side completion of one sample
# ----------------------------------------------------------------------------------------------


class SampleCollector:
    """Accumulates one sample's tokens and decides when it is finished.

    Stop strings are looked for in the decoded text of the last ``window`` tokens after every token, so
    the cost per token does not grow with the response length. The window is wide enough for any stop
    string (each token decodes to at least one character, except special tokens and partial UTF-8
    bytes, which the slack covers).
    """

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], stop_strings: Sequence[str], limit: int):
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.window = 2 * max((len(s) for s in self.stop_strings), default=0) + 16
        self.limit = limit
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.reason: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def feed(self, token: int, logprob: float) -> bool:
        """Append one generated token; returns True when the sample is now finished."""
        if self.finished:
            return True
        self.tokens.append(int(token))
        self.logprobs.append(float(logprob))
        if token in self.eos_ids:
            self.reason = "stop"
        elif self.stop_strings and self._has_stop_string():
            self.reason = "stop"
        elif len(self.tokens) >= self.limit:
            self.reason = "length"
        return self.finished

    def _has_stop_string(self) -> bool:
        tail = self.tokenizer.decode(self.tokens[-self.window:])
        return any(s in tail for s in self.stop_strings)


# ----------------------------------------------------------------------------------------------
# Prompt checks
# ----------------------------------------------------------------------------------------------


def _prepare_prompts(prompt_ids: Sequence[Sequence[int]], cfg: RolloutConfig, engine: RolloutEngine):
    """-> (kept [(prompt index, ids)], dropped indices, truncated indices), per ``rollout.long_prompt``."""
    max_len = cfg.max_prompt_len
    if max_len > engine.buckets[-1]:
        raise ValueError(f"rollout.max_prompt_len={max_len} exceeds the engine's largest prefill bucket "
                         f"{engine.buckets[-1]}")
    kept, dropped, truncated = [], [], []
    for i, ids in enumerate(prompt_ids):
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt {i} is empty (need at least one token)")
        if len(ids) > max_len:
            if cfg.long_prompt == "error":
                raise LongPromptError(f"prompt {i} has {len(ids)} tokens, more than rollout.max_prompt_len="
                                      f"{max_len} (set rollout.long_prompt to 'filter' or 'left_truncate')")
            if cfg.long_prompt == "filter":
                dropped.append(i)
                continue
            ids = ids[-max_len:]
            truncated.append(i)
        kept.append((i, ids))
    if dropped or truncated:
        log.warning("%d prompt(s) longer than rollout.max_prompt_len=%d: %d dropped, %d left-truncated",
                    len(dropped) + len(truncated), max_len, len(dropped), len(truncated))
    return kept, tuple(dropped), tuple(truncated)


# ----------------------------------------------------------------------------------------------
# Driver 1: static batches
# ----------------------------------------------------------------------------------------------


def _run_batched(engine: RolloutEngine, requests: list[tuple[int, list[int]]],
                 collectors: list[SampleCollector], check_every: int) -> None:
    params = engine.params
    state = engine.init_decode_state()
    n_slots = engine.max_concurrent_decodes
    for start in range(0, len(requests), n_slots):
        wave = list(range(start, min(start + n_slots, len(requests))))
        prefixes: dict[int, Any] = {}
        for slot, r in enumerate(wave):
            p_idx, ids = requests[r]
            if p_idx not in prefixes:  # the n samples of a prompt share one prefill
                prefixes[p_idx] = engine.prefill(params=params, padded_tokens=np.asarray(ids, np.int32),
                                                 true_length=len(ids))
            state = engine.insert(prefixes[p_idx], state, slot)
        if len(wave) < n_slots:  # slots left over from the previous wave must not keep the loop alive
            idle = np.zeros((n_slots,), bool)
            idle[len(wave):] = True
            state = engine.release(state, idle)
        del prefixes
        consumed = np.zeros((len(wave),), np.int64)
        while not all(collectors[r].finished for r in wave):
            state = engine.generate_steps(params, state, check_every)
            steps, out = jax.device_get((state.steps, state.out_tokens))  # the one host sync per check
            stopped = np.zeros((n_slots,), bool)
            for slot, r in enumerate(wave):
                c = collectors[r]
                while not c.finished and consumed[slot] < steps[slot]:
                    c.feed(int(out[slot, consumed[slot]]), 0.0)  # log-probs are filled in below
                    consumed[slot] += 1
                    stopped[slot] = c.finished and c.reason == "stop" and c.tokens[-1] not in c.eos_ids
            if stopped.any():  # stop strings: the device does not know, free those slots
                state = engine.release(state, stopped)
        logprobs = np.asarray(jax.device_get(state.out_logprobs))
        for slot, r in enumerate(wave):
            n = len(collectors[r].tokens)
            collectors[r].logprobs = logprobs[slot, :n].tolist()


# ----------------------------------------------------------------------------------------------
# Driver 2: JetStream's orchestrator (continuous batching)
# ----------------------------------------------------------------------------------------------


class _RolloutDriver(orchestrator.Driver):
    """JetStream 0.2.2's ``orchestrator.Driver`` with two hooks replaced for rollouts:

    * ``_process_prefill_content``: token-id prompts go to our engine unpadded (the engine pads to its own
      buckets and adds no BOS; JetStream's version only knows power-of-two buckets and always adds one);
    * ``_detokenize_thread``: the same protocol as JetStream's (a queue of ``(slot, ActiveRequest)`` slot
      activations interleaved with ``(step, ResultTokens)`` results, in generation order; a finished
      request's slot goes back on the free-slot queue), but each result row goes to the request's
      :class:`SampleCollector` (carried as the request's ``return_channel``) together with its log-prob
      (column 3 of our engine's ``ResultTokens``), so a request also finishes on a stop string.

    Its prefill / transfer / generate threads report an exception to ``on_finished`` (and end) instead of
    SIGKILLing the process, and every prefill and every detokenized step stamps ``last_progress``
    (``time.monotonic()``) for the caller's watchdog.
    """

    def __init__(self, *args, on_finished=None, **kwargs):
        self._on_finished = on_finished  # called with (collector) or (exception) from the driver's threads
        self.last_progress = time.monotonic()
        self.decoding: dict[int, Any] = {}  # slot -> request, as the detokenize thread sees it
        super().__init__(*args, **kwargs)

    def _guarded(self, name: str, run, idx: int) -> None:
        try:
            run(idx)
        except Exception as e:  # noqa: BLE001 -- hand it to the waiting caller instead of killing the process
            log.exception("rollout driver: %s-%d thread failed", name, idx)
            self._on_finished(RolloutDriverError(f"rollout.driver=orchestrator: the {name}-{idx} thread raised "
                                                 f"{type(e).__name__}: {e}"))

    def _prefill_thread(self, idx: int):
        self._guarded("prefill", super()._prefill_thread, idx)

    def _transfer_thread(self, idx: int):
        self._guarded("transfer", super()._transfer_thread, idx)

    def _generate_thread(self, idx: int):
        self._guarded("generate", super()._generate_thread, idx)

    def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
        self.last_progress = time.monotonic()  # the previous prefill (if any) is done
        ids = np.asarray(request.prefill_content, np.int32)
        return ids, int(ids.size)

    def outstanding(self) -> str:
        """Where the unfinished requests are, e.g. "2 waiting for prefill, 1 prefilled waiting for a slot,
        3 decoding in slots [0, 1, 3]" (a request between two of these queues is in a thread)."""
        prefilled = sum(q.qsize() for q in self._transfer_backlogs) + sum(
            q.qsize() for q in self._generate_backlogs.values())
        slots = sorted(self.decoding.copy())  # copy(): atomic; the detokenize thread changes the dict
        return (f"{self._prefill_backlog.qsize()} waiting for prefill, {prefilled} prefilled waiting for a slot, "
                f"{len(slots)} decoding in slots {slots}")

    def stop_within(self, seconds: float) -> list[str]:
        """JetStream's ``stop`` (drain every queue, send each thread its sentinel) with a deadline: a thread
        stuck inside the engine cannot hang the caller. Returns the names of threads still running."""
        self.live = False
        backlogs = [self._prefill_backlog, *self._transfer_backlogs, *self._generate_backlogs.values(),
                    *self._detokenize_backlogs]
        deadline = time.monotonic() + seconds
        while any(t.is_alive() for t in self._all_threads) and time.monotonic() < deadline:
            for q in backlogs:
                try:
                    while True:
                        q.get_nowait()
                except queue.Empty:
                    pass
                try:
                    q.put_nowait(None)
                except queue.Full:
                    pass
            for t in self._all_threads:
                t.join(0.01)
        return [t.name for t in self._all_threads if t.is_alive()]

    def _detokenize_thread(self, idx: int):
        backlog = self._detokenize_backlogs[idx]
        free_slots = self._generate_slots[idx]
        live = self.decoding
        try:
            while self.live:
                item = backlog.get(block=True)
                if item is None:
                    break
                self.last_progress = time.monotonic()
                if isinstance(item[1], engine_api.ResultTokens):
                    data = np.asarray(item[1].data)  # [slots, 4] token | valid | steps | logprob bits
                    logprobs = data[:, 3].view(np.float32)
                    for slot, request in list(live.items()):
                        collector = request.return_channel
                        if collector.feed(int(data[slot, 0]), float(logprobs[slot])):
                            del live[slot]
                            # before the slot is reused: it no longer holds the decode window open
                            self._generate_engines[idx].forget_slot(slot)
                            free_slots.put(slot, block=False)
                            self._on_finished(collector)
                else:
                    slot, request = item
                    live[slot] = request
        except Exception as e:  # noqa: BLE001 -- hand it to the waiting caller instead of killing the process
            log.exception("rollout detokenize thread failed")
            self._on_finished(e)


def _run_orchestrator(engine: RolloutEngine, requests: list[tuple[int, list[int]]],
                      collectors: list[SampleCollector], timeout_s: float) -> None:
    """Run ``requests`` through a fresh ``_RolloutDriver``; RolloutTimeout after ``timeout_s`` seconds without
    progress, RolloutDriverError if one of its threads raised."""
    remaining = [len(requests)]
    errors: list[BaseException] = []
    all_done = threading.Event()

    def on_finished(item):
        if isinstance(item, BaseException):
            errors.append(item)
            all_done.set()
            return
        remaining[0] -= 1
        if remaining[0] == 0:
            all_done.set()

    driver = _RolloutDriver(prefill_engines=[engine], generate_engines=[engine], prefill_params=[engine.params],
                            generate_params=[engine.params], interleaved_mode=True, jax_padding=False,
                            on_finished=on_finished)
    try:
        for (_, ids), collector in zip(requests, collectors):
            driver.place_request_on_prefill_queue(orchestrator.ActiveRequest(
                max_tokens=collector.limit, prefill_content=ids, return_channel=collector))
        # A watchdog on progress rather than on the total: a large batch may take hours, a stuck one must not.
        while not all_done.wait(min(1.0, timeout_s)):
            idle = time.monotonic() - driver.last_progress
            if idle > timeout_s:
                raise RolloutTimeout(
                    f"rollout.driver=orchestrator: no progress for {idle:.1f} s (rollout.timeout_s={timeout_s:g}); "
                    f"{remaining[0]} of {len(requests)} requests unfinished: {driver.outstanding()}")
    finally:
        stuck = driver.stop_within(min(30.0, timeout_s))
        if stuck:
            log.warning("rollout driver: thread(s) %s still running after stop (stuck in the engine?)", stuck)
    if errors and remaining[0] == 0:  # every sample is in: an error while shutting down costs nothing
        log.warning("rollout driver: %s after every request had finished", errors[0])
    elif errors:
        e = errors[0]
        if isinstance(e, RolloutDriverError):
            raise RolloutDriverError(f"{e}; {remaining[0]} of {len(requests)} requests unfinished") from e
        raise RolloutDriverError(f"rollout.driver=orchestrator: the detokenize thread raised "
                                 f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def generate_rollouts(engine: RolloutEngine, prompt_ids: Sequence[Sequence[int]], n_samples: int,
                      rng: Union[int, jax.Array], cfg: RolloutConfig, *, driver: Optional[str] = None,
                      check_every: Optional[int] = None, timeout_s: Optional[float] = None) -> RolloutBatch:
    """Sample ``n_samples`` responses for every prompt with the engine's current parameters.

    Args:
      prompt_ids: token ids per prompt (no padding).
      rng: int seed or PRNG key; with the same seed, parameters and settings the samples are identical,
        whichever driver runs them.
      cfg: sampling (temperature / top_p / top_k), ``max_response_len`` (<= the engine's), stop strings,
        ``long_prompt`` policy and ``driver`` (overridden by ``driver=``).
      check_every: batched driver: decode steps per device call between host checks (default
        ``rollout.check_every``).
      timeout_s: orchestrator driver: raise ``RolloutTimeout`` after this many seconds without progress
        (default ``rollout.timeout_s``).
    """
    driver = driver or cfg.driver
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    kept, dropped, truncated = _prepare_prompts(prompt_ids, cfg, engine)
    engine.reset_requests(rng)
    engine.set_sampling(SamplingParams.from_config(cfg), cfg.max_response_len)
    requests = [(i, ids) for i, ids in kept for _ in range(n_samples)]
    collectors = [SampleCollector(engine.tokenizer, engine.eos_ids, cfg.stop_strings, cfg.max_response_len)
                  for _ in requests]
    if requests:
        if driver == "batched":
            _run_batched(engine, requests, collectors, check_every or cfg.check_every)
        elif driver == "orchestrator":
            _run_orchestrator(engine, requests, collectors, timeout_s or cfg.timeout_s)
        else:
            raise ValueError(f"rollout.driver must be 'batched' or 'orchestrator', got {driver!r}")

    n, lp, lr = len(requests), cfg.max_prompt_len, cfg.max_response_len
    prompt = np.zeros((n, lp), np.int32)
    prompt_lens = np.zeros((n,), np.int32)
    resp = np.zeros((n, lr), np.int32)
    mask = np.zeros((n, lr), np.int32)
    logprobs = np.zeros((n, lr), np.float32)
    for r, ((_, ids), c) in enumerate(zip(requests, collectors)):
        prompt[r, :len(ids)] = ids
        prompt_lens[r] = len(ids)
        k = len(c.tokens)
        resp[r, :k] = c.tokens
        mask[r, :k] = 1
        logprobs[r, :k] = c.logprobs
    return RolloutBatch(
        prompt_ids=prompt, prompt_lens=prompt_lens, response_ids=resp, response_mask=mask, logprobs=logprobs,
        prompt_index=np.asarray([i for i, _ in requests], np.int32).reshape(n),
        stop_reason=[c.reason for c in collectors], texts=[engine.tokenizer.decode(c.tokens) for c in collectors],
        dropped_prompts=dropped, truncated_prompts=truncated)
