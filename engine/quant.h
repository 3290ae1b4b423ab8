#pragma once
// CPU reference for ggml weight formats: dequantization, quantization (for synthetic models and
// tests) and the dot products / matmul of the CPU forward pass.
//
// Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
// Dequantization is bit-identical to ggml's own (and gguf-py's) dequantizers.
//
// Determinism: every dot product of a weight row with an x row is summed in one fixed order
// (16 strided partial sums, then a fixed tree), whatever the batch size, thread count or call
// (vec_dot_row and matmul give the same bits). The engine library is built with
// -ffp-contract=off so that no build fuses multiply-adds differently.
#include <cstddef>
#include <cstdint>

#include "io/ggml_types.h"

namespace coinfer {

// ---- scalar conversions (exact, IEEE) ----
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);  // round to nearest even; NaN stays a (quiet) NaN
float bf16_to_fp32(uint16_t b);
uint16_t fp32_to_bf16(float f);  // round to nearest even; NaN stays a (quiet) NaN

// True for the formats dequantize_row / vec_dot_row / matmul handle.
bool quant_supported(GgmlType type);
// True for the formats quantize_row handles (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
// Q5_K, Q6_K).
bool quantize_supported(GgmlType type);

// Elements per block (1 for F32/F16/BF16). Throws coinfer::Error for unsupported types.
int64_t quant_block_size(GgmlType type);
// Bytes of a row of n elements. Throws coinfer::Error for unsupported types or when n is not a
// multiple of the block size.
size_t quant_row_bytes(GgmlType type, int64_t n);

// dst[0..n) = the values of one row (n a multiple of the block size, else coinfer::Error).
void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n);

// src[0..n) -> one row in `type`. Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 follow ggml's reference
// quantizers byte for byte; Q4_K, Q5_K and Q6_K use simple min/max schemes of their own.
void quantize_row(GgmlType type, const float* src, void* dst, int64_t n);

// Q4_K / Q5_K: scale and min (6 bits each) of sub-block j (0..7) from a super-block's 12 packed
// bytes. j < 4: low 6 bits of bytes j and j+4; j >= 4: a nibble of byte j+4 plus the top 2 bits
// of bytes j-4 (scale) and j (min).
void k4_scale_min(int j, const uint8_t* s, int& sc, int& mn);

// dot(dequant(row), x) in float, without materialising more than one block of the row.
float vec_dot_row(GgmlType type, const void* row, const float* x, int64_t n);

// y[r][o] = dot(W row o, x[r]) for r < n_rows_x, o < n_out.
//   w: n_out rows of n_in elements in `type` (GGUF ne = [n_in, n_out])
//   x: [n_rows_x, n_in]   y: [n_rows_x, n_out]
// Each y value has the same bits as vec_dot_row(type, row o, x[r], n_in), for any n_rows_x and
// n_threads. n_threads > 1 splits the output rows over that many std::threads.
void matmul(GgmlType type, const void* w, int64_t n_in, int64_t n_out, const float* x,
            int64_t n_rows_x, float* y, int n_threads = 1);

}  // namespace coinfer
