#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: every backend built here against the float64 contract,
# then the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (tiny sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VITKERN_VENV:-.venv}/bin/activate"
python -m vitkern.info  # what this run tests: versions, backends, build flags, kernel paths
# setup.py installs without the extension when it does not compile (users without a compiler still get the
# reference backend); a test run must not pass that way, with the C++ kernels untested.
if [ "${VITKERN_DISABLE_EXT:-0}" != "1" ]; then
  python -c "import vitkern, sys; sys.exit(0 if 'cpu' in vitkern.available_backends() else
    'scripts/test.sh: the C++ extension did not build, so the cpu backend is off; run python setup.py build_ext --inplace for the compiler errors')"
fi
python -m pytest -q -p no:cacheprovider tests "$@"
TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/test_contract_sdpa.py tests/test_contract_varlen.py \
  tests/test_property.py tests/test_contract_nan.py tests/test_triton_kernels.py tests/test_triton_autotune.py \
  tests/test_triton_host.py tests/test_segment_ids.py "$@"
