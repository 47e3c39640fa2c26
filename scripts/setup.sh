#!/usr/bin/env bash
# Idempotent set-up on a fresh clone: a virtual environment with every dependency, and the C++ extension built
# in place. VITKERN_VENV picks the environment's folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VITKERN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  # torch with torchvision takes ~6 GB here; a full disk otherwise surfaces as a pip OSError halfway through.
  need_kb=$((7 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt "$need_kb" ]; then
    echo "scripts/setup.sh: the new environment $venv needs about 7 GB of free disk; $((free_kb / 1024)) MB are free here" >&2
    exit 1
  fi
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
python -m pip show torch >/dev/null  # fail here, not later, if torch did not install
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "^WARNING: Location" || true
python -c "import vitkern; print('vitkern', vitkern.__version__, 'backends:', vitkern.available_backends())"
