"""The ragged Pallas decode-attention kernel (orz_jax/models/decode_attention.py), in Pallas interpret mode on the
CPU: against float64 on ragged per-slot lengths (empty slots, lengths that are not block multiples, head_dim 64
and 128, GQA), its K/V index map's clamp to each slot's last live block, a sharded call, greedy tokens through the
engine against transformers (both drivers, across a window switch), the config key, and (with libtpu) the decode
step compiled for v5p with the Mosaic kernel priced at the window's KV bytes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_aot_script, tiny_tpu_yaml, run_with_devices
from orz_jax.config import ArchConfig, ConfigError, MeshConfig, ModelConfig, RolloutConfig, check_attention, \
    load_config, resolve_decode_attention_impl
from orz_jax.models.attention import AttentionSpec, pallas_interpret
from orz_jax.models.build import create_model
from orz_jax.models.decode_attention import block_for, decode_grid_spec, ragged_decode_attention, slot_group
from orz_jax.models.transformer import folded_attention
from orz_jax.rollout import RolloutEngine, generate_rollouts
from orz_jax.sharding import make_mesh
from orz_jax.tokenizer import CharTokenizer


def _reference64(q, k, v, lengths):
    """float64 loop. q: [slots, 1, kvh, g, d]; k, v: [slots, t, kvh * d] (one layer); lengths [slots]: positions
    attended -> [slots, 1, kvh, g, d] (zeros for an empty slot)."""
    b, _, kvh, g, d = q.shape
    out = np.zeros(q.shape)
    for i in range(b):
        n = lengths[i]
        for j in range(kvh):
            kk, vv = k[i, :n, j * d:(j + 1) * d].astype(np.float64), v[i, :n, j * d:(j + 1) * d].astype(np.float64)
            for h in range(g):
                if n:
                    sc = kk @ q[i, 0, j, h].astype(np.float64) / np.sqrt(d)
                    p = np.exp(sc - sc.max())
                    out[i, 0, j, h] = (p / p.sum()) @ vv
    return out


LENGTHS = np.array([0, 1, 128, 129, 300, 0], np.int32)  # empty / done slots, block edges, ragged; 2 slots per step


@pytest.mark.parametrize("kvh,g,d,dtype", [(2, 3, 64, "float32"), (1, 4, 128, "float32"), (4, 1, 64, "bfloat16"),
                                           (1, 4, 128, "bfloat16")])  # GQA groups of 3, 4, 1; head_dim 64 and 128
def test_kernel_equals_float64_reference_on_ragged_lengths(kvh, g, d, dtype):
    rng = np.random.RandomState(kvh * 100 + d)
    layers, b, max_len, layer = 3, len(LENGTHS), 330, 1  # 330: the last 128-block of the window is partial
    dt = jnp.dtype(dtype)
    k = jnp.asarray(rng.randn(layers, b, max_len, kvh * d), dt)
    v = jnp.asarray(rng.randn(layers, b, max_len, kvh * d), dt)
    q = jnp.asarray(rng.randn(b, 1, kvh, g, d), dt)
    # the reference reads the values the kernel reads (inputs rounded to dtype), in float64
    qn, kn, vn = (np.asarray(x.astype(jnp.float32)) for x in (q, k, v))
    ref = _reference64(qn, kn[layer], vn[layer], LENGTHS)
    with pallas_interpret():
        got = ragged_decode_attention(q, k, v, jnp.asarray(LENGTHS), jnp.int32(layer), read_len=max_len, block_kv=128,
                                      shards=1, interpret=True)
    got = np.asarray(got.astype(jnp.float32))
    # the XLA path on the same inputs: its own error against float64 is the yardstick
    mask = jnp.arange(max_len)[None, None, :] < jnp.asarray(LENGTHS)[:, None, None]  # [slots, 1, t]
    xla = np.asarray(folded_attention(q, k[layer], v[layer], mask, 1, dt).astype(jnp.float32))
    live = LENGTHS > 0
    err, xla_err = np.abs(got - ref)[live].max(), np.abs(xla - ref)[live].max()
    # float32: both are a few ulps of O(1) weighted means (the online softmax sums in another order); bfloat16: both
    # round p to bf16 before p v, the XLA path also its scores (the kernel keeps f32 scores). Kernel / XLA error
    # measured 0.33-1.41 over 3 draws of each case here (up to 1.51 on other lengths). 3 = 2x the worst measured.
    assert err <= 3.0 * xla_err, (err, xla_err)
    assert np.all(got[~live] == 0)  # an empty slot reads nothing and outputs zeros, not 0 / 0


def test_dead_positions_are_never_used():
    """NaN everywhere past each slot's live length (and in the other layers): the output does not change."""
    rng = np.random.RandomState(0)
    kvh, g, d, max_len = 2, 2, 64, 330
    k = rng.randn(2, len(LENGTHS), max_len, kvh * d).astype(np.float32)
    v = rng.randn(*k.shape).astype(np.float32)
    q = jnp.asarray(rng.randn(len(LENGTHS), 1, kvh, g, d), jnp.float32)
    dead = np.arange(max_len)[None, :, None] >= LENGTHS[:, None, None]  # [slots, t, 1]
    kn, vn = k.copy(), v.copy()
    kn[1], vn[1] = np.where(dead, np.nan, k[1]), np.where(dead, np.nan, v[1])
    kn[0] = vn[0] = np.nan
    run = lambda kk, vv: np.asarray(ragged_decode_attention(  # noqa: E731
        q, jnp.asarray(kk), jnp.asarray(vv), jnp.asarray(LENGTHS), jnp.int32(1), read_len=max_len, block_kv=128,
        shards=1, interpret=True))
    clean, poisoned = run(k, v), run(kn, vn)
    assert np.isfinite(poisoned).all()
    np.testing.assert_array_equal(poisoned, clean)


def test_index_map_never_fetches_past_a_slots_last_live_block():
    """The K / V BlockSpecs of the kernel's grid spec, evaluated at every grid step: for each slot the fetched block
    index stops at its last live block (the pipeline then re-uses it: no DMA for the dead tail of the window), and
    the distinct blocks fetched are exactly the live ones. Slots go in groups of 4 per grid step, each slot with its
    own K and V input, so a short slot does not read as far as a long one of its group."""
    block, window, group = 128, 1024, 4
    lengths = np.array([0, 1, 128, 129, 700, 1024, 5, 300], np.int32)
    nb = window // block
    spec = decode_grid_spec(len(lengths), rows=4, fold=128, num_blocks=nb, block=block, group=group)
    assert spec.grid == (len(lengths) // group, nb) and spec.num_scalar_prefetch == 2
    assert len(spec.in_specs) == 1 + 2 * group  # q, a K per slot of a group, a V per slot of a group
    layer, lens = jnp.asarray([2], jnp.int32), jnp.asarray(lengths)
    for which in range(2):  # K, V
        for t in range(group):
            kv_spec = spec.in_specs[1 + which * group + t]
            for i in range(len(lengths) // group):
                s = i * group + t
                idx = [tuple(int(x) for x in kv_spec.index_map(i, j, lens, layer)) for j in range(nb)]
                assert all(x[0] == 2 and x[1] == s and x[3] == 0 for x in idx)  # this layer and slot, whole fold
                blocks = [x[2] for x in idx]
                live_blocks = max(-(-lengths[s] // block), 1)  # an empty slot names block 0 (fetched, never used)
                assert max(blocks) == live_blocks - 1, (s, blocks)
                assert sorted(set(blocks)) == list(range(live_blocks)) and blocks == sorted(blocks)
                # DMAs the pipeline issues for this slot: one per change of block index, live blocks only
                assert 1 + sum(a != b for a, b in zip(blocks, blocks[1:])) == live_blocks


def test_slot_group_fits_the_slots_and_vmem():
    assert slot_group(512, 512, 128, 2) == 8  # 7B on v5p-32: 8 slots x 2 x 2 x 128 KiB = 4 MiB
    assert slot_group(12, 512, 128, 2) == 4 and slot_group(3, 512, 128, 2) == 1
    assert slot_group(512, 2048, 256, 2) == 2  # larger blocks: fewer slots per step within 8 MiB


def test_block_follows_the_window():
    assert block_for(512, 10048, 10048) == 512
    assert block_for(512, 256, 2048) == 256  # a window smaller than the block: one block of the window
    assert block_for(512, 4, 28) == 28  # a block as large as the cache: the whole dim (always a legal block)
    assert block_for(128, 300, 330) == 128


def test_sharded_kernel_equals_float64_reference():
    """On a 2 x 2 CPU mesh (slots over fsdp, the folded kv dim over tensor), inside shard_map."""
    out = run_with_devices("""
        import numpy as np, jax, jax.numpy as jnp
        from orz_jax.config import MeshConfig
        from orz_jax.models.decode_attention import ragged_decode_attention
        from orz_jax.sharding import kv_fold_shards, make_mesh, named_sharding, use_mesh
        rng = np.random.RandomState(1)
        kvh, g, d, b, t = 4, 2, 64, 4, 200
        lengths = np.array([5, 0, 200, 131], np.int32)
        k = rng.randn(2, b, t, kvh * d).astype(np.float32); v = rng.randn(*k.shape).astype(np.float32)
        q = rng.randn(b, 1, kvh, g, d).astype(np.float32)
        mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
        kv = named_sharding(mesh, ("layers", "slots", "cache_seq", "kv_fold"), k.shape)
        with use_mesh(mesh):
            shards = kv_fold_shards(kvh)
            f = jax.jit(lambda q, k, v, n: ragged_decode_attention(q, k, v, n, jnp.int32(0), read_len=t, block_kv=128,
                                                                   shards=shards, interpret=True))
            got = f(jnp.asarray(q), jax.device_put(k, kv), jax.device_put(v, kv), jnp.asarray(lengths))
        ref = np.zeros(q.shape)
        for i in range(b):
            for j in range(kvh):
                for h in range(g):
                    n = lengths[i]
                    if n:
                        sc = k[0, i, :n, j*d:(j+1)*d].astype(np.float64) @ q[i, 0, j, h] / np.sqrt(d)
                        p = np.exp(sc - sc.max()); ref[i, 0, j, h] = (p / p.sum()) @ v[0, i, :n, j*d:(j+1)*d]
        print("SHARDS", shards, "ERR", float(np.abs(np.asarray(got) - ref).max()))
    """, n_devices=4)
    shards, err = out.split("SHARDS")[1].split()[0], float(out.split("ERR")[1])
    assert shards == "2"
    assert err < 2e-5, err  # float32 weighted means over <= 200 keys, as the unsharded float32 case


# ----------------------------------------------------------------------------------------------
# Through the engine: greedy tokens equal transformers with the kernel (interpret mode), both drivers
# ----------------------------------------------------------------------------------------------


WIN_CFG = RolloutConfig(driver="orchestrator", temperature=0.0, max_prompt_len=16, prefill_buckets=[8, 16],
                        max_response_len=12, max_concurrent_decodes=2, stop_strings=[], long_prompt="error",
                        decode_window_block=4)  # max_len 28: windows 4, 8, 16, 28; 2 slots: one group of 2 per step,
# and 4 prompts through 2 slots: requests wait, finish, are evicted and replaced (continuous batching)


@pytest.mark.parametrize("kernel,drivers", [("tpu", ("orchestrator", "batched")),
                                            # the GPU kernel (orz_jax/models/gpu_decode_attention.py) does not
                                            # see the driver: the continuous-batching one is enough
                                            ("gpu", ("orchestrator",))])
def test_greedy_through_the_engine_with_the_kernel_equals_transformers(tmp_path, kernel, drivers, monkeypatch):
    import orz_jax.models.transformer as tr

    traced = []  # which kernel the decode step traced (interpret mode lowers both to plain HLO)
    name = {"tpu": "ragged_decode_attention", "gpu": "gpu_decode_attention"}[kernel]
    fn = getattr(tr, name)
    monkeypatch.setattr(tr, name, lambda *a, **k: traced.append(name) or fn(*a, **k))
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from orz_jax.models.hf_io import export_hf

    tok = CharTokenizer()
    arch = ArchConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, initializer_range=0.5, rope_theta=1000.0)
    # kv blocks of 8 positions (below the config's TPU minimum of 128, fine in interpret mode): the 16- and
    # 28-position windows span 2 and 4 blocks, the last one partial, so slots of different lengths clamp
    # at different blocks
    mcfg = ModelConfig(arch=arch, decode_attention_impl="pallas", decode_block_kv=8)
    policy = create_model("policy", arch, mcfg, make_mesh(MeshConfig()), seed=3)
    spec = policy.transformer.layers.attn.attention
    assert (spec.decode_impl, spec.decode_block_kv) == ("pallas", 8)
    prompts = [tok.encode(p) for p in ["1+2=", "x", "abcdefg", "hello there!"]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(policy, str(tmp_path / "hf")),
                                                           dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=WIN_CFG.max_response_len, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id)
        expected.append(out[0, len(p):].tolist())
    with pallas_interpret(decode_kernel=kernel):
        engine = RolloutEngine(policy, WIN_CFG, tok, seed=0)
        used = []
        window_for = engine.window_for
        engine.window_for = lambda n=1: used.append(window_for(n)) or used[-1]
        for driver in drivers:
            cfg = dataclasses.replace(WIN_CFG, driver=driver, check_every=3)
            batch = generate_rollouts(engine, prompts, 1, 0, cfg, driver=driver, timeout_s=300)
            got = [batch.response_ids[i, :batch.response_mask[i].sum()].tolist() for i in range(len(prompts))]
            assert got == expected, driver
            # the window switched mid-generation: "1+2=" and "x" (bucket 8) start in window 16 and need 28 after 8 steps
            assert set(used) == {16, 28}, driver
            used.clear()
    assert traced and set(traced) == {name}
    # the kernel ran: outside interpret mode a CPU trace of the pallas decode path is refused, naming the key
    state = engine.init_decode_state()
    with pytest.raises(ConfigError, match=r"^model\.decode_attention_impl: 'pallas' has kernels for TPU and GPU"):
        engine._generate_jit(engine.params, state, engine.sampling, 8)  # a window not traced before


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_decode_attention_config():
    assert [resolve_decode_attention_impl("auto", p) for p in ("tpu", "gpu", "cpu")] == ["pallas", "pallas_gpu", "xla"]
    assert resolve_decode_attention_impl("xla", "tpu") == "xla"
    assert resolve_decode_attention_impl("pallas", "gpu") == "pallas_gpu"
    assert resolve_decode_attention_impl("pallas", "cpu", interpret="tpu") == "pallas"
    assert resolve_decode_attention_impl("pallas", "cpu", interpret="gpu") == "pallas_gpu"
    cfg = load_config(None, ["model.arch.num_layers=1"])
    assert (cfg.model.decode_attention_impl, cfg.model.decode_block_kv) == ("auto", 512)
    with pytest.raises(ConfigError, match=r"^model\.decode_attention_impl: 'pallas' has kernels for TPU and GPU but "
                                          r"the mesh's devices are 'cpu'; use 'auto' or 'xla'"):
        check_attention(load_config(None, ["model.arch.num_layers=1", "model.decode_attention_impl=pallas"]), "cpu")
    with pytest.raises(ConfigError, match=r"model\.decode_attention_impl"):
        load_config(None, ["model.arch.num_layers=1", "model.decode_attention_impl=flash"])
    with pytest.raises(ConfigError, match=r"^model\.decode_block_kv: must be a multiple of 128"):
        load_config(None, ["model.arch.num_layers=1", "model.decode_block_kv=100"])
    # prefill (several tokens per row) keeps the XLA path
    assert AttentionSpec(decode_impl="pallas").resolve_decode(16, _FakeMesh("tpu")) == "xla"
    assert AttentionSpec(decode_impl="auto").resolve_decode(1, _FakeMesh("tpu")) == "pallas"
    assert AttentionSpec(decode_impl="auto").resolve_decode(1, _FakeMesh("cpu")) == "xla"


class _FakeMesh:
    """Stands in for a mesh of devices of ``platform`` (resolution reads only ``mesh.devices.flat[0].platform``)."""

    def __init__(self, platform: str):
        self.devices = np.asarray([type("Device", (), {"platform": platform})()], dtype=object)


# ----------------------------------------------------------------------------------------------
# TPU: compiled for v5p (ahead of time, compile-only devices)
# ----------------------------------------------------------------------------------------------


TINY_TPU = tiny_tpu_yaml(tensor=2, slots=64)

AOT_SCRIPT = """
import json, sys
import jax
from orz_jax.compile import _placeholder_tokenizer, parse_topology, topology_devices, with_shardings
from orz_jax.config import load_config
from orz_jax.hlo_cost import analyze_hlo
from orz_jax.models.build import abstract_model
from orz_jax.rollout.engine import RolloutEngine
from orz_jax.sharding import make_mesh
cfg = load_config(sys.argv[1])
mesh = make_mesh(cfg.mesh, topology_devices(parse_topology("v5p:2x2x1")))
engine = RolloutEngine(abstract_model("policy", cfg.model.arch, cfg.model), cfg.rollout, _placeholder_tokenizer(cfg),
                       mesh=mesh)
state = with_shardings(jax.eval_shape(engine._init_impl), engine._state_shardings)
out = {}
for w in (256, 2048):
    hlo = engine._generate_jit.lower(engine.params, state, engine.sampling, w).compile().as_text()
    cost = analyze_hlo(hlo)
    kernel = [(n, b) for c, n, op, f, b in cost.top("bytes", 10 ** 6) if op == "custom-call"]
    mosaic = hlo.count('custom_call_target="tpu_custom_call"')
    out[w] = {"bytes": cost.bytes_accessed, "kernel": kernel, "mosaic": mosaic}
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e '.[tpu-aot]')")
def test_tpu_decode_step_runs_the_mosaic_kernel_priced_at_the_window(tmp_path):
    """v5p:2x2x1 (4 chips), mesh fsdp 2 x tensor 2: the decode step holds the kernel as one Mosaic custom call,
    inside shard_map (each device its 32 slots and 1 kv head), and the compile tool prices it at the K and V of
    the window only: 2 layers x 2 (K, V) x 32 slots x W x 64 lanes x 2 bytes, plus the queries and outputs."""
    (tmp_path / "tiny.yaml").write_text(TINY_TPU)
    (tmp_path / "run.py").write_text(textwrap.dedent(AOT_SCRIPT))
    run_aot_script(tmp_path / "run.py", tmp_path / "tiny.yaml", tmp_path / "o.json")
    r = json.loads((tmp_path / "o.json").read_text())
    for w in ("256", "2048"):
        assert r[w]["mosaic"] == 1  # one kernel, called in the layer scan
        (name, nbytes), = r[w]["kernel"]
        assert name.startswith("ragged_decode_attention")
        kv = 2 * 2 * 32 * int(w) * 64 * 2
        q_out = 2 * 2 * 32 * 2 * 64 * 2  # per layer: q and out [32 slots, 1 shard, 2 rows, 64 lanes] bf16
        assert kv <= nbytes <= kv + q_out + 2 * (32 * 4 + 4), (w, nbytes, kv)
    # the step's bytes grow by the extra window's K and V (nothing else depends on the window)
    extra = 2 * 2 * 32 * (2048 - 256) * 64 * 2
    assert r["2048"]["bytes"] - r["256"]["bytes"] == pytest.approx(extra, rel=0.02)
