#!/usr/bin/env bash
# Idempotent set-up on a fresh clone: a virtual environment with every dependency, and the C++ extension built
# in place. VITKERN_VENV picks the environment's folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VITKERN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
python -m pip show torch >/dev/null  # fail here, not later, if torch did not install
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "^WARNING: Location" || true
python -c "import vitkern; print('vitkern', vitkern.__version__, 'backends:', vitkern.available_backends())"
