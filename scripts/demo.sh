#!/usr/bin/env bash
# Builds coinfer and runs the multi-client demo on the default model
# (../shared/models/stories260K.gguf, or $COINFER_MODEL): eight coroutine clients streaming
# side by side from one engine, on the GPU when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -d build ] || meson setup build
ninja -C build
model="${COINFER_MODEL:-${COINFER_TEST_MODELS:-../shared/models}/stories260K.gguf}"
if [ ! -f "$model" ]; then
  echo "demo: no model at $model; set COINFER_MODEL=/path/to/model.gguf" >&2
  exit 2
fi
./build/examples/coinfer gguf "$model" | sed -n '/^model:/p;/^tensors:/p'
exec ./build/examples/multi_client -m "$model" "$@"
