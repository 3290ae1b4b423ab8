// RMSNorm (+ residual add). One block per row; the sum of squares runs in double so that it
// agrees with the CPU reference to the last bits that matter.
#include "cuda_check.h"
#include "norm.h"

namespace coinfer::kernels {

namespace {

constexpr int k_norm_threads = 256;

constexpr int k_norm_regs = 16;  // values a thread keeps in registers: rows up to 4096 in one read

__global__ void __launch_bounds__(k_norm_threads)
rms_norm_kernel(float* __restrict__ x, const float* __restrict__ dx, const int32_t* __restrict__ rows, bool write_x,
                const float* __restrict__ w, float* __restrict__ y, int64_t n, float eps) {
    const int64_t r = blockIdx.x;
    const int64_t s = rows ? rows[r] : r;
    float* xr = x + s * n;
    const float* dr = dx ? dx + s * n : nullptr;
    const bool in_regs = n <= int64_t(k_norm_threads) * k_norm_regs;
    float vals[k_norm_regs];
    double sum = 0.0;
    if (in_regs) {
        // All loads first, then the sum in the same element order as the loop below.
#pragma unroll
        for (int k = 0; k < k_norm_regs; ++k) {
            const int64_t i = threadIdx.x + int64_t(k) * k_norm_threads;
            vals[k] = i < n ? (dr ? __fadd_rn(xr[i], dr[i]) : xr[i]) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < k_norm_regs; ++k) {
            const int64_t i = threadIdx.x + int64_t(k) * k_norm_threads;
            if (i < n) {
                if (dr && write_x) xr[i] = vals[k];
                sum += double(__fmul_rn(vals[k], vals[k]));
            }
        }
    } else {
        for (int64_t i = threadIdx.x; i < n; i += k_norm_threads) {
            float v = xr[i];
            if (dr) {
                v = __fadd_rn(v, dr[i]);
                if (write_x) xr[i] = v;
            }
            sum += double(__fmul_rn(v, v));
        }
    }
    __shared__ double s_sum[k_norm_threads / 32];
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if ((threadIdx.x & 31) == 0) s_sum[threadIdx.x >> 5] = sum;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < k_norm_threads / 32; ++i) total += s_sum[i];
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(float(total / double(n)), eps)));
    float* yr = y + r * n;
    if (in_regs) {
#pragma unroll
        for (int k = 0; k < k_norm_regs; ++k) {
            const int64_t i = threadIdx.x + int64_t(k) * k_norm_threads;
            if (i < n) yr[i] = __fmul_rn(__fmul_rn(vals[k], scale), w[i]);
        }
        return;
    }
    for (int64_t i = threadIdx.x; i < n; i += k_norm_threads) {
        // When x is not written back, re-form the sum (same bits as above).
        const float v = dr && !write_x ? __fadd_rn(xr[i], dr[i]) : xr[i];
        yr[i] = __fmul_rn(__fmul_rn(v, scale), w[i]);
    }
}

}  // namespace

void rms_norm(float* x, const float* dx, const int32_t* rows, bool write_x, const float* w, float* y, int64_t n_rows,
              int64_t n, float eps, cudaStream_t stream) {
    if (n_rows <= 0) return;
    rms_norm_kernel<<<unsigned(n_rows), k_norm_threads, 0, stream>>>(x, dx, rows, write_x, w, y, n, eps);
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
