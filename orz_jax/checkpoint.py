"""Whole-training-state checkpoints with orbax: actor and critic (parameters + optimizer state),
the data iterator position, the RNG key and the iteration.

Orbax writes each step into a temporary directory and renames it only once every item is on disk,
so a save interrupted by a crash or ``kill -9`` never replaces or corrupts the previous checkpoint:
``latest_step`` only ever sees finalised steps. Saves are asynchronous (training continues while
the arrays stream to disk); ``wait`` blocks until the last one is durable.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Iterator, Optional

import jax
import orbax.checkpoint as ocp

from orz_jax.config import CheckpointConfig
from orz_jax.models.layer_layout import has_per_layer, per_layer_like, stack_abstract, stacked_tree

log = logging.getLogger(__name__)


def _arrays(state) -> dict:
    """The array part of a ``TrainState`` (graphdef is static and rebuilt from the config), in the layout the run
    trains in (``ppo.train_layers``)."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rest": state.rest}


def _stacked(tree: Any) -> Any:
    """What a checkpoint holds: ``tree`` with per-layer parameters and moments stacked, so that a checkpoint does not
    depend on the layout the run trained in (``ppo.train_layers``: a CPU run resumes on a TPU and back)."""
    return stacked_tree(tree) if has_per_layer(tree) else tree


def _target(tree: Any) -> Any:
    """The restore target for ``tree`` (arrays in the run's layout): its stacked form as ShapeDtypeStructs placed
    like ``tree``'s arrays."""
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                       if isinstance(x, jax.Array) else x, tree)
    return stacked_tree(sds, stack_abstract) if has_per_layer(sds) else sds


def _in_layout_of(template: Any, restored: Any) -> Any:
    """``restored`` (stacked, from a checkpoint) in the layout and shardings of ``template`` (the run's arrays)."""
    if not has_per_layer(template):
        return restored
    out = per_layer_like(template, restored)
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding) if isinstance(t, jax.Array) else x, out, template)


class _DropDiskFullTracebacks(logging.Filter):
    """Orbax logs the full traceback of a failed background save before re-raising it to us; on a full disk
    the trainer reports that failure in one line (see orz_jax.run_guard), so the traceback is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        from orz_jax.run_guard import disk_full
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and disk_full(exc))


_DISK_FULL_FILTER = _DropDiskFullTracebacks()


class Checkpointer:
    def __init__(self, directory: str, cfg: CheckpointConfig):
        for name in ("absl", "orbax"):  # orbax logs through absl; idempotent (a filter is added once)
            logging.getLogger(name).addFilter(_DISK_FULL_FILTER)
        self.directory = os.path.abspath(directory)
        self.cfg = cfg
        _remove_unfinished_saves(self.directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                            create=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts,
                                          item_names=("actor", "critic", "data", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, actor, critic, data_state: dict, meta: dict) -> None:
        """Queue a save of the whole training state at ``step`` (asynchronous when configured).
        ``critic`` is None when the run has none (GRPO)."""
        items = dict(actor=ocp.args.StandardSave(_stacked(_arrays(actor))), data=ocp.args.JsonSave(data_state),
                     meta=ocp.args.JsonSave(meta))
        if critic is not None:
            items["critic"] = ocp.args.StandardSave(_stacked(_arrays(critic)))
        self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, actor, critic) -> tuple[Any, Any, dict, dict]:
        """Restore ``step`` into the structure, shapes, shardings and layer layout of the given train states."""
        items = dict(actor=ocp.args.StandardRestore(_target(_arrays(actor))), data=ocp.args.JsonRestore(),
                     meta=ocp.args.JsonRestore())
        if critic is not None:  # None: a run without a critic (GRPO)
            items["critic"] = ocp.args.StandardRestore(_target(_arrays(critic)))
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))

        def into(state, restored):
            r = _in_layout_of(_arrays(state), restored)
            return state.replace(params=r["params"], opt_state=r["opt_state"], step=r["step"], rest=r["rest"])

        actor = into(actor, out["actor"])
        if critic is not None:
            critic = into(critic, out["critic"])
        return actor, critic, dict(out["data"]), dict(out["meta"])

    def restore_params(self, step: int, actor, critic) -> tuple[Any, Any, dict]:
        """Only the parameters of ``step`` (no optimizer state is read, so no memory is spent on it), in
        the structure, shapes, shardings and layer layout of the given train states: (actor params, critic params,
        meta)."""
        def args(state):
            t = {"params": _target(state.params)}
            return ocp.args.PyTreeRestore(item=t, restore_args=ocp.checkpoint_utils.construct_restore_args(t),
                                          partial_restore=True)

        items = {"actor": args(actor), "meta": ocp.args.JsonRestore()}
        if critic is not None:  # None: a run without a critic (GRPO) takes the policy only
            items["critic"] = args(critic)
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        actor_params = _in_layout_of(actor.params, out["actor"]["params"])
        critic_params = _in_layout_of(critic.params, out["critic"]["params"]) if critic is not None else None
        return actor_params, critic_params, dict(out["meta"])

    def restore_newest(self, actor, critic) -> Iterator[tuple[int, Any, Any, dict, dict]]:
        """Yield restored states ``(step, actor, critic, data_state, meta)`` newest first. A step that does not
        restore (a truncated file, an empty directory) is logged with the reason and moved aside to
        ``<directory>/unreadable/<step>-<time>`` (never deleted: it may hold the only copy of something
        worth rescuing), so that the run does not save over it or fail on it again. The caller stops at the
        first step it can use; if it cannot use a yielded step, it calls :meth:`set_aside` on it."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                out = self.restore(step, actor, critic)
            except Exception as e:  # orbax / tensorstore raise many types for unreadable files
                self.set_aside(step, f"{type(e).__name__}: {_first_line(e)}")
                continue
            yield (step, *out)

    def set_aside(self, step: int, why: str) -> None:
        """Move the unreadable ``step`` out of the manager's view (never deletes it)."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, "unreadable", f"{step}-{int(time.time())}")
        if jax.process_index() == 0:  # one shared directory: one process moves, all wait for it
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
            log.warning("checkpoint step %d skipped: it does not restore (%s); moved to %s", step, why, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"orz_jax set aside checkpoint {step}")
        self._mgr.reload()

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _remove_unfinished_saves(directory: str) -> None:
    """Delete the ``<step>.orbax-checkpoint-tmp*`` directories of saves cut short (kill -9, a full disk):
    never finalised, they hold no usable step, and on a disk that was full they hold the space the run
    needs to resume. Process 0 only (one trainer per directory)."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if ".orbax-checkpoint-tmp" in name:
            log.info("removing the unfinished save %s", os.path.join(directory, name))
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text[:limit]
