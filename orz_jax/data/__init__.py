"""Prompt data: ORZ JSON records, the synthetic arithmetic task, the Grain training pipeline and
evaluation sets. See ``pipeline.py`` for the pipeline layout and its checkpointable state."""

from orz_jax.data.pipeline import (EvalItem, PromptBatch, SourceStats, TrainData, build_train_pipeline,
                                   load_eval_set, prepare_train_dataset, tokenize_records)
from orz_jax.data.records import DataError, PromptRecord, load_records, parse_record
from orz_jax.data.synthetic import evaluate_expression, generate_synthetic, synthetic_capacity

__all__ = ["DataError", "EvalItem", "PromptBatch", "PromptRecord", "SourceStats", "TrainData",
           "build_train_pipeline", "evaluate_expression", "generate_synthetic", "load_eval_set",
           "load_records", "parse_record", "prepare_train_dataset", "synthetic_capacity",
           "tokenize_records"]
