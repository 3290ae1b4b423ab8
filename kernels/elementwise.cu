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

__global__ void swiglu_rows_kernel(const float* __restrict__ g, const float* __restrict__ u, int64_t n_rows,
                                   int64_t n_ff, int64_t in_stride, float* __restrict__ out) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n_rows * n_ff) return;
    const int64_t r = i / n_ff, c = i % n_ff;
    const float x = g[r * in_stride + c];
    out[i] = __fmul_rn(__fdiv_rn(x, __fadd_rn(1.0f, expf(-x))), u[r * in_stride + c]);
}

}  // namespace

void swiglu_rows(const float* g, const float* u, int64_t n_rows, int64_t n_ff, int64_t in_stride, float* out,
                 cudaStream_t stream) {
    if (n_rows <= 0 || n_ff <= 0) return;
    const int64_t n = n_rows * n_ff;
    swiglu_rows_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(g, u, n_rows, n_ff, in_stride, out);
    CUDA_CHECK_LAUNCH();
}

void swiglu(float* g, const float* u, int64_t n, cudaStream_t stream) {
    if (n <= 0) return;
    swiglu_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(g, u, n);
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
