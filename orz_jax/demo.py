"""The built-in demo base model: a small char-level decoder pretrained here on the synthetic task.

ORZ starts RL from a *base* model that already holds the skill but does not use it reliably. The demo
recreates that situation in a few minutes of CPU time: the model is pretrained (plain next-token
prediction) on ``prompt + response`` texts that always hold the true value, written as
``<answer>\\boxed{v}</answer>`` with probability ``demo.boxed_prob`` and as a bare ``<answer>v</answer>``
(which the reward cannot grade, so it scores 0) otherwise. The pretrained model is an ordinary HF directory
(config.json + model.safetensors + tokenizer.json), cached under ``demo.cache_dir`` keyed by a hash
of everything that shapes it, and rebuilt when missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from orz_jax.config import ArchConfig, Config, ModelConfig
from orz_jax.data.synthetic import generate_synthetic
from orz_jax.models.build import create_model
from orz_jax.models.hf_io import export_hf
from orz_jax.template import format_prompt
from orz_jax.tokenizer import CharTokenizer

log = logging.getLogger(__name__)


def demo_response(answer: str, boxed: bool = True) -> str:
    """What the demo model learns to write after ``Assistant: <think>``."""
    shown = f"\\boxed{{{answer}}}" if boxed else answer
    return f" </think> <answer>{shown}</answer>"


def demo_arch(cfg: Config, vocab_size: int) -> ArchConfig:
    d = cfg.demo
    return ArchConfig(architecture="qwen2", vocab_size=vocab_size, hidden_size=d.hidden_size,
                      intermediate_size=d.intermediate_size, num_layers=d.num_layers, num_heads=d.num_heads,
                      num_kv_heads=d.num_kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, attention_bias=True, max_position_embeddings=1024)


def _fingerprint(cfg: Config) -> str:
    key = {"demo": dataclasses.asdict(cfg.demo), "synthetic": dataclasses.asdict(cfg.data.synthetic),
           "template": cfg.data.template, "version": 2}
    key["demo"].pop("cache_dir")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def demo_model_dir(cfg: Config) -> str:
    root = cfg.demo.cache_dir or os.environ.get("ORZ_JAX_CACHE") or os.path.expanduser("~/.cache/orz_jax")
    return os.path.join(root, f"demo-{_fingerprint(cfg)}")


def _pretrain_texts(cfg: Config, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    train, _ = generate_synthetic(cfg.data.synthetic)
    prompts, responses = [], []
    for rec in train:
        prompts.append(format_prompt(rec.question, cfg.data.template))
        responses.append(demo_response(rec.answer, boxed=bool(rng.random() < cfg.demo.boxed_prob)))
    return prompts, responses


def pretrain_demo_model(cfg: Config, out_dir: str) -> dict:
    """Pretrain the demo model and write it to ``out_dir`` as an HF directory. Returns stats."""
    t0 = time.time()
    d = cfg.demo
    tok = CharTokenizer()
    arch = demo_arch(cfg, tok.vocab_size)
    rng = np.random.default_rng(d.seed)
    prompts, responses = _pretrain_texts(cfg, rng)

    # Fixed-shape batches: every text padded to one length, so the step compiles once.
    seqs = [tok.encode(p) + tok.encode(r) + [tok.eos_id] for p, r in zip(prompts, responses)]
    plen = [len(tok.encode(p)) for p in prompts]
    seq_len = max(len(s) for s in seqs)
    n = len(seqs)
    tokens = np.zeros((n, seq_len), np.int32)
    loss_mask = np.zeros((n, seq_len), np.float32)  # predict response tokens (and EOS) only
    seg = np.zeros((n, seq_len), np.int32)
    for i, (s, p) in enumerate(zip(seqs, plen)):
        tokens[i, :len(s)] = s
        seg[i, :len(s)] = 1
        loss_mask[i, p:len(s)] = 1.0

    model = create_model("policy", arch, ModelConfig(arch=arch), seed=d.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    sched = optax.warmup_cosine_decay_schedule(0.0, d.lr, d.warmup_steps, d.steps, d.lr * 0.05)
    opt = optax.adamw(sched, b1=0.9, b2=0.98, weight_decay=0.01)
    opt_state = opt.init(params)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (d.batch_size, seq_len))

    def loss_fn(params, tokens, seg, mask):
        logits, _ = nnx.merge(graphdef, params)(tokens, positions, seg)  # [batch, seq, vocab]
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, seq-1]
        m = mask[:, 1:]
        return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

    @jax.jit
    def step(params, opt_state, tokens, seg, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, seg, mask)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for it in range(d.steps):
        idx = rng.integers(0, n, d.batch_size)
        params, opt_state, loss = step(params, opt_state, tokens[idx], seg[idx], loss_mask[idx])
        if (it + 1) % 100 == 0:
            losses.append(float(loss))  # one host sync per 100 steps
            log.info("demo pretrain step %d/%d loss %.4f", it + 1, d.steps, losses[-1])
    model = nnx.merge(graphdef, params, nnx.state(model, nnx.Not(nnx.Param)))
    export_hf(model, out_dir)
    tok.save(out_dir)
    stats = {"seconds": time.time() - t0, "steps": d.steps, "final_loss": losses[-1] if losses else None,
             "num_texts": n, "fingerprint": _fingerprint(cfg)}
    with open(os.path.join(out_dir, "demo_pretrain.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def ensure_demo_model(cfg: Config) -> str:
    """Path of the pretrained demo model, pretraining it first when it is not cached yet."""
    path = demo_model_dir(cfg)
    if os.path.isfile(os.path.join(path, "demo_pretrain.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-tmp-", dir=os.path.dirname(path))
    try:
        log.info("pretraining the demo base model (first run only) -> %s", path)
        pretrain_demo_model(cfg, tmp)
        if os.path.isdir(path):  # a concurrent run finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)  # atomic: a killed pretraining never leaves a half-written model
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
