#!/usr/bin/env bash
# Sets everything up, then runs benchmarks/bench_attn.py (arguments pass through, e.g. --quick, --full,
# --workloads vit-b16,navit-packed, --device cuda). Results land in benchmarks/results/.
# With no arguments on a CPU machine the whole command, set-up included, stays within 6 minutes: the benchmark's
# time budget is what is left of 300 s after the set-up (60 s more covers its start, yardsticks and last cells).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VITKERN_VENV:-.venv}/bin/activate"
if [ "$#" -eq 0 ] && [ "$(python -c 'import torch; print(torch.cuda.is_available())')" = "False" ]; then
  left=$((300 - ($(date +%s) - start)))
  budget=$((left < 120 ? 120 : (left > 270 ? 270 : left)))
  echo "bench.sh: set-up took $(($(date +%s) - start)) s; benchmark time budget ${budget} s"
  exec python benchmarks/bench_attn.py --time-budget-s "$budget"
fi
exec python benchmarks/bench_attn.py "$@"
