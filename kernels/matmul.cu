// Matrix products. Quantized weights are packed at upload (qpack.h) and go through the fused
// tensor-core product of matmul_mma.cu up to k_qmm_max_rows activation rows (at every n_rows when
// batch-invariant), beyond that dequantized to F16 tiles for cuBLAS. Dense weights:
//
//   gemv_dense_kernel  F32/F16/BF16 weights: each warp owns R output rows; lane l reads 16-byte
//                      vectors l, l+32, ... of each row (coalesced, U vectors in flight per row)
//                      and dots them with up to k_gemv_rows activation rows.
//   gemv_kernel        one warp per row, element loads: rows that are not 16-byte aligned.
//   In both the sum of each (row, output) pair is formed in one fixed order whatever n_rows is,
//   so a token's result does not depend on its batch.
//   dequant_kernel     one thread per chunk, writing F32 rows in the file's format (the embedding
//                      gather, the F32 tiles of the SGEMM fallback).
//   matmul             dense: GEMV below ctx.gemm_min_rows, else cublasGemmEx on F16/BF16
//                      operands with FP32 accumulate (F32 weights: SGEMM).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_check.h"
#include "matmul.h"
#include "matmul_mma.h"
#include "qpack.h"
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


// ---- fast GEMV ----

// Weights are read once per call: stream them past L1 so that the activations stay there.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// Elements of one 16-byte vector of a dense weight row.
template <int T>
__device__ __forceinline__ void unpack16(const uint4 v, float* f) {
    if constexpr (T == WT_F32) {
        f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
        f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
    } else {
        const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if constexpr (T == WT_F16) {
                const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&u[j]));
                f[2 * j] = p.x;
                f[2 * j + 1] = p.y;
            } else {
                f[2 * j] = __uint_as_float(u[j] << 16);
                f[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
            }
        }
    }
}

template <int T, int R, int U>
__global__ void __launch_bounds__(32 * k_gemv_warps)
gemv_dense_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_in, int64_t n_out,
                  const float* __restrict__ x, int64_t n_rows, float* __restrict__ y) {
    constexpr int E = T == WT_F32 ? 4 : 8;  // elements per 16-byte vector
    // U: vectors in flight per row and lane
    const int lane = threadIdx.x & 31;
    const int64_t o0 = (int64_t(blockIdx.x) * k_gemv_warps + (threadIdx.x >> 5)) * R;
    if (o0 >= n_out) return;
    const int64_t r0 = int64_t(blockIdx.y) * k_gemv_rows;
    const int nr = int(imin64(k_gemv_rows, n_rows - r0));
    const int64_t n_vec = n_in / E;
    const uint8_t* rows[R];
#pragma unroll
    for (int k = 0; k < R; ++k) rows[k] = w + imin64(o0 + k, n_out - 1) * row_bytes;  // clamp: loads stay in bounds
    float acc[R][k_gemv_rows];
#pragma unroll
    for (int k = 0; k < R; ++k)
#pragma unroll
        for (int r = 0; r < k_gemv_rows; ++r) acc[k][r] = 0.0f;
    for (int64_t v0 = lane; v0 < n_vec; v0 += 32 * U) {
        uint4 wr[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int k = 0; k < R; ++k)
                wr[u][k] = v0 + 32 * u < n_vec ? ld_stream(rows[k] + (v0 + 32 * u) * 16) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t v = v0 + 32 * u;
            if (v >= n_vec) break;
            float wf[R][E];
#pragma unroll
            for (int k = 0; k < R; ++k) unpack16<T>(wr[u][k], wf[k]);
#pragma unroll
            for (int r = 0; r < k_gemv_rows; ++r) {
                if (r >= nr) break;
                const float4* xr = reinterpret_cast<const float4*>(x + (r0 + r) * n_in + v * E);
                float xv[E];
#pragma unroll
                for (int i = 0; i < E / 4; ++i) {
                    const float4 t = xr[i];
                    xv[4 * i] = t.x; xv[4 * i + 1] = t.y; xv[4 * i + 2] = t.z; xv[4 * i + 3] = t.w;
                }
#pragma unroll
                for (int k = 0; k < R; ++k) {
                    float s = 0.0f;
#pragma unroll
                    for (int i = 0; i < E; ++i) s = fmaf(wf[k][i], xv[i], s);
                    acc[k][r] = fadd(acc[k][r], s);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
        if (o0 + k >= n_out) break;
#pragma unroll
        for (int r = 0; r < k_gemv_rows; ++r) {
            if (r >= nr) break;
            float v = acc[k][r];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v = fadd(v, __shfl_xor_sync(0xffffffffu, v, off));
            if (lane == 0) y[(r0 + r) * n_out + o0 + k] = v;
        }
    }
}

// Bytes of 32 consecutive chunks (one segment) of a block-format row.
// ---- tensor-core path: F16/BF16 operands ----

template <bool BF>
__global__ void f32_to_16_kernel(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ y) {
    const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
    if (i + 4 <= n && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
        const float4 v = *reinterpret_cast<const float4*>(x + i);
        uint16_t h[4];
        const float f[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j)
            h[j] = BF ? __bfloat16_as_ushort(__float2bfloat16_rn(f[j])) : __half_as_ushort(__float2half_rn(f[j]));
        *reinterpret_cast<uint2*>(y + i) = make_uint2(h[0] | (uint32_t(h[1]) << 16), h[2] | (uint32_t(h[3]) << 16));
    } else {
        for (int64_t j = i; j < n; ++j)
            y[j] = BF ? __bfloat16_as_ushort(__float2bfloat16_rn(x[j])) : __half_as_ushort(__float2half_rn(x[j]));
    }
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

// Dense weights (F32, F16, BF16) only. Measured at 1 activation row (H100): W with n_out < 8192
// runs faster with two output rows per warp (4096x4096 F16: 14.7 vs 17.7 us), larger n_out with
// one (33.3 vs 34.6 us).
void launch_gemv(int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out, const float* x,
                 int64_t n_rows, float* y, cudaStream_t stream) {
    const int64_t elems_per_vec = type == WT_F32 ? 4 : 8;
    // The fast kernel needs 16-byte aligned rows of whole vectors and float4 activation rows.
    const bool aligned = reinterpret_cast<uintptr_t>(w) % 16 == 0 && row_bytes % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(x) % 16 == 0 && n_in % 4 == 0 && n_in % elems_per_vec == 0;
    const auto* wb = static_cast<const uint8_t*>(w);
    const int rpw = aligned && n_out < 8192 ? 2 : 1;
    const dim3 grid(unsigned((n_out + k_gemv_warps * rpw - 1) / (k_gemv_warps * rpw)),
                    unsigned((n_rows + k_gemv_rows - 1) / k_gemv_rows));
    auto go = [&](auto t) {
        constexpr int T = decltype(t)::value;
        if (!aligned) gemv_kernel<T><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
        else if (rpw == 2) gemv_dense_kernel<T, 2, 4><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
        else gemv_dense_kernel<T, 1, 4><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
    };
    if (type == WT_F32) go(std::integral_constant<int, WT_F32>{});
    else if (type == WT_F16) go(std::integral_constant<int, WT_F16>{});
    else if (type == WT_BF16) go(std::integral_constant<int, WT_BF16>{});
    else throw std::runtime_error("kernels: GEMV of a non-dense weight type id " + std::to_string(type));
    CUDA_CHECK_LAUNCH();
}

void launch_f32_to_16(const float* x, int64_t n, uint16_t* y, bool bf16, cudaStream_t stream) {
    const int threads = 256;
    const unsigned blocks = unsigned((n + 4 * threads - 1) / (4 * threads));
    if (bf16) f32_to_16_kernel<true><<<blocks, threads, 0, stream>>>(x, n, y);
    else f32_to_16_kernel<false><<<blocks, threads, 0, stream>>>(x, n, y);
    CUDA_CHECK_LAUNCH();
}

void bind_stream(cublasHandle_t h, cudaStream_t stream) {
    cudaStream_t cur = nullptr;
    CUBLAS_CHECK(cublasGetStream(h, &cur));
    if (cur != stream) CUBLAS_CHECK(cublasSetStream(h, stream));
}

// y = W x through cublasGemmEx on 16-bit operands with FP32 accumulate. Scratch (as halves):
// [n_rows, n_in] activations, then (packed quantized W) as many rows of W dequantized to F16 as
// fit, a multiple of 16. Returns false (nothing launched) where the scratch is too small.
bool gemm_16(const MatmulContext& ctx, int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out,
             const float* x, int64_t n_rows, float* y, cudaStream_t stream) {
    if (type == WT_F32 || n_in % 8 != 0 || ctx.scratch == nullptr) return false;
    const bool direct = type == WT_F16 || type == WT_BF16;
    if (direct && (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(w) % 16 != 0)) return false;
    const int64_t cap = int64_t(ctx.scratch_floats) * 2;  // halves
    const int64_t x_halves = (n_rows * n_in + 127) / 128 * 128;
    if (x_halves > cap) return false;
    int64_t tile = n_out;
    if (!direct) {
        tile = std::min<int64_t>(n_out, (cap - x_halves) / n_in);
        if (tile < n_out) tile = tile / 16 * 16;
    }
    if (tile <= 0) return false;
    auto* xh = reinterpret_cast<uint16_t*>(ctx.scratch);
    auto* wh = reinterpret_cast<__half*>(xh + x_halves);
    const bool bf = type == WT_BF16;
    launch_f32_to_16(x, n_rows * n_in, xh, bf, stream);
    const cudaDataType dt = bf ? CUDA_R_16BF : CUDA_R_16F;
    const float one = 1.0f, zero = 0.0f;
    bind_stream(ctx.cublas, stream);
    for (int64_t o0 = 0; o0 < n_out; o0 += tile) {
        const int64_t m = std::min(tile, n_out - o0);
        const void* a = w;
        int64_t lda = int64_t(row_bytes / 2);
        if (direct) {
            a = static_cast<const uint8_t*>(w) + o0 * row_bytes;
        } else {
            qpack_dequant_f16(type, w, n_in, n_out, o0 / 16, (m + 15) / 16, wh, stream);
            a = wh;
            lda = n_in;
        }
        CUBLAS_CHECK(cublasGemmEx(ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(m), int(n_rows), int(n_in), &one, a, dt,
                                  int(lda), xh, dt, int(n_in), &zero, y + o0, CUDA_R_32F, int(n_out),
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    return true;
}

}  // namespace

bool weight_type_is_supported(int type) { return weight_type_supported(type); }

bool weight_type_is_packed(int type) { return qpack_type(type); }

void dequantize_rows(int type, const void* w, size_t row_bytes, int64_t n_in, const int32_t* ids, int64_t n_rows,
                     float* y, cudaStream_t stream) {
    launch_dequant(type, w, row_bytes, n_in, ids, n_rows, y, stream);
}

void matmul(const MatmulContext& ctx, int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out,
            const float* x, int64_t n_rows, float* y, cudaStream_t stream) {
    if (n_rows <= 0 || n_out <= 0) return;
    if (qpack_type(type)) {
        // Packed quantized W: the fused product (no F16 copy of W) up to k_qmm_max_rows and
        // whenever the order of the sums must not depend on n_rows; dequantized tiles + cuBLAS
        // beyond.
        const bool fused = ctx.batch_invariant || n_rows <= k_qmm_max_rows || ctx.cublas == nullptr;
        if (!fused && gemm_16(ctx, type, w, row_bytes, n_in, n_out, x, n_rows, y, stream)) return;
        if (!qmm(type, w, n_in, n_out, x, n_rows, y, ctx.scratch, ctx.scratch_floats, ctx.batch_invariant, stream))
            throw std::runtime_error("kernels: matmul scratch of " + std::to_string(ctx.scratch_floats) +
                                     " floats is too small for " + std::to_string(n_rows) + " rows of " +
                                     std::to_string(n_in));
        return;
    }
    if (n_rows < ctx.gemm_min_rows || ctx.batch_invariant || ctx.cublas == nullptr) {
        launch_gemv(type, w, row_bytes, n_in, n_out, x, n_rows, y, stream);
        return;
    }
    // Column-major view: W is [n_in, n_out] (lda = row stride), x is [n_in, n_rows], y is
    // [n_out, n_rows]; y = W^T x.
    if (gemm_16(ctx, type, w, row_bytes, n_in, n_out, x, n_rows, y, stream)) return;
    bind_stream(ctx.cublas, stream);
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
