"""DVC stages `features@<model>` and one per evaluation task: `linear@<model>`, `fewshot@<model>`, `probe@<model>`.

``python stages/evaluate.py <step> <method>-<variant>``: ``features`` extracts the model's frozen features;
any other step is an evaluation task of :mod:`pipeline.evaluate.tasks`, run by
:func:`pipeline.workflow.run_task` on those features (or, for the probe, the backbone); its wall time goes
into the model's MLflow run as ``time/<step>_s`` (the study's cost table reads it).
"""

from pathlib import Path

from pipeline.cli import stage
from pipeline.config import check_choice
from pipeline.workflow import evaluation_steps, run_evaluation_step


@stage("Evaluate one pretrained model.", positional=("step", "model"))
def main(params, args):
    check_choice("step", args.step, evaluation_steps())
    run_evaluation_step(args.step, params, args.model, models_dir=Path("models"), features_dir=Path("features"),
                        metrics_dir=Path("metrics"))


if __name__ == "__main__":
    raise SystemExit(main())
