"""Evaluation of frozen backbones: features, linear probe, few-shot episodes, augmentation probe.

Each evaluation task is a module here with its ``evaluate(ctx)`` and a record in :mod:`.tasks`, the one
registry the workflow, the results reader, the report and the study read (its params, metrics, per-item
file, paired-statistics hook and report rows).
"""
