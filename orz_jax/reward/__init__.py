"""ORZ's rule-based math reward: 1.0 iff the response stopped and its last ``\\boxed{}`` inside
``<answer>...</answer>`` equals the reference (math-verify, behind cheap exact / numeric checks)."""

from orz_jax.reward.extract import extract_answer
from orz_jax.reward.scorer import RULES, RewardResult, RewardScorer, summarize

__all__ = ["RULES", "RewardResult", "RewardScorer", "extract_answer", "summarize"]
