#!/usr/bin/env bash
# Download the pure-Python wheels the device check may need on an image without them (today: click,
# for salt.bench.kd_loss) into bench/device_wheels/ (git-ignored; carry it to the device machine).
# Run on a machine with a registry:  bash bench/prepare_device_wheels.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/bench/device_wheels"
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --dest "$DEST" "click>=8.1"
ls -l "$DEST"
