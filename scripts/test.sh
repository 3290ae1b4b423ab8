#!/usr/bin/env bash
# Builds coinfer and runs every test suite (unit, model, gpu), then the GGUF reader's tests and
# the engine's cancellation tests again under AddressSanitizer + UndefinedBehaviorSanitizer, and
# the engine's tests under ThreadSanitizer.
# Ends with "N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --test
jobs="${COINFER_JOBS:-$(nproc)}"

[ -d build ] || meson setup build
ninja -C build -j "$jobs"
status=0
meson test -C build --no-rebuild --print-errorlogs --num-processes "$jobs" || status=1

# Sanitizer build: the file reader's tests and the engine's cancellation cases.
san_tests=(test_gguf test_gguf_fuzz test_engine_cancel)
san_targets=(tests/unit/test_gguf tests/unit/test_gguf_fuzz tests/model/test_engine)
[ -d build-asan ] || meson setup build-asan -Dbuildtype=debugoptimized -Db_sanitize=address,undefined \
  -Db_lundef=false -Dcuda=disabled >/dev/null
ninja -C build-asan -j "$jobs" "${san_targets[@]}"
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
  meson test -C build-asan --no-rebuild --print-errorlogs "${san_tests[@]}" || status=1

# ThreadSanitizer build: the async engine's tests (threads submitting at once, cancellation from
# other threads and slots, shutdown while streams run, the soak with injected faults), which must
# come out clean.
[ -d build-tsan ] || meson setup build-tsan -Dbuildtype=debugoptimized -Db_sanitize=thread \
  -Db_lundef=false -Dcuda=disabled >/dev/null
ninja -C build-tsan -j "$jobs" tests/model/test_engine
TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
  meson test -C build-tsan --no-rebuild --print-errorlogs test_engine test_engine_soak || status=1

python3 scripts/test_summary.py build/meson-logs/testlog.json build-asan/meson-logs/testlog.json \
  build-tsan/meson-logs/testlog.json
exit $status
