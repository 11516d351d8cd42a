"""Sequence packing of (prompt, response) samples into fixed-length rows.

Several samples share one row of ``pack_len`` tokens. Each sample gets its own segment id (1..k;
0 = padding) and positions restarting at 0, so the model's segment-aware attention never looks
across samples and RoPE sees the same positions as in an unpacked row. Packing happens once per
rollout buffer on the host (numpy, first-fit decreasing); per-token quantities move between the
per-sample response layout ``[n, resp_len]`` and the packed layout ``[rows, pack_len]`` with one
gather / scatter on device (:func:`pack_response` / :func:`unpack_response`), which is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class PackedBatch:
    """One rollout buffer, packed. Every field is ``[rows, pack_len]`` and token-aligned (see
    ``orz_jax.ppo.losses``): ``old_logprobs[r, i]`` / ``old_values[r, i]`` describe token ``i``."""

    tokens: jax.Array  # int32 token ids, 0 on padding
    positions: jax.Array  # int32, restart at 0 for every sample
    segment_ids: jax.Array  # int32, 1..k = sample slot in the row, 0 = padding
    loss_mask: jax.Array  # float32, 1 on response tokens (incl. the stop token), 0 on prompt / padding
    old_logprobs: jax.Array  # float32, log-prob of the token under the policy that sampled it
    old_values: jax.Array  # float32, V_old(s_t) of the critic before this update
    advantages: jax.Array  # float32
    returns: jax.Array  # float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """Where each sample landed (host numpy). ``response_index`` maps the per-sample response layout
    onto flat packed positions for :func:`pack_response` / :func:`unpack_response`."""

    row: np.ndarray  # [n] packed row of each sample
    start: np.ndarray  # [n] column of its first (prompt) token
    prompt_len: np.ndarray  # [n]
    response_len: np.ndarray  # [n]
    num_rows: int
    pack_len: int
    response_index: np.ndarray  # [n, max_response_len] int32 flat index row*pack_len+col; num_rows*pack_len = none

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_len.sum() + self.response_len.sum())

    @property
    def fill(self) -> float:
        """Share of packed slots holding real tokens."""
        return self.num_tokens / float(self.num_rows * self.pack_len)


def _response_lengths(response_mask: np.ndarray) -> np.ndarray:
    """Lengths of right-padded responses; raises if a mask is not a contiguous prefix."""
    m = np.asarray(response_mask) != 0
    lens = m.sum(axis=1)
    prefix = np.arange(m.shape[1])[None, :] < lens[:, None]
    bad = np.nonzero((m != prefix).any(axis=1))[0]
    if bad.size:
        raise ValueError(f"pack_samples: response_mask of sample {int(bad[0])} is not right-padded "
                         f"(ones then zeros): {m[bad[0]].astype(int).tolist()}")
    return lens.astype(np.int64)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bin-pack ``lengths`` into rows of ``capacity``: longest first, each into the first row with room.

    Returns (row [n], start [n], num_rows).
    """
    lengths = np.asarray(lengths, np.int64)
    n = lengths.shape[0]
    row = np.empty(n, np.int64)
    start = np.empty(n, np.int64)
    used = np.zeros(max(n, 1), np.int64)  # at most one row per sample
    num_rows = 0
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.nonzero(used[:num_rows] + lengths[i] <= capacity)[0]
        r = int(fits[0]) if fits.size else num_rows
        num_rows = max(num_rows, r + 1)
        row[i], start[i] = r, used[r]
        used[r] += lengths[i]
    return row, start, num_rows


def pack_samples(prompt_ids: np.ndarray, prompt_lens: np.ndarray, response_ids: np.ndarray,
                 response_mask: np.ndarray, pack_len: int, *, row_multiple: int = 1,
                 seed: Optional[int] = 0) -> tuple[PackedBatch, PackLayout]:
    """Pack samples into rows (host, numpy).

    Args:
      prompt_ids:    [n, max_prompt_len] int, left-aligned, valid for ``prompt_lens`` tokens.
      prompt_lens:   [n] int, >= 1 (the first response token's log-prob / value is read at the
                     last prompt position).
      response_ids:  [n, max_response_len] int.
      response_mask: [n, max_response_len] {0,1}, right-padded (ones then zeros).
      pack_len:      tokens per packed row; every sample must fit in one row.
      row_multiple:  pad the number of rows up to a multiple of this (mesh batch shards x micro-batch
                     rows x optimizer steps) with all-padding rows, which carry no loss.
      seed:          rows are shuffled with this seed so mini-batches are random subsets of the
                     buffer (None: keep the packer's order).
    Returns:
      (batch, layout): ``batch`` holds numpy tokens / positions / segment_ids / loss_mask and zeros
      for the per-token training fields, which :func:`orz_jax.ppo.train.prepare_batch` fills in.
    """
    prompt_ids = np.asarray(prompt_ids)
    response_ids = np.asarray(response_ids)
    plens = np.asarray(prompt_lens).astype(np.int64)
    n, max_resp = response_ids.shape
    if prompt_ids.shape[0] != n or plens.shape != (n,) or np.shape(response_mask) != (n, max_resp):
        raise ValueError(f"pack_samples: inconsistent shapes prompt_ids {prompt_ids.shape}, prompt_lens "
                         f"{plens.shape}, response_ids {response_ids.shape}, response_mask {np.shape(response_mask)}")
    if (plens < 1).any() or (plens > prompt_ids.shape[1]).any():
        i = int(np.nonzero((plens < 1) | (plens > prompt_ids.shape[1]))[0][0])
        raise ValueError(f"pack_samples: sample {i} has prompt_len {int(plens[i])}; expected 1..{prompt_ids.shape[1]}")
    rlens = _response_lengths(response_mask)
    lengths = plens + rlens
    if (lengths > pack_len).any():
        i = int(np.argmax(lengths))
        raise ValueError(f"pack_samples: sample {i} has {int(lengths[i])} tokens (prompt {int(plens[i])} + response "
                         f"{int(rlens[i])}) > ppo.pack_len={pack_len}")

    row, start, num_rows = first_fit_decreasing(lengths, pack_len)
    num_rows = max(num_rows, 1)
    num_rows = -(-num_rows // row_multiple) * row_multiple
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(num_rows)  # old row r -> new row perm[r]
        row = perm[row]

    tokens = np.zeros((num_rows, pack_len), np.int32)
    positions = np.zeros((num_rows, pack_len), np.int32)
    segment_ids = np.zeros((num_rows, pack_len), np.int32)
    loss_mask = np.zeros((num_rows, pack_len), np.float32)
    seg_count = np.zeros(num_rows, np.int64)
    # Segment ids follow column order within a row (samples were placed left to right).
    for i in np.lexsort((start, row)):
        r, s, p, q = int(row[i]), int(start[i]), int(plens[i]), int(rlens[i])
        seg_count[r] += 1
        tokens[r, s:s + p] = prompt_ids[i, :p]
        tokens[r, s + p:s + p + q] = response_ids[i, :q]
        positions[r, s:s + p + q] = np.arange(p + q)
        segment_ids[r, s:s + p + q] = seg_count[r]
        loss_mask[r, s + p:s + p + q] = 1.0

    j = np.arange(max_resp)[None, :]
    flat = row[:, None] * pack_len + start[:, None] + plens[:, None] + j
    response_index = np.where(j < rlens[:, None], flat, num_rows * pack_len).astype(np.int32)

    zeros = np.zeros((num_rows, pack_len), np.float32)
    batch = PackedBatch(tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=loss_mask,
                        old_logprobs=zeros, old_values=zeros.copy(), advantages=zeros.copy(), returns=zeros.copy())
    layout = PackLayout(row=row, start=start, prompt_len=plens, response_len=rlens, num_rows=num_rows,
                        pack_len=pack_len, response_index=response_index)
    return batch, layout


def pack_response(x: jax.Array, response_index: jax.Array, num_rows: int, pack_len: int) -> jax.Array:
    """Scatter per-sample response values into the packed layout.

    Args: x [n, max_response_len]; response_index [n, max_response_len] from :class:`PackLayout`.
    Returns: [num_rows, pack_len], x at each response token, 0 elsewhere (prompt, padding).
    """
    flat = jnp.zeros((num_rows * pack_len,), x.dtype)
    flat = flat.at[response_index.reshape(-1)].set(x.reshape(-1), mode="drop")  # index n*L: dropped
    return flat.reshape(num_rows, pack_len)


def unpack_response(x: jax.Array, response_index: jax.Array) -> jax.Array:
    """Gather packed per-token values back to the per-sample layout.

    Args: x [num_rows, pack_len]; response_index [n, max_response_len].
    Returns: [n, max_response_len], 0 past each response's end.
    """
    flat = x.reshape(-1)
    return jnp.take(flat, response_index, mode="fill", fill_value=0)
