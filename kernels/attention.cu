// Paged attention, flash-decoding style, in two kernels by cache type:
//
// F16, q8_0 and fp8 caches: flash_kernel, on tensor cores. One CUDA block per (item, KV head,
//   split), where an item is one decode token or a run of up to 64 / G consecutive prompt tokens
//   of one sequence (G = n_head / n_head_kv): its query rows are the item's tokens x the GQA
//   group's heads, so each K/V tile is read from the cache once for all of them. Tiles of 64
//   positions come into shared memory as F16 through a two-stage cp.async ring (quantized
//   caches: their codes, then converted to F16 in shared memory); S = Q K^T and O += P V are
//   mma.sync m16n8k16 with F32 accumulation, the softmax is online in registers (base 2, the
//   scale folded into Q). Above 16 rows the 4 warps take 16 rows each; up to 16 rows (decode)
//   they take 16 positions of each tile each and are merged at the end. A split writes its
//   output directly when it is alone, else (m, l, o[hd]) for flash_merge_kernel.
// F32 caches: split_kernel, one block per (token, KV head, split) in F32 on CUDA cores (the
//   exact reference path), merge_kernel for tokens with several splits.
//
// Splits: a token or item walks ceil(tiles / max_splits) tiles per split. max_splits fills the
// GPU (from the number of items) unless the caller is batch-invariant; then it is 16 and a
// token's result depends only on its own context.
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <string>

#include "attention.h"
#include "cuda_check.h"
#include "mma.cuh"

namespace coinfer::kernels {

namespace {

constexpr int k_attn_threads = 128;
constexpr int k_attn_tile = 64;        // positions per shared-memory tile
constexpr int k_attn_max_splits = 16;  // splits per token at most
constexpr int k_max_head_dim = 256;

// Tiles per split for a context of n_ctx positions.
__host__ __device__ inline int tiles_per_split(int n_ctx) {
    const int n_tiles = (n_ctx + k_attn_tile - 1) / k_attn_tile;
    return (n_tiles + k_attn_max_splits - 1) / k_attn_max_splits;
}

__host__ __device__ inline int n_splits_for(int n_ctx) {
    const int n_tiles = (n_ctx + k_attn_tile - 1) / k_attn_tile, per = tiles_per_split(n_ctx);
    return (n_tiles + per - 1) / per;
}

// q's share of shared memory, rounded to whole 16-byte vectors so the tiles after it stay aligned.
__host__ __device__ inline int q_floats(int group, int hd) { return (group * hd + 3) / 4 * 4; }

__host__ __device__ inline size_t smem_floats(int group, int hd) {
    // q [G][hd] | K tile [T][hd + 4] (padded: 16-byte rows, and the float4 reads of 8 threads
    // of consecutive rows fall in distinct banks) | V tile [T][hd] | p [G][T] | m, l, rescale [3][G]
    return q_floats(group, hd) + size_t(k_attn_tile) * (hd + 4) + size_t(k_attn_tile) * hd +
           size_t(group) * k_attn_tile + 3 * size_t(group);
}

// Stages rows [p0, p0 + len) of one KV head of an F32 cache into sk (padded) and sv.
__device__ __forceinline__ void load_tile(const float* __restrict__ k_cache, const float* __restrict__ v_cache,
                                          const int32_t* __restrict__ table, int block_size, int64_t n_kv,
                                          int64_t head_off, int hd, int p0, int len, float* sk, float* sv) {
    if (hd % 4 == 0) {
        const int vec_per_row = hd / 4;
        for (int idx = threadIdx.x; idx < len * vec_per_row; idx += k_attn_threads) {
            const int j = idx / vec_per_row, c = idx % vec_per_row;
            const int pos = p0 + j;
            const int64_t slot = int64_t(table[pos / block_size]) * block_size + pos % block_size;
            const int64_t off = slot * n_kv + head_off + int64_t(c) * 4;
            *reinterpret_cast<float4*>(sk + j * (hd + 4) + c * 4) = *reinterpret_cast<const float4*>(k_cache + off);
            *reinterpret_cast<float4*>(sv + j * hd + c * 4) = *reinterpret_cast<const float4*>(v_cache + off);
        }
    } else {
        // Odd head sizes: one element per thread.
        for (int idx = threadIdx.x; idx < len * hd; idx += k_attn_threads) {
            const int j = idx / hd, i = idx % hd;
            const int pos = p0 + j;
            const int64_t slot = int64_t(table[pos / block_size]) * block_size + pos % block_size;
            const int64_t off = slot * n_kv + head_off + i;
            sk[j * (hd + 4) + i] = k_cache[off];
            sv[j * hd + i] = v_cache[off];
        }
    }
}

// HD: the head size when known at compile time (unrolled, float4 shared-memory reads), 0: any.
// Token of block x: items (first token of each pair) from item0 on, or item0 + x.
__device__ __forceinline__ int64_t item_token(const int32_t* items, int64_t item0) {
    return items ? items[2 * (item0 + blockIdx.x)] : item0 + blockIdx.x;
}

// part (the launch's own tokens, by block x): [n, n_head, max_splits, hd + 2].
template <int HD>
__global__ void __launch_bounds__(k_attn_threads)
split_kernel(AttentionParams p, const float* __restrict__ q, int64_t q_stride, const float* __restrict__ k_cache,
             const float* __restrict__ v_cache, const int32_t* __restrict__ positions, const int32_t* __restrict__ seq,
             const int32_t* __restrict__ block_tables, int32_t table_stride, int32_t max_splits,
             float* __restrict__ part, float* __restrict__ out, const int32_t* __restrict__ items, int64_t item0) {
    const int64_t t = item_token(items, item0);
    const int g = blockIdx.y, sp = blockIdx.z;
    const int hd = HD > 0 ? HD : p.head_dim, G = p.n_head / p.n_head_kv;
    const int n_ctx = positions[t] + 1;
    const int n_sp = n_splits_for(n_ctx);
    if (sp >= n_sp) return;
    const int span = tiles_per_split(n_ctx) * k_attn_tile;
    const int s0 = sp * span, s1 = min(n_ctx, s0 + span);
    const int64_t n_kv = int64_t(p.n_head_kv) * hd;
    const int32_t* table = block_tables + int64_t(seq[t]) * table_stride;

    extern __shared__ float smem[];
    float* sq = smem;                                  // [G][hd]
    float* sk = sq + q_floats(G, hd);                  // [T][hd + 4]
    float* sv = sk + k_attn_tile * (hd + 4);           // [T][hd]
    float* s_p = sv + k_attn_tile * hd;                // [G][T]
    float* s_m = s_p + G * k_attn_tile;                // [G] running max
    float* s_l = s_m + G;                              // [G] running sum
    float* s_r = s_l + G;                              // [G] rescale of this tile

    const float* qt = q + t * q_stride + int64_t(g) * G * hd;
    for (int i = threadIdx.x; i < G * hd; i += k_attn_threads) sq[i] = qt[i];
    for (int h = threadIdx.x; h < G; h += k_attn_threads) {
        s_m[h] = -INFINITY;
        s_l[h] = 0.0f;
    }
    // Each thread owns outputs idx = tid + k * 128 of the group's [G][hd] (at most 16 for
    // G * hd <= 2048).
    constexpr int k_max_own = 16;
    float acc[k_max_own];
#pragma unroll
    for (int k = 0; k < k_max_own; ++k) acc[k] = 0.0f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    for (int p0 = s0; p0 < s1; p0 += k_attn_tile) {
        const int len = min(k_attn_tile, s1 - p0);
        __syncthreads();  // the previous tile is consumed (and sq, s_m are set on the first)
        load_tile(k_cache, v_cache, table, p.block_size, n_kv, int64_t(g) * hd, hd, p0, len, sk, sv);
        __syncthreads();
        // Scores: one (head, position) dot product per thread and step, in dimension order.
        for (int idx = threadIdx.x; idx < G * len; idx += k_attn_threads) {
            const int h = idx / len, j = idx % len;
            const float* qh = sq + h * hd;
            const float* kj = sk + j * (hd + 4);
            float dot;
            if constexpr (HD > 0) {
                // Four partial sums (lanes of the float4), added pairwise at the end.
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll
                for (int i = 0; i < HD; i += 4) {
                    const float4 qv = *reinterpret_cast<const float4*>(qh + i);
                    const float4 kv = *reinterpret_cast<const float4*>(kj + i);
                    a0 = fmaf(qv.x, kv.x, a0);
                    a1 = fmaf(qv.y, kv.y, a1);
                    a2 = fmaf(qv.z, kv.z, a2);
                    a3 = fmaf(qv.w, kv.w, a3);
                }
                dot = (a0 + a1) + (a2 + a3);
            } else {
                dot = 0.0f;
                for (int i = 0; i < hd; ++i) dot = fmaf(qh[i], kj[i], dot);
            }
            s_p[h * k_attn_tile + j] = dot * p.scale;
        }
        __syncthreads();
        // Online softmax, one warp per head.
        for (int h = warp; h < G; h += k_attn_threads / 32) {
            float* ph = s_p + h * k_attn_tile;
            float mx = -INFINITY;
            for (int j = lane; j < len; j += 32) mx = fmaxf(mx, ph[j]);
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float m_old = s_m[h];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int j = lane; j < len; j += 32) {
                const float e = expf(ph[j] - m_new);
                ph[j] = e;
                sum += e;
            }
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (lane == 0) {
                const float r = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                s_r[h] = r;
                s_l[h] = s_l[h] * r + sum;
                s_m[h] = m_new;
            }
        }
        __syncthreads();
        // P V: thread's outputs (h, i), positions in order.
#pragma unroll
        for (int k = 0; k < k_max_own; ++k) {
            const int idx = threadIdx.x + k * k_attn_threads;
            if (idx >= G * hd) break;
            const int h = idx / hd, i = idx % hd;
            const float* ph = s_p + h * k_attn_tile;
            // Four partial sums over positions j = 4m + c, added pairwise.
            float o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;
            int j = 0;
            for (; j + 4 <= len; j += 4) {
                const float4 pv = *reinterpret_cast<const float4*>(ph + j);
                o0 = fmaf(pv.x, sv[j * hd + i], o0);
                o1 = fmaf(pv.y, sv[(j + 1) * hd + i], o1);
                o2 = fmaf(pv.z, sv[(j + 2) * hd + i], o2);
                o3 = fmaf(pv.w, sv[(j + 3) * hd + i], o3);
            }
            for (; j < len; ++j) o0 = fmaf(ph[j], sv[j * hd + i], o0);
            acc[k] = fmaf(acc[k], s_r[h], (o0 + o1) + (o2 + o3));
        }
    }
    __syncthreads();
    const int64_t n_q = int64_t(p.n_head) * hd;
    if (n_sp == 1) {
#pragma unroll
        for (int k = 0; k < k_max_own; ++k) {
            const int idx = threadIdx.x + k * k_attn_threads;
            if (idx >= G * hd) break;
            const int h = idx / hd, i = idx % hd;
            out[t * n_q + int64_t(g * G + h) * hd + i] = acc[k] / s_l[h];
        }
        return;
    }
    // part: [n_tokens, n_head, max_splits, hd + 2]
#pragma unroll
    for (int k = 0; k < k_max_own; ++k) {
        const int idx = threadIdx.x + k * k_attn_threads;
        if (idx >= G * hd) break;
        const int h = idx / hd, i = idx % hd;
        float* my = part + ((int64_t(blockIdx.x) * p.n_head + g * G + h) * max_splits + sp) * (hd + 2);
        my[2 + i] = acc[k];
        if (i == 0) {
            my[0] = s_m[h];
            my[1] = s_l[h];
        }
    }
}

// out[t, h] from the first `used` partials (m, l, o[hd]) of part [n_tokens, n_head, max_splits, hd + 2]:
// out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M). The block's threads share the dims.
__device__ void merge_partials(const AttentionParams& p, int64_t t, int h, int used, int32_t max_splits,
                               const float* __restrict__ part, float* __restrict__ out) {
    const int hd = p.head_dim;
    const float* base = part + (int64_t(blockIdx.x) * p.n_head + h) * int64_t(max_splits) * (hd + 2);
    float m = -INFINITY;
    for (int s = 0; s < used; ++s) m = fmaxf(m, base[s * (hd + 2)]);
    float l = 0.0f;
    for (int s = 0; s < used; ++s) l += base[s * (hd + 2) + 1] * expf(base[s * (hd + 2)] - m);
    const float inv = 1.0f / l;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < used; ++s) acc += base[s * (hd + 2) + 2 + i] * expf(base[s * (hd + 2)] - m);
        out[t * int64_t(p.n_head) * hd + int64_t(h) * hd + i] = acc * inv;
    }
}

__global__ void merge_kernel(AttentionParams p, const int32_t* __restrict__ positions, int32_t max_splits,
                             const float* __restrict__ part, float* __restrict__ out,
                             const int32_t* __restrict__ items, int64_t item0) {
    const int64_t t = item_token(items, item0);
    const int used = n_splits_for(positions[t] + 1);
    if (used == 1) return;  // written by split_kernel
    merge_partials(p, t, blockIdx.y, used, max_splits, part, out);
}

// ---- flash_kernel: tensor cores over F16 / q8_0 / fp8 caches ----

constexpr int k_fa_tile = 64;        // positions per staged tile
constexpr int k_fa_max_rows = 64;    // query rows per item (4 warps x 16)
constexpr int k_fa_max_splits = 64;

// Staged F16 rows: HD + 8 halves, so the 8 rows one ldmatrix reads start in distinct banks.
template <int HD>
constexpr int fa_pitch() { return HD + 8; }
template <int HD>
constexpr int fa_tile_bytes() { return k_fa_tile * fa_pitch<HD>() * 2; }
// Bytes of a staged position's scales (a head's group, kv_layout.h: at most 16).
constexpr int k_fa_scale_slot = 16;
// One stage of a quantized cache: K and V codes [64][HD], then K and V scales [64][16] bytes.
template <int HD>
constexpr int fa_raw_bytes() { return 2 * k_fa_tile * HD + 2 * k_fa_tile * k_fa_scale_slot; }
template <int HD>
constexpr int fa_epilogue_bytes() { return 4 * 16 * (HD + 2) * 4; }
// Stages: F16 tiles are used where they land (two: one computed, one in flight); quantized
// ones are converted into one F16 pair first (three raw stages: two in flight). The kernel is
// bound by issue more than by memory latency (H100, TinyLlama decode at B=64, ctx 4096: 2.2 TB/s
// with half the issue slots idle at 4 warps per scheduler), so shared memory goes to resident
// blocks rather than deeper rings.
template <int T>
constexpr int fa_stages() { return T == KV_DEV_F16 ? 2 : 3; }
template <int T, int HD>
constexpr int fa_smem_bytes() {
    const int body = T == KV_DEV_F16 ? fa_stages<T>() * 2 * fa_tile_bytes<HD>()
                                     : fa_stages<T>() * fa_raw_bytes<HD>() + 2 * fa_tile_bytes<HD>();
    return body > fa_epilogue_bytes<HD>() ? body : fa_epilogue_bytes<HD>();
}

// 2^x by the SFU (ex2.approx: 2 ulp; tiny results flush to zero, which a softmax weight may).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

struct FaArgs {
    AttentionParams p;
    const float* q;
    int64_t q_stride;
    const uint8_t* k;
    const uint8_t* v;
    int64_t row_bytes;
    const int32_t* positions;
    const int32_t* seq;
    const int32_t* tables;
    int32_t table_stride;
    const int32_t* items;
    int64_t item0;
    int32_t max_splits;
    int32_t rows_max;  // rows per item in part's layout
    int32_t bs_shift;  // log2(block_size), or -1
    float q_scale;     // p.scale * log2(e): scores in base 2
    float* part;       // [items][n_head_kv][max_splits][rows_max][hd + 2] of this launch
    float* out;
};

// Byte offset of position pos's row (block sizes that are powers of two by shifts).
__device__ __forceinline__ int64_t fa_row(const FaArgs& a, const int32_t* table, int pos) {
    const int bs = a.p.block_size;
    const int64_t slot = a.bs_shift >= 0 ? (int64_t(table[pos >> a.bs_shift]) << a.bs_shift) + (pos & (bs - 1))
                                         : int64_t(table[pos / bs]) * bs + pos % bs;
    return slot * a.row_bytes;
}

// Issue the copies of tile `tile` (positions past last_pos are zeros): F16 rows straight into
// the F16 tiles; quantized codes and their scales into the raw stage.
template <int T, int HD>
__device__ __forceinline__ void fa_issue(const FaArgs& a, const int32_t* table, int gkv, int tile, int last_pos,
                                         uint8_t* dst_k, uint8_t* dst_v) {
    const int hd = a.p.head_dim, p0 = tile * k_fa_tile;
    if constexpr (T == KV_DEV_F16) {
        __half* hk = reinterpret_cast<__half*>(dst_k);
        __half* hv = reinterpret_cast<__half*>(dst_v);
        const int64_t head = int64_t(gkv) * hd * 2;
        if (hd == HD) {
            // Whole rows of 16-byte vectors: a thread keeps its vector c and takes every
            // (128 / VPR)-th row.
            constexpr int VPR = HD / 8, RS = 128 / VPR;
            const int c = threadIdx.x % VPR;
#pragma unroll
            for (int j = threadIdx.x / VPR; j < k_fa_tile; j += RS) {
                const int pos = p0 + j;
                const bool live = pos <= last_pos;
                const int64_t off = head + 16 * c + (live ? fa_row(a, table, pos) : 0);
                cp_async16(hk + j * fa_pitch<HD>() + 8 * c, a.k + off, live ? 16 : 0);
                cp_async16(hv + j * fa_pitch<HD>() + 8 * c, a.v + off, live ? 16 : 0);
            }
        } else if (hd % 8 == 0) {
            const int vpr = hd / 8;
            for (int idx = threadIdx.x; idx < k_fa_tile * vpr; idx += 128) {
                const int j = idx / vpr, c = idx % vpr, pos = p0 + j;
                const bool live = pos <= last_pos;
                const int64_t off = head + 16 * c + (live ? fa_row(a, table, pos) : 0);
                cp_async16(hk + j * fa_pitch<HD>() + 8 * c, a.k + off, live ? 16 : 0);
                cp_async16(hv + j * fa_pitch<HD>() + 8 * c, a.v + off, live ? 16 : 0);
            }
        } else {
            // Rows not made of 16-byte vectors: plain loads.
            for (int idx = threadIdx.x; idx < k_fa_tile * hd; idx += 128) {
                const int j = idx / hd, i = idx % hd, pos = p0 + j;
                __half kv = __float2half(0.0f), vv = kv;
                if (pos <= last_pos) {
                    const int64_t off = head + 2 * i + fa_row(a, table, pos);
                    kv = *reinterpret_cast<const __half*>(a.k + off);
                    vv = *reinterpret_cast<const __half*>(a.v + off);
                }
                hk[j * fa_pitch<HD>() + i] = kv;
                hv[j * fa_pitch<HD>() + i] = vv;
            }
        }
    } else {
        // Codes in 16-byte vectors (4-byte words for heads of under 16 values); the head's scale
        // group: whole words.
        const int64_t head = int64_t(gkv) * hd, sc = kv_dev_scales_offset(T, a.p.n_head_kv, hd, gkv);
        uint8_t* sk = dst_k + 2 * k_fa_tile * HD;
        uint8_t* sv = sk + k_fa_tile * k_fa_scale_slot;
        auto codes = [&](int j, int c) {
            const int pos = p0 + j;
            const bool live = pos <= last_pos;
            const int64_t off = head + 16 * c + (live ? fa_row(a, table, pos) : 0);
            cp_async16(dst_k + j * HD + 16 * c, a.k + off, live ? 16 : 0);
            cp_async16(dst_v + j * HD + 16 * c, a.v + off, live ? 16 : 0);
        };
        // wpr 4-byte words of each position from byte src of its row, to dk / dv + j * pitch.
        auto words = [&](int64_t src, uint8_t* dk, uint8_t* dv, int pitch, int wpr) {
            for (int idx = threadIdx.x; idx < k_fa_tile * wpr; idx += 128) {
                const int j = idx / wpr, w = idx % wpr, pos = p0 + j;
                const bool live = pos <= last_pos;
                const int64_t off = src + 4 * w + (live ? fa_row(a, table, pos) : 0);
                cp_async4(dk + j * pitch + 4 * w, a.k + off, live ? 4 : 0);
                cp_async4(dv + j * pitch + 4 * w, a.v + off, live ? 4 : 0);
            }
        };
        if (hd == HD) {
            constexpr int VPR = HD / 16, RS = 128 / VPR;
            const int c = threadIdx.x % VPR;
#pragma unroll
            for (int j = threadIdx.x / VPR; j < k_fa_tile; j += RS) codes(j, c);
        } else if (hd % 16 == 0) {
            const int vpr = hd / 16;
            for (int idx = threadIdx.x; idx < k_fa_tile * vpr; idx += 128) codes(idx / vpr, idx % vpr);
        } else {
            words(head, dst_k, dst_v, HD, hd / 4);
        }
        words(sc, sk, sv, k_fa_scale_slot, int(kv_dev_scale_group_bytes(T, hd)) / 4);
    }
}

// Four codes (one word) as F32.
template <int T>
__device__ __forceinline__ void fa_codes4(uint32_t w, float* f) {
    if constexpr (T == KV_DEV_Q8_0) {
#pragma unroll
        for (int b = 0; b < 4; ++b) f[b] = float(int8_t(w >> (8 * b)));
    } else {
        const float2 lo = __half22float2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w & 0xffff), __NV_E4M3));
        const float2 hi = __half22float2(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w >> 16), __NV_E4M3));
        f[0] = lo.x; f[1] = lo.y; f[2] = hi.x; f[3] = hi.y;
    }
}

// Quantized stage -> F16 tile: 16 codes a thread and step, value = code x scale in F32, then F16.
template <int T, int HD>
__device__ __forceinline__ void fa_convert(int hd, const uint8_t* raw, const uint8_t* scales, __half* dst) {
    if (hd % 16 != 0) {
        // Heads of under 16 values: a word at a time (their one scale).
        const int wpr = hd / 4;
        for (int idx = threadIdx.x; idx < k_fa_tile * wpr; idx += 128) {
            const int j = idx / wpr, c = idx % wpr;
            const uint8_t* sj = scales + j * k_fa_scale_slot;
            const float d = T == KV_DEV_Q8_0 ? __half2float(*reinterpret_cast<const __half*>(sj))
                                             : *reinterpret_cast<const float*>(sj);
            float f[4];
            fa_codes4<T>(*reinterpret_cast<const uint32_t*>(raw + j * HD + 4 * c), f);
            *reinterpret_cast<uint2*>(dst + j * fa_pitch<HD>() + 4 * c) =
                make_uint2(pack_h2(f[0] * d, f[1] * d), pack_h2(f[2] * d, f[3] * d));
        }
        return;
    }
    const int vpr = hd / 16;
    for (int idx = threadIdx.x; idx < k_fa_tile * vpr; idx += 128) {
        const int j = idx / vpr, c = idx % vpr;
        const uint4 u = *reinterpret_cast<const uint4*>(raw + j * HD + 16 * c);
        const uint8_t* sj = scales + j * k_fa_scale_slot;
        const float d = T == KV_DEV_Q8_0 ? 0.0f : *reinterpret_cast<const float*>(sj);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
        uint32_t h[8];
        if constexpr (T == KV_DEV_Q8_0) {
            // int8 v -> F16 of 1024 + (v + 128) by a byte permute, minus 1152 (exact), times the
            // F16 scale: one rounding, as F16(v x d) computed in F32.
            const __half2 d2 = __half2half2(reinterpret_cast<const __half*>(sj)[c / 2]);
            const __half2 off = __float2half2_rn(1152.0f);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t x = w[i] ^ 0x80808080u;
                const uint32_t lo = __byte_perm(x, 0x64646464u, 0x4140), hi = __byte_perm(x, 0x64646464u, 0x4342);
                const __half2 a = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&lo), off), d2);
                const __half2 b = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&hi), off), d2);
                h[2 * i] = *reinterpret_cast<const uint32_t*>(&a);
                h[2 * i + 1] = *reinterpret_cast<const uint32_t*>(&b);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float f[4];
                fa_codes4<T>(w[i], f);
                h[2 * i] = pack_h2(f[0] * d, f[1] * d);
                h[2 * i + 1] = pack_h2(f[2] * d, f[3] * d);
            }
        }
        uint4* o = reinterpret_cast<uint4*>(dst + j * fa_pitch<HD>() + 16 * c);
        o[0] = make_uint4(h[0], h[1], h[2], h[3]);
        o[1] = make_uint4(h[4], h[5], h[6], h[7]);
    }
}

// RW: warps along the rows (4: rows 0..63, each warp all 64 positions of a tile; 1: rows 0..15,
// each warp 16 positions of every tile).
template <int T, int HD, int RW>
__global__ void __launch_bounds__(128) flash_kernel(FaArgs a) {
    constexpr int PW = 4 / RW, TPW = k_fa_tile / PW, NT = TPW / 8, KS = HD / 16, DT = HD / 8, P = fa_pitch<HD>();
    const AttentionParams& p = a.p;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int rg = warp % RW, pw0 = (warp / RW) * TPW;
    const int64_t item = a.item0 + blockIdx.x;
    const int64_t t0 = a.items ? a.items[2 * item] : item;
    const int n_tok = a.items ? a.items[2 * item + 1] : 1;
    const int gkv = blockIdx.y, sp = blockIdx.z;
    const int G = p.n_head / p.n_head_kv, hd = p.head_dim, R = n_tok * G;
    const int last_pos = a.positions[t0 + n_tok - 1];
    const int n_tiles = last_pos / k_fa_tile + 1;
    const int per = (n_tiles + a.max_splits - 1) / a.max_splits;
    const int n_sp = (n_tiles + per - 1) / per;
    if (sp >= n_sp) return;
    const int tile0 = sp * per, tile1 = min(n_tiles, tile0 + per);
    const int32_t* table = a.tables + int64_t(a.seq[t0]) * a.table_stride;

    extern __shared__ __align__(16) uint8_t fa_smem[];
    // F16: stage s is the (K, V) tile pair at 2s; quantized: raw stages, then one F16 pair.
    constexpr int NS = fa_stages<T>();
    __half* tk_q = reinterpret_cast<__half*>(fa_smem + NS * fa_raw_bytes<HD>());
    __half* tv_q = tk_q + k_fa_tile * P;
    auto stage_k = [&](int s) {
        return T == KV_DEV_F16 ? fa_smem + size_t(2 * s) * fa_tile_bytes<HD>() : fa_smem + size_t(s) * fa_raw_bytes<HD>();
    };
    auto stage_v = [&](int s) {
        return T == KV_DEV_F16 ? stage_k(s) + fa_tile_bytes<HD>() : stage_k(s) + k_fa_tile * HD;
    };

    // Padding columns hd..HD of the F16 tiles stay zero (never written by the copies).
    if (hd < HD) {
        __half* tiles = T == KV_DEV_F16 ? reinterpret_cast<__half*>(fa_smem) : tk_q;
        const int n_tiles_smem = T == KV_DEV_F16 ? 2 * NS : 2, padw = HD - hd;
        for (int idx = threadIdx.x; idx < n_tiles_smem * k_fa_tile * padw; idx += 128) {
            const int row = idx / padw, c = hd + idx % padw;
            tiles[row * P + c] = __float2half(0.0f);
        }
    }

    // Q fragments (A operand, rows x dims), scaled and rounded to F16.
    int row_pos[2];
    uint32_t qa[KS][4];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = rg * 16 + gq + 8 * half;
        const bool ok = r < R;
        row_pos[half] = ok ? a.positions[t0 + r / G] : -1;
        const float* qr = a.q + (ok ? (t0 + r / G) * a.q_stride + int64_t(gkv * G + r % G) * hd : 0);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int hi = 0; hi < 2; ++hi) {
                const int d = 16 * kk + 8 * hi + 2 * tq;
                const float x0 = ok && d < hd ? qr[d] * a.q_scale : 0.0f;
                const float x1 = ok && d + 1 < hd ? qr[d + 1] * a.q_scale : 0.0f;
                qa[kk][half + 2 * hi] = pack_h2(x0, x1);
            }
        }
    }
    // The warp's last visible position, and the first of its rows' last (idle rows aside).
    int warp_max_pos = max(row_pos[0], row_pos[1]);
    int warp_min_pos = min(row_pos[0] < 0 ? INT32_MAX : row_pos[0], row_pos[1] < 0 ? INT32_MAX : row_pos[1]);
    for (int off = 16; off > 0; off >>= 1) {
        warp_max_pos = max(warp_max_pos, __shfl_xor_sync(0xffffffffu, warp_max_pos, off));
        warp_min_pos = min(warp_min_pos, __shfl_xor_sync(0xffffffffu, warp_min_pos, off));
    }

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    const int mi = lane >> 3, r8 = lane & 7;
    __syncthreads();  // padding zeros before the copies land beside them
    // NS - 1 tiles ahead; one commit group per tile, empty past the split's end.
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) {
        if (tile0 + s < tile1) fa_issue<T, HD>(a, table, gkv, tile0 + s, last_pos, stage_k(s), stage_v(s));
        cp_async_commit();
    }

    for (int it = tile0; it < tile1; ++it) {
        const int s = (it - tile0) % NS;
        cp_async_wait(NS - 2);
        __syncthreads();  // tile it has landed; every warp is done with tile it - 1 and its stage
        const int ahead = it + NS - 1;
        if (ahead < tile1) {
            const int sa = (s + NS - 1) % NS;
            fa_issue<T, HD>(a, table, gkv, ahead, last_pos, stage_k(sa), stage_v(sa));
        }
        cp_async_commit();
        const __half* sk;
        const __half* sv;
        if constexpr (T == KV_DEV_F16) {
            sk = reinterpret_cast<const __half*>(stage_k(s));
            sv = reinterpret_cast<const __half*>(stage_v(s));
        } else {
            const uint8_t* sc = stage_k(s) + 2 * k_fa_tile * HD;
            fa_convert<T, HD>(hd, stage_k(s), sc, tk_q);
            fa_convert<T, HD>(hd, stage_v(s), sc + k_fa_tile * k_fa_scale_slot, tv_q);
            __syncthreads();
            sk = tk_q;
            sv = tv_q;
        }
        const int base = it * k_fa_tile + pw0;
        if (base <= warp_max_pos) {
            float sc[NT][4];
#pragma unroll
            for (int n = 0; n < NT; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
                for (int n2 = 0; n2 < NT / 2; ++n2) {
                    uint32_t b[4];
                    ldmatrix_x4(b, sk + (pw0 + 16 * n2 + 8 * (mi >> 1) + r8) * P + 16 * kk + 8 * (mi & 1));
                    mma16816(sc[2 * n2], qa[kk], b[0], b[1]);
                    mma16816(sc[2 * n2 + 1], qa[kk], b[2], b[3]);
                }
            }
            // Causal mask (only where the warp's positions pass one of its rows' last), online
            // softmax (rows gq: elements 0, 1; gq + 8: elements 2, 3).
            const bool masked = base + TPW - 1 > warp_min_pos;
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int pos = base + 8 * n + 2 * tq + (e & 1);
                    if (masked && pos > row_pos[e >> 1]) sc[n][e] = -INFINITY;
                    mx[e >> 1] = fmaxf(mx[e >> 1], sc[n][e]);
                }
            float alpha[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                const float m_new = fmaxf(m[h], mx[h]);
                alpha[h] = m_new == -INFINITY ? 1.0f : fast_exp2(m[h] - m_new);
                m[h] = m_new;
            }
            float sum[2] = {0.0f, 0.0f};
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float mh = m[e >> 1];
                    const float pe = mh == -INFINITY ? 0.0f : fast_exp2(sc[n][e] - mh);
                    sc[n][e] = pe;
                    sum[e >> 1] += pe;
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + sum[h];
            // Most tiles leave every row's maximum where it was: no rescale then.
            if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
                for (int d = 0; d < DT; ++d) {
                    o[d][0] *= alpha[0];
                    o[d][1] *= alpha[0];
                    o[d][2] *= alpha[1];
                    o[d][3] *= alpha[1];
                }
            }
            // O += P V, P from the score registers (C fragment -> A fragment).
#pragma unroll
            for (int ks = 0; ks < TPW / 16; ++ks) {
                const uint32_t pa[4] = {pack_h2(sc[2 * ks][0], sc[2 * ks][1]), pack_h2(sc[2 * ks][2], sc[2 * ks][3]),
                                        pack_h2(sc[2 * ks + 1][0], sc[2 * ks + 1][1]),
                                        pack_h2(sc[2 * ks + 1][2], sc[2 * ks + 1][3])};
#pragma unroll
                for (int d2 = 0; d2 < DT / 2; ++d2) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, sv + (pw0 + 16 * ks + 8 * (mi & 1) + r8) * P + 16 * d2 + 8 * (mi >> 1));
                    mma16816(o[2 * d2], pa, b[0], b[1]);
                    mma16816(o[2 * d2 + 1], pa, b[2], b[3]);
                }
            }
        }
    }
    cp_async_wait(0);

    // Epilogue: each warp's (m, l, o) of its 16 rows into shared memory, then per row the
    // position groups combined: the output, or this split's partial.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    __syncthreads();
    float* ep = reinterpret_cast<float*>(fa_smem);  // [4 warps][16 rows][HD + 2]: m, l, o
    {
        float* w = ep + warp * 16 * (HD + 2);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float* row = w + (gq + 8 * h) * (HD + 2);
            if (tq == 0) {
                row[0] = m[h];
                row[1] = l[h];
            }
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                row[2 + 8 * d + 2 * tq] = o[d][2 * h];
                row[2 + 8 * d + 2 * tq + 1] = o[d][2 * h + 1];
            }
        }
    }
    __syncthreads();
    const int64_t n_q = int64_t(p.n_head) * hd;
    for (int idx = threadIdx.x; idx < R * hd; idx += 128) {
        const int r = idx / hd, i = idx % hd, rgr = r / 16, rr = r % 16;
        float M = -INFINITY;
#pragma unroll
        for (int g2 = 0; g2 < PW; ++g2) M = fmaxf(M, ep[((g2 * RW + rgr) * 16 + rr) * (HD + 2)]);
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int g2 = 0; g2 < PW; ++g2) {
            const float* row = ep + ((g2 * RW + rgr) * 16 + rr) * (HD + 2);
            if (row[0] == -INFINITY) continue;
            const float f = exp2f(row[0] - M);
            L += row[1] * f;
            O += row[2 + i] * f;
        }
        if (n_sp == 1) {
            a.out[(t0 + r / G) * n_q + int64_t(gkv * G + r % G) * hd + i] = O / L;
        } else {
            float* my = a.part + (((int64_t(blockIdx.x) * p.n_head_kv + gkv) * a.max_splits + sp) * a.rows_max + r) *
                                     (hd + 2);
            if (i == 0) {
                my[0] = M;
                my[1] = L;
            }
            my[2 + i] = O;
        }
    }
}

// Items with several splits: out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M). Grid (item,
// KV head, row); threads over the head's dims, each reading its o_s with independent loads.
__global__ void __launch_bounds__(128) flash_merge_kernel(FaArgs a) {
    const AttentionParams& p = a.p;
    const int64_t item = a.item0 + blockIdx.x;
    const int64_t t0 = a.items ? a.items[2 * item] : item;
    const int n_tok = a.items ? a.items[2 * item + 1] : 1;
    const int gkv = blockIdx.y, r = blockIdx.z, G = p.n_head / p.n_head_kv, hd = p.head_dim;
    if (r >= n_tok * G) return;
    const int n_tiles = a.positions[t0 + n_tok - 1] / k_fa_tile + 1;
    const int per = (n_tiles + a.max_splits - 1) / a.max_splits;
    const int n_sp = (n_tiles + per - 1) / per;
    if (n_sp == 1) return;
    const int64_t split_stride = int64_t(a.rows_max) * (hd + 2);
    const float* rb =
        a.part + ((int64_t(blockIdx.x) * p.n_head_kv + gkv) * a.max_splits * a.rows_max + r) * (hd + 2);
    __shared__ float s_f[k_fa_max_splits];
    __shared__ float s_inv;
    if (threadIdx.x < 32) {
        float M = -INFINITY;
        for (int s = threadIdx.x; s < n_sp; s += 32) M = fmaxf(M, rb[s * split_stride]);
        for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
        float L = 0.0f;
        for (int s = threadIdx.x; s < n_sp; s += 32) {
            const float ms = rb[s * split_stride];
            const float f = ms == -INFINITY ? 0.0f : exp2f(ms - M);
            s_f[s] = f;
            L += rb[s * split_stride + 1] * f;
        }
        for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
        if (threadIdx.x == 0) s_inv = 1.0f / L;
    }
    __syncthreads();
    const int64_t n_q = int64_t(p.n_head) * hd;
    float* dst = a.out + (t0 + r / G) * n_q + int64_t(gkv * G + r % G) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float O = 0.0f;
#pragma unroll 8
        for (int s = 0; s < n_sp; ++s) O += rb[s * split_stride + 2 + i] * s_f[s];
        dst[i] = O * s_inv;
    }
}

// The head size the tensor-core kernel is compiled for: hd rounded up (zero padding).
int fa_head_dim(int hd) {
    for (int c : {64, 96, 128, 256})
        if (hd <= c) return c;
    return 0;
}


// Splits per item: the count that finishes soonest when the blocks run in waves of `capacity`
// (blocks resident at once): time ~ waves x (tiles per split + a block's fixed cost); more
// splits only for a clear gain. Batch-invariant: 16, whatever the batch.
int32_t choose_splits(const AttentionParams& p, int64_t n_items, int64_t max_ctx, int64_t capacity) {
    const int64_t ctx_tiles = (std::max<int64_t>(max_ctx, 1) + k_fa_tile - 1) / k_fa_tile;
    if (p.batch_invariant) return int32_t(std::min<int64_t>(16, ctx_tiles));
    const int64_t base = n_items * p.n_head_kv;
    // A block's start (Q, the ring's fill) and its partial's write and merge: about two tiles.
    auto cost = [&](int64_t sp) { return (base * sp + capacity - 1) / capacity * ((ctx_tiles + sp - 1) / sp + 2); };
    int64_t best = 1, best_cost = cost(1);
    for (int64_t sp = 2; sp <= std::min<int64_t>(k_fa_max_splits, ctx_tiles); ++sp) {
        const int64_t cost_sp = cost(sp);
        if (8 * cost_sp < 7 * best_cost) {  // a clear gain only: more splits cost merging
            best = sp;
            best_cost = cost_sp;
        }
    }
    return int32_t(best);
}

template <int T, int HD, int RW>
void run_flash(FaArgs a, int64_t n_items, int64_t max_ctx, size_t scratch_floats, cudaStream_t stream) {
    constexpr int smem = fa_smem_bytes<T, HD>();
    static const int per_sm = [] {
        // Above 48 KiB a kernel has to opt in.
        CUDA_CHECK(cudaFuncSetAttribute(flash_kernel<T, HD, RW>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        int n = 0;
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, flash_kernel<T, HD, RW>, 128, smem));
        return std::max(n, 1);
    }();
    a.max_splits = choose_splits(a.p, n_items, max_ctx, int64_t(per_sm) * sm_count());
    const int hd = a.p.head_dim;
    const size_t per_item = size_t(a.p.n_head_kv) * size_t(a.max_splits) * size_t(a.rows_max) * size_t(hd + 2);
    const int64_t chunk = a.max_splits > 1 ? int64_t(scratch_floats / per_item) : n_items;
    if (chunk < 1) throw std::runtime_error("paged_attention: scratch too small");
    for (int64_t c0 = 0; c0 < n_items; c0 += chunk) {
        a.item0 = c0;
        const unsigned nc = unsigned(std::min(chunk, n_items - c0));
        // The attribute is set on every launch: a graph captured elsewhere may run first.
        if (smem > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(flash_kernel<T, HD, RW>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        flash_kernel<T, HD, RW><<<dim3(nc, unsigned(a.p.n_head_kv), unsigned(a.max_splits)), 128, smem, stream>>>(a);
        CUDA_CHECK_LAUNCH();
        if (a.max_splits > 1) {
            flash_merge_kernel<<<dim3(nc, unsigned(a.p.n_head_kv), unsigned(a.rows_max)), hd <= 64 ? 64 : 128, 0,
                                 stream>>>(a);
            CUDA_CHECK_LAUNCH();
        }
    }
}

template <int T, int RW>
void run_flash_hd(const FaArgs& a, int64_t n_items, int64_t max_ctx, size_t scratch_floats, cudaStream_t stream) {
    switch (fa_head_dim(a.p.head_dim)) {
        case 64: run_flash<T, 64, RW>(a, n_items, max_ctx, scratch_floats, stream); break;
        case 96: run_flash<T, 96, RW>(a, n_items, max_ctx, scratch_floats, stream); break;
        case 128: run_flash<T, 128, RW>(a, n_items, max_ctx, scratch_floats, stream); break;
        default: run_flash<T, 256, RW>(a, n_items, max_ctx, scratch_floats, stream); break;
    }
}

template <int RW>
void run_flash_type(const FaArgs& a, int64_t n_items, int64_t max_ctx, size_t scratch_floats, cudaStream_t stream) {
    if (a.p.kv_type == KV_DEV_Q8_0) run_flash_hd<KV_DEV_Q8_0, RW>(a, n_items, max_ctx, scratch_floats, stream);
    else if (a.p.kv_type == KV_DEV_FP8) run_flash_hd<KV_DEV_FP8, RW>(a, n_items, max_ctx, scratch_floats, stream);
    else run_flash_hd<KV_DEV_F16, RW>(a, n_items, max_ctx, scratch_floats, stream);
}

}  // namespace

const char* attention_unsupported(const AttentionParams& p) {
    if (p.head_dim <= 0 || p.head_dim > k_max_head_dim || p.n_head_kv <= 0 || p.n_head % p.n_head_kv != 0)
        return "a head size of 1..256 and a whole number of query heads per KV head";
    const int G = p.n_head / p.n_head_kv;
    switch (p.kv_type) {
        case KV_DEV_F32:
            if (G * p.head_dim > 16 * k_attn_threads) return "n_head / n_head_kv x head_dim <= 2048 with an f32 cache";
            return nullptr;
        case KV_DEV_F16: break;
        case KV_DEV_Q8_0:
            if (p.head_dim % 32 != 0 && (p.head_dim > 32 || 32 % p.head_dim != 0 || p.head_dim % 4 != 0))
                return "a head size that is a multiple of 32, or 4, 8 or 16, for a q8_0 cache";
            break;
        case KV_DEV_FP8:
            if (p.head_dim % 4 != 0) return "a head size that is a multiple of 4 for an fp8 cache";
            break;
        default: return "a known KV cache type";
    }
    if (G > k_fa_max_rows) return "at most 64 query heads per KV head";
    return nullptr;
}

int32_t attention_item_tokens(const AttentionParams& p) {
    if (attention_unsupported(p)) return 0;
    if (p.kv_type == KV_DEV_F32) return 1;
    return k_fa_max_rows / (p.n_head / p.n_head_kv);
}

size_t attention_scratch_floats(const AttentionParams& p) {
    // Launches that fill the GPU by splitting have fewer than 2 x 4 x SMs (item, head, split)
    // blocks of at most 64 rows; batch-invariant and F32 launches run in parts of that size.
    return size_t(8) * size_t(sm_count()) * k_fa_max_rows * size_t(p.head_dim + 2);
}

void paged_attention(const AttentionParams& p, const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* positions, const int32_t* seq, const int32_t* block_tables, int32_t table_stride,
                     const int32_t* items, int64_t n_items, int32_t item_tokens, int64_t max_ctx, float* scratch,
                     size_t scratch_floats, float* out, cudaStream_t stream) {
    if (n_items <= 0) return;
    if (const char* why = attention_unsupported(p))
        throw std::runtime_error(std::string("paged_attention: unsupported geometry: needs ") + why);
    if (item_tokens < 1 || item_tokens > attention_item_tokens(p) || (!items && item_tokens != 1))
        throw std::runtime_error("paged_attention: bad item size");
    const int64_t q_stride = p.q_stride > 0 ? p.q_stride : int64_t(p.n_head) * p.head_dim;
    max_ctx = std::max<int64_t>(max_ctx, 1);
    const int hd = p.head_dim, G = p.n_head / p.n_head_kv;
    if (p.kv_type == KV_DEV_F32) {
        const int32_t n_splits = n_splits_for(int(std::min<int64_t>(max_ctx, int64_t(1) << 30)));
        const size_t per_token = size_t(p.n_head) * size_t(n_splits) * size_t(hd + 2);
        const int64_t chunk = n_splits > 1 ? int64_t(scratch_floats / per_token) : n_items;
        if (chunk < 1) throw std::runtime_error("paged_attention: scratch too small");
        const size_t smem = smem_floats(G, hd) * sizeof(float);
        const auto* kf = static_cast<const float*>(k_cache);
        const auto* vf = static_cast<const float*>(v_cache);
        for (int64_t c0 = 0; c0 < n_items; c0 += chunk) {
            const unsigned nc = unsigned(std::min(chunk, n_items - c0));
            const dim3 grid(nc, unsigned(p.n_head_kv), unsigned(n_splits));
            auto go = [&](auto kernel) {
                if (smem > 48 * 1024)
                    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
                kernel<<<grid, k_attn_threads, smem, stream>>>(p, q, q_stride, kf, vf, positions, seq, block_tables,
                                                               table_stride, n_splits, scratch, out, items, c0);
                CUDA_CHECK_LAUNCH();
            };
            if (hd == 64) go(split_kernel<64>);
            else if (hd == 128) go(split_kernel<128>);
            else go(split_kernel<0>);
            if (n_splits > 1) {
                merge_kernel<<<dim3(nc, unsigned(p.n_head)), 64, 0, stream>>>(p, positions, n_splits, scratch, out,
                                                                               items, c0);
                CUDA_CHECK_LAUNCH();
            }
        }
        return;
    }
    FaArgs a{};
    a.p = p;
    a.q = q;
    a.q_stride = q_stride;
    a.k = static_cast<const uint8_t*>(k_cache);
    a.v = static_cast<const uint8_t*>(v_cache);
    a.row_bytes = kv_dev_row_bytes(p.kv_type, p.n_head_kv, hd);
    a.positions = positions;
    a.seq = seq;
    a.tables = block_tables;
    a.table_stride = table_stride;
    a.items = items;
    a.rows_max = item_tokens * G;
    a.bs_shift = (p.block_size & (p.block_size - 1)) == 0 ? std::countr_zero(uint32_t(p.block_size)) : -1;
    a.q_scale = p.scale * 1.44269504088896341f;
    a.part = scratch;
    a.out = out;
    if (a.rows_max > 16) run_flash_type<4>(a, n_items, max_ctx, scratch_floats, stream);
    else run_flash_type<1>(a, n_items, max_ctx, scratch_floats, stream);
}

}  // namespace coinfer::kernels
