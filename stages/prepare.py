"""DVC stage `prepare@<dataset>`: raw files → data/prepared/<dataset>/{train,test}.npz + meta.json."""

from pipeline.cli import stage
from pipeline.config import check_choice
from pipeline.data import prepare_dataset


@stage("Prepare one dataset into the uniform on-disk format.", positional=("dataset",))
def main(params, args):
    check_choice("data.datasets", args.dataset, params.data.datasets)
    out = prepare_dataset(args.dataset, params.data.datasets[args.dataset], params.data)
    print(f"prepared {args.dataset} → {out}")


if __name__ == "__main__":
    raise SystemExit(main())
