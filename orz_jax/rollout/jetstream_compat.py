"""The one place that knows about google-jetstream 0.2.2's friction with current JAX.

Import JetStream only through this module:

    from orz_jax.rollout.jetstream_compat import engine_api, orchestrator, server_lib

Why it exists:
* JetStream 0.2.2 (the only release on PyPI) calls ``jax.tree_map``, which current JAX removed;
  ``jax.tree.map`` is the same function, so we alias it before JetStream is imported.
* Its orchestrator module sets the *root* logger to DEBUG and attaches a stdout handler at import
  time, which floods every JAX compile log line into our output; we restore the previous root
  logger state right after the import.
* Its dependency list pulls seqio (and with it TensorFlow) for its own tokenizers; we never use
  them, but they must be installed for ``jetstream.engine`` to import.
"""

from __future__ import annotations

import logging
import os

# seqio imports TensorFlow, which prints CUDA/oneDNN banners on every start; keep them quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map  # removed in JAX 0.6; JetStream 0.2.2 still calls it

_root = logging.getLogger()
_level, _handlers = _root.level, list(_root.handlers)

from jetstream.core import config_lib, orchestrator, server_lib  # noqa: E402
from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc  # noqa: E402
from jetstream.engine import engine_api, token_utils, tokenizer_api, tokenizer_pb2  # noqa: E402

_root.setLevel(_level)
for _h in list(_root.handlers):
    if _h not in _handlers:
        _root.removeHandler(_h)

__all__ = ["config_lib", "engine_api", "orchestrator", "server_lib", "jetstream_pb2", "jetstream_pb2_grpc",
           "token_utils", "tokenizer_api", "tokenizer_pb2"]
