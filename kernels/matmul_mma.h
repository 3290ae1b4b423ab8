#pragma once
// Tensor-core products over block-quantized weights, dequantized in registers (matmul_mma.cu).
// Internal to kernels/: matmul() routes products of quantized weights from gemm_min_rows to
// k_qmma_max_rows here.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

// Up to here the fused product beats dequantize + cuBLAS (H100, 4096x11008, Q4_0: 78.8 vs 114.7 us
// at 192 rows, 127.6 vs 115.6 at 256): beyond, its 16-row warp tiles make it compute-bound.
constexpr int64_t k_qmma_max_rows = 192;

// Whether qmma takes this product: a block-quantized type, rows <= k_qmma_max_rows, W and its
// row stride 16-byte aligned (the CUDA backend pads rows at upload).
bool qmma_supported(int type, const void* w, size_t stride, int64_t n_in, int64_t n_rows);

// y[r][o] = dot(W row o, x[r]); W: n_out rows, `stride` bytes apart; x: [n_rows, n_in] F32
// (rounded to F16); y: [n_rows, n_out] F32. scratch: the F16 activations, then room for split-K
// partial sums (fewer splits where it is small). Returns false, launching nothing, where
// qmma_supported says no or the scratch cannot hold the activations.
bool qmma(int type, const void* w, size_t stride, int64_t n_in, int64_t n_out, const float* x, int64_t n_rows,
          float* y, float* scratch, size_t scratch_floats, cudaStream_t stream);

}  // namespace coinfer::kernels
