"""Rollout dumps: a few samples of an iteration's rollout buffer with what the critic and the update saw.

Every ``experiment.dump_rollouts_every`` iterations (and at every evaluation, the first and the last
iteration) the trainer writes, under ``<out_dir>/rollouts/``:

* ``iter_NNNNNN.jsonl``: one JSON object per dumped sample (format in docs/INTERFACES.md): token ids
  and text pieces, sampling log-probs, the critic's value per response token before the update, the
  advantage (raw and normalised) and return the update used, reward, extracted answer, stop reason;
* ``stats.jsonl``: one line per dumped iteration with statistics of the *whole* buffer (explained
  variance of the old values, mean value at the first / last response token for correct and incorrect
  samples, histogram of the normalised advantages).

The samples are the best, worst and median by mean normalised advantage plus random ones. Values,
advantages and returns are gathered from the packed batch the update consumed (``PackedBatch``), so they
are the very arrays of the update; the raw advantages are recomputed by the same
``compute_advantages`` without normalisation. One small jitted call gathers the chosen rows and the
statistics; it is dispatched before the updates and fetched after them, so the device never waits on
the host for it.

    dumper = RolloutDumper(cfg, tokenizer, mesh)
    pending = dumper.dispatch(iteration, packed, layout, ro, rewards)   # None unless a dump iteration
    ...  # critic and actor updates
    dumper.write(pending, ro, answers)                                   # host: fetch, format, write
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orz_jax.config import Config, PPOConfig
from orz_jax.ppo.advantages import compute_advantages
from orz_jax.ppo.packing import PackedBatch, PackLayout, unpack_response

DUMP_DIR = "rollouts"
STATS_FILE = "stats.jsonl"
HIST_RANGE = 4.0  # histogram of normalised advantages over [-4, 4]; the tails land in the end bins
HIST_BINS = 32
SELECTIONS = ("best", "worst", "median")  # then "random"
REPETITION_N = 20  # span length of the trainer's repetition detector (orz_jax.trainer._repetition)


def dump_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, DUMP_DIR, f"iter_{iteration:06d}.jsonl")


def dump_every(cfg: Config) -> int:
    """Resolved dump period: the config value, or about four dumps per run when it is null (0 = off)."""
    every = cfg.experiment.dump_rollouts_every
    if every is None:
        every = max(1, cfg.experiment.num_iterations // 4)
    return every


def is_dump_iteration(cfg: Config, iteration: int) -> bool:
    """``iteration`` counts from 1 (as in metrics.jsonl). Off when dump_rollouts_every is 0; else the first and
    last iterations, every ``dump_every`` and every evaluation."""
    every = dump_every(cfg)
    if every == 0 or cfg.experiment.dump_rollouts_samples == 0:
        return False
    return (iteration == 1 or iteration % every == 0 or iteration == cfg.experiment.num_iterations
            or (cfg.eval.every > 0 and iteration % cfg.eval.every == 0))


# ----------------------------------------------------------------------------------------------
# Device side: one jitted gather of the chosen rows plus buffer statistics
# ----------------------------------------------------------------------------------------------


def _masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
    """Mean of x where m; NaN when m is empty (a figure that does not exist, not a zero)."""
    s = jnp.sum(m)
    return jnp.where(s > 0, jnp.sum(x * m) / jnp.maximum(s, 1.0), jnp.nan)


def gather_dump(batch: PackedBatch, response_index: jax.Array, response_mask: jax.Array, rewards: jax.Array,
                group_ids: jax.Array, key: jax.Array, *, cfg: PPOConfig, num_samples: int) -> dict[str, Any]:
    """Choose ``num_samples`` samples of the buffer and gather their per-token arrays and buffer statistics.

    Args:
      batch: the packed buffer after ``prepare_batch`` ([rows, pack_len] fields).
      response_index: [n, R] int32 flat packed index of each response token (``PackLayout.response_index``).
      response_mask: [n, R] {0,1}; rewards: [n] float; group_ids: [n] int (prompt of each sample).
      key: PRNG key of the random picks.
      cfg: the PPO config of the update (advantage estimator, gamma, lambda).
      num_samples: K, static; the first three picks are best / worst / median by mean normalised advantage.
    Returns:
      dict: ``index`` [K] int32 sample indices (a random pick may repeat a ranked one on tiny buffers);
      ``values``, ``advantages``, ``advantages_raw``, ``returns``, ``old_logprobs`` [K, R] float32 (0 past
      the response); ``score`` [K] mean normalised advantage; scalar statistics and ``adv_hist`` [HIST_BINS].
    """
    n, _ = response_mask.shape
    m = response_mask.astype(jnp.float32)  # [n, R]
    values = unpack_response(batch.old_values, response_index)  # [n, R] V(s_t) before the update
    adv = unpack_response(batch.advantages, response_index)  # [n, R] normalised (when configured)
    ret = unpack_response(batch.returns, response_index)  # [n, R]
    old_lp = unpack_response(batch.old_logprobs, response_index)  # [n, R]
    raw_cfg = dataclasses.replace(cfg, normalize_advantages=False)
    adv_raw, _ = compute_advantages(raw_cfg, rewards, values, m, group_ids)  # [n, R], same estimator

    lens = jnp.sum(m, axis=1)  # [n]
    score = jnp.sum(adv * m, axis=1) / jnp.maximum(lens, 1.0)  # [n] mean advantage of each sample
    valid = lens > 0
    order = jnp.argsort(jnp.where(valid, score, jnp.inf))  # empty rows last
    n_valid = jnp.sum(valid.astype(jnp.int32))
    ranked = jnp.stack([order[jnp.maximum(n_valid - 1, 0)], order[0], order[n_valid // 2]])  # best, worst, median
    n_rand = max(num_samples - len(SELECTIONS), 0)
    # random picks among the other non-empty samples (Gumbel top-k: distinct, none of the ranked three)
    eligible = valid & ~jnp.any(jnp.arange(n)[:, None] == ranked[None, :], axis=1)
    gumbel = jax.random.gumbel(key, (n,))
    rand = jnp.argsort(jnp.where(eligible, -gumbel, jnp.inf))[:min(n_rand, n)]
    index = jnp.concatenate([ranked, rand])[:num_samples].astype(jnp.int32)  # [K]

    last = jnp.maximum(lens.astype(jnp.int32) - 1, 0)
    v_first = values[:, 0]  # [n]
    v_last = jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]  # [n]
    correct = (rewards > 0.5) & valid
    wrong = (~(rewards > 0.5)) & valid
    var_ret = _masked_mean(jnp.square(ret), m) - jnp.square(_masked_mean(ret, m))
    err = ret - values
    var_err = _masked_mean(jnp.square(err), m) - jnp.square(_masked_mean(err, m))
    hist, _ = jnp.histogram(jnp.clip(adv, -HIST_RANGE, HIST_RANGE), bins=HIST_BINS, range=(-HIST_RANGE, HIST_RANGE),
                            weights=m)
    fv = valid.astype(jnp.float32)
    return {
        "index": index, "score": score[index],
        "values": values[index], "advantages": adv[index], "advantages_raw": adv_raw[index],
        "returns": ret[index], "old_logprobs": old_lp[index],
        "stats": {
            # 1 - Var(R - V) / Var(R) over the buffer's response tokens, V = the critic before the update
            "explained_variance": jnp.where(var_ret > 1e-12, 1.0 - var_err / jnp.maximum(var_ret, 1e-12), jnp.nan),
            "reward_mean": _masked_mean(rewards.astype(jnp.float32), fv),
            "value_first_mean": _masked_mean(v_first, fv),
            "value_last_mean": _masked_mean(v_last, fv),
            "value_first_correct": _masked_mean(v_first, correct.astype(jnp.float32)),
            "value_first_incorrect": _masked_mean(v_first, wrong.astype(jnp.float32)),
            "value_last_correct": _masked_mean(v_last, correct.astype(jnp.float32)),
            "value_last_incorrect": _masked_mean(v_last, wrong.astype(jnp.float32)),
            "value_token_mean": _masked_mean(values, m),
            "advantage_raw_mean": _masked_mean(adv_raw, m),
            "advantage_raw_std": jnp.sqrt(jnp.maximum(
                _masked_mean(jnp.square(adv_raw), m) - jnp.square(_masked_mean(adv_raw, m)), 0.0)),
            "num_samples": jnp.sum(fv), "num_correct": jnp.sum(correct.astype(jnp.float32)),
            "num_tokens": jnp.sum(m),
        },
        "adv_hist": hist,
    }


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Display text of each token. A token that decodes alone to U+FFFD (part of a multi-byte character
    split over byte-level BPE tokens) takes the characters it completes in a window of up to 4 earlier
    tokens, so the pieces still read as the text."""
    ids = [int(t) for t in ids]
    pieces = [tokenizer.decode([t], skip_special=False) for t in ids]
    for i, p in enumerate(pieces):
        if "\ufffd" in p:
            s = max(0, i - 4)
            before = tokenizer.decode(ids[s:i], skip_special=False)
            upto = tokenizer.decode(ids[s:i + 1], skip_special=False)
            if upto.startswith(before):
                pieces[i] = upto[len(before):]
                # the earlier partial pieces now belong to this token
                for j in range(s, i):
                    if "\ufffd" in pieces[j]:
                        pieces[j] = ""
    return pieces


def repetition_spans(text: str, n: int = REPETITION_N) -> list[tuple[int, int]]:
    """Character spans [start, end) of the repetition the trainer detects (``orz_jax.trainer._repetition``:
    an n-character chunk, sampled every 5 characters, seen 3+ times): every occurrence of each such chunk,
    merged where they overlap. Empty when the trainer would report no repetition."""
    if len(text) < 3 * n:
        return []
    counts: dict[str, int] = {}
    for i in range(0, len(text) - n + 1, 5):
        s = text[i:i + n]
        counts[s] = counts.get(s, 0) + 1
    spans = []
    for chunk, c in counts.items():
        if c >= 3:
            start = text.find(chunk)
            while start >= 0:
                spans.append((start, start + n))
                start = text.find(chunk, start + 1)
    spans.sort()
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _floats(x: np.ndarray) -> list:
    """float32 array -> JSON numbers that read back to the identical float32 (shortest round-trip repr)."""
    return [float(str(v)) if np.isfinite(v) else None for v in np.asarray(x, np.float32)]


@dataclasses.dataclass
class PendingDump:
    iteration: int
    device: dict  # the output of gather_dump, possibly still computing
    rewards: np.ndarray  # [n] the rewards the update used (host)


class RolloutDumper:
    """Owns the jitted gather and writes the dump files (process 0 only; every process runs the gather)."""

    def __init__(self, cfg: Config, tokenizer, mesh: Optional[Mesh] = None, out_dir: Optional[str] = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dir = os.path.join(out_dir or cfg.experiment.out_dir, DUMP_DIR)
        fn = functools.partial(gather_dump, cfg=cfg.ppo, num_samples=cfg.experiment.dump_rollouts_samples)
        # Replicated outputs: every process holds the few dumped rows (device_get works on several hosts).
        self._gather = (jax.jit(fn) if mesh is None else
                        jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec())))
        self._key = jax.random.key(cfg.experiment.seed + 7919)

    def dispatch(self, iteration: int, batch: PackedBatch, layout: PackLayout, ro, rewards: np.ndarray
                 ) -> Optional[PendingDump]:
        """Start the gather for iteration ``iteration`` (1-based) if it is a dump iteration; no host sync."""
        if not is_dump_iteration(self.cfg, iteration) or ro.num_samples == 0:
            return None
        out = self._gather(batch, layout.response_index, ro.response_mask, np.asarray(rewards, np.float32),
                           ro.prompt_index, jax.random.fold_in(self._key, iteration))
        return PendingDump(iteration, out, np.asarray(rewards, np.float32))

    def write(self, pending: Optional[PendingDump], ro, answers: Sequence[str]) -> Optional[str]:
        """Fetch the gathered rows and write ``iter_NNNNNN.jsonl`` and a ``stats.jsonl`` line.

        ``answers``: this process's reference answers, indexed by ``ro.prompt_index`` (gathered from all
        processes when there are several). Returns the dump path (None on other processes / no dump)."""
        if pending is None:
            return None
        answers = list(answers)
        if jax.process_count() > 1:  # prompt_index of the global buffer spans every process's prompts
            from orz_jax.multihost import _allgather_strings
            answers = _allgather_strings(answers, np.full(jax.process_count(), len(answers)))
        out = jax.device_get(pending.device)
        if jax.process_index() != 0:
            return None
        records = build_records(pending.iteration, out, ro, pending.rewards, answers, self.tokenizer)
        stats = {k: float(v) for k, v in out["stats"].items()}
        stats = {k: (v if math.isfinite(v) else None) for k, v in stats.items()}
        stats.update(iteration=pending.iteration, adv_hist=[float(c) for c in out["adv_hist"]],
                     adv_hist_range=[-HIST_RANGE, HIST_RANGE])
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"iter_{pending.iteration:06d}.jsonl")
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        _rewrite_stats(os.path.join(self.dir, STATS_FILE), stats)
        return path


def _rewrite_stats(path: str, stats: dict) -> None:
    """Append ``stats``, dropping an earlier line of the same or a later iteration (a resumed run)."""
    keep = []
    if os.path.isfile(path):
        with open(path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["iteration"] < stats["iteration"]]
    keep.append(json.dumps(stats) + "\n")
    with open(path, "w") as f:
        f.writelines(keep)


def build_records(iteration: int, out: dict, ro, rewards: np.ndarray, answers: Sequence[str], tokenizer
                  ) -> list[dict]:
    """One JSON-ready dict per gathered sample (see docs/INTERFACES.md, "Rollout dumps")."""
    from orz_jax.reward.extract import extract_answer

    records, seen = [], set()
    for k, i in enumerate(np.asarray(out["index"]).tolist()):
        if i in seen:  # a random pick that repeats a ranked one (tiny buffers)
            continue
        seen.add(i)
        plen, rlen = int(ro.prompt_lens[i]), int(ro.response_mask[i].sum())
        prompt_ids = np.asarray(ro.prompt_ids[i, :plen]).tolist()
        response_ids = np.asarray(ro.response_ids[i, :rlen]).tolist()
        text = ro.texts[i]
        p = int(ro.prompt_index[i])
        records.append({
            "iteration": iteration,
            "sample": int(i),
            "selected_by": SELECTIONS[k] if k < len(SELECTIONS) else "random",
            "prompt_index": p,
            "prompt_ids": prompt_ids,
            "prompt_text": tokenizer.decode(prompt_ids, skip_special=False),
            "response_ids": response_ids,
            "response_pieces": token_pieces(tokenizer, response_ids),
            "response_text": text,
            "reference": answers[p] if p < len(answers) else None,
            "extracted": extract_answer(text),
            "stop_reason": ro.stop_reason[i],
            "reward": float(rewards[i]),
            "score": float(out["score"][k]),
            "sampling_logprobs": _floats(ro.logprobs[i, :rlen]),
            "old_logprobs": _floats(out["old_logprobs"][k, :rlen]),
            "values": _floats(out["values"][k, :rlen]),
            "advantages": _floats(out["advantages"][k, :rlen]),
            "advantages_raw": _floats(out["advantages_raw"][k, :rlen]),
            "returns": _floats(out["returns"][k, :rlen]),
        })
    return records


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class DumpError(ValueError):
    """A run directory without dumps, or a malformed dump file; one line naming the file."""


ARRAY_FIELDS = ("sampling_logprobs", "old_logprobs", "values", "advantages", "advantages_raw", "returns")


def list_iterations(run_dir: str) -> list[int]:
    d = os.path.join(run_dir, DUMP_DIR)
    if not os.path.isdir(d):
        return []
    its = []
    for name in os.listdir(d):
        if name.startswith("iter_") and name.endswith(".jsonl"):
            try:
                its.append(int(name[5:-6]))
            except ValueError:
                continue
    return sorted(its)


def load_dump(run_dir: str, iteration: int) -> list[dict]:
    """Records of one dump with the per-token fields as float32 arrays [response_len]."""
    path = dump_path(run_dir, iteration)
    if not os.path.isfile(path):
        raise DumpError(f"{path}: no rollout dump for iteration {iteration} (dumped: {list_iterations(run_dir)})")
    records = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                n = len(r["response_ids"])
                for k in ARRAY_FIELDS:
                    r[k] = np.asarray([np.nan if v is None else v for v in r[k]], np.float32)
                    if r[k].shape != (n,):
                        raise ValueError(f"{k} has {r[k].shape[0]} entries for {n} response tokens")
                if len(r["response_pieces"]) != n:
                    raise ValueError(f"response_pieces has {len(r['response_pieces'])} entries for {n} tokens")
            except (ValueError, KeyError, TypeError) as e:
                raise DumpError(f"{path}:{ln}: malformed rollout dump record: {e}") from None
            records.append(r)
    return records


def load_stats(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, DUMP_DIR, STATS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return sorted((json.loads(ln) for ln in f if ln.strip()), key=lambda s: s["iteration"])
