"""``model.checkpoint`` as a Hugging Face hub id (``Qwen/Qwen2.5-7B``, optionally ``Qwen/Qwen2.5-7B@<revision>``).

The weights go into the usual Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)
through ``huggingface_hub.snapshot_download``, limited to the files the loader reads: config, safetensors and
tokenizer files (no PyTorch ``.bin`` duplicates). With ``HF_HUB_OFFLINE=1`` the cached snapshot is used and
nothing is fetched. From there on it is an ordinary local HF directory.

Which is which, unambiguously: a value that exists on disk is a local path, always; the bundled names
(``demo``, ``smollm2-135m``) are handled before this module; anything else of the form ``namespace/name``
(hub characters only, no leading ``/`` or ``.``) is a hub id; everything else is a missing local directory.
"""

from __future__ import annotations

import os
import re
from typing import Optional

__all__ = ["HubError", "HF_ALLOW_PATTERNS", "is_hub_id", "hub_snapshot"]

# What load_hf and load_tokenizer read. "*.safetensors.index.json" names the shards of a sharded checkpoint.
HF_ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "tokenizer.model", "vocab.json", "merges.txt"]

# huggingface_hub's repo-id rules (validate_repo_id): [A-Za-z0-9_.-], no "--" or "..", at most 96 characters;
# here the namespace is required, so that bare words stay local names.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9_./-]+))?$")


class HubError(ValueError):
    """A hub id that cannot be resolved; the message names the id and what failed."""


def is_hub_id(value: str) -> bool:
    """True for ``namespace/name`` (optionally ``@revision``) that is not an existing local path."""
    if os.path.exists(value):
        return False
    m = _HUB_ID.match(value)
    return bool(m) and len(m["repo"]) <= 96 and "--" not in m["repo"] and ".." not in m["repo"]


def hub_snapshot(hub_id: str, key: str = "model.checkpoint") -> str:
    """Download (or, offline, find in the cache) the model ``hub_id``; return its snapshot directory.

    Raises HubError naming ``key`` and ``hub_id``: not in the cache while offline, no such repository or
    revision, gated, a network failure, or a snapshot without ``config.json`` / safetensors weights.
    """
    m = _HUB_ID.match(hub_id)
    if not m:
        raise HubError(f"{key}: {hub_id!r} is not a Hugging Face hub id (expected namespace/name[@revision])")
    repo, revision = m["repo"], m["rev"]
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError as e:
        raise HubError(f"{key}: {hub_id!r} looks like a hub id, but huggingface_hub is not installed ({e}); "
                       f"pip install huggingface_hub, or give a local directory") from None
    cache = constants.HF_HUB_CACHE
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=HF_ALLOW_PATTERNS)
    except hf_errors.GatedRepoError:
        raise HubError(f"{key}: {repo} is gated on the Hugging Face hub: accept its terms on the hub and log in "
                       f"(huggingface-cli login or $HF_TOKEN)") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"{key}: no model {repo} on the Hugging Face hub (or it is private: log in first), "
                       f"and no local directory of that name") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{key}: {repo} has no revision {revision!r} on the Hugging Face hub") from None
    except hf_errors.LocalEntryNotFoundError:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise HubError(f"{key}: {hub_id} is not in the Hugging Face cache {cache} and {offline}; "
                       f"download it once with network access, or give a local directory") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{key}: downloading {hub_id} from the Hugging Face hub failed: {first}") from None
    _check_snapshot(path, hub_id, key)
    return path


def _check_snapshot(path: str, hub_id: str, key: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HubError(f"{key}: the snapshot of {hub_id} at {path} has no config.json (not a transformers model?)")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise HubError(f"{key}: the snapshot of {hub_id} at {path} has no *.safetensors weights (PyTorch .bin "
                       f"checkpoints are not supported)")

