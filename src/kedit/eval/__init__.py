"""Evaluation: datasets -> EvalCase, batched scoring, labelled metrics, the Evaluator and its reports."""

from kedit.eval.datasets import Dataset, EvalCase, load_dataset
from kedit.eval.harness import Evaluator, Report

__all__ = ["Dataset", "EvalCase", "Evaluator", "Report", "load_dataset"]
