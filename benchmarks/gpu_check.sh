#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_check.py says what it runs).
#   benchmarks/gpu_check.sh --dry-run     rehearse on a CPU
#   benchmarks/gpu_check.sh               on the GPU machine, from the repository root
# Wheels carried in .whl/ (../shared/tools/gpu-wheels.sh) go into a private folder first; parts of
# split wheels in .whl-parts/ are joined.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && compgen -G ".whl*/*" >/dev/null; then
  site=$(mktemp -d /tmp/vipo-site.XXXX)
  for first in .whl-parts/*.part00; do
    [ -e "$first" ] || continue
    cat "${first%.part00}".part* > "/tmp/$(basename "${first%.part00}")"
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .whl/*.whl $(ls /tmp/*.whl 2>/dev/null) || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
