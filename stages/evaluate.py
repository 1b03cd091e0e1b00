"""DVC stages `features@<model>`, `linear@<model>`, `fewshot@<model>`, `probe@<model>`.

``python stages/evaluate.py <step> <method>-<variant>``: each step is one function of
pipeline.workflow reading the model's frozen features (or, for the probe, its backbone); its wall time
goes into the model's MLflow run as ``time/<step>_s`` (the study's cost table reads it).
"""

from pathlib import Path

from pipeline.cli import stage
from pipeline.config import check_choice
from pipeline.workflow import EVALUATION_STEPS, run_evaluation_step


@stage("Evaluate one pretrained model.", positional=("step", "model"))
def main(params, args):
    check_choice("step", args.step, EVALUATION_STEPS)
    run_evaluation_step(args.step, params, args.model, models_dir=Path("models"), features_dir=Path("features"),
                        metrics_dir=Path("metrics"))


if __name__ == "__main__":
    raise SystemExit(main())
