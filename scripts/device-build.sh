#!/bin/sh
# Builds the GPU binaries for the device machine (CUDA 13 + cuBLAS, none of our apt packages):
# static libstdc++/libgcc, fmt header-only, static PCRE2/xxhash, so the binaries need only
# glibc, libcuda and the CUDA runtime/cuBLAS. Then stages them with the test models in devrun/
# (ignored by git) for `run` with carry: ["devrun"].
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-device}
if [ ! -d "$BUILD" ]; then
  meson setup "$BUILD" -Dcuda-arch=90 -Dprefer_static=true -Dbuildtype=release \
    "-Dcpp_args=['-DFMT_HEADER_ONLY']" \
    "-Dcpp_link_args=['-static-libstdc++','-static-libgcc','-Wl,--as-needed']"
fi
TARGETS="tests/gpu/test_gpu_ops tests/gpu/test_gpu_e2e examples/coinfer tests/model/test_engine"
ninja -C "$BUILD" -j"${JOBS:-2}" $TARGETS
rm -rf devrun && mkdir -p devrun/bin devrun/models/refs devrun/models/quant/logits devrun/models/quant/logits-dequant-f32
for t in $TARGETS; do cp "$BUILD/$t" devrun/bin/; done
for b in devrun/bin/*; do
  echo "== ldd $b"; ldd "$b" | grep -v -E 'linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl|librt' || true
done
M=${COINFER_TEST_MODELS:-../shared/models}
cp "$M/stories260K.gguf" devrun/models/
cp "$M/refs/stories260K-greedy.json" "$M/refs/tale.txt" devrun/models/refs/
for t in F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q4_K_M; do
  cp "$M/quant/quant-base-$t.gguf" devrun/models/quant/
  [ -f "$M/quant/logits-dequant-f32/$t.json" ] && cp "$M/quant/logits-dequant-f32/$t.json" devrun/models/quant/logits-dequant-f32/
done
cp "$M/quant/logits/F32.json" devrun/models/quant/logits/
du -sh devrun
