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
  them, but ``jetstream.engine`` imports two seqio classes at import time. ``pip install`` brings
  seqio along; where it is absent (a GPU/TPU image without TensorFlow, where the package was
  installed with ``--no-deps``) a two-class placeholder module stands in, and using it raises.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types

# seqio imports TensorFlow, which prints CUDA/oneDNN banners on every start; keep them quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map  # removed in JAX 0.6; JetStream 0.2.2 still calls it


def _install_seqio_placeholder() -> None:
    """``seqio.vocabularies.{Vocabulary, SentencePieceVocabulary}`` for JetStream's own tokenizers,
    which this project never instantiates (it brings its own through ``build_tokenizer``)."""

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise ImportError("seqio is not installed: JetStream's built-in tokenizers are unavailable "
                              "(orz_jax passes its own tokenizer to the engine)")

    vocab = types.ModuleType("seqio.vocabularies")
    vocab.Vocabulary = type("Vocabulary", (_Unavailable,), {})
    vocab.SentencePieceVocabulary = type("SentencePieceVocabulary", (_Unavailable,), {})
    pkg = types.ModuleType("seqio")
    pkg.vocabularies = vocab
    sys.modules.update({"seqio": pkg, "seqio.vocabularies": vocab})


if "seqio" not in sys.modules and importlib.util.find_spec("seqio") is None:
    _install_seqio_placeholder()

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
