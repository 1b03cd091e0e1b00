"""DVC stage `report`: every finished run of this configuration → reports/."""

from pathlib import Path

from pipeline.cli import stage
from pipeline.workflow import run_report


@stage("Regenerate reports/ from MLflow (or the metrics files).")
def main(params, args):
    run_report(params, models_dir=Path("models"), metrics_dir=Path("metrics"), out_dir=Path("reports"),
               params_path=Path(args.params))


if __name__ == "__main__":
    raise SystemExit(main())
