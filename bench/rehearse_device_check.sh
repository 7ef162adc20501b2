#!/usr/bin/env bash
# Rehearse bench/device_check.sh on a CPU-only host in an environment shaped like the device image
# (docs/gpu.md): a scratch virtual environment with jax/jaxlib 0.11.2 (CPU) and numpy, no click, no
# SALT installed and no project .venv; the check then runs with PIP_NO_INDEX=1 (no registry), SALT
# from the source tree, click from bench/device_wheels.  Then the GPU kernel's interpret-mode tests
# run on the same jax 0.11.2 (pytest and numba added to the scratch environment for them only).
#
#   bash bench/rehearse_device_check.sh [SCRATCH_DIR]      # default /tmp/salt-rehearsal
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="${1:-/tmp/salt-rehearsal}"
PY="${REHEARSAL_PYTHON:-python3.12}"
JAX_VERSION="${REHEARSAL_JAX:-0.11.2}"
[ -d "$REPO/bench/device_wheels" ] || bash "$REPO/bench/prepare_device_wheels.sh"
if [ ! -x "$SCRATCH/venv/bin/python" ]; then
  "$PY" -m venv "$SCRATCH/venv"
  "$SCRATCH/venv/bin/pip" install -q "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" numpy
fi
if "$SCRATCH/venv/bin/python" -c "import click" 2>/dev/null; then
  echo "note: click is installed in $SCRATCH/venv, so the carried wheel is not exercised" >&2
fi
echo "== device check (no registry) =="
PIP_NO_INDEX=1 PYTHON="$SCRATCH/venv/bin/python" OUT="$SCRATCH/out" bash "$REPO/bench/device_check.sh"

echo "== GPU kernel tests, interpret mode, jax $JAX_VERSION =="
"$SCRATCH/venv/bin/pip" install -q pytest numba ml_dtypes
PKG="$(mktemp -d)"
trap 'rm -rf "$PKG"' EXIT
mkdir "$PKG/salt"
for package in core reference kernels data runtime bench cli; do ln -s "$REPO/$package" "$PKG/salt/$package"; done
cd "$REPO"
PYTHONSAFEPATH=1 PYTHONPATH="$PKG" "$SCRATCH/venv/bin/python" -m pytest -q -p no:cacheprovider \
  -k "not runtime_auto" tests/test_kernels_fused_linear_kd_gpu.py
