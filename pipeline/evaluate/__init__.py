"""Evaluation of frozen backbones: features, linear probe, few-shot episodes, augmentation probe."""

# The per-item results file of each evaluation task that has one (next to its metrics json, and an
# MLflow artifact of the model's run): the paired statistics read them (pipeline.stats).  Written by
# pipeline.workflow, read back by pipeline.tracking and the study ledger: this is their one definition.
ITEM_FILES = {"linear": "linear_predictions.npz", "fewshot": "fewshot_episodes.npz"}
