"""The training prompt pipeline (Grain) and the evaluation-set loader.

Build time does all the work that can fail or that the report needs: read and validate every record,
apply the prompt template, tokenize (one multi-threaded batch call per file) and apply
``rollout.long_prompt`` to prompts longer than ``rollout.max_prompt_len`` (dropped and counted,
left-truncated, or an error). What remains is a Grain ``MapDataset`` graph over in-memory token
arrays, per training file::

    source -> shuffle(seed_i) -> even-split -> shard [process_index::process_count] -> repeat(epochs)

then ``MapDataset.mix`` with ``data.train_files[i].weight`` when there are several files, then
``batch(prompts_per_iter // process_count)``. Shuffling happens before sharding with the same seed on
every host, so within an epoch the hosts' shards are disjoint and together cover the (evenly
truncated) file, and ``repeat`` reshuffles each epoch with a seed derived from the epoch number.
Every step is index-based, so the iterator's whole state is ``{"next_index": n}`` (JSON), and a
pipeline rebuilt from the same config and data and given that state yields exactly the batches the
uninterrupted one would have.

``data.prompts_per_iter`` is the global number of prompts per iteration; each JAX process gets
``prompts_per_iter // process_count`` of them. With a finite ``data.num_epochs`` and several files,
the mixture ends when its first component runs out (Grain's ``mix`` keeps the weights exact rather
than padding with other files).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import grain
import numpy as np

from orz_jax.config import Config
from orz_jax.data.records import DataError, PromptRecord, load_records
from orz_jax.data.synthetic import generate_synthetic
from orz_jax.template import format_prompt, prepends_bos

__all__ = ["PromptBatch", "EvalItem", "SourceStats", "TrainData", "tokenize_records",
           "prepare_train_dataset", "build_train_pipeline", "load_eval_set"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptBatch:
    """One iteration's prompts on this host (host-side Python lists, all of length ``batch``).

    prompt_ids: token ids of the templated prompt, unpadded, each <= rollout.max_prompt_len.
    """

    prompt_ids: list[list[int]]
    questions: list[str]
    answers: list[str]
    sources: list[str]
    indices: list[int]  # record index inside its source file

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class _Example:
    """A pipeline element: tokenized prompt + its record. int32 array, not a list: a Python list of
    ints costs ~9x the memory, and a 72k-prompt file is held whole."""

    prompt_ids: np.ndarray  # [prompt_len] int32
    record: PromptRecord


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """An evaluation prompt. Iterates as ``(prompt_ids, answer, question)`` (the module contract)."""

    prompt_ids: list[int]
    answer: str
    question: str
    source: str
    index: int
    choices: Optional[dict[str, str]] = None  # GPQA: {"A": ..., "D": ...}

    def __iter__(self):
        return iter((self.prompt_ids, self.answer, self.question))


@dataclasses.dataclass
class SourceStats:
    """What build time did to one source; logged, and returned for the run report."""

    name: str
    records: int = 0  # valid records read
    skipped_bad: int = 0  # bad records dropped (data.on_bad_record=skip)
    dropped_long: int = 0  # prompts over rollout.max_prompt_len dropped (long_prompt=filter)
    truncated_long: int = 0  # prompts over the limit left-truncated (long_prompt=left_truncate)
    kept: int = 0
    max_prompt_len: int = 0  # longest kept prompt, in tokens
    mean_prompt_len: float = 0.0


@dataclasses.dataclass
class TrainData:
    dataset: "grain.MapDataset[PromptBatch]"  # batched, sharded for this process
    stats: list[SourceStats]
    batch_size: int  # prompts per batch on this process
    process_index: int
    process_count: int


# ----------------------------------------------------------------------------------------------
# Build-time tokenization
# ----------------------------------------------------------------------------------------------


_CHUNK = 1024  # records per encode_batch call: bounds the Encodings alive at once (~100 B a token)


def _encode_chunked(records: Sequence[PromptRecord], tokenizer, template: str):
    """Yield (record, ids [prompt_len] int32). Chunked so that only one chunk of Python int lists
    (~36 bytes per token) is alive at a time, not a whole 57k-prompt file's worth."""
    add_bos = prepends_bos(template) and tokenizer.bos_id is not None  # ORZ: BOS first when there is one
    for start in range(0, len(records), _CHUNK):
        chunk = records[start:start + _CHUNK]
        texts = [format_prompt(r.question, template) for r in chunk]
        for rec, ids in zip(chunk, tokenizer.encode_batch(texts, add_bos=add_bos)):
            yield rec, np.asarray(ids, dtype=np.int32)


def tokenize_records(records: Sequence[PromptRecord], tokenizer, cfg: Config, name: str,
                     skipped_bad: int = 0) -> tuple[list[_Example], SourceStats]:
    """Template + tokenize ``records`` and apply ``cfg.rollout.long_prompt``."""
    limit, policy = cfg.rollout.max_prompt_len, cfg.rollout.long_prompt
    stats = SourceStats(name=name, records=len(records), skipped_bad=skipped_bad)
    out: list[_Example] = []
    for rec, ids in _encode_chunked(records, tokenizer, cfg.data.template):
        if len(ids) > limit:
            if policy == "filter":
                stats.dropped_long += 1
                continue
            if policy == "left_truncate":
                # Keep the end: that is where the question and the "Assistant: <think>" cue are.
                ids = ids[-limit:].copy()  # not a view: do not pin the full array
                stats.truncated_long += 1
            else:
                raise DataError(
                    f"{name}: record {rec.index}: prompt is {len(ids)} tokens, over rollout.max_prompt_len="
                    f"{limit} (rollout.long_prompt=error; use 'filter' or 'left_truncate' to allow this)")
        out.append(_Example(ids, rec))
    stats.kept = len(out)
    if out:
        lens = [len(e.prompt_ids) for e in out]
        stats.max_prompt_len, stats.mean_prompt_len = max(lens), float(np.mean(lens))
    else:
        raise DataError(
            f"{name}: none of the {len(records)} prompts fits rollout.max_prompt_len={limit} tokens "
            f"(template={cfg.data.template!r}); raise the limit or set rollout.long_prompt=left_truncate")
    return out, stats


def _log_stats(stats: SourceStats, limit: int) -> None:
    msg = (f"data {stats.name}: {stats.records} records, kept {stats.kept} "
           f"(prompt tokens max {stats.max_prompt_len}, mean {stats.mean_prompt_len:.1f})")
    if stats.skipped_bad:
        msg += f", skipped {stats.skipped_bad} bad records"
    if stats.dropped_long:
        msg += f", dropped {stats.dropped_long} prompts over max_prompt_len={limit}"
    if stats.truncated_long:
        msg += f", left-truncated {stats.truncated_long} prompts to {limit} tokens"
    log.info(msg)


# ----------------------------------------------------------------------------------------------
# Training pipeline
# ----------------------------------------------------------------------------------------------


def _collate(examples: Sequence[_Example]) -> PromptBatch:
    return PromptBatch(
        prompt_ids=[e.prompt_ids.tolist() for e in examples],
        questions=[e.record.question for e in examples],
        answers=[e.record.answer for e in examples],
        sources=[e.record.source for e in examples],
        indices=[e.record.index for e in examples],
    )


def _component_seed(base: int, i: int) -> int:
    # Distinct, reproducible shuffle seed per mixture component (grain wants [0, 2**32)).
    return (base * 1_000_003 + i * 7919) % 2**32


def _process_layout(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


def prepare_train_dataset(cfg: Config, tokenizer, *, process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> TrainData:
    """Read, validate and tokenize the training data; return this process's batched Grain dataset.

    process_index / process_count default to ``jax.process_index()`` / ``jax.process_count()``
    (pass them to simulate other hosts in tests).
    """
    d = cfg.data
    pi, pc = _process_layout(process_index, process_count)
    if d.prompts_per_iter % pc:
        raise DataError(f"data.prompts_per_iter={d.prompts_per_iter} must divide evenly over "
                        f"{pc} JAX processes")
    batch_size = d.prompts_per_iter // pc

    sources: list[tuple[str, list[PromptRecord], int, float]] = []  # (name, records, skipped, weight)
    if d.source == "synthetic":
        train, _ = generate_synthetic(d.synthetic)
        sources.append(("synthetic", train, 0, 1.0))
    else:
        if not d.train_files:
            raise DataError("data.source is 'files' but data.train_files is empty")
        for f in d.train_files:
            path = d.resolve(f.path)  # bare names live in data.dir
            loaded = load_records(path, d.on_bad_record)
            sources.append((path, loaded.records, loaded.num_skipped, f.weight))

    components, stats = [], []
    for i, (name, records, skipped, _) in enumerate(sources):
        examples, st = tokenize_records(records, tokenizer, cfg, name, skipped)
        _log_stats(st, cfg.rollout.max_prompt_len)
        stats.append(st)
        n_even = (len(examples) // pc) * pc  # equal shard sizes keep hosts in lockstep
        if n_even == 0:
            raise DataError(f"{name}: {len(examples)} usable prompts cannot be shared by {pc} processes")
        ds = grain.MapDataset.source(examples).shuffle(seed=_component_seed(d.shuffle_seed, i))
        ds = ds[:n_even][pi::pc]
        components.append(ds.repeat(d.num_epochs))

    if len(components) == 1:
        mixed = components[0]
    else:
        mixed = grain.MapDataset.mix(components, weights=[w for *_, w in sources])
    batched = mixed.batch(batch_size, drop_remainder=True, batch_fn=_collate)
    if len(batched) == 0:
        raise DataError(f"data: {len(mixed)} prompts per process over data.num_epochs={d.num_epochs} "
                        f"do not fill one batch of {batch_size}")
    return TrainData(dataset=batched, stats=stats, batch_size=batch_size, process_index=pi, process_count=pc)


def build_train_pipeline(cfg: Config, tokenizer, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> "grain.DatasetIterator[PromptBatch]":
    """A Grain iterator of :class:`PromptBatch` for this process.

    Checkpoint with ``it.get_state()`` (a JSON-able dict) and resume with ``it.set_state(state)`` on a
    pipeline built from the same config, tokenizer and files. Ends after ``data.num_epochs``
    (None: never).
    """
    td = prepare_train_dataset(cfg, tokenizer, process_index=process_index, process_count=process_count)
    # Elements are tokenized and in memory already: reader threads or worker processes would only
    # add GIL contention and pickling for a batch that costs microseconds to assemble.
    return iter(td.dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


# ----------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------


def load_eval_set(path: str, cfg: Config, tokenizer) -> list[EvalItem]:
    """All prompts of an evaluation file (or ``"synthetic"``: the synthetic eval split), in file
    order, templated and tokenized like training prompts, ``rollout.long_prompt`` applied (dropped
    prompts are logged). For avg@n the caller samples each item n times; ``eval.max_prompts`` is the
    caller's to apply."""
    if path == "synthetic":
        _, records = generate_synthetic(cfg.data.synthetic)
        if not records:
            raise DataError("synthetic eval split is empty (data.synthetic.num_eval=0)")
        skipped = 0
    else:
        loaded = load_records(path, cfg.data.on_bad_record)
        records, skipped = loaded.records, loaded.num_skipped
    examples, st = tokenize_records(records, tokenizer, cfg, path, skipped)
    _log_stats(st, cfg.rollout.max_prompt_len)
    return [EvalItem(prompt_ids=e.prompt_ids.tolist(), answer=e.record.answer, question=e.record.question,
                     source=e.record.source, index=e.record.index, choices=e.record.choices)
            for e in examples]
