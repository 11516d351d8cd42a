"""orz_jax.memory: parameter counts against the published Qwen2.5 sizes and a transformers model,
memory arithmetic against hand-computed numbers, the roofline against a hand-worked example."""

import dataclasses
import math

import pytest

from orz_jax import memory as M
from orz_jax.config import ArchConfig, ConfigError

# The total parameter counts of the Qwen2.5 base checkpoints (sum of tensor sizes in their
# safetensors files, as reported on their model pages).
QWEN25_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-32b": 32_763_876_352,
}

TINY = ArchConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=False, attention_bias=True)


@pytest.mark.parametrize("name", sorted(QWEN25_PARAMS))
def test_qwen25_param_counts_exact(name):
    assert M.num_params(M.ARCH_PRESETS[name]) == QWEN25_PARAMS[name]


def test_presets_match_the_brief():
    a = M.ARCH_PRESETS["qwen2.5-32b"]
    assert (a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads, a.vocab_size) == \
        (5120, 27648, 64, 40, 8, 152064)
    assert not a.tie_word_embeddings and a.attention_bias and a.rms_norm_eps == 1e-5 and a.rope_theta == 1e6
    assert M.ARCH_PRESETS["qwen2.5-0.5b"].tie_word_embeddings
    assert M.ARCH_PRESETS["qwen2.5-0.5b"].resolved_head_dim == 64


def test_tiny_config_by_hand():
    # hidden 64, 4 heads of 16 -> q out 64; 2 kv heads -> k/v out 32.
    q = 64 * 64 + 64
    k = v = 64 * 32 + 32
    o = 64 * 64
    mlp = 3 * 64 * 128
    norms = 2 * 64
    per_layer = q + k + v + o + mlp + norms
    assert per_layer == 37120
    embed = head = 512 * 64
    pc = M.param_count(TINY)
    assert pc.per_layer == per_layer
    assert pc.total == embed + 2 * per_layer + 64 + head == 139840
    # tied: the head is the embedding matrix, counted once
    assert M.num_params(dataclasses.replace(TINY, tie_word_embeddings=True)) == 139840 - head
    # no q/k/v bias (Llama)
    assert M.num_params(dataclasses.replace(TINY, attention_bias=False)) == 139840 - 2 * (64 + 32 + 32)
    # critic: trunk + a hidden->1 value head without bias, no LM head
    assert M.num_params(TINY, "critic") == embed + 2 * per_layer + 64 + 64
    # explicit head_dim different from hidden/heads
    hd = dataclasses.replace(TINY, head_dim=32)
    assert M.param_count(hd).per_layer == (64 * 128 + 128) + 2 * (64 * 64 + 64) + 128 * 64 + mlp + norms


@pytest.mark.parametrize("tied,bias,arch", [(False, True, "qwen2"), (True, True, "qwen2"), (False, False, "llama")])
def test_counts_match_transformers(tied, bias, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, tie_word_embeddings=tied)
    if arch == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **kw))
    # parameters() de-duplicates the tied embedding / lm_head tensor
    want = sum(p.numel() for p in hf.parameters())
    ours = ArchConfig(architecture=arch, vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3,
                      num_heads=6, num_kv_heads=2, tie_word_embeddings=tied, attention_bias=bias)
    assert M.num_params(ours) == want
    del torch


def test_bytes_helpers():
    assert M.param_bytes(10, "float32") == 40 and M.param_bytes(10, "bfloat16") == 20
    assert M.optimizer_bytes(10) == 80 and M.optimizer_bytes(10, master_copy=True) == 120
    assert M.optimizer_bytes(10, moment_dtype="bfloat16") == 40
    assert M.grad_bytes(10, "bfloat16") == 20
    with pytest.raises(ValueError, match="unknown dtype"):
        M.param_bytes(1, "float8")


def test_kv_cache_bytes_by_hand():
    # K and V x 2 layers x 8 slots x 16 positions x 2 kv heads x 16 head_dim x 2 bytes
    assert M.kv_cache_bytes(8, 16, 2, 2, 16, "bfloat16") == 2 * 2 * 8 * 16 * 2 * 16 * 2 == 32768
    assert M.kv_cache_bytes(8, 16, 2, 2, 16, "float32") == 65536
    # Qwen2.5-7B, one token, bf16: 2 * 28 layers * 4 kv heads * 128 * 2 bytes = 57,344
    assert M.kv_bytes_per_token(M.ARCH_PRESETS["qwen2.5-7b"], "bfloat16") == 57344


def test_resolve_mesh():
    assert M.resolve_mesh(1, -1, 1, devices=8) == M.Mesh3(1, 8, 1)
    assert M.resolve_mesh(2, -1, 4, devices=64) == M.Mesh3(2, 8, 4)
    with pytest.raises(ConfigError, match="not divisible"):
        M.resolve_mesh(1, -1, 3, devices=8)
    with pytest.raises(ConfigError, match="but the slice has 8"):
        M.resolve_mesh(1, 2, 2, devices=8)
    with pytest.raises(ConfigError, match="at most one -1"):
        M.resolve_mesh(-1, -1, 1, devices=8)


def test_per_device_division():
    mesh = M.Mesh3(data=2, fsdp=2, tensor=2)
    m = M.per_device_memory(TINY, mesh, slots=8, max_len=16, param_dtype="float32", compute_dtype="bfloat16")
    n_actor, n_critic = 139840, 139840 - 512 * 64 + 64
    # parameters / optimizer / grads over fsdp * tensor = 4 (data replicates)
    assert m.actor_params == n_actor * 4 // 4
    assert m.actor_opt == n_actor * 8 // 4
    assert m.actor_grads == n_actor * 4 // 4
    assert m.critic_params == n_critic * 4 // 4
    assert m.critic_opt == n_critic * 8 // 4
    # the decode engine's bf16 copy is sharded over tensor only (serving layout: no fsdp, so no gathers)
    assert m.rollout_weights == n_actor * 2 // 2
    # KV: 8 slots over data*fsdp = 4 -> 2 per device; 2 kv heads over tensor = 2 -> 1 per device
    assert (m.slots_per_device, m.kv_heads_per_device) == (2, 1)
    assert m.kv_cache == 32768 // 8
    assert m.resident == m.actor_params + m.actor_opt + m.critic_params + m.critic_opt
    assert m.rollout_peak == m.resident + m.rollout_weights + m.kv_cache
    assert m.train_peak == m.resident + m.actor_grads


def test_kv_heads_replicated_when_tensor_does_not_divide():
    # 0.5B has 2 kv heads; tensor=4 cannot split them, so every device keeps both.
    arch = M.ARCH_PRESETS["qwen2.5-0.5b"]
    m = M.per_device_memory(arch, M.Mesh3(1, 1, 4), slots=4, max_len=10, compute_dtype="bfloat16")
    assert m.kv_heads_per_device == 2
    assert m.kv_cache == M.kv_cache_bytes(4, 10, 24, 2, 64, "bfloat16")


def test_master_copy_and_same_dtype():
    m = M.per_device_memory(TINY, M.Mesh3(1, 1, 1), slots=1, max_len=1, param_dtype="bfloat16",
                            compute_dtype="bfloat16", master_copy=True)
    # same dtype and layout: the engine shares the trainer's arrays
    assert m.actor_params == 139840 * 2 and m.actor_opt == 139840 * 12 and m.rollout_weights == 0
    # over fsdp the serving layout differs (no fsdp shards): a copy
    assert M.per_device_memory(TINY, M.Mesh3(1, 2, 1), slots=2, max_len=1, param_dtype="bfloat16",
                               compute_dtype="bfloat16").rollout_weights == 139840 * 2


def test_several_processes_serve_from_their_own_chips():
    # 7B on v5p-32 (data 1, fsdp 4, tensor 4; 4 hosts of 4 chips), as python -m orz_jax.compile measured it:
    # each host's engine has tensor = gcd(4, 4) = 4, fsdp 1, so all 512 slots of a host sit on each of its
    # chips with 1 of the 4 kv heads: 68.69 GiB of KV per chip (docs/tpu/README.md).
    arch = M.ARCH_PRESETS["qwen2.5-7b"]
    m = M.per_device_memory(arch, M.Mesh3(1, 4, 4), slots=512, max_len=10048, processes=4)
    assert m.serving == M.Mesh3(1, 1, 4)
    assert (m.slots_per_device, m.kv_heads_per_device) == (512, 1)
    assert m.kv_cache == M.kv_cache_bytes(512, 10048, 28, 1, 128, "bfloat16")
    assert m.rollout_weights == -(-M.num_params(arch) * 2 // 4)
    # 32B on v5p-128: tensor 8 does not divide a host's 4 chips, gcd = 4
    assert M.serving_mesh(M.Mesh3(1, 8, 8), processes=16) == M.Mesh3(1, 1, 4)
    # every host decodes its own share: 8192 / 4 hosts / 512 slots = 4 waves
    est = M.roofline_iteration(arch, M.CHIPS["v5p"], M.Mesh3(1, 4, 4), slots=512, shape=M.RolloutShape(),
                               processes=4)
    assert est.decode_waves == 4


def test_max_decode_slots_fills_the_budget():
    arch, mesh = M.ARCH_PRESETS["qwen2.5-7b"], M.Mesh3(1, 4, 1)
    hbm, max_len = 95e9, 10048
    s = M.max_decode_slots(arch, mesh, hbm, max_len=max_len, reserve_frac=0.1)
    assert s > 0 and s % 4 == 0
    fits = M.per_device_memory(arch, mesh, slots=s, max_len=max_len).rollout_peak
    over = M.per_device_memory(arch, mesh, slots=s + 4, max_len=max_len).rollout_peak
    assert fits <= 0.9 * hbm < over
    assert M.max_decode_slots(arch, mesh, hbm, max_len=max_len, cap=100) == 100
    assert M.max_decode_slots(arch, mesh, 16e9, max_len=max_len) == 0  # 7B actor+critic state alone > 16 GB


def test_parse_accelerator_type():
    chip, n = M.parse_accelerator_type("v5p-128")
    assert chip.name == "v5p" and n == 64
    assert M.parse_accelerator_type("v4-8")[1] == 4
    assert M.parse_accelerator_type("v5litepod-16")[0].name == "v5e"
    assert M.parse_accelerator_type("v6e-8")[1] == 8
    with pytest.raises(ValueError, match="expected one of"):
        M.parse_accelerator_type("a100-8")


def test_attention_flops_by_naive_sum():
    arch = TINY
    T = 7
    naive = sum(arch.num_layers * arch.num_heads * (2 * 16 * t + 2 * 16 * t) for t in range(1, T + 1))
    assert M.attention_flops(arch, T) == naive


def test_roofline_hand_example():
    # One chip with round numbers so every phase can be worked out by hand.
    chip = M.ChipSpec("toy", peak_flops=1e12, hbm_bytes=1e12, hbm_bw=1e9, cores_per_chip=1, type_prefix="toy",
                      source="test")
    arch = TINY
    shape = M.RolloutShape(n_prompts=2, n_samples=2, prompt_len=4, response_len=6)
    est = M.roofline_iteration(arch, chip, M.Mesh3(1, 1, 1), slots=2, shape=shape, compute_dtype="bfloat16")
    layers = 2 * 37120
    head = 512 * 64
    actor_mm, critic_mm = layers + head, layers + 64
    attn = lambda t: 2 * 2 * 4 * 16 * t * (t + 1)
    # prefill: 4 sequences x (2 * trunk * 4 tokens + attention(4) + one LM-head row)
    assert est.prefill_s == pytest.approx(4 * (2 * layers * 4 + attn(4) + 2 * head) / 1e12)
    # decode: 2 waves of 6 steps; a step reads bf16 weights + 2 slots x ctx (4 + 3) x KV/token
    kv_tok = 2 * 2 * 2 * 16 * 2
    step_bytes = actor_mm * 2 + 2 * 7 * kv_tok
    step_flops = 2 * (2 * actor_mm + 4 * 2 * 4 * 16 * 7)
    assert est.decode_waves == 2
    assert est.decode_step_s == pytest.approx(max(step_bytes / 1e9, step_flops / 1e12))
    assert est.decode_bound == "HBM"
    assert est.decode_s == pytest.approx(2 * 6 * est.decode_step_s)
    tokens = 4 * 10
    assert est.tokens == tokens
    assert est.forward_s == pytest.approx((2 * (actor_mm + critic_mm) * tokens + 2 * 4 * attn(10)) / 1e12)
    assert est.train_s == pytest.approx((6 * (actor_mm + critic_mm) * tokens + 2 * 3 * 4 * attn(10)) / 1e12)
    assert est.total_s == pytest.approx(est.prefill_s + est.decode_s + est.forward_s + est.train_s)


def test_roofline_scales_with_chips():
    arch = M.ARCH_PRESETS["qwen2.5-7b"]
    chip = M.CHIPS["v5p"]
    shape = M.RolloutShape()
    a = M.roofline_iteration(arch, chip, M.Mesh3(1, 4, 1), slots=256, shape=shape)
    b = M.roofline_iteration(arch, chip, M.Mesh3(1, 16, 1), slots=1024, shape=shape)
    # 4x the chips: compute-bound phases take exactly a quarter of the time
    assert b.train_s == pytest.approx(a.train_s / 4) and b.forward_s == pytest.approx(a.forward_s / 4)
    # same slots per device, so the same step time, but a quarter of the waves
    assert b.decode_step_s == pytest.approx(a.decode_step_s) and b.decode_waves == math.ceil(a.decode_waves / 4)


def test_report_and_cli(capsys):
    assert M.main(["--arch", "qwen2.5-7b", "--accelerator", "v5p-8", "--mesh", "1,4,1"]) == 0
    out = capsys.readouterr().out
    assert "policy params    7,615,616,512" in out
    assert "mesh data=1 fsdp=4 tensor=1" in out
    assert "roofline estimate" in out and "not a measurement" in out
    assert "https://cloud.google.com/tpu/docs/v5p" in out
    assert M.main(["--arch", "qwen2.5-0.5b", "--devices", "4", "--slots", "64"]) == 0
    out = capsys.readouterr().out
    assert "64 slots per process, 16/device" in out and "roofline" not in out


def test_cli_reads_a_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  arch: {vocab_size: 512, hidden_size: 64, intermediate_size: 128, num_layers: 2,\n"
                   "         num_heads: 4, num_kv_heads: 2}\n"
                   "mesh: {data: 1, fsdp: -1, tensor: 1}\n"
                   "rollout: {n_samples_per_prompt: 4, max_prompt_len: 128, max_response_len: 128,\n"
                   "          max_concurrent_decodes: 32}\n"
                   "ppo: {pack_len: 256}\n")
    assert M.main(["--config", str(cfg), "--devices", "2"]) == 0
    out = capsys.readouterr().out
    assert "policy params          139,840" in out
    assert "8 prompts x 4 samples = 32 sequences, prompt <= 128 + response <= 128" in out
    assert "32 slots per process, 16/device x 256 positions" in out


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        M.main(["--accelerator", "v5p-8"])  # no model
    assert "give --arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        M.main(["--arch", "qwen2.5-7b", "--devices", "4"])  # no slots and no chip
    assert "--slots" in capsys.readouterr().err
    assert M.main(["--arch", "qwen2.5-7b", "--accelerator", "v5p-8", "--mesh", "1,3,1"]) == 2
    assert "but the slice has 4" in capsys.readouterr().err
    assert M.main(["--config", str(tmp_path / "missing.yaml"), "--devices", "1"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_compare_table(capsys):
    assert M.main(["--compare", "qwen2.5-7b:v5p-8:1,4,1", "qwen2.5-32b:v5e-8:1,8,1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("| model | slice (chips)")
    assert out[2].startswith("| qwen2.5-7b | v5p-8 (4) | 1/4/1 | 41.0 GiB | 7.1 GiB | 224 (56) | 30.1 GiB |")  # bf16 engine copy replicated over fsdp
    # 32B actor + critic state (~1 TB) cannot sit on 8 x 16 GB chips
    assert "0 (does not fit)" in out[3]
    assert M.main(["--compare", "qwen2.5-7b:v5p-8"]) == 2
    assert "expected PRESET:ACCELERATOR" in capsys.readouterr().err
