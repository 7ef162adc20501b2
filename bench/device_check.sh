#!/usr/bin/env bash
# Device check for one NVIDIA GPU (H100 or H200), on the device image AS IT IS: Python 3.12, a
# CUDA-enabled jax 0.11.x or 0.12.x, no registry, the project copied over as source (docs/gpu.md).
#
#   OUT=/some/dir bash bench/device_check.sh
#
# * SALT is made importable from this checkout without installing anything: a temporary folder
#   holds salt/<package> -> ./<package> links (the package-dir map of pyproject.toml) and goes on
#   PYTHONPATH.  Pure-Python wheels in bench/device_wheels/ (bench/prepare_device_wheels.sh) are
#   appended to sys.path after the image's own packages (used only where the image lacks one).
# * Sections (bench/device_check.py): environment; the Pallas GPU kernel in interpret mode on the
#   CPU vs the xla path; then, on a GPU, the compiled kernel vs the xla path, the bf16 matmul rate
#   and forward+backward timings at Liger's shape and the paper's.  Without a GPU the GPU sections
#   are skipped with one line (the rehearsal).  $OUT/device_check.json is rewritten after every
#   section; $OUT/device_check.log holds the output.  Exit status: the Python part's (0: passed).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/device_check_out}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then  # the image's interpreter with jax: python3, else python
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import jax" 2>/dev/null; then PYTHON="$candidate"; break; fi
  done
  PYTHON="${PYTHON:-python3}"
fi
LIMIT_S="${DEVICE_CHECK_LIMIT_S:-540}"   # well inside the device machine's 10 minutes per command
mkdir -p "$OUT"

PKG="$(mktemp -d)"
trap 'rm -rf "$PKG"' EXIT
mkdir "$PKG/salt"
for package in core reference kernels data runtime bench cli; do
  ln -s "$REPO/$package" "$PKG/salt/$package"
done
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export SALT_DEVICE_WHEELS="$REPO/bench/device_wheels"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONSAFEPATH=1   # the checkout's kernels/ folder must not shadow anything
export PYTHONDONTWRITEBYTECODE=1   # write nothing outside $OUT (no __pycache__ in the checkout)
unset JAX_PLATFORMS

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
  > "$OUT/nvidia_smi.csv" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia_smi.csv"

timeout "$LIMIT_S" "$PYTHON" -c '
import glob, os, runpy, sys
sys.path.extend(sorted(glob.glob(os.path.join(os.environ["SALT_DEVICE_WHEELS"], "*.whl"))))
sys.argv = ["device_check"] + sys.argv[1:]
runpy.run_module("salt.bench.device_check", run_name="__main__")
' "$OUT" 2>&1 | tee "$OUT/device_check.log"
status=${PIPESTATUS[0]}
echo "device_check exit status $status" | tee -a "$OUT/device_check.log"
exit "$status"
