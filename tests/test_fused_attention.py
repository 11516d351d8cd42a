"""Fused training attention (``model.attention_impl``): splash (Pallas, TPU) and cuDNN (GPU) against the XLA path.

The XLA path (``transformer._causal_blocked_attention``) is the reference. Bounds are relative to its own float32
error against a float64 computation (conftest.PARITY_K says why k = 4): a kernel that computes the same function
in float32 is as far from float64 as the XLA path is; a wrong mask or scale is orders of magnitude further.
Splash runs in Pallas interpret mode here (``attention.pallas_interpret``), the same kernel code the TPU
compiles; its TPU compile is checked ahead of time for v5p with libtpu (no TPU needed).
"""

from __future__ import annotations

import importlib.util
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import PARITY_K, REPO, run_aot_script, run_with_devices
from orz_jax.config import ArchConfig, ConfigError, check_attention, load_config, resolve_attention_impl
from orz_jax.models import attention as fa
from orz_jax.models.transformer import CausalLM, _causal_blocked_attention, positions_from_segments

SEQ = 256  # two 128-token splash blocks per row: the kernel's block skipping and cross-block masking both run
TILES = (128, 128, 128)


def _segments(batch: int = 2, seq: int = SEQ) -> np.ndarray:
    """Packed rows with ragged segments, padding (0) at the ends, one segment crossing the 128 block boundary,
    and a one-token segment. [batch, seq] int32."""
    seg = np.zeros((batch, seq), np.int32)
    seg[0, :100], seg[0, 100:101], seg[0, 101:230] = 1, 2, 3  # 230.. padding
    seg[1, :seq] = 4
    if batch > 2:
        seg[2, :37], seg[2, 37:200] = 5, 6
    if batch > 3:
        seg[3, :130] = 7
    return seg


def _qkv(seed: int, b=2, kvh=2, g=3, s=SEQ, d=32, dtype=np.float32):
    r = np.random.RandomState(seed)
    return (r.randn(b, kvh, g, s, d).astype(dtype), r.randn(b, kvh, s, d).astype(dtype),
            r.randn(b, kvh, s, d).astype(dtype))


def _reference64(qh, kh, vh, seg) -> np.ndarray:
    """Naive float64 attention: causal within each non-padding segment. -> [b, kvh, g, s, d]; padding rows 0."""
    qh, kh, vh = (np.asarray(x, np.float64) for x in (qh, kh, vh))
    s, d = qh.shape[3], qh.shape[4]
    out = np.zeros(qh.shape)
    for i in range(qh.shape[0]):
        allowed = (seg[i][:, None] == seg[i][None, :]) & (seg[i][:, None] != 0) & np.tri(s, dtype=bool)  # [q, k]
        scores = np.einsum("kgqd,ktd->kgqt", qh[i], kh[i]) / np.sqrt(d)
        scores = np.where(allowed, scores, -np.inf)
        rows = allowed.any(1)
        scores[..., ~rows, :] = 0.0  # padding rows: anything finite, not compared
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[i] = np.einsum("kgqt,ktd->kgqd", p, vh[i])
    return out


def _xla(qh, kh, vh, seg, block=128):
    seg = jnp.asarray(seg)
    idx = jnp.arange(seg.shape[1])
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (idx[None, None, :] <= idx[None, :, None])
    return _causal_blocked_attention(jnp.asarray(qh), jnp.asarray(kh), jnp.asarray(vh), mask, block, jnp.float32)


def _kernel_errors(out, qh, kh, vh, seg):
    """(max |kernel - float64|, max |xla - float64|) over real (segment != 0) query positions."""
    ref = _reference64(qh, kh, vh, seg)
    real = (seg != 0)[:, None, None, :, None]
    err = lambda x: float(np.abs(np.where(real, np.asarray(x, np.float64) - ref, 0.0)).max())
    return err(out), err(_xla(qh, kh, vh, seg))


# ----------------------------------------------------------------------------------------------
# The kernels against float64, at the attention level
# ----------------------------------------------------------------------------------------------


def test_splash_kernel_matches_float64_like_the_xla_path():
    qh, kh, vh = _qkv(0)
    seg = _segments()
    with fa.pallas_interpret():
        out = jax.jit(lambda *a: fa.splash_attention(*a, tiles=TILES))(qh, kh, vh, jnp.asarray(seg))
    assert out.shape == qh.shape and bool(jnp.all(jnp.isfinite(out))), "padding rows must stay finite"
    e_kernel, e_xla = _kernel_errors(out, qh, kh, vh, seg)
    assert 0 < e_xla and e_kernel <= PARITY_K * e_xla, (e_kernel, e_xla)


def test_splash_no_real_token_attends_across_segments_or_to_padding():
    """Changing another segment's (or the padding's) keys and values leaves a segment's outputs bit-identical."""
    qh, kh, vh = _qkv(1)
    seg = _segments()
    kh2, vh2 = kh.copy(), vh.copy()
    other = (seg[0] != 3)  # everything outside segment 3 of row 0: segments 1, 2 and the padding
    kh2[0][:, other], vh2[0][:, other] = 100.0, -100.0
    run = jax.jit(lambda *a: fa.splash_attention(*a, tiles=TILES))
    with fa.pallas_interpret():
        a, b = run(qh, kh, vh, jnp.asarray(seg)), run(qh, kh2, vh2, jnp.asarray(seg))
    np.testing.assert_array_equal(np.asarray(a)[0][:, :, seg[0] == 3], np.asarray(b)[0][:, :, seg[0] == 3])
    assert not np.allclose(np.asarray(a)[0][:, :, seg[0] == 1], np.asarray(b)[0][:, :, seg[0] == 1])


def test_cudnn_wrapper_masks_on_cpu_through_jax_xla_implementation():
    """The wrapper's layout and segment / causal masks, through jax's XLA implementation of the same call."""
    qh, kh, vh = _qkv(2)
    seg = _segments()
    out = jax.jit(lambda *a: fa.cudnn_attention(*a, implementation="xla"))(qh, kh, vh, jnp.asarray(seg))
    assert out.shape == qh.shape and bool(jnp.all(jnp.isfinite(out)))
    e_kernel, e_xla = _kernel_errors(out, qh, kh, vh, seg)
    assert 0 < e_xla and e_kernel <= PARITY_K * e_xla, (e_kernel, e_xla)


# conftest defaults JAX_PLATFORMS to cpu; on a GPU machine run with JAX_PLATFORMS=cuda to include this test
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()),
                    reason="cuDNN attention needs an NVIDIA GPU (none here; on one, set JAX_PLATFORMS=cuda)")
def test_cudnn_kernel_on_gpu():
    """cuDNN runs bf16 only: both it and the XLA path in bf16, against float64."""
    qh, kh, vh = (x.astype(jnp.bfloat16) for x in map(jnp.asarray, _qkv(3, d=64)))
    seg = _segments()
    out = jax.jit(fa.cudnn_attention)(qh, kh, vh, jnp.asarray(seg))
    idx = jnp.arange(SEQ)
    s = jnp.asarray(seg)
    mask = (s[:, :, None] == s[:, None, :]) & (s[:, :, None] != 0) & (idx[None, None, :] <= idx[None, :, None])
    xla = _causal_blocked_attention(qh, kh, vh, mask, 128, jnp.bfloat16)
    ref = _reference64(*(np.asarray(x, np.float64) for x in (qh, kh, vh)), seg)
    real = (seg != 0)[:, None, None, :, None]
    err = lambda x: float(np.abs(np.where(real, np.asarray(x, np.float64) - ref, 0.0)).max())
    assert err(out) <= PARITY_K * err(xla), (err(out), err(xla))


# ----------------------------------------------------------------------------------------------
# The model: logits and gradients, splash against the XLA path, float64 as the yardstick
# ----------------------------------------------------------------------------------------------

ARCH = ArchConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  initializer_range=0.2)


def _model(impl: str, dtype=jnp.float32) -> CausalLM:
    return CausalLM(ARCH, dtype=dtype, param_dtype=dtype, attention_block=128,
                    attention=fa.AttentionSpec(impl=impl, splash_tiles=TILES), rngs=nnx.Rngs(3))


def _loss_and_logits(model, tokens, positions, seg):
    """Mean next-token NLL over real positions whose next token is in the same segment, and the logits."""
    logits, _ = model(tokens, positions, seg)  # [batch, seq, vocab]
    target = jnp.roll(tokens, -1, axis=1)
    keep = ((seg != 0) & (jnp.roll(seg, -1, axis=1) == seg)).at[:, -1].set(False)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, target[..., None], -1)[..., 0]
    return jnp.sum(nll * keep) / jnp.sum(keep), logits


def _grads_and_logits(model, tokens, positions, seg):
    graphdef, params = nnx.split(model)
    fn = lambda p: _loss_and_logits(nnx.merge(graphdef, p), tokens, positions, seg)
    (_, logits), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    return np.asarray(logits, np.float64), [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]


def test_splash_model_logits_and_gradients_match_the_xla_path():
    # two layers: in the second, the padding rows' inputs differ between the paths (splash attends padding to
    # padding, XLA averages), so any real token attending to padding would show in the logits
    seg = _segments(batch=2)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, ARCH.vocab_size, seg.shape), jnp.int32)
    positions = positions_from_segments(jnp.asarray(seg))
    seg_j = jnp.asarray(seg)
    xla = _grads_and_logits(_model("xla"), tokens, positions, seg_j)
    with fa.pallas_interpret():
        splash = _grads_and_logits(_model("splash"), tokens, positions, seg_j)
    # float64 yardstick: the XLA path with float64 weights and activations (the same initial values)
    with jax.enable_x64(True):
        m64 = _model("xla", jnp.float64)
        nnx.update(m64, jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(_model("xla"), nnx.Param)))
        ref = _grads_and_logits(m64, tokens, positions, seg_j)
    real = seg != 0
    e = lambda out: (float(np.abs(out[0] - ref[0])[real].max()),
                     # gradients: the worst leaf, each relative to its largest float64 entry
                     max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(out[1], ref[1])))
    (l_splash, g_splash), (l_xla, g_xla) = e(splash), e(xla)
    assert l_xla > 0 and g_xla > 0
    assert l_splash <= PARITY_K * l_xla, ("logits", l_splash, l_xla)
    assert g_splash <= PARITY_K * g_xla, ("gradients", g_splash, g_xla)
    assert np.isfinite(splash[0]).all()


# ----------------------------------------------------------------------------------------------
# shard_map on a mesh of 8 fake CPU devices
# ----------------------------------------------------------------------------------------------

SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from orz_jax.config import ArchConfig, ModelConfig, MeshConfig
from orz_jax.models.build import create_model
from orz_jax.models import attention as fa
from orz_jax.models.transformer import positions_from_segments
from orz_jax.sharding import make_mesh, use_mesh, named_sharding
from test_fused_attention import _segments
arch = ArchConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                  initializer_range=0.2)
seg = _segments(batch=4)
tokens = np.random.RandomState(0).randint(0, 128, seg.shape).astype(np.int32)
pos = np.asarray(positions_from_segments(jnp.asarray(seg)))
def run(impl, mesh):
    mcfg = ModelConfig(arch=arch, attention_impl=impl, splash_block_q=128, splash_block_kv=128,
                       splash_block_kv_compute=128)
    model = create_model("policy", arch, mcfg, mesh=mesh, seed=3)
    @jax.jit
    def fwd(model, t, p, s):
        with use_mesh(mesh):
            return model(t, p, s)[0]
    args = [jnp.asarray(x) for x in (tokens, pos, seg)]  # the model's constraints shard them where they divide
    with fa.pallas_interpret():
        return np.asarray(fwd(model, *args))
real = seg > 0
mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # rows over data x fsdp, the heads' GQA groups over tensor
d = {impl: float(np.abs(run(impl, mesh) - run(impl, None))[real].max()) for impl in ("xla", "splash")}
print("DIFF", d["splash"], d["xla"])
# shard_map specs from the rules table; an axis that does not divide its dimension is dropped, as in constrain
P = jax.sharding.PartitionSpec
print("SPECS", fa._specs(mesh, 4, 2) == (P(("data", "fsdp"), "tensor", None, None),) * 2 + (P(("data", "fsdp"), None),),
      fa._specs(make_mesh(MeshConfig(data=1, fsdp=8, tensor=1)), 4, 2)[2] == P(None, None),
      fa._specs(make_mesh(MeshConfig(data=1, fsdp=2, tensor=4)), 4, 2)[0] == P(("data", "fsdp"), None, None, None))
"""


def test_splash_under_shard_map_equals_single_device():
    out = run_with_devices(f"import sys; sys.path.insert(0, 'tests')\n{textwrap.dedent(SHARDED)}", 8)
    print(out)
    d_splash, d_xla = (float(x) for x in next(line for line in out.splitlines() if line.startswith("DIFF")).split()[1:])
    # the sharded parameters' partial sums reorder the projections' float32 rounding, as for the XLA path; the
    # kernel itself adds none (each device runs it on whole rows and whole GQA groups)
    assert d_splash <= PARITY_K * d_xla, (d_splash, d_xla)
    assert "SPECS True True True" in out, out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile for a v5p topology (libtpu, no TPU)
# ----------------------------------------------------------------------------------------------

TINY = """\
model:
  arch: {vocab_size: 256, hidden_size: 256, intermediate_size: 256, num_layers: 1, num_heads: 2, num_kv_heads: 1}
  tokenizer: unused
  dtype: bfloat16
  remat: full
mesh: {data: 1, fsdp: -1, tensor: 1}
rollout: {n_samples_per_prompt: 4, max_prompt_len: 64, max_response_len: 64, prefill_buckets: [64],
          max_concurrent_decodes: 8, driver: orchestrator}
ppo: {micro_batch_rows: 4, pack_len: 256, critic_steps_per_batch: 1, actor_steps_per_batch: 1}
data: {prompts_per_iter: 4}
"""

AOT = """
import json, sys
import orz_jax.models.transformer as tr
from orz_jax.compile import compile_run, parse_topology
from orz_jax.config import load_config
calls = []
real = tr.splash_attention
tr.splash_attention = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
cfg = load_config(sys.argv[1], ["model.splash_block_q=128", "model.splash_block_kv=256",
                                "model.splash_block_kv_compute=128"])  # auto: splash on the TPU mesh
rep = compile_run(cfg, parse_topology("v5p:2x2x1"), only=["actor_step"], log=lambda s: None)
progs = [p if isinstance(p, dict) else p.__dict__ for p in rep.programs]
json.dump({"failures": rep.failures, "programs": {p["name"]: p for p in progs}, "calls": len(calls)},
          open(sys.argv[2], "w"))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu-aot]')")
def test_splash_actor_step_compiles_for_v5p(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "run.py").write_text(textwrap.dedent(AOT))
    run_aot_script(tmp_path / "run.py", tmp_path / "tiny.yaml", tmp_path / "out.json")
    import json
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["failures"] == [] and set(res["programs"]) == {"actor_step"}, res
    print({k: (p["flops"], p["model_flops"], p["compile_s"]) for k, p in res["programs"].items()})
    assert res["calls"] >= 1, res  # 'auto' resolved to splash on the TPU mesh (the critic's trunk is the same code)
    # the step covers at least forward + backward (3 of the 4 remat passes) of the model over every packed
    # position (1.15x the 4-pass figure when written; the kernels' exact count: the hand-count test below)
    a = res["programs"]["actor_step"]
    assert a["flops"] >= 0.75 * a["model_flops"], a


# ----------------------------------------------------------------------------------------------
# Config: 'auto' per platform, one-line errors naming the key
# ----------------------------------------------------------------------------------------------


def test_auto_resolves_by_platform_and_wrong_platform_is_refused():
    assert [resolve_attention_impl("auto", p) for p in ("tpu", "gpu", "cuda", "cpu", "rocm")] == \
        ["splash", "cudnn", "cudnn", "xla", "xla"]
    assert resolve_attention_impl("xla", "tpu") == "xla"
    assert resolve_attention_impl("splash", "cpu", interpret=True) == "splash"  # the tests' interpret hook only
    with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'splash' is a TPU kernel but the mesh's devices "
                                          r"are 'cpu'"):
        resolve_attention_impl("splash", "cpu")
    with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'cudnn' needs NVIDIA GPUs .* 'tpu'"):
        resolve_attention_impl("cudnn", "tpu")
    # the model resolves against the mesh it is traced under; on this CPU, auto is the XLA path
    assert fa.resolve_impl("auto") == "xla"


def test_config_errors_name_the_key():
    cfg = load_config(None, ["model.arch.num_layers=1", "ppo.pack_len=768"])
    assert cfg.model.attention_impl == "auto"
    assert check_attention(cfg, "cpu") == "xla"
    assert check_attention(cfg, "tpu") == "xla"  # auto: rows of 768 do not divide into 512-token splash tiles
    assert check_attention(load_config(None, ["model.arch.num_layers=1", "ppo.pack_len=1024"]), "tpu") == "splash"
    with pytest.raises(ConfigError, match=r"^ppo\.pack_len: splash attention needs ppo\.pack_len=768 to be a "
                                          r"multiple of model\.splash_block_q=512"):
        check_attention(_with(cfg, attention_impl="splash"), "tpu")  # named explicitly: refused
    # the model decides the same way at trace time, from the row length it is given
    spec = fa.AttentionSpec("auto", (512, 512, 512))
    assert spec.resolve(1024, _FakeMesh("tpu")) == "splash" and spec.resolve(768, _FakeMesh("tpu")) == "xla"
    assert fa.AttentionSpec("splash").resolve(768, _FakeMesh("tpu")) == "splash"  # splash_attention then raises
    assert spec.resolve(1024, _FakeMesh("gpu")) == "cudnn" and spec.resolve(1024, _FakeMesh("cpu")) == "xla"
    with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'cudnn' needs NVIDIA GPUs"):
        check_attention(load_config(None, ["model.arch.num_layers=1", "model.attention_impl=cudnn"]), "cpu")
    with pytest.raises(ConfigError, match=r"model\.splash_block_kv: must be a multiple of 128"):
        load_config(None, ["model.arch.num_layers=1", "model.splash_block_kv=100"])
    with pytest.raises(ConfigError, match=r"model\.splash_block_kv_compute: 384 must divide model\.splash_block_kv"):
        load_config(None, ["model.arch.num_layers=1", "model.splash_block_kv_compute=384"])
    with pytest.raises(ConfigError, match=r"ppo\.pack_len: splash attention needs"):
        load_config(None, ["model.arch.num_layers=1", "model.attention_impl=splash", "ppo.pack_len=640"])
    with pytest.raises(ConfigError, match=r"model\.attention_impl"):
        load_config(None, ["model.arch.num_layers=1", "model.attention_impl=flash"])


def test_trainer_start_up_refuses_a_kernel_on_the_wrong_platform():
    """Before any device work: check_inputs resolves the kernel against the mesh's platform (the CPU here)."""
    from orz_jax.trainer import check_inputs

    base = ["model.arch.num_layers=1", "data.source=synthetic"]
    check_inputs(load_config(None, base))  # auto -> xla on this CPU
    for impl in ("splash", "cudnn"):
        with pytest.raises(ConfigError, match=rf"^model\.attention_impl: '{impl}' .* the mesh's devices are 'cpu'"):
            check_inputs(load_config(None, base + [f"model.attention_impl={impl}"]))


class _FakeMesh:
    """Stands in for a mesh of devices of ``platform`` (resolution reads only ``mesh.devices.flat[0].platform``)."""

    def __init__(self, platform: str):
        self.devices = np.asarray([type("Device", (), {"platform": platform})()], dtype=object)


def _with(cfg, **model):
    import dataclasses
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


# ----------------------------------------------------------------------------------------------
# Splash FLOPs: counted from the kernels' visited blocks, read back from the compiled HLO
# ----------------------------------------------------------------------------------------------


def test_causal_block_pairs_equal_jax_mask_tables():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi
    # hand numbers: n equal blocks -> n (n + 1) / 2
    assert fa.causal_block_pairs(512, 128, 128) == 10 and fa.causal_block_pairs(16384, 512, 512) == 32 * 33 // 2
    for s, bq, bkv in [(512, 128, 128), (1024, 128, 256), (1024, 256, 128), (768, 256, 128), (512, 512, 128)]:
        mask = sm.MultiHeadMask([sm.CausalMask((s, s))])
        for process in (mi.process_mask, mi.process_mask_dkv):  # the tables the fwd and dkv / dq kernels skip by
            info, _ = process(mask, (bq, bkv))
            assert int((np.asarray(info.block_mask) != 0).sum()) == fa.causal_block_pairs(s, bq, bkv), (s, bq, bkv)


SPLASH_FLOPS_AOT = """
import json, sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[2])
from orz_jax.compile import parse_topology, topology_devices
from orz_jax.hlo_cost import analyze_hlo
from orz_jax.models.attention import splash_attention
from orz_jax.sharding import use_mesh
from test_fused_attention import _xla
devs = topology_devices(parse_topology("v5p:2x2x1"))
mesh = Mesh(np.asarray(devs).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
sh = NamedSharding(mesh, P("data"))  # 8 rows: 2 per device
q = jax.ShapeDtypeStruct((8, 2, 2, 512, 128), jnp.bfloat16, sharding=sh)
k = jax.ShapeDtypeStruct((8, 2, 512, 128), jnp.bfloat16, sharding=sh)
seg = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=sh)
res = {}
for name, attn in [("splash", lambda q, k, v, s: splash_attention(q, k, v, s, tiles=(128, 256, 128), mesh=mesh)),
                   ("xla", lambda q, k, v, s: _xla(q, k, v, s, block=128))]:
    # weighted by an input: with a plain sum dO would be a constant XLA folds (dO V^T -> a reduce over V); and
    # value_and_grad: with grad alone the forward's PV product is dead code on the XLA path
    loss = lambda q, k, v, s, w: (attn(q, k, v, s).astype(jnp.float32) * w).sum()
    with use_mesh(mesh):
        c = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, k, seg, q).compile()
    hc = analyze_hlo(c.as_text())
    res[name] = {"flops": hc.flops, "xla_flops": c.cost_analysis()["flops"],
                 "kernels": sorted([t[1].split(".")[0], t[3]] for t in hc.top("flops", 50) if t[2] == "custom-call")}
json.dump(res, open(sys.argv[1], "w"))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu-aot]')")
def test_splash_fwd_bwd_flops_in_v5p_hlo_equal_the_hand_count(tmp_path):
    (tmp_path / "run.py").write_text(SPLASH_FLOPS_AOT)
    run_aot_script(tmp_path / "run.py", tmp_path / "out.json", REPO / "tests")
    import json
    r = json.loads((tmp_path / "out.json").read_text())
    print(r)
    # per device: 2 rows x 4 query heads; block_q 128 x block_kv 256 over 512 causal positions visits 6 block
    # pairs (query blocks 0, 1 need kv block 0; 2, 3 need kv blocks 0, 1); per pair and head each matmul is
    # 2 x 128 x 256 x 128 flops: fwd 2 matmuls (QK^T, PV), dq 3 (QK^T, dO V^T, dS K), dkv 4 (QK^T, P^T dO,
    # V dO^T, dS^T Q)
    unit = 2 * 4 * 6 * 2 * 128 * 256 * 128
    assert r["splash"]["kernels"] == [["splash_mha_dkv_segmented_no_residuals", 4 * unit],
                                      ["splash_mha_dq_segmented_no_residuals", 3 * unit],
                                      ["splash_mha_fwd_segmented_residuals", 2 * unit]], r["splash"]
    # nothing else in the program multiplies matrices (the d_i = rowsum(dO * O) einsum is elementwise + reduce)
    assert r["splash"]["flops"] == 9 * unit
    assert r["splash"]["xla_flops"] < 9 * unit / 100  # XLA alone sees under 1% (its elementwise counts only)
    # the XLA path over the same causal 128 x 128 blocks (10 pairs): at least fwd QK^T, PV and bwd dV, dP, dQ, dK
    assert r["xla"]["flops"] >= 6 * 2 * 4 * 10 * 2 * 128 ** 3, r["xla"]
