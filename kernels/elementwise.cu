// SwiGLU: silu(gate) * up, written as the CPU writes it.
#include "cuda_check.h"
#include "elementwise.h"

namespace coinfer::kernels {

namespace {

__global__ void swiglu_kernel(float* __restrict__ g, const float* __restrict__ u, int64_t n) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = g[i];
    g[i] = __fmul_rn(__fdiv_rn(x, __fadd_rn(1.0f, expf(-x))), u[i]);
}

}  // namespace

void swiglu(float* g, const float* u, int64_t n, cudaStream_t stream) {
    if (n <= 0) return;
    swiglu_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(g, u, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
