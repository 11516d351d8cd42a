"""Rollouts served by a JetStream engine: sampling, the engine, and the two rollout drivers."""

from orz_jax.rollout.engine import CompileCounter, DecodeState, Prefix, RolloutEngine, TokenizerAdapter
from orz_jax.rollout.rollouts import LongPromptError, RolloutBatch, SampleCollector, generate_rollouts
from orz_jax.rollout.sampling import SamplingParams, sample_tokens, sampling_logprobs

__all__ = ["CompileCounter", "DecodeState", "Prefix", "RolloutEngine", "TokenizerAdapter", "LongPromptError",
           "RolloutBatch", "SampleCollector", "generate_rollouts", "SamplingParams", "sample_tokens",
           "sampling_logprobs"]
