#pragma once
// Tensor-core products over packed quantized weights (qpack.h), dequantized in registers
// (matmul_mma.cu). Internal to kernels/: matmul() routes quantized products here.
#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace coinfer::kernels {

// Up to here the fused product beats dequantize + cuBLAS; beyond, its 16-row warp tiles make it
// compute-bound.
constexpr int64_t k_qmm_max_rows = 192;

// y[r][o] = dot(W row o, x[r]); W: packed (qpack.h) n_out x n_in; x: [n_rows, n_in] F32
// (rounded to F16); y: [n_rows, n_out] F32. scratch: the F16 activations, then room for split-K
// partials (rows go in several launches where it is small). batch_invariant: the same summation
// order for every n_rows. Returns false, launching nothing, for a type without a packed layout or
// a scratch too small for the activations.
bool qmm(int type, const void* w, int64_t n_in, int64_t n_out, const float* x, int64_t n_rows, float* y,
         float* scratch, size_t scratch_floats, bool batch_invariant, cudaStream_t stream);

// Rows [16 row_tile0, 16 (row_tile0 + n_row_tiles)) of a packed matrix as F16 (rounded as qmm
// rounds them), into y: [rows, n_in].
void qpack_dequant_f16(int type, const void* w, int64_t n_in, int64_t n_out, int64_t row_tile0, int64_t n_row_tiles,
                       __half* y, cudaStream_t stream);

}  // namespace coinfer::kernels
