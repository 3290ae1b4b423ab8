// Matrix products over weights in their ggml format.
//
//   gemv_dense_kernel  F32/F16/BF16 weights: each warp owns R output rows; lane l reads 16-byte
//                      vectors l, l+32, ... of each row (coalesced, U vectors in flight per row)
//                      and dots them with up to k_gemv_rows activation rows.
//   gemv_quant_kernel  block formats: each warp owns R output rows and walks them 32 chunks (one
//                      "segment") at a time. Segments come in as coalesced 16-byte cp.async
//                      copies into a 4-deep shared-memory ring per warp; lane l then dequantizes
//                      chunk l of the segment from shared memory.
//   gemv_split_kernel  Q4_0, Q8_0, Q4_K, Q5_K, Q6_K (default; COINFER_GEMV=v2 sends them to
//                      gemv_quant_kernel): several lanes per block, weights read straight from
//                      global, block scales applied once per lane and block; F32 activations, or
//                      with COINFER_GEMV_Q8=1 (Q4_0, Q8_0, Q4_K) int8 activation blocks and
//                      __dp4a (see its comment).
//   gemv_kernel        the first version (one warp per row, byte loads): kept for rows that are
//                      not 16-byte aligned, and as the baseline.
//   In all three the sum of each (row, output) pair is formed in one fixed order whatever n_rows
//   is, so a token's result does not depend on its batch.
//   dequant_kernel     one thread per chunk, writing F32 rows (embedding gather, SGEMM tiles).
//   dequant_f16_kernel the same into F16 (tensor-core tiles).
//   matmul             GEMV below ctx.gemm_min_rows (2 in the backend); from there to 192 rows,
//                      quantized weights go through the fused tensor-core product of
//                      matmul_mma.cu; else F16/BF16 operands (quantized weights dequantized to F16
//                      tiles) through cublasGemmEx with FP32 accumulate (F32 weights: SGEMM).
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_check.h"
#include "matmul.h"
#include "matmul_mma.h"
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
template <int T>
constexpr int segment_bytes() { return 4 * bytes_per_256<T>(); }

// Chunk `lane` of a segment held in shared memory. Q4_0, Q8_0 and Q4_K read it with 2- and
// 16-byte loads; the others go through dq32's byte loads. Same arithmetic as dq32, bit for bit.
template <int T>
__device__ __forceinline__ void dq32_seg(const uint8_t* seg, int lane, float* y) {
    if constexpr (T == WT_Q4_0) {
        const uint16_t* b = reinterpret_cast<const uint16_t*>(seg) + 9 * lane;
        const float d = __half2float(__ushort_as_half(b[0]));
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int q = b[1 + j];
            y[2 * j] = fmul(i2f((q & 0xf) - 8), d);
            y[2 * j + 1] = fmul(i2f(((q >> 8) & 0xf) - 8), d);
            y[2 * j + 16] = fmul(i2f(((q >> 4) & 0xf) - 8), d);
            y[2 * j + 17] = fmul(i2f((q >> 12) - 8), d);
        }
    } else if constexpr (T == WT_Q8_0) {
        const uint16_t* b = reinterpret_cast<const uint16_t*>(seg) + 17 * lane;
        const float d = __half2float(__ushort_as_half(b[0]));
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const uint32_t q = b[1 + j];
            y[2 * j] = fmul(i2f(int8_t(q & 0xff)), d);
            y[2 * j + 1] = fmul(i2f(int8_t(q >> 8)), d);
        }
    } else if constexpr (T == WT_Q4_K) {
        const uint8_t* b = seg + 144 * (lane >> 3);
        const int k = lane & 7;
        const float d = ld_f16(b), dmin = ld_f16(b + 2);
        int sc, mn;
        k4_scale_min(k, b + 4, sc, mn);
        const float d1 = fmul(d, i2f(sc)), m1 = fmul(dmin, i2f(mn));
        const uint4* q = reinterpret_cast<const uint4*>(b + 16 + 32 * (k >> 1));
        const int sh = (k & 1) * 4;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint4 v = q[h];
            const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int l = 0; l < 16; ++l) {
                const int nib = int((u[l >> 2] >> (8 * (l & 3) + sh)) & 0xf);
                y[16 * h + l] = fsub(fmul(d1, i2f(nib)), m1);
            }
        }
    } else {
        dq32<T>(seg, lane, 0, false, y);
    }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const uint32_t sa = uint32_t(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

template <int T, int R>
__global__ void __launch_bounds__(32 * k_gemv_warps)
gemv_quant_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_in, int64_t n_out,
                  const float* __restrict__ x, int64_t n_rows, float* __restrict__ y) {
    constexpr int SEG = segment_bytes<T>();
    constexpr int N16 = SEG / 16 + 2;  // 16-byte slots: a segment may start mid-vector
    constexpr int NS = R == 1 ? 4 : 2;  // segments in flight per warp (cp.async ring)
    __shared__ uint4 buf[k_gemv_warps][NS][R][N16];
    __shared__ float4 xs[k_gemv_warps][32 * 9];  // one segment of activations, chunk-padded
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t o0 = (int64_t(blockIdx.x) * k_gemv_warps + warp) * R;
    if (o0 >= n_out) return;
    const int64_t r0 = int64_t(blockIdx.y) * k_gemv_rows;
    const int nr = int(imin64(k_gemv_rows, n_rows - r0));
    const int64_t n_chunks = n_in / 32;
    const int64_t n_seg = (n_chunks + 31) / 32;
    const uint8_t* rows[R];
#pragma unroll
    for (int k = 0; k < R; ++k) rows[k] = w + imin64(o0 + k, n_out - 1) * row_bytes;
    // Segment s: bytes [s*SEG, min((s+1)*SEG, row_bytes)); rows are 16-byte aligned, so the
    // rounded-out range stays inside the row. Every lane commits one group per segment slot.
    auto issue = [&](int64_t s) {
        if (s < n_seg) {
            const int64_t a0 = (s * SEG) & ~int64_t(15);
            const int n16 = int((imin64((s + 1) * SEG, int64_t(row_bytes)) - a0 + 15) / 16);
#pragma unroll
            for (int k = 0; k < R; ++k)
                for (int idx = lane; idx < n16; idx += 32) cp_async16(&buf[warp][s % NS][k][idx], rows[k] + a0 + 16 * idx);
        }
        cp_async_commit();
    };
    float acc[R][k_gemv_rows];
#pragma unroll
    for (int k = 0; k < R; ++k)
#pragma unroll
        for (int r = 0; r < k_gemv_rows; ++r) acc[k][r] = 0.0f;
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) issue(s);
    for (int64_t s = 0; s < n_seg; ++s) {
        issue(s + NS - 1);
        cp_async_wait<NS - 1>();  // segment s has landed (this lane's part) ...
        __syncwarp();             // ... and every lane's
        const int64_t c = s * 32 + lane;
        const bool live = c < n_chunks;
        float wv[R][32];
        if (live) {
            const int shift = int((s * SEG) & 15);
#pragma unroll
            for (int k = 0; k < R; ++k)
                dq32_seg<T>(reinterpret_cast<const uint8_t*>(buf[warp][s % NS][k]) + shift, lane, wv[k]);
        }
        for (int r = 0; r < nr; ++r) {
            // The segment's activations [s*1024, +1024) of row r, staged through shared memory:
            // read straight from global, lane l's 128-byte chunk would make every 16-byte load
            // of the warp touch 32 cache lines. Padded to 9 vectors a chunk: no bank conflicts.
            __syncwarp();
            const float* xr = x + (r0 + r) * n_in;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int idx = lane + 32 * i;
                const int64_t e = s * 1024 + 4 * int64_t(idx);
                if (e < n_in) xs[warp][(idx >> 3) * 9 + (idx & 7)] = *reinterpret_cast<const float4*>(xr + e);
            }
            __syncwarp();
            if (live) {
                float sk[R];
#pragma unroll
                for (int k = 0; k < R; ++k) sk[k] = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float4 v = xs[warp][lane * 9 + i];
#pragma unroll
                    for (int k = 0; k < R; ++k) {
                        sk[k] = fmaf(wv[k][4 * i], v.x, sk[k]);
                        sk[k] = fmaf(wv[k][4 * i + 1], v.y, sk[k]);
                        sk[k] = fmaf(wv[k][4 * i + 2], v.z, sk[k]);
                        sk[k] = fmaf(wv[k][4 * i + 3], v.w, sk[k]);
                    }
                }
                // acc is indexed by a run-time r: keep it in registers with a static switch.
#pragma unroll
                for (int rr = 0; rr < k_gemv_rows; ++rr)
                    if (rr == r)
#pragma unroll
                        for (int k = 0; k < R; ++k) acc[k][rr] = fadd(acc[k][rr], sk[k]);
            }
        }
        __syncwarp();  // slot s % NS is refilled next iteration
    }
    cp_async_wait<0>();
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

// ---- split-block GEMV (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K) ----
//
// A row is cut into "pieces" of 8 weights (Q4_0: a quarter of a block's nibbles, i.e. values
// 4j..4j+3 and 16+4j..16+4j+3; Q8_0: a quarter of a block) or 16 (Q4_K, Q5_K: 8 bytes of one
// 32-byte nibble group, i.e. 8 values of sub-block 2m and the 8 matching values of sub-block
// 2m+1; Q6_K: 4 bytes l0..l0+3 of a half's ql and qh, i.e. values l0.., 32+l0.., 64+l0..,
// 96+l0.. of the half, each group of 4 with its own int8 scale).
// Lane l of a warp takes pieces l, l+32, ...: 4 lanes share a block, a warp reads whole blocks
// in a row, and the block scale multiplies each lane's partial dot once instead of every weight.
// Activations are read straight from global/L1 as float4 (lanes of a block read adjacent
// vectors, so each load of the warp is coalesced), with no shared-memory staging.
//   FP32 mode (default): weights become exact integer-valued floats (byte permute into the
//     mantissa of 2^23, one FSUB), dotted with the F32 activations; NMSE against the CPU ~1e-14.
//   Q8 mode (COINFER_GEMV_Q8=1; Q4_0, Q8_0, Q4_K): the activation rows are first rounded to int8 blocks of 32 with
//     one F32 scale (quantize_x_q8_kernel, once per call), and pieces are dotted with __dp4a; the
//     scales are applied per piece in FP32. Adds the activation rounding error (NMSE ~3e-5 on
//     Gaussian inputs; logits move by ~1e-2 on quant-base), so it is opt-in.
// Each (row, output) sum is formed in one fixed order whatever n_rows is (batch invariance), and
// the Q8 rounding of a row depends on that row alone.

template <int T>
constexpr int piece_elems() { return T == WT_Q4_0 || T == WT_Q8_0 ? 8 : 16; }

struct RawPiece { uint32_t w[8]; };

__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) { return __ldg(reinterpret_cast<const uint16_t*>(p)); }

template <int T>
__device__ __forceinline__ RawPiece load_piece(const uint8_t* __restrict__ row, int64_t p) {
    RawPiece r{};
    if constexpr (T == WT_Q4_0) {
        const uint8_t* b = row + 18 * (p >> 2) ;
        const int sub = int(p & 3);
        r.w[0] = ld_u16(b);
        r.w[1] = ld_u16(b + 2 + 4 * sub) | (ld_u16(b + 4 + 4 * sub) << 16);
    } else if constexpr (T == WT_Q8_0) {
        const uint8_t* b = row + 34 * (p >> 2);
        const int sub = int(p & 3);
        r.w[0] = ld_u16(b);
        r.w[1] = ld_u16(b + 2 + 8 * sub) | (ld_u16(b + 4 + 8 * sub) << 16);
        r.w[2] = ld_u16(b + 6 + 8 * sub) | (ld_u16(b + 8 + 8 * sub) << 16);
    } else if constexpr (T == WT_Q4_K) {
        const uint8_t* b = row + 144 * (p >> 4);
        const int j = int(p & 15), m = j >> 2, sub = j & 3;
        r.w[0] = __ldg(reinterpret_cast<const uint32_t*>(b));  // d, dmin
        // Scale bytes of sub-blocks 2m, 2m+1 (see k4_scale_min): s[2m-4..], s[2m..], s[2m+4..].
        r.w[1] = ld_u16(b + 4 + (m >= 2 ? 2 * m - 4 : 0));
        r.w[2] = ld_u16(b + 4 + 2 * m);
        r.w[3] = ld_u16(b + 8 + 2 * m);
        const uint2 q = __ldg(reinterpret_cast<const uint2*>(b + 16 + 32 * m + 8 * sub));
        r.w[4] = q.x;
        r.w[5] = q.y;
    } else if constexpr (T == WT_Q5_K) {
        // As Q4_K (super-blocks of 176 bytes, 16-byte aligned in padded rows), plus qh[8sub..+8).
        const uint8_t* b = row + 176 * (p >> 4);
        const int j = int(p & 15), m = j >> 2, sub = j & 3;
        r.w[0] = __ldg(reinterpret_cast<const uint32_t*>(b));
        r.w[1] = ld_u16(b + 4 + (m >= 2 ? 2 * m - 4 : 0));
        r.w[2] = ld_u16(b + 4 + 2 * m);
        r.w[3] = ld_u16(b + 8 + 2 * m);
        const uint2 q = __ldg(reinterpret_cast<const uint2*>(b + 48 + 32 * m + 8 * sub));
        const uint2 h = __ldg(reinterpret_cast<const uint2*>(b + 16 + 8 * sub));
        r.w[4] = q.x;
        r.w[5] = q.y;
        r.w[6] = h.x;
        r.w[7] = h.y;
    } else if constexpr (T == WT_Q6_K) {
        // Super-blocks of 210 bytes: 2-byte aligned only. Piece j: half j / 8, bytes l0 = 4 (j % 8).
        const uint8_t* b = row + 210 * (p >> 4);
        const int j = int(p & 15), half = j >> 3, l0 = 4 * (j & 7);
        const uint8_t* ql = b + 64 * half + l0;
        r.w[0] = ld_u16(ql) | (ld_u16(ql + 2) << 16);
        r.w[1] = ld_u16(ql + 32) | (ld_u16(ql + 34) << 16);
        const uint8_t* qh = b + 128 + 32 * half + l0;
        r.w[2] = ld_u16(qh) | (ld_u16(qh + 2) << 16);
        // int8 scales of the four groups: sc[8 half + l0 / 16 + {0, 2, 4, 6}].
        const uint8_t* sc = b + 192 + 8 * half + (l0 >> 4);
        r.w[3] = uint32_t(__ldg(sc)) | (uint32_t(__ldg(sc + 2)) << 8) | (uint32_t(__ldg(sc + 4)) << 16) |
                 (uint32_t(__ldg(sc + 6)) << 24);
        r.w[4] = ld_u16(b + 208);
    }
    return r;
}

// Byte i of v as the float 2^23 + byte (exact), less `bias`.
__device__ __forceinline__ float byte_f(uint32_t v, int i, float bias) {
    return __fsub_rn(__int_as_float(int(__byte_perm(v, 0x4B000000u, 0x7440u | unsigned(i)))), bias);
}

__device__ __forceinline__ float dot4(float s, const float* f, float4 x) {
    s = fmaf(f[0], x.x, s);
    s = fmaf(f[1], x.y, s);
    s = fmaf(f[2], x.z, s);
    return fmaf(f[3], x.w, s);
}
__device__ __forceinline__ float sum4(float s, float4 x) { return fadd(fadd(fadd(fadd(s, x.x), x.y), x.z), x.w); }

// Q4_K: scales and mins of sub-blocks 2m and 2m+1 of a piece, times d and dmin.
__device__ __forceinline__ void q4k_piece_scales(const RawPiece& r, int m, float* sm) {
    const float d = __half2float(__ushort_as_half(uint16_t(r.w[0] & 0xffff)));
    const float dmin = __half2float(__ushort_as_half(uint16_t(r.w[0] >> 16)));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int a = int(r.w[1] >> (8 * h)) & 0xff, b = int(r.w[2] >> (8 * h)) & 0xff, c = int(r.w[3] >> (8 * h)) & 0xff;
        int sc, mn;
        if (m < 2) {
            sc = b & 63;
            mn = c & 63;
        } else {
            sc = (c & 0xf) | ((a >> 6) << 4);
            mn = (c >> 4) | ((b >> 6) << 4);
        }
        sm[2 * h] = fmul(d, i2f(sc));
        sm[2 * h + 1] = fmul(dmin, i2f(mn));
    }
}

// FP32 mode: the piece's weights as integer-valued floats (f) and its scales (sc).
template <int T>
__device__ __forceinline__ void unpack_piece(const RawPiece& r, int64_t p, float* f, float* sc) {
    if constexpr (T == WT_Q4_0) {
        sc[0] = __half2float(__ushort_as_half(uint16_t(r.w[0])));
        const uint32_t lo = r.w[1] & 0x0F0F0F0Fu, hi = (r.w[1] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[i] = byte_f(lo, i, 8388616.0f);  // 2^23 + 8
            f[4 + i] = byte_f(hi, i, 8388616.0f);
        }
    } else if constexpr (T == WT_Q8_0) {
        sc[0] = __half2float(__ushort_as_half(uint16_t(r.w[0])));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[i] = byte_f(r.w[1] ^ 0x80808080u, i, 8388736.0f);  // signed bytes: 2^23 + 128
            f[4 + i] = byte_f(r.w[2] ^ 0x80808080u, i, 8388736.0f);
        }
    } else if constexpr (T == WT_Q4_K || T == WT_Q5_K) {
        const int m = int(p & 15) >> 2;
        q4k_piece_scales(r, m, sc);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t q = r.w[4 + h];
            uint32_t lo = q & 0x0F0F0F0Fu, hi = (q >> 4) & 0x0F0F0F0Fu;
            if constexpr (T == WT_Q5_K) {  // bit s of qh[l]: the 5th bit of value l of sub-block s
                lo |= ((r.w[6 + h] >> (2 * m)) & 0x01010101u) << 4;
                hi |= ((r.w[6 + h] >> (2 * m + 1)) & 0x01010101u) << 4;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                f[4 * h + i] = byte_f(lo, i, 8388608.0f);
                f[8 + 4 * h + i] = byte_f(hi, i, 8388608.0f);
            }
        }
    } else if constexpr (T == WT_Q6_K) {
        // Group g (values g*32 + l0..): low nibbles of ql (g = 0, 1: bytes l0.., 32+l0..; g = 2, 3:
        // their high nibbles) with bits 2g, 2g+1 of qh on top; minus 32. Scale: d * sc[g].
        const float d = __half2float(__ushort_as_half(uint16_t(r.w[4])));
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const uint32_t l = (g & 2) ? (r.w[g & 1] >> 4) : r.w[g & 1];
            const uint32_t v = (l & 0x0F0F0F0Fu) | (((r.w[2] >> (2 * g)) & 0x03030303u) << 4);
#pragma unroll
            for (int i = 0; i < 4; ++i) f[4 * g + i] = byte_f(v, i, 8388640.0f);  // 2^23 + 32
            sc[g] = fmul(d, i2f(int(int8_t(r.w[3] >> (8 * g)))));
        }
    }
}

// FP32 mode: the piece's contribution to dot(W row, x row).
template <int T>
__device__ __forceinline__ float dot_piece(const float* f, const float* sc, const float* __restrict__ xr, int64_t p) {
    if constexpr (T == WT_Q4_0 || T == WT_Q8_0) {
        const float* xb = xr + 32 * (p >> 2) + (T == WT_Q4_0 ? 4 : 8) * (p & 3);
        const float4 xa = *reinterpret_cast<const float4*>(xb);
        const float4 xc = *reinterpret_cast<const float4*>(xb + (T == WT_Q4_0 ? 16 : 4));
        return fmul(sc[0], dot4(dot4(0.0f, f, xa), f + 4, xc));
    } else if constexpr (T == WT_Q6_K) {
        const int j = int(p & 15);
        const float* xb = xr + 256 * (p >> 4) + 128 * (j >> 3) + 4 * (j & 7);
        float s = 0.0f;
#pragma unroll
        for (int g = 0; g < 4; ++g) s = fmaf(sc[g], dot4(0.0f, f + 4 * g, *reinterpret_cast<const float4*>(xb + 32 * g)), s);
        return s;
    } else {
        const int j = int(p & 15);
        const float* xb = xr + 256 * (p >> 4) + 64 * (j >> 2) + 8 * (j & 3);
        const float4 l0 = *reinterpret_cast<const float4*>(xb), l1 = *reinterpret_cast<const float4*>(xb + 4);
        const float4 h0 = *reinterpret_cast<const float4*>(xb + 32), h1 = *reinterpret_cast<const float4*>(xb + 36);
        const float s_lo = dot4(dot4(0.0f, f, l0), f + 4, l1), s_hi = dot4(dot4(0.0f, f + 8, h0), f + 12, h1);
        const float x_lo = sum4(sum4(0.0f, l0), l1), x_hi = sum4(sum4(0.0f, h0), h1);
        float s = fmul(sc[0], s_lo);
        s = fmaf(-sc[1], x_lo, s);
        s = fmaf(sc[2], s_hi, s);
        return fmaf(-sc[3], x_hi, s);
    }
}

// Q8 mode: the piece's contribution against int8 activations xq with per-32 scales xd.
template <int T>
__device__ __forceinline__ float dot_piece_q8(const RawPiece& r, const int8_t* __restrict__ xq,
                                              const float* __restrict__ xd, int64_t p) {
    if constexpr (T == WT_Q4_0) {
        const int64_t b = p >> 2;
        const int8_t* xb = xq + 32 * b + 4 * (p & 3);
        const int xa = *reinterpret_cast<const int*>(xb), xc = *reinterpret_cast<const int*>(xb + 16);
        const int lo = int(r.w[1] & 0x0F0F0F0Fu), hi = int((r.w[1] >> 4) & 0x0F0F0F0Fu);
        const int s = __dp4a(lo, xa, __dp4a(hi, xc, 0)) - __dp4a(0x08080808, xa, __dp4a(0x08080808, xc, 0));
        return fmul(fmul(__half2float(__ushort_as_half(uint16_t(r.w[0]))), __ldg(xd + b)), i2f(s));
    } else if constexpr (T == WT_Q8_0) {
        const int64_t b = p >> 2;
        const int2 xv = *reinterpret_cast<const int2*>(xq + 32 * b + 8 * (p & 3));
        const int s = __dp4a(int(r.w[1]), xv.x, __dp4a(int(r.w[2]), xv.y, 0));
        return fmul(fmul(__half2float(__ushort_as_half(uint16_t(r.w[0]))), __ldg(xd + b)), i2f(s));
    } else {
        const int j = int(p & 15), m = j >> 2;
        const int64_t e = 256 * (p >> 4) + 64 * m + 8 * (j & 3);
        const int2 xl = *reinterpret_cast<const int2*>(xq + e), xh = *reinterpret_cast<const int2*>(xq + e + 32);
        float sm[4];
        q4k_piece_scales(r, m, sm);
        const int lo0 = int(r.w[4] & 0x0F0F0F0Fu), lo1 = int(r.w[5] & 0x0F0F0F0Fu);
        const int hi0 = int((r.w[4] >> 4) & 0x0F0F0F0Fu), hi1 = int((r.w[5] >> 4) & 0x0F0F0F0Fu);
        const int d_lo = __dp4a(lo0, xl.x, __dp4a(lo1, xl.y, 0)), d_hi = __dp4a(hi0, xh.x, __dp4a(hi1, xh.y, 0));
        const int s_lo = __dp4a(0x01010101, xl.x, __dp4a(0x01010101, xl.y, 0));
        const int s_hi = __dp4a(0x01010101, xh.x, __dp4a(0x01010101, xh.y, 0));
        const int64_t b = e >> 5;
        const float v_lo = fmaf(-sm[1], i2f(s_lo), fmul(sm[0], i2f(d_lo)));
        const float v_hi = fmaf(-sm[3], i2f(s_hi), fmul(sm[2], i2f(d_hi)));
        return fmaf(__ldg(xd + b + 1), v_hi, fmul(__ldg(xd + b), v_lo));
    }
}

// Rounds x [n / 32 blocks of 32] to int8 xq with one scale per block, xd = amax / 127.
__global__ void quantize_x_q8_kernel(const float* __restrict__ x, int64_t n, int8_t* __restrict__ xq,
                                     float* __restrict__ xd) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i - (threadIdx.x & 31) >= n) return;  // whole warps only (n % 32 == 0)
    const float v = x[i];
    float amax = fabsf(v);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float d = amax / 127.0f;
    xq[i] = int8_t(d > 0.0f ? __float2int_rn(v / d) : 0);
    if ((threadIdx.x & 31) == 0) xd[i >> 5] = d;
}

template <int T, int R, bool Q8>
__global__ void __launch_bounds__(32 * k_gemv_warps)
gemv_split_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_in, int64_t n_out,
                  const float* __restrict__ x, const int8_t* __restrict__ xq, const float* __restrict__ xd,
                  int64_t n_rows, float* __restrict__ y) {
    constexpr int U = 4;  // pieces in flight per row and lane
    constexpr int E = piece_elems<T>();
    const int lane = threadIdx.x & 31;
    const int64_t o0 = (int64_t(blockIdx.x) * k_gemv_warps + (threadIdx.x >> 5)) * R;
    if (o0 >= n_out) return;
    const int64_t r0 = int64_t(blockIdx.y) * k_gemv_rows;
    const int nr = int(imin64(k_gemv_rows, n_rows - r0));
    const int64_t n_p = n_in / E;
    const uint8_t* rows[R];
#pragma unroll
    for (int k = 0; k < R; ++k) rows[k] = w + imin64(o0 + k, n_out - 1) * row_bytes;
    float acc[R][k_gemv_rows];
#pragma unroll
    for (int k = 0; k < R; ++k)
#pragma unroll
        for (int r = 0; r < k_gemv_rows; ++r) acc[k][r] = 0.0f;
    for (int64_t p0 = lane; p0 < n_p; p0 += 32 * U) {
        RawPiece raw[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int k = 0; k < R; ++k)
                raw[u][k] = p0 + 32 * u < n_p ? load_piece<T>(rows[k], p0 + 32 * u) : RawPiece{};
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t p = p0 + 32 * u;
            if (p >= n_p) break;
            float f[R][Q8 ? 1 : E], sc[R][4];
            if constexpr (!Q8) {
#pragma unroll
                for (int k = 0; k < R; ++k) unpack_piece<T>(raw[u][k], p, f[k], sc[k]);
            }
#pragma unroll
            for (int r = 0; r < k_gemv_rows; ++r) {
                if (r >= nr) break;
#pragma unroll
                for (int k = 0; k < R; ++k) {
                    float s;
                    if constexpr (Q8) s = dot_piece_q8<T>(raw[u][k], xq + (r0 + r) * n_in, xd + (r0 + r) * (n_in / 32), p);
                    else s = dot_piece<T>(f[k], sc[k], x + (r0 + r) * n_in, p);
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

template <int T>
__global__ void dequant_f16_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_in, int64_t n_rows,
                                   __half* __restrict__ y) {
    const int64_t n_chunks = n_in / 32;
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n_chunks * n_rows) return;
    const int64_t r = i / n_chunks, c = i % n_chunks;
    float v[32];
    dq32<T>(w + r * row_bytes, c, n_in, false, v);
    uint4* out = reinterpret_cast<uint4*>(y + r * n_in + 32 * c);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        uint32_t u[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const __half2 h = __floats2half2_rn(v[8 * q + 2 * j], v[8 * q + 2 * j + 1]);
            u[j] = *reinterpret_cast<const uint32_t*>(&h);
        }
        out[q] = make_uint4(u[0], u[1], u[2], u[3]);
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

void launch_gemv_v1(int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out, const float* x,
                    int64_t n_rows, float* y, cudaStream_t stream) {
    const dim3 grid(unsigned((n_out + k_gemv_warps - 1) / k_gemv_warps),
                    unsigned((n_rows + k_gemv_rows - 1) / k_gemv_rows));
    dispatch_weight_type(type, [&](auto t) {
        gemv_kernel<decltype(t)::value><<<grid, 32 * k_gemv_warps, 0, stream>>>(
            static_cast<const uint8_t*>(w), row_bytes, n_in, n_out, x, n_rows, y);
    });
    CUDA_CHECK_LAUNCH();
}

// COINFER_GEMV=v1 selects the first kernel, COINFER_GEMV=v2 keeps the block formats on the
// segment kernel (gemv_quant_kernel, the fallback for the split kernel), COINFER_GEMV_RPW=1|2 the
// output rows per warp, COINFER_GEMV_Q8=1 int8 activations for the split kernel (for comparisons).
int gemv_version() {
    static const int v = [] {
        const char* e = std::getenv("COINFER_GEMV");
        if (e && std::strcmp(e, "v1") == 0) return 1;
        if (e && std::strcmp(e, "v2") == 0) return 2;
        return 3;
    }();
    return v;
}
bool gemv_q8_enabled() {
    static const bool q8 = [] {
        const char* e = std::getenv("COINFER_GEMV_Q8");
        return e && std::strcmp(e, "1") == 0;
    }();
    return q8;
}

constexpr bool split_supported(int type) {
    return type == WT_Q4_0 || type == WT_Q8_0 || type == WT_Q4_K || type == WT_Q5_K || type == WT_Q6_K;
}

void launch_gemv(const MatmulContext& ctx, int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out,
                 const float* x, int64_t n_rows, float* y, cudaStream_t stream) {
    const bool dense = type == WT_F32 || type == WT_F16 || type == WT_BF16;
    const int64_t elems_per_vec = type == WT_F32 ? 4 : 8;
    // The fast kernels need 16-byte aligned rows, and (dense) whole vectors, (x) float4 rows.
    const bool aligned = reinterpret_cast<uintptr_t>(w) % 16 == 0 && row_bytes % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(x) % 16 == 0 && n_in % 4 == 0 &&
                         (!dense || n_in % elems_per_vec == 0) && (dense || n_in % 32 == 0);
    if (!aligned || gemv_version() == 1) {
        launch_gemv_v1(type, w, row_bytes, n_in, n_out, x, n_rows, y, stream);
        return;
    }
    static const int rpw_env = [] {
        const char* e = std::getenv("COINFER_GEMV_RPW");
        return e ? std::atoi(e) : 0;
    }();
    const auto* wb = static_cast<const uint8_t*>(w);
    if (split_supported(type) && gemv_version() == 3) {
        // Q8 mode needs room in the scratch for the rounded activations: [n_rows, n_in] int8
        // after [n_rows, n_in / 32] F32 scales.
        const int64_t n_x = n_rows * n_in;
        const int64_t xd_floats = (n_x / 32 + 3) / 4 * 4;
        const bool q8 = gemv_q8_enabled() && (type == WT_Q4_0 || type == WT_Q8_0 || type == WT_Q4_K) &&
                        ctx.scratch != nullptr &&
                        int64_t(ctx.scratch_floats) * 4 >= xd_floats * 4 + n_x;
        float* xd = nullptr;
        int8_t* xq = nullptr;
        if (q8) {
            xd = ctx.scratch;
            xq = reinterpret_cast<int8_t*>(ctx.scratch + xd_floats);
            const int threads = 256;
            quantize_x_q8_kernel<<<unsigned((n_x + threads - 1) / threads), threads, 0, stream>>>(x, n_x, xq, xd);
            CUDA_CHECK_LAUNCH();
        }
        // One row per warp: checked on the device at every n_rows; two are faster for some
        // shapes (docs/gpu-tests.md) but were checked at one activation row only.
        const int rpw = rpw_env == 1 || rpw_env == 2 ? rpw_env : 1;
        const dim3 grid(unsigned((n_out + k_gemv_warps * rpw - 1) / (k_gemv_warps * rpw)),
                        unsigned((n_rows + k_gemv_rows - 1) / k_gemv_rows));
        auto go = [&](auto t) {
            constexpr int T = decltype(t)::value;
            constexpr bool has_q8 = T == WT_Q4_0 || T == WT_Q8_0 || T == WT_Q4_K;
            if (has_q8 && q8) {
                if (rpw == 2) gemv_split_kernel<T, 2, has_q8><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, xq, xd, n_rows, y);
                else gemv_split_kernel<T, 1, has_q8><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, xq, xd, n_rows, y);
            } else {
                if (rpw == 2) gemv_split_kernel<T, 2, false><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, xq, xd, n_rows, y);
                else gemv_split_kernel<T, 1, false><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, xq, xd, n_rows, y);
            }
        };
        if (type == WT_Q4_0) go(std::integral_constant<int, WT_Q4_0>{});
        else if (type == WT_Q8_0) go(std::integral_constant<int, WT_Q8_0>{});
        else if (type == WT_Q4_K) go(std::integral_constant<int, WT_Q4_K>{});
        else if (type == WT_Q5_K) go(std::integral_constant<int, WT_Q5_K>{});
        else go(std::integral_constant<int, WT_Q6_K>{});
        CUDA_CHECK_LAUNCH();
        return;
    }
    // Measured at 1 activation row (H100): dense W with n_out < 8192 runs faster with two output
    // rows per warp (4096x4096 F16: 14.7 vs 17.7 us), larger n_out with one (33.3 vs 34.6 us).
    // The block-format kernel also ran faster with two (Q6_K 4096x11008: 34.6 vs 40.7 us; see
    // docs/gpu-tests.md) but that was checked at one activation row only: one stays the default.
    const int rpw = rpw_env == 1 || rpw_env == 2 ? rpw_env : dense && n_out < 8192 ? 2 : 1;
    const dim3 grid(unsigned((n_out + k_gemv_warps * rpw - 1) / (k_gemv_warps * rpw)),
                    unsigned((n_rows + k_gemv_rows - 1) / k_gemv_rows));
    dispatch_weight_type(type, [&](auto t) {
        constexpr int T = decltype(t)::value;
        if constexpr (T == WT_F32 || T == WT_F16 || T == WT_BF16) {
            // COINFER_GEMV_U=8: eight 16-byte vectors in flight per row and lane instead of four.
            static const int u_env = [] {
                const char* e = std::getenv("COINFER_GEMV_U");
                return e ? std::atoi(e) : 0;
            }();
            if (u_env == 8) {
                if (rpw == 2) gemv_dense_kernel<T, 2, 8><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
                else gemv_dense_kernel<T, 1, 8><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
            } else {
                if (rpw == 2) gemv_dense_kernel<T, 2, 4><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
                else gemv_dense_kernel<T, 1, 4><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
            }
        } else {
            if (rpw == 2) gemv_quant_kernel<T, 2><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
            else gemv_quant_kernel<T, 1><<<grid, 32 * k_gemv_warps, 0, stream>>>(wb, row_bytes, n_in, n_out, x, n_rows, y);
        }
    });
    CUDA_CHECK_LAUNCH();
}

void launch_f32_to_16(const float* x, int64_t n, uint16_t* y, bool bf16, cudaStream_t stream) {
    const int threads = 256;
    const unsigned blocks = unsigned((n + 4 * threads - 1) / (4 * threads));
    if (bf16) f32_to_16_kernel<true><<<blocks, threads, 0, stream>>>(x, n, y);
    else f32_to_16_kernel<false><<<blocks, threads, 0, stream>>>(x, n, y);
    CUDA_CHECK_LAUNCH();
}

void launch_dequant_f16(int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_rows, __half* y,
                        cudaStream_t stream) {
    const int64_t n = n_in / 32 * n_rows;
    if (n == 0) return;
    const int threads = 128;
    dispatch_weight_type(type, [&](auto t) {
        dequant_f16_kernel<decltype(t)::value><<<unsigned((n + threads - 1) / threads), threads, 0, stream>>>(
            static_cast<const uint8_t*>(w), row_bytes, n_in, n_rows, y);
    });
    CUDA_CHECK_LAUNCH();
}

// cublasSetStream resets the handle's workspace to the default pool, so it is called only when
// the stream changes: the backend sets a workspace of its own for graph capture.
void bind_stream(cublasHandle_t h, cudaStream_t stream) {
    cudaStream_t cur = nullptr;
    CUBLAS_CHECK(cublasGetStream(h, &cur));
    if (cur != stream) CUBLAS_CHECK(cublasSetStream(h, stream));
}

// y = W x through cublasGemmEx on 16-bit operands with FP32 accumulate. Scratch (as halves):
// [n_rows, n_in] activations, then as many [tile, n_in] dequantized weight rows as fit.
// Returns false (nothing launched) where the scratch is too small or the shape unsuitable.
bool gemm_16(const MatmulContext& ctx, int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out,
             const float* x, int64_t n_rows, float* y, cudaStream_t stream) {
    if (type == WT_F32 || n_in % 32 != 0 || ctx.scratch == nullptr) return false;
    const bool direct = type == WT_F16 || type == WT_BF16;
    if (direct && (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(w) % 16 != 0)) return false;
    const int64_t cap = int64_t(ctx.scratch_floats) * 2;  // halves
    const int64_t x_halves = (n_rows * n_in + 127) / 128 * 128;
    if (x_halves > cap) return false;
    const int64_t tile = direct ? n_out : std::min<int64_t>(n_out, (cap - x_halves) / n_in);
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
            launch_dequant_f16(type, static_cast<const uint8_t*>(w) + o0 * row_bytes, row_bytes, n_in, m, wh, stream);
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

void dequantize_rows(int type, const void* w, size_t row_bytes, int64_t n_in, const int32_t* ids, int64_t n_rows,
                     float* y, cudaStream_t stream) {
    launch_dequant(type, w, row_bytes, n_in, ids, n_rows, y, stream);
}

void matmul(const MatmulContext& ctx, int type, const void* w, size_t row_bytes, int64_t n_in, int64_t n_out,
            const float* x, int64_t n_rows, float* y, cudaStream_t stream) {
    if (n_rows <= 0 || n_out <= 0) return;
    // Quantized weights from gemm_min_rows to k_qmma_max_rows: the fused tensor-core product, which
    // dequantizes in registers and writes no F16 copy of W.
    if (n_rows >= ctx.gemm_min_rows &&
        qmma(type, w, row_bytes, n_in, n_out, x, n_rows, y, ctx.scratch, ctx.scratch_floats, stream))
        return;
    if (n_rows < ctx.gemm_min_rows || ctx.cublas == nullptr) {
        launch_gemv(ctx, type, w, row_bytes, n_in, n_out, x, n_rows, y, stream);
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
        launch_gemv(ctx, type, w, row_bytes, n_in, n_out, x, n_rows, y, stream);
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
