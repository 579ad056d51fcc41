#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv (once, and again whenever the pins change), then runs a job.
#   ./finercam.sh demo [ARGS]      the main job: explain the embedded models on the synthetic benchmark, write
#                                  finercam-demo/report.html and metrics.json (the default job)
#   ./finercam.sh example [ARGS]   train a small model on the spot, explain it, write finercam-out/example.png
#   ./finercam.sh web [ARGS]       serve the web demo on http://127.0.0.1:7860 (Ctrl-C to stop)
#   ./finercam.sh test [ARGS]      lint, then the full test suite (what CI runs)
#   ./finercam.sh bench [ARGS]     the engine benchmark (benchmarks/engine.py; minutes, not a test)
#   ./finercam.sh setup            only the set-up
set -euo pipefail
cd "$(dirname "$0")"

python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin=$candidate; break; fi
  done
fi
if [ -z "$python_bin" ] || ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "finercam needs Python >= 3.10 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Setting up .venv (once; about a minute) ..." >&2
  [ -x .venv/bin/python ] || "$python_bin" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
job=${1:-demo}
[ $# -gt 0 ] && shift
case "$job" in
  setup) ;;
  demo) exec .venv/bin/finercam demo "$@" ;;
  example) exec .venv/bin/finercam example "$@" ;;
  web) exec .venv/bin/finercam web "$@" ;;
  test)
    .venv/bin/python -m ruff check src tests benchmarks
    exec .venv/bin/python -m pytest "$@" ;;
  bench) exec .venv/bin/python benchmarks/engine.py "$@" ;;
  *) echo "usage: ./finercam.sh [demo|example|web|test|bench|setup] [ARGS]" >&2; exit 2 ;;
esac
