#pragma once
// Matrix products with weights kept in their file format (ggml type ids, see quant_dev.cuh),
// and row dequantization (the embedding gather).
#include <cstddef>
#include <cstdint>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

namespace coinfer::kernels {

struct MatmulContext {
    cublasHandle_t cublas = nullptr;
    float* scratch = nullptr;       // F16 activations and split-K partials; the cuBLAS path's dequantized tile
    size_t scratch_floats = 0;
    int64_t gemm_min_rows = 1 << 30;  // dense W: n_rows at or above this use cuBLAS
    bool batch_invariant = false;     // every product sums in an order that does not depend on n_rows
};

// Row stride of a weight matrix on the device: rows padded to 16 bytes, so that every kernel can
// read them with 16-byte copies (a Q6_K row of 11008 elements is 9030 bytes).
constexpr size_t weight_row_stride(size_t row_bytes) { return (row_bytes + 15) / 16 * 16; }

// y[r][o] = dot(W row o, x[r]).  w: dense types (F32, F16, BF16) n_out rows of n_in elements,
// row_bytes apart (a stride: see weight_row_stride); the block-quantized types packed by
// engine/qpack.h (row_bytes unused). x: [n_rows, n_in] F32; y: [n_rows, n_out] F32. With
// ctx.batch_invariant, each row's sums do not depend on n_rows.
void matmul(const MatmulContext& ctx, int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out,
            const float* x, int64_t n_rows, float* y, cudaStream_t stream);

// y[r] = dequantized row ids[r] of w in its file layout, row_bytes apart (never packed: the
// embedding table stays as in the file). ids == nullptr: row r.  y: [n_rows, n_in] F32.
void dequantize_rows(int type, const void* w, size_t row_bytes, int64_t n_in, const int32_t* ids, int64_t n_rows,
                     float* y, cudaStream_t stream);

bool weight_type_is_supported(int type);
// Whether matmul takes `type` packed (qpack.h) rather than in its file layout.
bool weight_type_is_packed(int type);

}  // namespace coinfer::kernels
