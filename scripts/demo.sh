#!/usr/bin/env bash
# Builds coinfer and runs it on the default model (../shared/models/stories260K.gguf, or
# $COINFER_MODEL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -d build ] || meson setup build
ninja -C build
model="${COINFER_MODEL:-${COINFER_TEST_MODELS:-../shared/models}/stories260K.gguf}"
./build/examples/coinfer gguf "$model"
