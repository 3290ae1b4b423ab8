// Matrix products over weights in their ggml format.
//
//   gemv_kernel    one warp per output row, lanes striding over 32-element chunks of the row; it
//                  dequantizes each chunk once into registers and dots it with up to k_gemv_rows
//                  activation rows. The sum of each (row, output) pair is formed in one fixed
//                  order whatever n_rows is, so a token's result does not depend on its batch.
//   dequant_kernel one thread per chunk, writing F32 rows (embedding gather, cuBLAS tiles).
//   matmul         GEMV below ctx.gemm_min_rows, else F32 tiles of W + cublasSgemm.
#include <algorithm>



#include "cuda_check.h"
#include "matmul.h"
#include "quant_dev.cuh"

namespace coinfer::kernels {

namespace {

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int k_gemv_rows = 8;   // activation rows per pass over the weights
constexpr int k_gemv_warps = 4;  // output rows per block

template <int T>
__global__ void __launch_bounds__(32 * k_gemv_warps)
gemv_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_in, int64_t n_out,
            const float* __restrict__ x, int64_t n_rows, float* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int64_t o = int64_t(blockIdx.x) * k_gemv_warps + (threadIdx.x >> 5);
    if (o >= n_out) return;
    const int64_t r0 = int64_t(blockIdx.y) * k_gemv_rows;
    const int nr = int(imin64(k_gemv_rows, n_rows - r0));
    const uint8_t* row = w + o * row_bytes;
    const int64_t n_chunks = (n_in + 31) / 32;
    const bool w_vec = (row_bytes % 16) == 0 && (n_in % 32) == 0;
    const bool x_vec = (n_in % 4) == 0;
    float acc[k_gemv_rows];
#pragma unroll
    for (int r = 0; r < k_gemv_rows; ++r) acc[r] = 0.0f;
    for (int64_t c = lane; c < n_chunks; c += 32) {
        float wv[32];
        dq32<T>(row, c, n_in, w_vec, wv);
        const int lim = int(imin64(32, n_in - 32 * c));
#pragma unroll
        for (int r = 0; r < k_gemv_rows; ++r) {
            if (r >= nr) break;
            const float* xr = x + (r0 + r) * n_in + 32 * c;
            float s = 0.0f;
            if (x_vec && lim == 32) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float4 v = reinterpret_cast<const float4*>(xr)[i];
                    s = fmaf(wv[4 * i], v.x, s);
                    s = fmaf(wv[4 * i + 1], v.y, s);
                    s = fmaf(wv[4 * i + 2], v.z, s);
                    s = fmaf(wv[4 * i + 3], v.w, s);
                }
            } else {
                for (int i = 0; i < lim; ++i) s = fmaf(wv[i], xr[i], s);
            }
            acc[r] = fadd(acc[r], s);
        }
    }
#pragma unroll
    for (int r = 0; r < k_gemv_rows; ++r) {
        if (r >= nr) break;
        float v = acc[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v = fadd(v, __shfl_xor_sync(0xffffffffu, v, off));
        if (lane == 0) y[(r0 + r) * n_out + o] = v;
    }
}

template <int T>
__global__ void dequant_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_in,
                               const int32_t* __restrict__ ids, int64_t n_rows, float* __restrict__ y) {
    const int64_t n_chunks = (n_in + 31) / 32;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n_chunks * n_rows) return;
    const int64_t r = i / n_chunks, c = i % n_chunks;
    const int64_t src = ids ? ids[r] : r;
    float v[32];
    const bool w_vec = (row_bytes % 16) == 0 && (n_in % 32) == 0;
    dq32<T>(w + src * row_bytes, c, n_in, w_vec, v);
    float* out = y + r * n_in + 32 * c;
    const int lim = int(imin64(32, n_in - 32 * c));
    for (int k = 0; k < lim; ++k) out[k] = v[k];
}

void launch_dequant(int type, const void* w, size_t row_bytes, int64_t n_in, const int32_t* ids, int64_t n_rows,
                    float* y, cudaStream_t stream) {
    const int64_t n = (n_in + 31) / 32 * n_rows;
    if (n == 0) return;
    const int threads = 128;
    dispatch_weight_type(type, [&](auto t) {
        dequant_kernel<decltype(t)::value><<<unsigned((n + threads - 1) / threads), threads, 0, stream>>>(
            static_cast<const uint8_t*>(w), row_bytes, n_in, ids, n_rows, y);
    });
    CUDA_CHECK_LAUNCH();
}

void launch_gemv(int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out, const float* x,
                 int64_t n_rows, float* y, cudaStream_t stream) {
    const dim3 grid(unsigned((n_out + k_gemv_warps - 1) / k_gemv_warps),
                    unsigned((n_rows + k_gemv_rows - 1) / k_gemv_rows));
    dispatch_weight_type(type, [&](auto t) {
        gemv_kernel<decltype(t)::value><<<grid, 32 * k_gemv_warps, 0, stream>>>(
            static_cast<const uint8_t*>(w), row_bytes, n_in, n_out, x, n_rows, y);
    });
    CUDA_CHECK_LAUNCH();
}

}  // namespace

bool weight_type_is_supported(int type) { return weight_type_supported(type); }

void dequantize_rows(int type, const void* w, size_t row_bytes, int64_t n_in, const int32_t* ids, int64_t n_rows,
                     float* y, cudaStream_t stream) {
    launch_dequant(type, w, row_bytes, n_in, ids, n_rows, y, stream);
}

void matmul(const MatmulContext& ctx, int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out,
            const float* x, int64_t n_rows, float* y, cudaStream_t stream) {
    if (n_rows <= 0 || n_out <= 0) return;
    if (n_rows < ctx.gemm_min_rows || ctx.cublas == nullptr) {
        launch_gemv(type, w, row_bytes, n_in, n_out, x, n_rows, y, stream);
        return;
    }
    // Column-major view: W is [n_in, n_out] (lda = row stride), x is [n_in, n_rows], y is
    // [n_out, n_rows]; y = W^T x.
    CUBLAS_CHECK(cublasSetStream(ctx.cublas, stream));
    const float one = 1.0f, zero = 0.0f;
    if (type == WT_F32 && row_bytes % sizeof(float) == 0) {
        CUBLAS_CHECK(cublasSgemm(ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(n_out), int(n_rows), int(n_in), &one,
                                 static_cast<const float*>(w), int(row_bytes / sizeof(float)), x, int(n_in), &zero, y,
                                 int(n_out)));
        return;
    }
    const int64_t tile = std::min<int64_t>(n_out, int64_t(ctx.scratch_floats) / std::max<int64_t>(n_in, 1));
    if (tile <= 0) {
        launch_gemv(type, w, row_bytes, n_in, n_out, x, n_rows, y, stream);
        return;
    }
    for (int64_t o0 = 0; o0 < n_out; o0 += tile) {
        const int64_t m = std::min(tile, n_out - o0);
        launch_dequant(type, static_cast<const uint8_t*>(w) + o0 * row_bytes, row_bytes, n_in, nullptr, m,
                       ctx.scratch, stream);
        CUBLAS_CHECK(cublasSgemm(ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(m), int(n_rows), int(n_in), &one,
                                 ctx.scratch, int(n_in), x, int(n_in), &zero, y + o0, int(n_out)));
    }
}

}  // namespace coinfer::kernels
