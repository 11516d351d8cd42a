"""Issue 19 (part B): bad configs, bad model directories and unwritable paths fail up front with one line
naming the key or file (#8, #9), and ``launch`` takes overrides on both sides of ``--config`` (#12)."""

from __future__ import annotations

import json
import os

import pytest

from orz_jax.config import ConfigError, load_config
from orz_jax.launch import DEMO_CONFIG


def _error(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(DEMO_CONFIG, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------
# #9: validation gaps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ppo.actor.lr", "ppo.critic.lr", "ppo.clip_eps", "reward.timeout_s",
                                 "rollout.temperature", "eval.temperature", "demo.boxed_prob",
                                 "model.critic_head_init_std", "ppo.actor.grad_clip"])
@pytest.mark.parametrize("value", ["inf", ".inf", "nan", "-inf"])
def test_nonfinite_numbers_are_rejected_naming_the_key(key, value):
    msg = _error([f"{key}={value}"])
    assert msg.startswith(f"{key}: must be a finite number, got "), msg


def test_lr_inf_names_finiteness():
    assert _error(["ppo.actor.lr=inf"]) == "ppo.actor.lr: must be a finite number, got inf"


@pytest.mark.parametrize("override,key", [
    ("eval.max_prompts=-5", "eval.max_prompts"),
    ("eval.max_prompts=0", "eval.max_prompts"),
    ("eval.temperature=-1", "eval.temperature"),
    ("ppo.actor.eps=0", "ppo.actor.eps"),
    ("ppo.critic.weight_decay=-0.1", "ppo.critic.weight_decay"),
    ("ppo.actor.b2=1.0", "ppo.actor.b2"),
    ("ppo.entropy_coef=-0.01", "ppo.entropy_coef"),
    ("model.critic_head_init_std=-1", "model.critic_head_init_std"),
    ("demo.lr=0", "demo.lr"),
    ("demo.batch_size=0", "demo.batch_size"),
    ("demo.num_kv_heads=3", "demo.num_kv_heads"),
    ("data.synthetic.num_eval=0", "data.synthetic.num_eval"),
    ("model.arch={rope_theta: -1.0}", "model.arch.rope_theta"),
    ("model.arch={rms_norm_eps: 0.0}", "model.arch.rms_norm_eps"),
])
def test_out_of_range_values_name_the_key(override, key):
    assert _error([override]).startswith(f"{key}: ")


def test_valid_values_still_load():
    cfg = load_config(DEMO_CONFIG, ["eval.max_prompts=3", "ppo.actor.lr=2e-6", "ppo.critic.weight_decay=0.0"])
    assert cfg.eval.max_prompts == 3 and cfg.ppo.actor.lr == 2e-6


# ----------------------------------------------------------------------------------------------
# #12: overrides after --config
# ----------------------------------------------------------------------------------------------


def test_launch_takes_overrides_before_and_after_config(capsys):
    from orz_jax import launch

    # the later override of the same key wins, so both sides reached load_config in order
    rc = launch.main(["eval.max_prompts=3", "--config", DEMO_CONFIG, "eval.max_prompts=-5"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and err == ["error: eval.max_prompts: must be >= 1 or null (all prompts), got -5"]
    rc = launch.main(["eval.max_prompts=-7", "--config", DEMO_CONFIG, "eval.every=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and err == ["error: eval.max_prompts: must be >= 1 or null (all prompts), got -7"]


# ----------------------------------------------------------------------------------------------
# #8: start-up failures
# ----------------------------------------------------------------------------------------------

GOOD_HF = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("text,expect", [
    ("{not json", "not valid JSON"),
    (json.dumps({k: v for k, v in GOOD_HF.items() if k != "hidden_size"}), "missing keys ['hidden_size']"),
    (json.dumps({**GOOD_HF, "model_type": "gpt2"}), "unsupported architecture model_type='gpt2'"),
    (json.dumps({**GOOD_HF, "use_sliding_window": True}), "sliding-window attention is not supported"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_bad_config_json_is_one_line_naming_the_file(tmp_path, capsys, text, expect):
    from orz_jax import evaluate
    from orz_jax.config import ModelConfig
    from orz_jax.models.hf_io import CheckpointError, load_hf

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        load_hf("policy", str(model), ModelConfig())
    assert str(e.value).startswith(str(model / "config.json") + ": ") and expect in str(e.value)

    rc = evaluate.main(["--checkpoint", str(model), "--data", "synthetic", "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(err) == 1 and str(model / "config.json") in err[0] and expect in err[0]


@pytest.mark.parametrize("key", ["experiment.out_dir", "checkpoint.dir"])
def test_unwritable_output_dirs_fail_before_any_work(tmp_path, key):
    from orz_jax.trainer import StartupError, Trainer

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    bad = blocker / "sub"
    overrides = [f"experiment.out_dir={tmp_path / 'run'}", f"{key}={bad}"]
    with pytest.raises(StartupError) as e:
        Trainer(load_config(DEMO_CONFIG, overrides))
    assert str(e.value).startswith(f"{key}: cannot write to {bad}")


def test_evaluate_unwritable_out_fails_before_loading(tmp_path, capsys):
    from orz_jax import evaluate

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(GOOD_HF))  # no weights: loading would fail later
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = evaluate.main(["--checkpoint", str(model), "--data", "synthetic", "--out", str(blocker / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and err == [f"error: --out: cannot write to {blocker / 'out'}: Not a directory"]
    assert not os.path.exists(blocker.parent / "eval")
