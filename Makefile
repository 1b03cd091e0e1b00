# The two commands of the README:
#   make repro   install what is missing, then run the whole pipeline (dvc repro) on params.yaml
#   make test    install what is missing (+ Chromium), then run the test suite
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: setup repro test report seeds bench clean-mlflow study premise

setup:
	scripts/setup.sh

repro: setup
	dvc repro

test:
	scripts/setup.sh --test
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# Add seeds 1 and 2 as queued experiments, run them, and rebuild reports/ over every seed found.
seeds: repro
	dvc exp run --queue -S seed=1
	dvc exp run --queue -S seed=2
	dvc queue start -j 1
	dvc queue status; while dvc queue status | grep -qE 'Queued|Running'; do sleep 10; done; dvc queue status
	dvc repro -f -s report

report:
	dvc repro -f -s report

# The study (docs/study.md, study.yaml): trains every missing model through `dvc exp run --queue`,
# exports finished ones to reports/study/runs/ (committed), rebuilds reports/study/. Resumable.
study: repro
	python -m stages.study run

# The study's premise curves (baseline only; reports/study/premise.*). Resumable.
premise: setup
	python -m stages.premise

bench:
	python bench/bench_pretrain.py
	python bench/bench_linear.py
	python bench/bench_augment.py $$(python -c 'import kornia' 2>/dev/null || echo --no-kornia)   # kornia: pip install -e '.[bench]'
	python bench/bench_lightly.py $$(python -c 'import lightly' 2>/dev/null || echo --no-lightly)   # lightly: pip install -e '.[bench]'
