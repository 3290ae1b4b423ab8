#!/bin/sh
# Long-context decode and prefill figures (docs/perf.md, "Long context"): TinyLlama-1.1B and
# Llama-2-7B shapes (F16 weights, context raised to 20,480 with :ctx=) at 1,024 / 4,096 / 16,384
# prompt tokens, 1 / 16 / 64 sequences, F16 and q8_0 KV caches; the lines that matter only.
#   sh scripts/bench-long-context.sh [path/to/coinfer] [decode|prefill|all]
set -u
B=${1:-build/examples/coinfer}
WHAT=${2:-all}
T=synthetic:tinyllama-1.1b:f16:ctx=20480
L=synthetic:llama2-7b:f16:ctx=20480
run() {
  echo "== coinfer bench --device cuda --mode batched $*"
  "$B" bench --device cuda --mode batched "$@" 2>&1 |
    grep -E '^cuda: KV|^\| +[0-9]|skipped|TG KV|error' || true
}
if [ "$WHAT" != prefill ]; then
  run -m $T --batches 1,16,64 --pp 1024 --tg 128
  run -m $T --batches 1,16,64 --pp 4096 --tg 64
  run -m $T --batches 1,16,64 --pp 16384 --tg 32
  run -m $T --batches 64 --pp 4096 --tg 64 --kv-type q8_0
  run -m $L --batches 1,16,64 --pp 1024 --tg 128
  run -m $L --batches 1,16 --pp 4096 --tg 64
  run -m $L --batches 16,64 --pp 4096 --tg 64 --kv-type q8_0
  run -m $L --batches 1 --pp 16384 --tg 32
fi
if [ "$WHAT" != decode ]; then
  for pp in 512 4096 16384; do
    run -m $T --batches 1 --pp $pp --tg 4
    run -m $L --batches 1 --pp $pp --tg 4
  done
fi
