#!/usr/bin/env bash
# Two outside projects against coinfer, each running a completion on stories260K:
#  - CMake: `meson install` of the library (shared) into a temporary prefix, then
#    find_package(coinfer) / coinfer::coinfer;
#  - meson: coinfer as a subproject (tests and examples of coinfer off by default there).
# usage: run.sh SOURCE_ROOT MODEL.gguf   (exit 77 when the model or a tool is missing)
set -euo pipefail
src=$(cd "$1" && pwd)
model=$2
[ -n "${COINFER_TEST_MODELS:-}" ] && [ -f "$COINFER_TEST_MODELS/stories260K.gguf" ] && model=$COINFER_TEST_MODELS/stories260K.gguf
if [ ! -f "$model" ]; then echo "SKIP: no model at $model"; exit 77; fi
for t in meson ninja pkg-config cmake; do
  command -v $t >/dev/null || { echo "SKIP: $t not found"; exit 77; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
jobs=${COINFER_JOBS:-$(nproc)}

echo "== meson install (shared library, no CUDA, no tests or examples) into $work/prefix"
meson setup "$work/build-lib" "$src" --prefix="$work/prefix" --libdir=lib -Ddefault_library=shared \
  -Dtests=disabled -Dexamples=disabled -Dcuda=disabled -Dbuildtype=release >/dev/null
ninja -C "$work/build-lib" -j "$jobs" install >/dev/null
test -f "$work/prefix/include/coinfer/coinfer.hpp"
test -f "$work/prefix/lib/pkgconfig/coinfer.pc"
test ! -e "$work/prefix/bin/coinfer"  # examples off: no program installed

echo "== CMake consumer (find_package(coinfer))"
cmake -S "$src/tests/consumers/cmake" -B "$work/build-cmake" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/build-cmake" -j "$jobs" >/dev/null
LD_LIBRARY_PATH="$work/prefix/lib" "$work/build-cmake/consumer" "$model"

echo "== meson consumer (coinfer as a subproject)"
cp -r "$src/tests/consumers/meson" "$work/meson-consumer"
cp "$src/tests/consumers/consumer.cpp" "$work/meson-consumer/"
mkdir -p "$work/meson-consumer/subprojects"
ln -s "$src" "$work/meson-consumer/subprojects/coinfer"
meson setup "$work/build-meson" "$work/meson-consumer" -Dcoinfer:cuda=disabled >/dev/null
ninja -C "$work/build-meson" -j "$jobs" >/dev/null
# coinfer's own program, demos and tests are not built inside a parent project.
if find "$work/build-meson/subprojects" -name 'test_engine' -o -name 'multi_client' | grep -q .; then
  echo "FAIL: the subproject built coinfer's tests or demos"; exit 1
fi
"$work/build-meson/consumer" "$model"
echo "consumers: both built and ran"
