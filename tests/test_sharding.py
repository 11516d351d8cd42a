"""Meshes, the logical-axis rules, sharded forward == single-device forward, and full-size shapes."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from orz_jax.config import ConfigError, MeshConfig, load_config
from orz_jax.models.build import abstract_model, param_count
from orz_jax.sharding import logical_to_spec, make_mesh

from conftest import REPO, run_with_devices

# Parameter counts of the Qwen2.5 base models (policy = trunk + LM head; tied for 0.5B / 1.5B).
QWEN25_PARAMS = {
    "0p5b": 494_032_768,
    "1p5b": 1_543_714_304,
    "7b": 7_615_616_512,
    "32b": 32_763_876_352,
}


def test_rules_table():
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",))


def test_mesh_errors_name_the_problem():
    devices = jax.devices()[:1] * 1
    with pytest.raises(ConfigError, match="but 1 are available"):
        make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), devices)
    assert make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices).shape == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("size", list(QWEN25_PARAMS))
def test_full_size_shapes_without_memory(size):
    cfg = load_config(str(REPO / "configs" / f"orz_{size}.yaml"))
    policy = abstract_model("policy", cfg.model.arch, cfg.model)
    assert param_count(policy) == QWEN25_PARAMS[size]
    critic = abstract_model("critic", cfg.model.arch, cfg.model)
    lm_head = 0 if cfg.model.arch.tie_word_embeddings else cfg.model.arch.vocab_size * cfg.model.arch.hidden_size
    assert param_count(critic) == QWEN25_PARAMS[size] - lm_head + cfg.model.arch.hidden_size


SHARDED_FORWARD = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from orz_jax.config import ArchConfig, ModelConfig, MeshConfig
from orz_jax.models.build import create_model
from orz_jax.sharding import make_mesh, use_mesh, named_sharding
assert jax.device_count() == 8
arch = ArchConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  initializer_range=0.2)
mcfg = ModelConfig(arch=arch)
ref_model = create_model("policy", arch, mcfg, mesh=None, seed=3)
tokens = np.random.RandomState(0).randint(0, 128, (8, 64)).astype(np.int32)
seg = np.ones_like(tokens); seg[3, 40:] = 0
pos = np.where(seg > 0, np.arange(64)[None], 0).astype(np.int32)
ref, _ = ref_model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
for shape in [dict(data=1, fsdp=8, tensor=1), dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]:
    mesh = make_mesh(MeshConfig(**shape))
    model = create_model("policy", arch, mcfg, mesh=mesh, seed=3)
    blk = model.transformer.layers  # every block, stacked over a leading "layers" axis (not sharded)
    # parameters really are sharded as the rules table says
    assert blk.mlp.gate.value.sharding.spec == P(None, "fsdp", "tensor"), blk.mlp.gate.value.sharding
    assert blk.attn.q.value.sharding.spec == P(None, "fsdp", "tensor", None)
    assert blk.attn.o.value.sharding.spec == P(None, "tensor", None, "fsdp")
    assert model.lm_head.value.sharding.spec == P("fsdp", "tensor")
    n_shards = len({str(s.index) for s in blk.mlp.gate.value.addressable_shards})
    assert n_shards == mesh.shape["fsdp"] * mesh.shape["tensor"], n_shards
    bs = named_sharding(mesh, ("batch", "seq"))
    @jax.jit
    def fwd(model, t, p, s):
        with use_mesh(mesh):
            return model(t, p, s)[0]
    out = fwd(model, jax.device_put(tokens, bs), jax.device_put(pos, bs), jax.device_put(seg, bs))
    d = float(np.abs(np.asarray(out) - np.asarray(ref))[seg > 0].max())
    assert d < 1e-4, (shape, d)
    print("OK", shape, d)
"""


def test_sharded_forward_equals_single_device():
    out = run_with_devices(SHARDED_FORWARD, 8)
    assert out.count("OK") == 3, out


MESH_MISMATCH = """
from orz_jax.config import ConfigError, MeshConfig, ArchConfig, ModelConfig
from orz_jax.sharding import make_mesh
from orz_jax.models.build import create_model
try:
    make_mesh(MeshConfig(data=1, fsdp=3, tensor=1)); raise SystemExit("no error")
except ConfigError as e:
    print("ERR1", e)
arch = ArchConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2)
try:
    create_model("policy", arch, ModelConfig(arch=arch), mesh=make_mesh(MeshConfig(data=1, fsdp=1, tensor=8)))
    raise SystemExit("no error")
except ConfigError as e:
    print("ERR2", e)
"""


def test_mesh_mismatch_and_indivisible_dims_fail_clearly():
    out = run_with_devices(MESH_MISMATCH, 8)
    assert "ERR1 mesh: data=1 x fsdp=3 x tensor=1 = 3 devices, but 8 are available" in out
    assert "does not divide over mesh axis tensor of size 8" in out
