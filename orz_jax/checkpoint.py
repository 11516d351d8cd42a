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
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from orz_jax.config import CheckpointConfig

log = logging.getLogger(__name__)


def _arrays(state) -> dict:
    """The array part of a ``TrainState`` (graphdef is static and rebuilt from the config)."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rest": state.rest}


class Checkpointer:
    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        self.cfg = cfg
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
        items = dict(actor=ocp.args.StandardSave(_arrays(actor)), data=ocp.args.JsonSave(data_state),
                     meta=ocp.args.JsonSave(meta))
        if critic is not None:
            items["critic"] = ocp.args.StandardSave(_arrays(critic))
        self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, actor, critic) -> tuple[Any, Any, dict, dict]:
        """Restore ``step`` into the structure, shapes and shardings of the given train states."""
        def target(state):
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                                if isinstance(x, jax.Array) else x, _arrays(state))

        items = dict(actor=ocp.args.StandardRestore(target(actor)), data=ocp.args.JsonRestore(),
                     meta=ocp.args.JsonRestore())
        if critic is not None:  # None: a run without a critic (GRPO)
            items["critic"] = ocp.args.StandardRestore(target(critic))
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        a = out["actor"]
        actor = actor.replace(params=a["params"], opt_state=a["opt_state"], step=a["step"], rest=a["rest"])
        if critic is not None:
            c = out["critic"]
            critic = critic.replace(params=c["params"], opt_state=c["opt_state"], step=c["step"], rest=c["rest"])
        return actor, critic, dict(out["data"]), dict(out["meta"])

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
