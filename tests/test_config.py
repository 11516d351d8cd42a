"""Config as data: every shipped config parses and validates; bad keys and values name the key."""

from __future__ import annotations

import glob
import os

import pytest

from orz_jax.config import Config, ConfigError, dump_yaml, load_config

from conftest import REPO

SHIPPED = sorted(glob.glob(str(REPO / "configs" / "*.yaml"))) + [str(REPO / "orz_jax" / "demo.yaml")]


def test_there_are_shipped_configs():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"orz_0p5b.yaml", "orz_1p5b.yaml", "orz_7b.yaml", "orz_32b.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # a dump reloads to the same config (no field is lost or renamed on the way)
    tmp = REPO / ".pytest_cache" / ("roundtrip_" + os.path.basename(path))
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_text(dump_yaml(cfg))
    assert load_config(str(tmp)) == cfg


def test_orz_recipe_numbers():
    cfg = load_config(str(REPO / "configs" / "orz_7b.yaml"))
    assert (cfg.ppo.gamma, cfg.ppo.lam, cfg.ppo.kl_coef) == (1.0, 1.0, 0.0)
    assert (cfg.ppo.actor.lr, cfg.ppo.critic.lr) == (1e-6, 5e-6)
    assert (cfg.ppo.actor_steps_per_batch, cfg.ppo.critic_steps_per_batch) == (1, 12)
    assert (cfg.data.prompts_per_iter, cfg.rollout.n_samples_per_prompt) == (128, 64)
    assert (cfg.rollout.max_prompt_len, cfg.rollout.max_response_len) == (2048, 8000)
    assert cfg.rollout.stop_strings == ["User:", "Human:", "Assistant:", "</answer>"]
    assert (cfg.eval.every, cfg.checkpoint.save_every) == (10, 50)


def test_overrides_apply_and_parse_types():
    cfg = load_config(None, ["model.checkpoint=demo", "ppo.actor.lr=2e-6", "rollout.stop_strings=[a, b]",
                             "ppo.value_clip=null", "data.train_files=[{path: x.json, weight: 2}]"])
    assert cfg.ppo.actor.lr == 2e-6
    assert cfg.rollout.stop_strings == ["a", "b"]
    assert cfg.ppo.value_clip is None
    assert cfg.data.train_files[0].path == "x.json" and cfg.data.train_files[0].weight == 2.0


@pytest.mark.parametrize("override, message", [
    ("ppo.clip_epz=0.1", "unknown config key 'ppo.clip_epz'"),
    ("nonsense.key=1", "unknown config key 'nonsense'"),
    ("model.arch.num_heads=abc", "model.arch.num_heads: expected an integer, got 'abc'"),
    ("rollout.driver=fast", "rollout.driver: 'fast' is not one of ['orchestrator', 'batched']"),
    ("rollout.top_p=1.5", "rollout.top_p: must be in (0, 1]"),
    ("rollout.decode_window_block=-1", "rollout.decode_window_block: must be >= 0"),
    ("ppo.actor.lr=0", "ppo.actor.lr: must be > 0"),
    ("mesh.fsdp=0", "mesh.fsdp: must be >= 1 or -1"),
    ("ppo.pack_len=10", "ppo.pack_len: must hold one whole sample"),
    ("experiment.progress_bar=maybe", "experiment.progress_bar: expected true/false"),
    ("noequals", "is not of the form key.sub=value"),
    ("model.attention_impl=flash", "model.attention_impl: 'flash' is not one of"),
    ("model.splash_block_q=100", "model.splash_block_q: must be a multiple of 128"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(str(REPO / "orz_jax" / "demo.yaml"), [override])
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: {checkpoint: demo}\nppo:\n  critc: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key 'ppo.critc'"):
        load_config(str(unknown))


def test_base_file_is_laid_under_a_variant(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "ppo:\n  actor: {lr: 1.0e-6, warmup_steps: 50}\n  critic_steps_per_batch: 12\n"
        "model: {checkpoint: demo}\ndata:\n  source: synthetic\n  prompts_per_iter: 8\n"
        "experiment: {name: base, num_iterations: 1000}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "variant.yaml").write_text(  # base: is relative to the file that names it
        "base: ../base.yaml\nppo:\n  actor: {warmup_steps: 0}\nexperiment: {name: variant}\n")
    cfg = load_config(str(tmp_path / "sub" / "variant.yaml"), ["experiment.num_iterations=7"])
    assert (cfg.ppo.actor.lr, cfg.ppo.actor.warmup_steps) == (1e-6, 0)  # nested keys merge, the variant wins
    assert cfg.ppo.critic_steps_per_batch == 12 and cfg.data.prompts_per_iter == 8
    assert (cfg.experiment.name, cfg.experiment.num_iterations) == ("variant", 7)  # overrides still come last
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: config file not found: .*nowhere\.yaml"):
        load_config(str(tmp_path / "c.yaml"))


def test_anneal_config_is_the_32b_config_plus_its_stage():
    main, anneal = (load_config(str(REPO / "configs" / n)) for n in ("orz_32b.yaml", "orz_32b_anneal.yaml"))
    assert anneal.model.arch == main.model.arch and anneal.rollout == main.rollout and anneal.mesh == main.mesh
    assert anneal.ppo.micro_batch_rows == main.ppo.micro_batch_rows  # sized for the same slice (v5p-128)
