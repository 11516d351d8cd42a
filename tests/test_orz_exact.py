"""ORZ exactly (issue 16): its prompt byte for byte, its answer extraction, its critic-head init, the
learning-rate schedules of the annealing stage, and ORZ's own GRPO baseline (group mean only)."""

from __future__ import annotations

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, SHARED_DATA
from orz_jax.config import ArchConfig, ConfigError, ModelConfig, OptimConfig, PPOConfig, RewardConfig, load_config
from orz_jax.data.pipeline import tokenize_records
from orz_jax.data.records import PromptRecord
from orz_jax.models.build import create_model, critic_head_std
from orz_jax.models.transformer import CausalLM
from orz_jax.ppo.advantages import compute_advantages
from orz_jax.ppo.train import PPOFunctions, create_train_state, lr_schedule
from orz_jax.reward import RewardScorer
from orz_jax.reward.extract import extract_answer
from orz_jax.template import ORZ_TEMPLATE, format_prompt
from orz_jax.tokenizer import CharTokenizer

ORZ_CONFIGS = ["orz_0p5b.yaml", "orz_1p5b.yaml", "orz_7b.yaml", "orz_32b.yaml", "orz_32b_anneal.yaml"]

# ---- prompt ---------------------------------------------------------------------------------------

# sha256 of orz_jax/prompts/orz.txt, checked equal to ../shared/data/orz/prompt_template.txt (ORZ's prompt
# as its code renders it, see orz_jax/prompts/NOTICE.md) when it was shipped.
ORZ_PROMPT_SHA256 = "b10b7ae1199f067e6064e641294a96a1bdf7402a254e150d6cbbdc5cd2ecac3c"


def test_orz_prompt_is_the_shipped_file_byte_for_byte():
    shipped = (REPO / "orz_jax" / "prompts" / "orz.txt").read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == ORZ_PROMPT_SHA256
    assert ORZ_TEMPLATE.encode("utf-8") == shipped
    if (SHARED_DATA / "prompt_template.txt").is_file():  # the source it was copied from, beside the repo
        assert shipped == (SHARED_DATA / "prompt_template.txt").read_bytes()
    # Rendering: the placeholder replaced by the question, nothing else touched; no trailing newline.
    question = "  Let $f(x)={x^2}$ and {question}. Find $f(3)$.\n"  # braces, a placeholder, edge whitespace
    rendered = format_prompt(question, "orz").encode("utf-8")
    head, tail = shipped.split(b"{question}")
    assert rendered == head + question.encode("utf-8") + tail
    assert rendered.endswith(b"\nAssistant: <think>")
    assert format_prompt("q", "orz", bos_text="<s>") == "<s>" + format_prompt("q", "orz")
    # The paraphrase is still there under its own name, and the other templates still strip.
    assert format_prompt(" q ", "orz_paraphrase").count("User: q\n") == 1


def test_orz_prompt_tokens_start_with_bos_only_when_the_tokenizer_has_one():
    cfg = load_config(None, ["model.arch.vocab_size=128", "rollout.max_prompt_len=4096",
                             "rollout.prefill_buckets=[4096]", "ppo.pack_len=8192"])
    rec = [PromptRecord(question=" What is {1+1}? ", answer="2", source="t", index=0)]
    tok = CharTokenizer()
    text = format_prompt(rec[0].question, "orz")
    (ex,), _ = tokenize_records(rec, tok, cfg, "t")
    assert ex.prompt_ids.tolist() == [tok.bos_id] + tok.encode(text)
    tok.bos_id = None  # a tokenizer without BOS (Qwen2.5): the text alone
    (ex,), _ = tokenize_records(rec, tok, cfg, "t")
    assert ex.prompt_ids.tolist() == CharTokenizer().encode(text)
    cfg.data.template = "compact"  # the demo templates never get one
    (ex,), _ = tokenize_records(rec, CharTokenizer(), cfg, "t")
    assert ex.prompt_ids.tolist() == CharTokenizer().encode(format_prompt(rec[0].question, "compact"))


@pytest.mark.parametrize("name", ORZ_CONFIGS)
def test_orz_configs_use_orz_prompt_extraction_and_head(name):
    cfg = load_config(str(REPO / "configs" / name))
    assert (cfg.data.template, cfg.reward.extraction, cfg.model.critic_head_init_std) == ("orz", "orz", "auto")


# ---- extraction -------------------------------------------------------------------------------------

# (response, ORZ's reading, the lenient reading). ORZ's by hand from its regex
# <answer>.*?(\\boxed{.*}).*?</answer> (DOTALL, last match) and the last balanced \boxed{ of that match.
EXTRACTION_CASES = [
    ("<think> 2+3 </think> <answer> \\boxed{5} </answer>", "5", "5"),
    ("<answer> \\boxed{5}", None, "5"),  # ended by EOS after an unclosed answer
    ("<answer> \\boxed{5} </think>\nUser:", None, "5"),  # ended by a new User: turn
    ("<answer> \\boxed{5} and \\boxed{6} </answer>", "6", "6"),  # last box of the block
    ("<answer> \\boxed{1} </answer> then <answer> \\boxed{3} </answer>", "3", "3"),  # several blocks
    ("<answer> \\boxed{1} </answer> then <answer> \\boxed{3}", "1", "3"),  # the last one unclosed
    ("<answer> \\boxed{1} </answer> \\boxed{9}", "1", "1"),  # a box after the block
    ("\\boxed{9} <answer> \\boxed{1} </answer>", "1", "1"),  # a box before the block
    ("\\boxed{9} <answer> 1 </answer>", None, None),  # the block holds no box
    # ORZ's one regex match spans both blocks, so a box between them counts; lenient: the last block with a box
    ("<answer> \\boxed{1} </answer> \\boxed{7} <answer> 2 </answer>", "7", "1"),
    ("<answer> \\boxed{\\frac{1}{\\sqrt{2}}} </answer>", "\\frac{1}{\\sqrt{2}}", "\\frac{1}{\\sqrt{2}}"),  # nested
    ("<answer> \\boxed{\\frac{1}{2} </answer>", None, None),  # the last box never closes
    ("<answer> \\boxed {4} </answer>", None, "4"),  # ORZ needs "\boxed{" exactly
    ("<answer> \\boxed{} </answer>", "", ""),
]


@pytest.mark.parametrize("response, orz, lenient", EXTRACTION_CASES)
def test_extraction_orz_and_lenient(response, orz, lenient):
    assert extract_answer(response, "orz") == orz
    assert extract_answer(response, "lenient") == lenient
    assert extract_answer(response) == lenient  # the base default is unchanged


def test_scorer_reads_answers_as_configured():
    responses = ["<answer> \\boxed{5}", "<answer> \\boxed{5} </answer>", "<answer> \\boxed {5} </answer>"]
    for extraction, expected in (("orz", [0.0, 1.0, 0.0]), ("lenient", [1.0, 1.0, 1.0])):
        with RewardScorer(RewardConfig(extraction=extraction, num_workers=1)) as scorer:
            results = scorer.score_batch(responses, ["5"] * 3, ["stop"] * 3)  # all decided by the cheap rules
        assert [r.reward for r in results] == expected
        assert [r.rule for r in results] == ["no_answer" if v == 0 else "exact" for v in expected]
    with pytest.raises(ConfigError, match="reward.extraction"):
        load_config(None, ["model.arch.vocab_size=64", "reward.extraction=strict"])


# ---- critic head --------------------------------------------------------------------------------------


def test_critic_head_init_std_auto_is_orz_one_over_hidden_plus_one():
    hidden = 1024
    arch = ArchConfig(vocab_size=8, hidden_size=hidden, intermediate_size=8, num_layers=1, num_heads=4,
                      num_kv_heads=4)
    mcfg = ModelConfig(arch=arch, critic_head_init_std="auto")
    assert critic_head_std(mcfg, arch) == 1.0 / (hidden + 1)
    head = np.asarray(create_model("critic", arch, mcfg, seed=3).value_head.value, np.float64).ravel()  # [hidden]
    sigma = 1.0 / (hidden + 1)
    # n = 1024 draws of N(0, sigma^2): the sample std has relative standard error 1/sqrt(2(n-1)) = 2.2% and
    # the mean has standard error sigma/sqrt(n); 5 standard errors either way.
    assert abs(head.std(ddof=1) / sigma - 1) < 5 / math.sqrt(2 * (hidden - 1))
    assert abs(head.mean()) < 5 * sigma / math.sqrt(hidden)
    zero = create_model("critic", arch, ModelConfig(arch=arch, critic_head_init_std=0.0)).value_head.value
    assert not np.asarray(zero).any()
    with pytest.raises(ConfigError, match="model.critic_head_init_std"):
        load_config(None, ["model.arch.vocab_size=64", "model.critic_head_init_std=-0.1"])
    with pytest.raises(ConfigError, match="model.critic_head_init_std"):
        load_config(None, ["model.arch.vocab_size=64", "model.critic_head_init_std=big"])


# ---- learning-rate schedules --------------------------------------------------------------------------

LR, FINAL = 1e-3, 1e-4
# warmup 2 then decay over 4 optimizer steps, by hand: warmup lr * (k + 1) / 2, then from lr at step 2 to
# FINAL at step 6 and after. Linear: lr - (lr - FINAL) * j / 4; cosine: FINAL + (lr - FINAL)(1 + cos(pi j / 4)) / 2.
HAND = {
    "constant": [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3],
    "linear": [5e-4, 1e-3, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4, 1e-4],
    "cosine": [5e-4, 1e-3, 1e-3, 1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2, 5.5e-4,
               1e-4 + 9e-4 * (1 - math.sqrt(0.5)) / 2, 1e-4, 1e-4],
}


@pytest.mark.parametrize("schedule", sorted(HAND))
def test_lr_schedule_hand_numbers(schedule):
    o = OptimConfig(lr=LR, warmup_steps=2, schedule=schedule, final_lr=FINAL, decay_steps=4)
    got = [float(lr_schedule(o)(jnp.asarray(k))) for k in range(8)]
    np.testing.assert_allclose(got, HAND[schedule], rtol=1e-6)  # float32 evaluation of the same formula


def test_lr_schedule_config_errors():
    base = ["model.arch.vocab_size=64", "ppo.actor.schedule=linear"]
    with pytest.raises(ConfigError, match="ppo.actor.decay_steps"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="ppo.actor.final_lr"):
        load_config(None, base + ["ppo.actor.decay_steps=10", "ppo.actor.final_lr=1.0"])
    with pytest.raises(ConfigError, match="ppo.critic.schedule"):
        load_config(None, ["model.arch.vocab_size=64", "ppo.critic.schedule=step"])
    cfg = load_config(None, base + ["ppo.actor.decay_steps=10", "ppo.actor.final_lr=3e-7"])
    assert (cfg.ppo.actor.schedule, cfg.ppo.actor.decay_steps, cfg.ppo.actor.final_lr) == ("linear", 10, 3e-7)


def test_jitted_actor_steps_follow_the_schedule_and_resume_keeps_position():
    """Adam with b1 = b2 = 0 moves every parameter by lr * g / (|g| + eps): the largest move of a step is
    that step's lr (to ~1e-6 of it for eps 1e-12), so the parameters show which lr the optimizer used."""
    from test_ppo_train import ARCH, make_rollout, packed  # the tiny model and buffer of the PPO tests

    o = OptimConfig(lr=LR, warmup_steps=2, schedule="linear", final_lr=FINAL, decay_steps=4, b1=0.0, b2=0.0,
                    eps=1e-12, grad_clip=1e6)
    pol = CausalLM(ARCH, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", rngs=nnx.Rngs(0))
    pb, lay = packed(*make_rollout(), pack_len=16)
    step = PPOFunctions.build(PPOConfig(actor=o, micro_batch_rows=lay.num_rows, pack_len=16)).actor_step
    state = create_train_state(pol, o)
    moves, lrs = [], []
    for k in range(7):
        if k == 4:  # "resume": a fresh state given the saved params, optimizer state and step (host copies)
            saved = jax.device_get((state.params, state.opt_state, state.step))
            fresh = create_train_state(pol, o)
            state = fresh.replace(**dict(zip(("params", "opt_state", "step"), jax.tree.map(jnp.asarray, saved))))
        before = jax.device_get(state.params)
        state, m = step(state, pb)
        moves.append(max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                                      jax.tree.leaves(before))))
        lrs.append(float(m["actor/lr"]))
    np.testing.assert_allclose(lrs, HAND["linear"][:7], rtol=1e-6)
    # float32 parameters below 2 in size (norm scales are 1) round a move to one ulp there, 2.4e-7 absolute
    np.testing.assert_allclose(moves, HAND["linear"][:7], rtol=1e-6, atol=2.4e-7)


# ---- GRPO as ORZ's code ran it ------------------------------------------------------------------------


def test_grpo_mean_only_hand_numbers():
    rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])  # groups: 4 samples (mean 0.5), 3 (mean 2/3)
    groups = jnp.asarray([5, 5, 5, 5, 9, 9, 9])
    mask = jnp.ones((7, 3), jnp.float32)  # [7, 3], all valid
    values = jnp.zeros((7, 3))
    mean_only = PPOConfig(advantage_estimator="grpo_mean_only", normalize_advantages=False)
    adv, ret = compute_advantages(mean_only, rewards, values, mask, groups)
    hand = np.array([0.5, -0.5, -0.5, 0.5, 1 / 3, 1 / 3, -2 / 3])
    np.testing.assert_allclose(adv, np.repeat(hand[:, None], 3, 1), rtol=1e-6)
    np.testing.assert_allclose(ret, np.repeat(np.asarray(rewards)[:, None], 3, 1))
    # the intended estimator divides by the group's population std: 0.5 and sqrt(2)/3
    adv_std, _ = compute_advantages(PPOConfig(advantage_estimator="grpo", normalize_advantages=False),
                                    rewards, values, mask, groups)
    std = np.array([0.5] * 4 + [math.sqrt(2) / 3] * 3)
    np.testing.assert_allclose(adv_std[:, 0], hand / std, rtol=1e-6)
    assert PPOConfig().advantage_estimator == "gae"


def test_orz_32b_anneal_config_is_the_papers_stage():
    cfg = load_config(str(REPO / "configs" / "orz_32b_anneal.yaml"))
    main = load_config(str(REPO / "configs" / "orz_32b.yaml"))
    a = cfg.ppo.actor
    assert (a.schedule, a.lr, a.final_lr, a.decay_steps, a.warmup_steps) == ("linear", 1e-6, 3e-7, 100, 0)
    assert cfg.experiment.num_iterations == 100 and cfg.ppo.actor_steps_per_batch == 1  # 100 actor steps
    assert cfg.model.init_from_run == main.experiment.out_dir
    assert [f.path.rsplit("/", 1)[-1] for f in cfg.data.train_files] == ["orz_math_13k_collection_hard.json"]
    assert cfg.model.arch == main.model.arch and cfg.rollout == main.rollout
    assert float(lr_schedule(a)(jnp.asarray(99))) == pytest.approx(3e-7 + 7e-7 / 100, rel=1e-6)
