#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py says what each part does and checks).
#
#   bash bench/gpu_check.sh prepare --data DIR   # where there is PyPI: builds .gpu/ (bundle, tokenizer, data)
#   bash bench/gpu_check.sh run [--record]       # on the card, with .gpu/ carried: results in $GPU_CHECK_OUT
#   bash bench/gpu_check.sh run --reduced        # on a CPU, from .venv (what tests/test_bench.py runs)
#   bash bench/gpu_check.sh record DIR           # append a results folder (e.g. brought back from a card) to RESULTS.md
#
# `run` on a host without .venv (the card: Python 3.12 with a CUDA torch, nothing else of ours) unpacks
# .gpu/site.txz into a temporary folder and puts it first on PYTHONPATH, so the bundled (tested)
# versions of TRL, transformers, MLflow, Prefect... are the ones imported.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
command=${1:?usage: gpu_check.sh prepare|run|record [options]}; shift
python=${PYTHON:-}
if [ "$command" = prepare ]; then
  exec "${python:-$repo/.venv/bin/python}" "$repo/bench/gpu_check.py" prepare "$@"
elif [ "$command" = record ]; then  # the standard library only
  exec "${python:-python3}" "$repo/bench/gpu_check.py" record "$@"
fi
if [ -z "$python" ] && [ -x "$repo/.venv/bin/python" ]; then
  python=$repo/.venv/bin/python
elif [ -z "$python" ]; then
  bundle=${GPU_CHECK_BUNDLE:-$repo/.gpu/site.txz}
  [ -f "$bundle" ] || { echo "gpu_check: no .venv and no $bundle: run 'bash bench/gpu_check.sh prepare' first" >&2; exit 2; }
  site=$(mktemp -d "${TMPDIR:-/tmp}/preftune-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  started=$SECONDS
  tar xJf "$bundle" -C "$site"
  echo "gpu_check: unpacked $(basename "$bundle") into $site in $((SECONDS - started)) s"
  export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PREFTUNE_GPU_SITE=$site
  python=python3
fi
"$python" "$repo/bench/gpu_check.py" "$command" "$@"
