"""The study (docs/study.md): the premise curves on the baseline, then the AugSelf sweep."""
