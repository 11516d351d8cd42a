"""``model.checkpoint`` as a Hugging Face hub id, against a hub cache laid out by the test with ``HF_HUB_OFFLINE=1``
(this machine reaches no hub): the id resolves to the cached snapshot, the policy loads from it with the weights
transformers saved there, an existing local directory of the same name wins, an id missing from the cache fails
with one line naming it, and the bundled names stay local names.

huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE when it is imported, so the checks run in a fresh Python."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from orz_jax.models.hub import is_hub_id

REV = "0123456789abcdef0123456789abcdef01234567"

CHILD = r"""
import json, os, shutil, sys
import numpy as np, torch, transformers
from tokenizers import Tokenizer, models, pre_tokenizers

snap = sys.argv[1]
os.makedirs(snap)
cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False)
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM(cfg).eval()
model.save_pretrained(snap, safe_serialization=True)
vocab = {c: i for i, c in enumerate(["<unk>", "<eos>"] + [chr(97 + i) for i in range(26)])}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
tok.save(os.path.join(snap, "tokenizer.json"))
json.dump({"eos_token": "<eos>"}, open(os.path.join(snap, "tokenizer_config.json"), "w"))
with open(os.path.join(snap, "..", "..", "refs", "main"), "w") as f:  # refs/main -> the snapshot's revision
    f.write(os.path.basename(snap))

from orz_jax.config import load_config
from orz_jax.models.hf_io import load_hf
from orz_jax.tokenizer import load_tokenizer
from orz_jax.trainer import StartupError, resolve_model_path

cfg = load_config(None, ["model.checkpoint=tiny-org/Tiny-Qwen.v1"])
path = resolve_model_path(cfg)
assert os.path.realpath(path) == os.path.realpath(snap), (path, snap)
policy, arch = load_hf("policy", path, cfg.model)
assert (arch.vocab_size, arch.hidden_size, arch.num_layers, arch.num_kv_heads) == (64, 32, 2, 2)
# The cached weights, bit for bit (float32 both sides; our lm_head is stored [hidden, vocab]).
assert np.array_equal(np.asarray(policy.transformer.embed.value), model.model.embed_tokens.weight.detach().numpy())
assert np.array_equal(np.asarray(policy.lm_head.value), model.lm_head.weight.detach().numpy().T)
assert load_tokenizer(path).eos_id == 1

# A revision pinned with @ resolves to the same snapshot.
cfg_rev = load_config(None, [f"model.checkpoint=tiny-org/Tiny-Qwen.v1@{os.path.basename(snap)}"])
assert os.path.realpath(resolve_model_path(cfg_rev)) == os.path.realpath(snap)

# python -m orz_jax.evaluate --checkpoint takes the same id.
from orz_jax.evaluate import locate_checkpoint
loc = locate_checkpoint("tiny-org/Tiny-Qwen.v1")
assert loc.kind == "hf" and os.path.realpath(loc.hf_dir) == os.path.realpath(snap), loc

# An existing local directory of the same name wins over the hub.
os.makedirs("tiny-org")
shutil.copytree(snap, "tiny-org/Tiny-Qwen.v1")
assert resolve_model_path(cfg) == "tiny-org/Tiny-Qwen.v1"

try:
    resolve_model_path(load_config(None, ["model.checkpoint=nobody/missing-model"]))
except StartupError as e:
    print("MISSING:", e)
else:
    raise AssertionError("a hub id absent from the offline cache resolved")
print("OK")
"""


def test_hub_id_from_offline_cache(tmp_path):
    hf_home = tmp_path / "hf"
    snap = hf_home / "hub" / "models--tiny-org--Tiny-Qwen.v1" / "snapshots" / REV
    (hf_home / "hub" / "models--tiny-org--Tiny-Qwen.v1" / "refs").mkdir(parents=True)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(snap)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout[-2000:] + p.stderr[-4000:]
    missing = next(line for line in p.stdout.splitlines() if line.startswith("MISSING:"))
    assert missing == (f"MISSING: model.checkpoint: nobody/missing-model is not in the Hugging Face cache "
                       f"{hf_home / 'hub'} and HF_HUB_OFFLINE is set; download it once with network access, or "
                       f"give a local directory")


@pytest.mark.parametrize("value, hub", [
    ("Qwen/Qwen2.5-7B", True), ("Qwen/Qwen2.5-7B@main", True), ("org/name@0123abc", True),
    ("demo", False), ("smollm2-135m", False), ("/abs/path", False), ("./rel/dir", False), ("a/b/c", False),
    ("runs/x/", False), ("org/na--me", False), ("org/na..me", False), ("../x", False), ("org/", False),
])
def test_hub_id_syntax(value, hub):
    assert is_hub_id(value) is hub


def test_existing_local_path_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/model")
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not is_hub_id("org/model")
