#pragma once
// Elementwise ops of the FFN.
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

// g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, for i < n.
void swiglu(float* g, const float* u, int64_t n, cudaStream_t stream);

// The same over rows: out[r][i] = silu(g[r][i]) * u[r][i] for i < n_ff, where g and u rows are
// in_stride floats apart (one fused gate|up output: u = g + n_ff, in_stride = 2 n_ff) and out
// rows n_ff apart.
void swiglu_rows(const float* g, const float* u, int64_t n_rows, int64_t n_ff, int64_t in_stride, float* out,
                 cudaStream_t stream);

}  // namespace coinfer::kernels
