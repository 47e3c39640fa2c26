#!/usr/bin/env bash
# Sets everything up, then runs benchmarks/bench_attn.py (arguments pass through, e.g. --quick,
# --workloads vit-b16,navit-packed, --device cuda). Results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VITKERN_VENV:-.venv}/bin/activate"
python benchmarks/bench_attn.py "$@"
