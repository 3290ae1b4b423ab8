#!/bin/sh
# Builds the GPU binaries for the device machine (CUDA 13 + cuBLAS, none of our apt packages):
# static libstdc++, fmt header-only, prefer_static for PCRE2/xxhash/fmt, so the binaries need
# only glibc (with libgcc_s), libcuda and the CUDA runtime/cuBLAS. The executables are linked
# by nvcc (the kernels library is CUDA), so the static-libstdc++ flags go in cuda_link_args.
# Then stages them with the test models in $STAGE (default devrun/; add it to
# .git/info/exclude if .gitignore does not cover it) for `run` with carry: ["$STAGE"].
#   BUILD=build-device STAGE=devrun MODELS=quant COMPRESS=1 scripts/device-build.sh
# MODELS=quant (default) also stages the quant-base files; MODELS=small only stories260K.
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-device}
STAGE=${STAGE:-devrun}
if [ ! -d "$BUILD" ]; then
  meson setup "$BUILD" -Dcuda-arch=90 -Dcuda-generic=false -Dprefer_static=true -Dbuildtype=release \
    "-Dcpp_args=['-DFMT_HEADER_ONLY']" \
    "-Dcpp_link_args=['-static-libstdc++','-static-libgcc','-Wl,--as-needed']" \
    "-Dcuda_link_args=['-Xcompiler=-static-libstdc++','-Xcompiler=-static-libgcc']"
fi
TARGETS="tests/gpu/test_gpu_ops tests/gpu/test_gpu_e2e tests/gpu/test_multi_gpu examples/coinfer tests/model/test_engine tests/model/test_grammar_vocab"
ninja -C "$BUILD" -j"${JOBS:-2}" $TARGETS
rm -rf "$STAGE" && mkdir -p "$STAGE/bin" "$STAGE/models/refs"
for t in $TARGETS; do cp "$BUILD/$t" "$STAGE/bin/"; strip "$STAGE/bin/$(basename "$t")"; done
# What the binaries still need beyond glibc: only CUDA's libraries (and libgcc_s) should show.
for b in "$STAGE"/bin/*; do
  echo "== ldd $b"; ldd "$b" | grep -v -E 'linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl|librt' || true
done
M=${COINFER_TEST_MODELS:-../shared/models}
cp "$M/stories260K.gguf" "$STAGE/models/"
cp "$M/refs/stories260K-greedy.json" "$M/refs/tale.txt" "$STAGE/models/refs/"
if [ "${MODELS:-quant}" = quant ]; then
  mkdir -p "$STAGE/models/quant/logits" "$STAGE/models/quant/logits-dequant-f32"
  for t in F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q4_K_M; do
    cp "$M/quant/quant-base-$t.gguf" "$STAGE/models/quant/"
    [ -f "$M/quant/logits-dequant-f32/$t.json" ] && cp "$M/quant/logits-dequant-f32/$t.json" "$STAGE/models/quant/logits-dequant-f32/"
  done
  cp "$M/quant/logits/F32.json" "$STAGE/models/quant/logits/"
fi
# COMPRESS=1: gzip the binaries (19 MB -> ~5 MB each) to stay under the 64 MiB carry; the device
# command then starts with `gunzip $STAGE/bin/*.gz && chmod +x $STAGE/bin/*`.
if [ "${COMPRESS:-0}" = 1 ]; then env -u GZIP gzip -6 "$STAGE"/bin/*; fi
du -sh "$STAGE"
