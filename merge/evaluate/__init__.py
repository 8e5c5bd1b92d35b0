"""Evaluation: accuracy, NLL and calibration error of members, prediction ensembles and soups.

One module per job, each importing only those before it:

- :mod:`merge.evaluate.measures`: accuracy, NLL and ECE of logits or probabilities, and the prediction
  ensemble (the definitions and their papers are there);
- :mod:`merge.evaluate.inference`: a model's logits on a loader, and the ``evaluate(model)`` and
  ``score(state_dict)`` callbacks greedy soup takes;
- :mod:`merge.evaluate.checkpoints`: checkpoints' model and data split rebuilt from their metadata
  (:class:`CheckpointEvaluator`), and BatchNorm recalibration of a soup file;
- :mod:`merge.evaluate.rows`: the rows of an evaluation (each checkpoint, the members' ensemble, each
  selection's), and the members' mean, min and max;
- :mod:`merge.evaluate.tables`: those rows as a plain-text table;
- :mod:`merge.evaluate.lm`: causal language models (Hugging Face folders) scored by perplexity on a held-out
  text (:class:`LanguageModelEvaluator`); their rows come from :func:`evaluate_lm_checkpoints`.

Example:
    >>> rows = evaluate_checkpoints(["m0.safetensors", "m1.safetensors"], split="test")  # doctest: +SKIP
    >>> print(format_table([*rows, *summarize_members(rows)]))  # doctest: +SKIP
"""

from __future__ import annotations

from merge.evaluate.checkpoints import (
    CheckpointEvaluator,
    checkpoint_metadata,
    eval_model_spec,
    recompute_bn_checkpoint,
    resolve_eval_data,
)
from merge.evaluate.inference import Evaluate, StateDictScore, load_into, model_evaluator, predict, state_dict_scorer
from merge.evaluate.lm import LanguageModelEvaluator, Perplexity, is_causal_lm
from merge.evaluate.measures import ensemble_probs, metrics, metrics_from_probs
from merge.evaluate.rows import EvalRow, evaluate_checkpoints, evaluate_lm_checkpoints, summarize_members
from merge.evaluate.tables import TableFormatter, format_table, scoring_label

__all__ = ["metrics", "metrics_from_probs", "ensemble_probs", "predict", "model_evaluator", "state_dict_scorer",
           "load_into", "checkpoint_metadata", "CheckpointEvaluator", "EvalRow", "evaluate_checkpoints",
           "summarize_members", "format_table", "TableFormatter", "recompute_bn_checkpoint", "resolve_eval_data",
           "eval_model_spec", "scoring_label", "Evaluate", "StateDictScore", "LanguageModelEvaluator", "Perplexity",
           "evaluate_lm_checkpoints", "is_causal_lm"]
