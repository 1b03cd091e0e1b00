"""DVC stages `features@<model>`, `linear@<model>`, `fewshot@<model>`, `probe@<model>`.

``python stages/evaluate.py <step> <method>-<variant>``: each step is one function of
pipeline.workflow reading the model's frozen features (or, for the probe, its backbone).
"""

from pathlib import Path

from pipeline.cli import stage
from pipeline.config import check_choice
from pipeline.workflow import EVALUATION_STEPS


@stage("Evaluate one pretrained model.", positional=("step", "model"))
def main(params, args):
    check_choice("step", args.step, EVALUATION_STEPS)
    EVALUATION_STEPS[args.step](params, args.model, models_dir=Path("models"),
                                features_dir=Path("features"), metrics_dir=Path("metrics"))


if __name__ == "__main__":
    raise SystemExit(main())
