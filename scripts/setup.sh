#!/usr/bin/env bash
# Install what the project needs, idempotently: Debian packages (when missing and apt is usable),
# a .venv with the pinned Python packages, and the project itself (editable).
#   scripts/setup.sh          what `dvc repro` needs
#   scripts/setup.sh --test   plus what the test suite needs (Chromium for the report page test)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_pkgs+=(dataset-fashion-mnist)
command -v npm >/dev/null 2>&1 || apt_pkgs+=(npm)        # vega for `dvc plots show` offline (below)
if [ "$want_test" = 1 ] && ! command -v chromium >/dev/null 2>&1; then apt_pkgs+=(chromium); fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${apt_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
  else
    echo "setup: missing Debian packages ${apt_pkgs[*]}; install them as root (apt-get install ${apt_pkgs[*]})" \
         "or put the Fashion-MNIST IDX files under data/raw/fashion-mnist/" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing pinned Python packages (requirements.lock; torch from this machine's disk)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# AUGSELF_DVC_REMOTE: where this clone's `dvc push` / `dvc pull` go (default: .dvc/config's
# ../augself-dvc-remote beside the repository); kept in .dvc/config.local, which git ignores.
if [ -n "${AUGSELF_DVC_REMOTE:-}" ]; then
  .venv/bin/dvc remote modify --local local url "$AUGSELF_DVC_REMOTE"
  echo "setup: DVC remote 'local' → $AUGSELF_DVC_REMOTE (in .dvc/config.local)"
fi
# `dvc plots show` offline (issue 27): vega, vega-lite and vega-embed, pinned in scripts/plots/package-lock.json,
# installed into scripts/plots/node_modules (git-ignored) and inlined into .dvc/plots_offline.html, the
# page .dvc/config's plots.html_template names (without it dvc-render loads them from a CDN).
plots_stamp="scripts/plots/node_modules/.installed-$(sha256sum scripts/plots/package-lock.json | cut -c1-16)"
if command -v npm >/dev/null 2>&1; then
  if [ ! -f "$plots_stamp" ]; then
    echo "setup: installing vega for offline plots (npm ci, scripts/plots/package-lock.json)"
    npm ci --prefix scripts/plots --ignore-scripts --omit=dev --no-audit --no-fund --loglevel=error >/dev/null
    touch "$plots_stamp"
  fi
  [ -f .dvc/plots_offline.html ] && [ .dvc/plots_offline.html -nt "$plots_stamp" ] || .venv/bin/python scripts/plots/build_template.py
else
  echo "setup: npm is missing, so \`dvc plots show\` cannot write its offline page; install npm (apt-get install npm)" >&2
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
