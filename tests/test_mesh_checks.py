"""Config arithmetic against the mesh, decided at start-up (``orz_jax.config.check_against_mesh``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orz_jax.config import ConfigError, check_against_mesh, load_config, resolve_mesh_shape
from orz_jax.memory import parse_accelerator_type

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The slice each shipped ORZ config documents (its max_concurrent_decodes comment and tpu/README.md).
# v5p accelerator types count TensorCores, 2 per chip: v5p-8 = 4 chips (1 host), v5p-32 = 16 chips (4 hosts),
# v5p-128 = 64 chips (16 hosts); a v5p host holds 4 chips.
DOCUMENTED = {"orz_0p5b.yaml": "v5p-8", "orz_1p5b.yaml": "v5p-8", "orz_7b.yaml": "v5p-32", "orz_32b.yaml": "v5p-128",
              "orz_32b_anneal.yaml": "v5p-128"}
V5P_CHIPS_PER_HOST = 4


def test_v5p_slice_sizes_count_tensorcores():
    assert [parse_accelerator_type(t)[1] for t in ("v5p-8", "v5p-32", "v5p-128")] == [4, 16, 64]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_shipped_config_fits_its_documented_mesh(name):
    cfg = load_config(str(CONFIGS / name))
    _, chips = parse_accelerator_type(DOCUMENTED[name])
    shape = resolve_mesh_shape(cfg.mesh, chips)
    check_against_mesh(cfg, shape, num_processes=chips // V5P_CHIPS_PER_HOST, local_devices=V5P_CHIPS_PER_HOST)


def _cfg(*overrides):
    return load_config(None, ["model.arch={vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_layers: 1, "
                              "num_heads: 4, num_kv_heads: 2}", "model.tokenizer=unused", *overrides])


@pytest.mark.parametrize("overrides, n_dev, procs, start", [
    (["ppo.micro_batch_rows=2"], 4, 1, "ppo.micro_batch_rows: 2 rows per micro-batch do not divide over the 4 batch"),
    (["rollout.max_concurrent_decodes=6"], 4, 1, "rollout.max_concurrent_decodes: 6 decode slots do not divide"),
    (["ppo.micro_batch_rows=4", "data.prompts_per_iter=2", "rollout.n_samples_per_prompt=2",
      "ppo.critic_steps_per_batch=12"], 4, 1, "ppo.critic_steps_per_batch: 12 optimizer steps per buffer exceed"),
    (["ppo.micro_batch_rows=8", "data.prompts_per_iter=6"], 8, 4, "data.prompts_per_iter: 6 prompts do not divide"),
    (["mesh.tensor=8", "ppo.micro_batch_rows=1"], 8, 1, "model.arch.num_heads: 4 does not divide over mesh axis tensor=8"),
    (["mesh.tensor=4", "ppo.micro_batch_rows=1"], 8, 1, "model.arch.num_kv_heads: 2 does not divide"),
])
def test_mesh_arithmetic_errors_name_the_key(overrides, n_dev, procs, start):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        check_against_mesh(cfg, resolve_mesh_shape(cfg.mesh, n_dev), num_processes=procs)
    assert str(e.value).startswith(start), str(e.value)
    assert "\n" not in str(e.value)


def test_multi_process_slots_divide_over_the_local_serving_mesh():
    # 4 processes x 2 devices: the engine serves from 2 local devices, so 6 slots are fine (not a multiple of 8)
    cfg = _cfg("ppo.micro_batch_rows=8", "rollout.max_concurrent_decodes=6")
    check_against_mesh(cfg, resolve_mesh_shape(cfg.mesh, 8), num_processes=4, local_devices=2)
    with pytest.raises(ConfigError, match="^rollout.max_concurrent_decodes: 6 decode slots do not divide over the 8 slot"):
        check_against_mesh(cfg, resolve_mesh_shape(cfg.mesh, 8), num_processes=1)


def test_resolve_mesh_shape():
    cfg = _cfg("mesh.tensor=2")
    assert resolve_mesh_shape(cfg.mesh, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ConfigError, match="^mesh.fsdp: 6 devices cannot be split"):
        resolve_mesh_shape(_cfg("mesh.tensor=4").mesh, 6)
