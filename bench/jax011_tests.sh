#!/usr/bin/env bash
# The kernel tests on JAX 0.11.x (the oldest JAX SALT supports, the GPU image's), in a scratch
# virtual environment: SALT's dependencies and the test tools (not the test extra's libtpu pin or
# its Hugging Face / lm-eval extras, which the kernel tests do not use), JAX pinned to 0.11.2 and
# the libtpu it asks for, so the TPU ahead-of-time tests run too. CI tests the newest JAX; this is
# the second job.
#
#   bash bench/jax011_tests.sh [SCRATCH_DIR]      # default /tmp/salt-jax011
#   PYTEST_MARKERS='not slow' bash bench/jax011_tests.sh   # only the tests with those markers
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="${1:-/tmp/salt-jax011}"
PY="${SALT_PYTHON:-python3.12}"
JAX_VERSION="${JAX_VERSION:-0.11.2}"
LIBTPU_VERSION="${LIBTPU_VERSION:-0.0.48.*}"  # what jax 0.11.2's tpu extra asks for
if [ ! -x "$SCRATCH/venv/bin/python" ]; then
  "$PY" -m venv "$SCRATCH/venv"
  "$SCRATCH/venv/bin/pip" install -q --upgrade pip
  CONSTRAINTS="$SCRATCH/constraints.txt"
  printf 'jax==%s\njaxlib==%s\nlibtpu==%s\n' "$JAX_VERSION" "$JAX_VERSION" "$LIBTPU_VERSION" > "$CONSTRAINTS"
  "$SCRATCH/venv/bin/pip" install -q -c "$CONSTRAINTS" -e "$REPO" pytest pytest-xdist hypothesis \
    "libtpu==$LIBTPU_VERSION"
fi
"$SCRATCH/venv/bin/python" -c "import jax; print('jax', jax.__version__)"
cd "$REPO"
markers=()
[ -n "${PYTEST_MARKERS:-}" ] && markers=(-m "$PYTEST_MARKERS")
PYTHONSAFEPATH=1 "$SCRATCH/venv/bin/python" -m pytest -q -n 2 -p no:cacheprovider "${markers[@]}" \
  tests/test_kernels_*.py tests/test_vocab_parallel.py
