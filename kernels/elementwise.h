#pragma once
// Elementwise ops of the FFN.
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

// g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, for i < n.
void swiglu(float* g, const float* u, int64_t n, cudaStream_t stream);

}  // namespace coinfer::kernels
