"""DVC stage `pretrain@<method>-<variant>`: SSL pretraining of one variant (baseline, augself, cassle).

Runs alone or under ``torchrun --nproc_per_node=N`` (DDP); only rank 0 writes files and logs.
"""

from pathlib import Path

from pipeline.cli import is_main_process, stage
from pipeline.workflow import run_pretraining


@stage("Pretrain one model (method × variant).", positional=("method", "variant"))
def main(params, args):
    # run_pretraining resolves the request (pipeline.request.RunRequest: the one check of method and
    # variant) before any work.
    run_pretraining(params, args.method, args.variant, Path("models"), track=is_main_process())


if __name__ == "__main__":
    raise SystemExit(main())
