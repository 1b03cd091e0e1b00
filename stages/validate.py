"""DVC stage `validate`: every params refusal, before any stage's outputs are touched.

DVC removes a stage's outputs *before* it runs the stage's command, so a refusal raised inside
`pretrain_*@*` (e.g. a few-shot K larger than the test classes) came after DVC had already deleted that
model's committed files.  This stage runs first (every stage that writes non-persistent outputs depends
on its output) and performs all the checks the other stages would: the params schema
(pipeline/params.py, through :func:`pipeline.cli.stage`), the dataset entries against the registry, and
each evaluation task's own refusal (:mod:`pipeline.evaluate.tasks`: the few-shot feasibility against the
prepared test splits).

It runs after `prepare@*` (it depends on the prepared data, which the few-shot check reads): prepare's
outputs are ``persist: true`` (never deleted by DVC) and prepare's own entry point applies the same
params checks before writing anything, so a bad value refused there also leaves the workspace as it was.

Its output, ``params.valid``, holds a constant text: when the params are valid it is rewritten with the
same bytes, so DVC sees an unchanged dependency and re-runs nothing downstream because of this stage.
It is ``persist: true`` so that a refusal does not delete it either.
"""

from pathlib import Path

from pipeline.cli import stage
from pipeline.workflow import check_evaluations

VALID_FILE = Path("params.valid")
VALID_TEXT = "params.yaml passed stages/validate.py (schema, datasets, few-shot feasibility)\n"


@stage("Check params.yaml against everything the pipeline's stages will check.")
def main(params, args):
    check_evaluations(params)
    if not VALID_FILE.exists() or VALID_FILE.read_text() != VALID_TEXT:
        VALID_FILE.write_text(VALID_TEXT)
    print(f"validate: {args.params} is valid")


if __name__ == "__main__":
    raise SystemExit(main())
