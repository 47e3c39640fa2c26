#!/usr/bin/env bash
# One command for a GPU machine without a package registry (an H100/H200 with torch and triton installed):
#
#   scripts/gpu_check.sh OUT_DIR             # about 8 minutes on an H100/H200
#   scripts/gpu_check.sh --dry-run OUT_DIR   # without a GPU: every step's command, checked on CPU
#
# Steps (each time-boxed; a failing or timed-out step is logged and the next one runs):
#   install   pip install -e . --no-build-isolation --no-deps (the C++ CPU extension is skipped unless
#             GPU_CHECK_BUILD_EXT=1: the GPU steps do not use it); the tree is on PYTHONPATH either way
#   versions  device, driver, torch, triton, CUDA, cuDNN, numpy, compute-sanitizer
#   tests     the CUDA test profiles at the reduced sizes of VITKERN_TEST_QUICK=1 (every dtype and feature),
#             plus tests/test_triton_kernels.py compiled, autotuning off (GPU_CHECK_TEST_AUTOTUNE=1: on)
#   memcheck  compute-sanitizer --tool memcheck on one small forward+backward per kernel family (dense,
#             masked, varlen, dropout; scripts/gpu_memcheck_case.py), where the tool works on this machine
#   bench     benchmarks/bench_gpu.py: bf16 FA3 grid, vit-b16, navit-packed, pit-224 against torch's peers,
#             within the time left
#
# Writes at most 8 files into OUT_DIR: gpu_check.log, tests.log, memcheck.log, bench.log, bench_gpu.json,
# bench_gpu.md, summary.json, summary.md; prints the summary last.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (total seconds, default 480),
# GPU_CHECK_STEPS (default install,versions,tests,memcheck,bench), GPU_CHECK_TEST_WORKERS (pytest-xdist
# workers, default 8), GPU_CHECK_BENCH_ARGS (extra arguments for bench_gpu.py), GPU_CHECK_DRY_RUN=1 (as
# --dry-run).
set -uo pipefail   # no -e: a failing step must not end the run

DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--dry-run] OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
STEPS=",${GPU_CHECK_STEPS:-install,versions,tests,memcheck,bench},"
WORKERS=${GPU_CHECK_TEST_WORKERS:-8}
LOG="$OUT/gpu_check.log"
START=$(date +%s)
# Caches and scratch files live outside OUT_DIR (it must hold 8 files at most).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RECORDS="$WORK/steps.tsv"
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
: > "$RECORDS"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export VITKERN_TRITON_AUTOTUNE_CACHE="$WORK/autotune.json"
unset TRITON_INTERPRET

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$LOG"; }
wanted() { case "$STEPS" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RECORDS"; }   # step, status, seconds, note

# step NAME LIMIT_S STEP_LOG COMMAND...: runs COMMAND under `timeout` for at most LIMIT_S seconds (less when
# the total budget has less left, keeping RESERVE_S for the summary), output appended to STEP_LOG, its tail
# copied into the main log and onto stdout. Sets STEP_RC.
RESERVE_S=15
step() {
  local name=$1 limit=$2 slog=$3
  shift 3
  local left=$(( BUDGET - $(elapsed) - RESERVE_S ))
  [ "$left" -lt "$limit" ] && limit=$left
  STEP_RC=125
  if [ "$limit" -lt 5 ]; then
    log "$name: not run (out of time)"
    record "$name" "not run" 0 "out of time"
    return
  fi
  log "$name: start (at most ${limit} s): $*"
  local t0
  t0=$(date +%s)
  echo "=== $name: $* (at most ${limit} s)" >> "$slog"
  timeout --kill-after=10 "$limit" "$@" >> "$slog" 2>&1
  STEP_RC=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ "$slog" != "$LOG" ]; then
    tail -n 25 "$slog" | sed "s/^/  [$name] /" | tee -a "$LOG"
  fi
  local status=ok
  if [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ]; then status="timed out"; elif [ "$STEP_RC" -ne 0 ]; then status="failed"; fi
  log "$name: $status (exit $STEP_RC, ${dt} s)"
  record "$name" "$status" "$dt" "exit $STEP_RC"
}

skip() { log "$1: skipped ($2)"; record "$1" "skipped" 0 "$2"; }

log "vitkern gpu_check: root $ROOT, out $OUT, budget ${BUDGET} s, python $(command -v "$PY"), dry run $DRY"

# ------------------------------------------------------------------------------------------ install
if ! wanted install; then skip install "not in GPU_CHECK_STEPS"
elif [ "$DRY" = 1 ]; then skip install "dry run: the current environment is left as it is"
else
  VITKERN_NO_EXT=$([ "${GPU_CHECK_BUILD_EXT:-0}" = 1 ] && echo 0 || echo 1) \
    step install 120 "$LOG" "$PY" -m pip install -e . --no-build-isolation --no-deps
fi

# ------------------------------------------------------------------------------------------ versions
if wanted versions; then
  step versions 60 "$WORK/versions.txt" "$PY" - <<'EOF'
import importlib, shutil, subprocess
def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception as e:  # noqa: BLE001
        return f"absent ({type(e).__name__})"
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("triton", version("triton"), "| numpy", version("numpy"), "| vitkern", version("vitkern"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | "
          f"{p.total_memory / 2**30:.1f} GiB")
else:
    print("device: no CUDA device")
import vitkern
print("vitkern backends", vitkern.available_backends(), "from", vitkern.__file__)
for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                   "--format=csv,noheader"]), ("compute-sanitizer", ["--version"]),
                   ("nvcc", ["--version"])):
    path = shutil.which(tool)
    out = subprocess.run([path] + args, capture_output=True, text=True, timeout=20).stdout.strip() if path else ""
    print(f"{tool}: {out.splitlines()[-1] if out else 'not found'}")
EOF
else skip versions "not in GPU_CHECK_STEPS"
fi

# ------------------------------------------------------------------------------------------ tests
if wanted tests; then
  TESTS=()
  for f in tests/test_contract_*.py tests/test_property.py tests/test_segment_ids.py tests/test_triton_kernels.py; do
    [ -f "$f" ] && TESTS+=("$f")
  done
  PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE -k "not reference-cpu and not cpu-cpu")
  if [ "$DRY" = 1 ]; then
    PYTEST+=(--collect-only)
  elif "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ]; then
    PYTEST+=(-n "$WORKERS")
  fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout 150); fi
  VITKERN_TEST_QUICK=1 VITKERN_TRITON_AUTOTUNE=${GPU_CHECK_TEST_AUTOTUNE:-0} \
    step tests 150 "$OUT/tests.log" "${PYTEST[@]}" "${TESTS[@]}"
else skip tests "not in GPU_CHECK_STEPS"
fi

# ------------------------------------------------------------------------------------------ memcheck
FAMILIES=(dense masked varlen dropout)
if ! wanted memcheck; then skip memcheck "not in GPU_CHECK_STEPS"
elif [ "$DRY" = 1 ]; then
  # The case program itself, in Triton's interpreter; the sanitizer only where it is installed.
  TRITON_INTERPRET=1 step memcheck-cases 400 "$OUT/memcheck.log" "$PY" scripts/gpu_memcheck_case.py \
    "${FAMILIES[@]}" --device cpu
  if command -v compute-sanitizer >/dev/null; then log "compute-sanitizer: $(command -v compute-sanitizer)"
  else log "compute-sanitizer: not on PATH here (the GPU machine has it)"; fi
else
  SAN=$(command -v compute-sanitizer)
  [ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
  if [ -z "$SAN" ]; then skip memcheck "compute-sanitizer not found"
  else
    # Compile every kernel once outside the sanitizer (Triton's on-disk cache), so its runs only launch.
    VITKERN_TRITON_AUTOTUNE=0 step memcheck-warm 60 "$OUT/memcheck.log" "$PY" scripts/gpu_memcheck_case.py \
      "${FAMILIES[@]}"
    # The sanitized runs share 120 s (each family at most 75 s), so the benchmark keeps its minutes.
    SAN_END=$(( $(elapsed) + 120 ))
    for fam in "${FAMILIES[@]}"; do
      LIMIT=$(( SAN_END - $(elapsed) ))
      [ "$LIMIT" -gt 75 ] && LIMIT=75
      # No caching allocator: each tensor is its own allocation, so a read past its end is caught.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 VITKERN_TRITON_AUTOTUNE=0 step "memcheck-$fam" "$LIMIT" "$OUT/memcheck.log" \
        "$SAN" --tool memcheck --error-exitcode 3 --print-limit 20 "$PY" scripts/gpu_memcheck_case.py "$fam"
      if grep -q "Device not supported\|Unable to find injection library\|CUDA_ERROR_NOT_SUPPORTED" \
          "$OUT/memcheck.log"; then
        log "compute-sanitizer does not work on this machine (see memcheck.log): the other families are not run"
        break
      fi
    done
  fi
fi

# ------------------------------------------------------------------------------------------ bench
if ! wanted bench; then skip bench "not in GPU_CHECK_STEPS"
else
  # shellcheck disable=SC2206  # word splitting of the extra arguments is intended
  EXTRA=(${GPU_CHECK_BENCH_ARGS:-})
  if [ "$DRY" = 1 ]; then
    step bench 120 "$OUT/bench.log" "$PY" benchmarks/bench_gpu.py --dry-run "${EXTRA[@]}"
  else
    LEFT=$(( BUDGET - $(elapsed) - RESERVE_S ))
    # bench_gpu.py stops starting cases 20 s before the step's limit and writes its files after every case.
    step bench "$LEFT" "$OUT/bench.log" "$PY" benchmarks/bench_gpu.py --out "$OUT" --deadline-s $(( LEFT - 20 )) \
      "${EXTRA[@]}"
  fi
fi

# ------------------------------------------------------------------------------------------ summary
log "summary"
timeout 60 "$PY" - "$OUT" "$RECORDS" "$WORK/versions.txt" "$(elapsed)" "$DRY" <<'EOF' 2>&1 | tee -a "$LOG"
import json, re, sys
from pathlib import Path
out, records, versions, wall, dry = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
steps = [dict(zip(("step", "status", "seconds", "note"), line.split("\t")))
         for line in records.read_text().splitlines() if line.strip()]
ver = [l for l in versions.read_text().strip().splitlines() if not l.startswith("===")] if versions.exists() else []
def tail_line(name, pattern):
    p = out / name
    if not p.exists():
        return None
    hits = [l for l in p.read_text(errors="replace").splitlines() if re.search(pattern, l)]
    return hits[-1].strip() if hits else None
tests = tail_line("tests.log", r"(passed|failed|error|no tests ran|tests? collected)")
fams = []
if (out / "memcheck.log").exists():
    text = (out / "memcheck.log").read_text(errors="replace")
    fams = re.findall(r"^(dense|masked|varlen|dropout) (ok|FAILED)$", text, re.M)
    san = re.findall(r"ERROR SUMMARY: (\d+) error", text)
else:
    san = []
bench_md = out / "bench_gpu.md"
head = []
if bench_md.exists():
    for line in bench_md.read_text().splitlines()[2:]:
        if line.startswith("## Per case"):
            break
        head.append(line)
doc = {"wall_s": wall, "dry_run": dry, "versions": ver, "steps": steps, "tests": tests,
       "memcheck_families": fams, "sanitizer_error_summaries": san,
       "files": sorted(p.name for p in out.iterdir())}
(out / "summary.json").write_text(json.dumps(doc, indent=1))
md = [f"# vitkern gpu_check{' (dry run: no GPU step ran)' if dry else ''}", "", f"Wall time {wall} s.", ""]
md += ["```"] + ver + ["```", "", "| step | status | s | note |", "|---|---|---:|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in steps]
md += ["", f"Tests: {tests or '(no result line)'}",
       f"Memcheck: {', '.join(f'{f} {r}' for f, r in fams) or '(no family ran)'}; sanitizer error summaries: "
       f"{', '.join(san) or '-'}", ""] + head
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
log "done in $(elapsed) s; files in $OUT:" "$(cd "$OUT" && printf '%s ' *)"
