"""Premise curves of the study (docs/study.md): python -m stages.premise [--strengths none,strong] [--seed 0]"""

import argparse

from pipeline.study.premise import PremiseConfig, run, summarise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--strengths", default=None, help="comma list of none,weak,default,strong")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--summarise-only", action="store_true")
    a = ap.parse_args()
    cfg = PremiseConfig(seed=a.seed, method=a.method)
    if a.strengths:
        cfg.strengths = a.strengths.split(",")
    print((summarise if a.summarise_only else run)(cfg))


if __name__ == "__main__":
    main()
