"""DVC as the README and dvc.yaml comments give it, in a tiny project after `dvc repro` (issue 27):

* every ``dvc ...`` command line of README's ``bash`` blocks and of dvc.yaml's comments is listed in
  :data:`DOC_COMMANDS` (a new or changed one fails the test until it is), and each one listed as
  ``run`` exits 0 here, as written (placeholders replaced);
* the documented ``dvc exp show`` invocation, at 160 columns, shows the experiments' names, the params
  that differ and the headline metrics (two experiments);
* ``dvc plots show`` renders in headless Chromium with the network off (the page carries vega itself):
  three charts, baseline and AugSelf overlaid, the kNN top-1 of every task drawn.

One project, reproduced once; the experiments are added after the documented commands ran.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e import ROOT, make_project, run

pytestmark = pytest.mark.slow

GIT_ID = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
          "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
TASKS = ["class", "color", "hue"]                          # the default pretraining tasks: the monitor plot's columns
OVERRIDES = {"variants": ["baseline", "augself"],          # the default variants
             "data.datasets": {"cfmnist": {"tasks": TASKS, "image_size": 32, "max_train": 256, "max_test": 200}}}
TEMPLATE = ".dvc/plots_offline.html"                       # built by scripts/setup.sh (git-ignored)

# Every command line with `dvc ` in README's bash blocks and in dvc.yaml's comments, and what this file
# does with it: "run" (here, exit 0), or why not.  Placeholders are replaced by SUBSTITUTE.
RUN = "run"
DOC_COMMANDS = {
    "dvc exp run -S augself.lambda=0.5": "the `experiments` fixture runs it as written (test_exp_show_*)",
    "dvc exp run -S ssl.methods=[simclr]": RUN,
    "dvc exp run --queue -S seed=1; dvc exp run --queue -S seed=2; dvc queue start -j 2":
        "trains four more models: the same commands run in tests/test_e2e_queue.py (queue, start -j 2)",
    "dvc repro -f -s report": RUN,
    "dvc exp show --only-changed --drop 'Created|^(params\\.valid|pipeline|stages|data|features|metrics|models|reports)"
    "(/|$)|^(pretrain|linear|fewshot|probe)/' --keep '.*Δ'": RUN,
    "dvc metrics show metrics/simclr-baseline/linear.json metrics/simclr-augself/linear.json": RUN,
    "dvc metrics diff": RUN,
    "dvc exp show --csv > experiments.csv": RUN,
    "dvc get . models/simclr-augself/final.pt -o simclr-augself.pt": RUN,
    'git tag -a simclr-augself@v0.1.0 -m "simclr-augself v0.1.0" && dvc artifacts get . simclr-augself': RUN,
    "dvc push": RUN,
    "git clone <this repo> other && cd other && dvc pull": RUN,
    "dvc remote modify --local local url /shared/disk/augself-dvc": RUN,
    "for lam in 0.25 0.5 1 2; do dvc exp run --queue -S augself.lambda=$lam; done":
        "a GPU machine's λ sweep: queued experiments as in tests/test_e2e_queue.py",
    "dvc queue start -j 4": "4 workers for 4 GPUs: tests/test_e2e_queue.py starts 2",
}
# Where a command runs (default: the project) and what stands in for a placeholder.
CWD = {"git clone <this repo> other && cd other && dvc pull": "..",          # README: beside the repository
       "dvc remote modify --local local url /shared/disk/augself-dvc": "../other"}   # "for this clone only"
SUBSTITUTE = {"<this repo>": "{project}", "/shared/disk/augself-dvc": "{tmp}/elsewhere-remote"}
# Named in README's prose (not a bash block) and in issue 27: run as well.
EXTRA = ["dvc ls . -R --dvc-only"]


def doc_commands() -> list[str]:
    """The `dvc` command lines of README's bash blocks and of dvc.yaml's comments, comments stripped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if re.search(r"(^|[;&|]\s*|do\s+)dvc ", line):
                found.append(line)
    for line in (ROOT / "dvc.yaml").read_text().splitlines():
        m = re.match(r"^#\s{3,}(.*?)(\s{2,}.*)?$", line)             # "#   <command>   <what it does>"
        if m and re.search(r"(^|&&\s*)dvc ", m[1]):
            found.append(m[1].strip())
    return list(dict.fromkeys(found))


def test_every_documented_dvc_command_is_listed():
    assert set(doc_commands()) == set(DOC_COMMANDS), (
        f"not listed: {sorted(set(doc_commands()) - set(DOC_COMMANDS))}; "
        f"no longer documented: {sorted(set(DOC_COMMANDS) - set(doc_commands()))}")


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Path:
    template = ROOT / TEMPLATE
    assert template.exists(), f"{TEMPLATE} is missing: run scripts/setup.sh (npm ci + scripts/plots/build_template.py)"
    base = tmp_path_factory.mktemp("dvcdocs")
    p = base / "project"
    p.mkdir()
    make_project(p, OVERRIDES)
    shutil.copy2(template, p / TEMPLATE)
    run(["dvc", "repro"], p, timeout=1800)            # minutes on a busy 2-core machine
    run(["git", "add", "-A"], p)
    run(["git", "commit", "-qm", "reproduced"], p, **GIT_ID)
    return p


def test_every_documented_dvc_command_runs_after_repro(reproduced):
    p = reproduced
    failed = []
    for command in [c for c, how in DOC_COMMANDS.items() if how == RUN] + EXTRA:
        line = command
        for placeholder, value in SUBSTITUTE.items():
            line = line.replace(placeholder, value.format(project=p, tmp=p.parent))
        cwd = (p / CWD[command]).resolve() if command in CWD else p
        out = run(["bash", "-c", line], cwd, check=False, timeout=1200, **GIT_ID)
        print(f"$ {line}   (in {cwd.name}): exit {out.returncode}")
        if out.returncode != 0:
            failed.append(f"{line}\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}")
    assert not failed, "\n\n".join(failed)
    assert (p / "simclr-augself.pt").read_bytes() == (p / "models/simclr-augself/final.pt").read_bytes()
    assert (p / "final.pt").read_bytes() == (p / "models/simclr-augself/final.pt").read_bytes()   # artifacts get
    assert (p.parent / "other/models/simclr-augself/final.pt").exists()                             # dvc pull


@pytest.fixture(scope="module")
def experiments(reproduced) -> tuple[Path, list[str]]:
    """Two experiments: README's λ command as written (DVC names it), and a named one on top of it."""
    p = reproduced
    out = run(["bash", "-c", "dvc exp run -S augself.lambda=0.5"], p, timeout=1800)
    names = re.findall(r"Ran experiment\(s\): (\S+)", out.stdout + out.stderr)
    run(["dvc", "exp", "run", "-n", "fewer-episodes", "-S", "eval.fewshot.episodes=10"], p, timeout=1200)
    return p, [*names, "fewer-episodes"]


EXP_SHOW = next(c for c in DOC_COMMANDS if c.startswith("dvc exp show --only-changed"))


def test_exp_show_at_160_columns_shows_names_changed_params_and_headline_metrics(experiments):
    p, names = experiments
    assert len(names) == 2, names
    shown = run(["bash", "-c", EXP_SHOW], p, COLUMNS="160", LINES="50").stdout
    print(shown)
    assert max(len(line) for line in shown.splitlines()) <= 160
    for name in names:
        assert name in shown, name
    for column in ("augself.lambda", "eval.fewshot.episodes", *(f"Δaugself/cfmnist/{t}" for t in TASKS)):
        assert column in shown, column
    assert "…" not in shown, "a column collapsed"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]      # no network at all


def render_offline(page: Path, out: Path) -> tuple[str, "object"]:
    """(DOM after scripts ran, screenshot as a PIL image) of ``page`` in headless Chromium, network off."""
    from PIL import Image

    def chromium(*args: str) -> subprocess.CompletedProcess:
        profile = out / f"profile{len(list(out.glob('profile*')))}"
        return subprocess.run([CHROMIUM, *OFFLINE, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                               *args, page.as_uri()], capture_output=True, text=True, timeout=180)

    dom = chromium("--dump-dom").stdout
    shot = out / "plots.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,1000")
    return dom, Image.open(shot).convert("RGB")


def check_plots_page(dom: str, image) -> None:
    """Three charts drawn; both variants' SSL loss and the kNN top-1 of every task, for both, are line
    marks; the screenshot's chart area is not blank."""
    assert len(re.findall(r"<svg [^>]*class=\"marks\"", dom)) == 3, "not three rendered charts"
    for model in ("simclr-baseline", "simclr-augself"):
        assert re.search(rf'{model}/losses\.csv[^"]*" role="graphics-symbol" aria-roledescription="line mark"', dom), model
        for task in TASKS:
            series = f"{model}/monitor.csv::monitor/{task}/knn_top1"
            assert re.search(rf'{re.escape(series)}" role="graphics-symbol" aria-roledescription="line mark"', dom), series
    charts = image.crop((0, 0, 1100, 600))                 # the two curve charts, side by side at the top
    dark = sum(1 for r, g, b in charts.getdata() if r + g + b < 600)
    assert dark > 5000, f"{dark} non-background pixels: the charts are blank"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_plots_render_offline_with_the_variants_overlaid(experiments, tmp_path):
    p, _ = experiments
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], p)
    page = tmp_path / "plots" / "index.html"
    assert "cdn.jsdelivr.net" not in page.read_text()
    dom, image = render_offline(page, tmp_path)
    image.save(tmp_path / "plots-checked.png")
    check_plots_page(dom, image)


def test_headline_file_is_each_variant_minus_the_baseline(tmp_path):
    """reports/metrics.json, the columns `dvc exp show` compares by: variant − baseline linear top-1."""
    import json

    from pipeline.params import load_params
    from pipeline.workflow import write_headline

    params = load_params(ROOT / "params.yaml")
    params.variants = ["baseline", "augself", "cassle"]
    values = {"baseline": (70.0, 97.5), "augself": (68.5, 98.25), "cassle": (60.0, 99.0)}
    for variant, (cls, hue) in values.items():
        d = tmp_path / "metrics" / f"simclr-{variant}"
        d.mkdir(parents=True)
        (d / "linear.json").write_text(json.dumps({"linear/cfmnist/class/top1": cls, "linear/cfmnist/hue/top1": hue}))
    out = json.loads(write_headline(params, tmp_path / "metrics", tmp_path).read_text())
    assert out == {"Δaugself/cfmnist/class": -1.5, "Δaugself/cfmnist/hue": 0.75,
                   "Δcassle/cfmnist/class": -10.0, "Δcassle/cfmnist/hue": 1.5}
    params.ssl.methods = ["simclr", "simsiam"]                 # several methods: the method names the key
    out = json.loads(write_headline(params, tmp_path / "metrics", tmp_path).read_text())
    assert set(out) == {"simclr/Δaugself/cfmnist/class", "simclr/Δaugself/cfmnist/hue",
                        "simclr/Δcassle/cfmnist/class", "simclr/Δcassle/cfmnist/hue"}
