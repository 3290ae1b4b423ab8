// Paged attention, flash-decoding style. Two kernels, chosen by the model's GQA group size
// G = n_head / n_head_kv (so a token's result never depends on its batch):
// G >= 4: one CUDA block per (token, KV head, split):
//
//   split_kernel  The block serves the whole GQA group of its KV head: each K/V row is read from
//                 the cache once for the group's n_head / n_head_kv query heads. It walks its
//                 split in tiles of k_attn_tile positions (K and V staged in shared memory as
//                 F32), with an FP32 online softmax per head. A token whose context fits one
//                 split writes its output directly; otherwise each split writes (m, l, o[hd]).
//   merge_kernel  grid (token, head), tokens with several splits only:
//                 out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// G < 4: head_split_kernel / head_merge_kernel, one block per (token, query head, split of 256
// positions), K/V read straight from the cache.
// Split sizes depend only on the token's own context length (at most k_attn_max_splits splits
// of whole tiles), never on the batch, so a token's result does not depend on its batch.
#include <cuda_fp16.h>

#include <algorithm>

#include "attention.h"
#include "cuda_check.h"

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

// Stages rows [p0, p0 + len) of one KV head into sk (padded) and sv.
template <typename KV>
__device__ __forceinline__ void load_tile(const KV* __restrict__ k_cache, const KV* __restrict__ v_cache,
                                          const int32_t* __restrict__ table, int block_size, int64_t n_kv,
                                          int64_t head_off, int hd, int p0, int len, float* sk, float* sv) {
    constexpr int E = 16 / sizeof(KV);  // elements per 16-byte vector
    if (hd % E == 0) {
        const int vec_per_row = hd / E;
        for (int idx = threadIdx.x; idx < len * vec_per_row; idx += k_attn_threads) {
            const int j = idx / vec_per_row, c = idx % vec_per_row;
            const int pos = p0 + j;
            const int64_t slot = int64_t(table[pos / block_size]) * block_size + pos % block_size;
            const int64_t off = slot * n_kv + head_off + int64_t(c) * E;
            const uint4 kr = *reinterpret_cast<const uint4*>(k_cache + off);
            const uint4 vr = *reinterpret_cast<const uint4*>(v_cache + off);
            float kf[E], vf[E];
            if constexpr (sizeof(KV) == 2) {
                const uint32_t ku[4] = {kr.x, kr.y, kr.z, kr.w}, vu[4] = {vr.x, vr.y, vr.z, vr.w};
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&ku[u]));
                    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&vu[u]));
                    kf[2 * u] = a.x;
                    kf[2 * u + 1] = a.y;
                    vf[2 * u] = b.x;
                    vf[2 * u + 1] = b.y;
                }
            } else {
                kf[0] = __uint_as_float(kr.x); kf[1] = __uint_as_float(kr.y);
                kf[2] = __uint_as_float(kr.z); kf[3] = __uint_as_float(kr.w);
                vf[0] = __uint_as_float(vr.x); vf[1] = __uint_as_float(vr.y);
                vf[2] = __uint_as_float(vr.z); vf[3] = __uint_as_float(vr.w);
            }
            float* kd = sk + j * (hd + 4) + c * E;
            float* vd = sv + j * hd + c * E;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                kd[e] = kf[e];
                vd[e] = vf[e];
            }
        }
    } else {
        // Odd head sizes: one element per thread.
        for (int idx = threadIdx.x; idx < len * hd; idx += k_attn_threads) {
            const int j = idx / hd, i = idx % hd;
            const int pos = p0 + j;
            const int64_t slot = int64_t(table[pos / block_size]) * block_size + pos % block_size;
            const int64_t off = slot * n_kv + head_off + i;
            if constexpr (sizeof(KV) == 2) {
                sk[j * (hd + 4) + i] = __half2float(k_cache[off]);
                sv[j * hd + i] = __half2float(v_cache[off]);
            } else {
                sk[j * (hd + 4) + i] = k_cache[off];
                sv[j * hd + i] = v_cache[off];
            }
        }
    }
}

// HD: the head size when known at compile time (unrolled, float4 shared-memory reads), 0: any.
template <typename KV, int HD>
__global__ void __launch_bounds__(k_attn_threads)
split_kernel(AttentionParams p, const float* __restrict__ q, int64_t q_stride, const KV* __restrict__ k_cache,
             const KV* __restrict__ v_cache, const int32_t* __restrict__ positions, const int32_t* __restrict__ seq,
             const int32_t* __restrict__ block_tables, int32_t table_stride, int32_t max_splits,
             float* __restrict__ part, float* __restrict__ out, const int32_t* __restrict__ token_ids) {
    const int64_t t = token_ids ? token_ids[blockIdx.x] : blockIdx.x;
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
        load_tile<KV>(k_cache, v_cache, table, p.block_size, n_kv, int64_t(g) * hd, hd, p0, len, sk, sv);
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
        float* my = part + ((t * p.n_head + g * G + h) * max_splits + sp) * (hd + 2);
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
    const float* base = part + (t * p.n_head + h) * int64_t(max_splits) * (hd + 2);
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
                             const int32_t* __restrict__ token_ids) {
    const int64_t t = token_ids ? token_ids[blockIdx.x] : blockIdx.x;
    const int used = n_splits_for(positions[t] + 1);
    if (used == 1) return;  // written by split_kernel
    merge_partials(p, t, blockIdx.y, used, max_splits, part, out);
}

// ---- One CUDA block per (token, query head, split of k_head_split positions) ----
// Used when the GQA group is small (n_head / n_head_kv < 4): there the grouped kernel's shared
// K/V tile serves too few heads to pay for its staging (Llama-2-7B prefill ran 20% slower).

constexpr int k_head_split = 256;

template <typename KV>
__device__ __forceinline__ float kv_load(const KV* p) {
    if constexpr (sizeof(KV) == 2) return __half2float(*p);
    else return *p;
}

// Lane l's VEC consecutive elements of a K or V row (dims l * VEC ...), as floats: one load.
template <typename KV, int VEC>
__device__ __forceinline__ void load_lane_vec(const KV* __restrict__ row, int lane, float* f) {
    if constexpr (sizeof(KV) == 2) {
        if constexpr (VEC == 4) {
            const uint2 u = *reinterpret_cast<const uint2*>(row + 4 * lane);
            const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
            const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
            f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
        } else {
            const float2 a = __half22float2(*reinterpret_cast<const __half2*>(row + 2 * lane));
            f[0] = a.x; f[1] = a.y;
        }
    } else {
        if constexpr (VEC == 4) {
            const float4 a = *reinterpret_cast<const float4*>(row + 4 * lane);
            f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
        } else {
            const float2 a = *reinterpret_cast<const float2*>(row + 2 * lane);
            f[0] = a.x; f[1] = a.y;
        }
    }
}

// VEC > 0 (head_dim == 32 * VEC): each lane reads its VEC consecutive dims of a row with one
// load (Llama-2-7B's 128: 8 bytes per lane) instead of VEC strided 2-byte loads.
template <typename KV, int VEC>
__global__ void __launch_bounds__(k_attn_threads)
head_split_kernel(AttentionParams p, const float* __restrict__ q, int64_t q_stride, const KV* __restrict__ k_cache,
             const KV* __restrict__ v_cache, const int32_t* __restrict__ positions, const int32_t* __restrict__ seq,
             const int32_t* __restrict__ block_tables, int32_t table_stride, int32_t n_splits,
             float* __restrict__ part, const int32_t* __restrict__ token_ids) {
    const int64_t t = token_ids ? token_ids[blockIdx.x] : blockIdx.x;
    const int h = blockIdx.y, sp = blockIdx.z;
    const int hd = p.head_dim;
    const int n_ctx = positions[t] + 1;
    const int p0 = sp * k_head_split;
    // part: [n_tokens, n_head, n_splits, hd + 2]
    float* my = part + ((t * p.n_head + h) * n_splits + sp) * (hd + 2);
    if (p0 >= n_ctx) {
        if (threadIdx.x == 0) {
            my[0] = -INFINITY;
            my[1] = 0.0f;
        }
        return;
    }
    const int len = min(k_head_split, n_ctx - p0);
    const int kvh = h / (p.n_head / p.n_head_kv);
    const int64_t n_kv = int64_t(p.n_head_kv) * hd;
    const int32_t* table = block_tables + int64_t(seq[t]) * table_stride;
    __shared__ __align__(16) float s_q[k_max_head_dim];
    __shared__ float s_p[k_head_split];
    __shared__ float s_red[k_attn_threads / 32];
    for (int i = threadIdx.x; i < hd; i += k_attn_threads) s_q[i] = q[t * q_stride + int64_t(h) * hd + i];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll 4
    for (int j = warp; j < len; j += k_attn_threads / 32) {
        const int pos = p0 + j;
        const int64_t slot = int64_t(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
        const KV* kp = k_cache + slot * n_kv + int64_t(kvh) * hd;
        float dot = 0.0f;
        if constexpr (VEC > 0) {
            float kf[VEC], qf[VEC];
            load_lane_vec<KV, VEC>(kp, lane, kf);
            load_lane_vec<float, VEC>(s_q, lane, qf);  // one shared-memory vector load
#pragma unroll
            for (int e = 0; e < VEC; ++e) dot = fmaf(qf[e], kf[e], dot);
        } else {
            for (int i = lane; i < hd; i += 32) dot = fmaf(s_q[i], kv_load(kp + i), dot);
        }
        for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (lane == 0) s_p[j] = dot * p.scale;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < len; j += k_attn_threads) mx = fmaxf(mx, s_p[j]);
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) s_red[warp] = mx;
    __syncthreads();
    mx = s_red[0];
    for (int i = 1; i < k_attn_threads / 32; ++i) mx = fmaxf(mx, s_red[i]);
    __syncthreads();
    float sum = 0.0f;
    for (int j = threadIdx.x; j < len; j += k_attn_threads) {
        const float e = expf(s_p[j] - mx);
        s_p[j] = e;
        sum += e;
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) s_red[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float l = 0.0f;
        for (int i = 0; i < k_attn_threads / 32; ++i) l += s_red[i];
        my[0] = mx;
        my[1] = l;
    }
    // Output: warp w sums positions w, w + 4, ... with lane l holding dims l, l + 32, ... (one
    // coalesced row of V per warp and step, four rows in flight), then the four partial sums
    // are added in warp order. (One thread per dim walking every position in turn was latency-
    // bound: 36 us for one token at ctx 144 on TinyLlama.)
    constexpr int k_dims_per_lane = k_max_head_dim / 32;
    float acc[k_dims_per_lane];
#pragma unroll
    for (int c = 0; c < k_dims_per_lane; ++c) acc[c] = 0.0f;
#pragma unroll 2
    for (int j = warp; j < len; j += k_attn_threads / 32) {
        const int pos = p0 + j;
        const int64_t slot = int64_t(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
        const KV* vp = v_cache + slot * n_kv + int64_t(kvh) * hd;
        const float pj = s_p[j];
        if constexpr (VEC > 0) {
            float vf[VEC];
            load_lane_vec<KV, VEC>(vp, lane, vf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] = fmaf(pj, vf[e], acc[e]);
        } else {
#pragma unroll
            for (int c = 0; c < k_dims_per_lane; ++c)
                if (lane + 32 * c < hd) acc[c] = fmaf(pj, kv_load(vp + lane + 32 * c), acc[c]);
        }
    }
    __shared__ __align__(16) float s_o[k_attn_threads / 32][k_max_head_dim];
    if constexpr (VEC > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) s_o[warp][VEC * lane + e] = acc[e];
    } else {
#pragma unroll
        for (int c = 0; c < k_dims_per_lane; ++c)
            if (lane + 32 * c < hd) s_o[warp][lane + 32 * c] = acc[c];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += k_attn_threads) {
        float o = s_o[0][i];
        for (int w = 1; w < k_attn_threads / 32; ++w) o += s_o[w][i];
        my[2 + i] = o;
    }
}

__global__ void head_merge_kernel(AttentionParams p, const int32_t* __restrict__ positions, int32_t n_splits,
                             const float* __restrict__ part, float* __restrict__ out,
                             const int32_t* __restrict__ token_ids) {
    const int64_t t = token_ids ? token_ids[blockIdx.x] : blockIdx.x;
    const int used = (positions[t] + k_head_split) / k_head_split;  // splits with positions
    merge_partials(p, t, blockIdx.y, used, n_splits, part, out);
}

// ---- Prompt runs: one CUDA block per (tile of consecutive tokens of one sequence, KV head) ----
// The block's 64 query rows are the GQA group's heads x the tile's tokens (64 / G tokens), so
// each K/V tile of the cache is staged once for all of them. Scores and P V use 4 x TP/8 and
// 4 x HD/8 register tiles per thread (rows ty + 16 i, positions / dims tx + 8 j), with an FP32
// online softmax per row; causal masking per row by its token's position.
constexpr int k_pf_rows = 64;

template <int HD>
constexpr int pf_tile_positions() { return HD <= 64 ? 64 : 32; }

template <int HD>
constexpr size_t pf_smem_floats() {
    constexpr int TP = pf_tile_positions<HD>();
    return size_t(k_pf_rows) * HD + size_t(TP) * (HD + 4) + size_t(TP) * HD + size_t(k_pf_rows) * (TP + 4);
}

template <typename KV, int HD>
__global__ void __launch_bounds__(k_attn_threads)
prefill_kernel(AttentionParams p, const float* __restrict__ q, int64_t q_stride, const KV* __restrict__ k_cache,
               const KV* __restrict__ v_cache, const int32_t* __restrict__ positions, const int32_t* __restrict__ seq,
               const int32_t* __restrict__ block_tables, int32_t table_stride, const int32_t* __restrict__ tiles,
               float* __restrict__ out) {
    constexpr int TP = pf_tile_positions<HD>();
    constexpr int PJ = TP / 8, DJ = HD / 8;
    const int g = blockIdx.y, G = p.n_head / p.n_head_kv, QT = k_pf_rows / G;
    const int64_t t0 = tiles[2 * blockIdx.x];
    const int n_tok = tiles[2 * blockIdx.x + 1];
    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int64_t n_kv = int64_t(p.n_head_kv) * HD;
    const int32_t* table = block_tables + int64_t(seq[t0]) * table_stride;

    extern __shared__ float smem[];
    float* sq = smem;                      // [64][HD]
    float* sk = sq + k_pf_rows * HD;       // [TP][HD + 4]
    float* sv = sk + TP * (HD + 4);        // [TP][HD]
    float* sp = sv + TP * HD;              // [64][TP + 4]

    // Row r: head g * G + r / QT, token t0 + r % QT (rows past the tile's tokens are idle).
    for (int idx = tid; idx < k_pf_rows * HD; idx += k_attn_threads) {
        const int r = idx / HD, i = idx % HD, tq = r % QT;
        sq[idx] = tq < n_tok ? q[(t0 + tq) * q_stride + int64_t(g * G + r / QT) * HD + i] : 0.0f;
    }
    int row_pos[4];
    bool row_ok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int tq = (ty + 16 * i) % QT;
        row_ok[i] = tq < n_tok;
        row_pos[i] = row_ok[i] ? positions[t0 + tq] : -1;
    }
    const int last_pos = positions[t0 + n_tok - 1];
    float m[4], l[4], o[4][DJ];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int d = 0; d < DJ; ++d) o[i][d] = 0.0f;
    }
    for (int p0 = 0; p0 <= last_pos; p0 += TP) {
        const int len = min(TP, last_pos + 1 - p0);
        __syncthreads();  // the previous tile is consumed (and sq is written on the first)
        load_tile<KV>(k_cache, v_cache, table, p.block_size, n_kv, int64_t(g) * HD, HD, p0, len, sk, sv);
        __syncthreads();
        float sc[4][PJ];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < PJ; ++j) sc[i][j] = 0.0f;
#pragma unroll 4
        for (int c = 0; c < HD; c += 4) {
            float4 qv[4], kv[PJ];
#pragma unroll
            for (int i = 0; i < 4; ++i) qv[i] = *reinterpret_cast<const float4*>(sq + (ty + 16 * i) * HD + c);
#pragma unroll
            for (int j = 0; j < PJ; ++j) kv[j] = *reinterpret_cast<const float4*>(sk + (tx + 8 * j) * (HD + 4) + c);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < PJ; ++j) {
                    float a = sc[i][j];
                    a = fmaf(qv[i].x, kv[j].x, a);
                    a = fmaf(qv[i].y, kv[j].y, a);
                    a = fmaf(qv[i].z, kv[j].z, a);
                    a = fmaf(qv[i].w, kv[j].w, a);
                    sc[i][j] = a;
                }
        }
        float r_scale[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < PJ; ++j) {
                const int pos = p0 + tx + 8 * j;
                sc[i][j] = pos < p0 + len && pos <= row_pos[i] ? sc[i][j] * p.scale : -INFINITY;
                mx = fmaxf(mx, sc[i][j]);
            }
            // The 8 threads of a row group are adjacent lanes.
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            const float m_new = fmaxf(m[i], mx);
            // A row with nothing visible yet (or idle) keeps zero weights.
            const bool none = m_new == -INFINITY;
            r_scale[i] = none || m[i] == -INFINITY ? 0.0f : expf(m[i] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < PJ; ++j) {
                const float e = none ? 0.0f : expf(sc[i][j] - m_new);
                sp[(ty + 16 * i) * (TP + 4) + tx + 8 * j] = e;
                sum += e;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            l[i] = l[i] * r_scale[i] + sum;
            m[i] = m_new;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int d = 0; d < DJ; ++d) o[i][d] *= r_scale[i];
        for (int j = 0; j < len; j += 4) {
            float4 pv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) pv[i] = *reinterpret_cast<const float4*>(sp + (ty + 16 * i) * (TP + 4) + j);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                if (j + u >= len) break;
                const float* vr = sv + (j + u) * HD + tx;
#pragma unroll
                for (int d = 0; d < DJ; ++d) {
                    const float vv = vr[8 * d];
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const float pw = u == 0 ? pv[i].x : u == 1 ? pv[i].y : u == 2 ? pv[i].z : pv[i].w;
                        o[i][d] = fmaf(pw, vv, o[i][d]);
                    }
                }
            }
        }
    }
    const int64_t n_q = int64_t(p.n_head) * HD;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (!row_ok[i]) continue;
        const int r = ty + 16 * i;
        float* dst = out + (t0 + r % QT) * n_q + int64_t(g * G + r / QT) * HD;
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int d = 0; d < DJ; ++d) dst[tx + 8 * d] = o[i][d] * inv;
    }
}

int32_t max_splits_for(int64_t max_ctx) {
    return n_splits_for(int(std::min<int64_t>(max_ctx, int64_t(1) << 30)));
}

bool grouped(const AttentionParams& p) {
    if (p.kernel == ATTN_KERNEL_GROUPED) return true;
    if (p.kernel == ATTN_KERNEL_PER_HEAD) return false;
    return p.n_head / p.n_head_kv >= 4;
}

}  // namespace

size_t attention_scratch_floats(const AttentionParams& p, int64_t n_tokens, int64_t max_ctx) {
    max_ctx = std::max<int64_t>(max_ctx, 1);
    // Room for either kernel: the backend may pick per batch.
    const int64_t n_splits = std::max<int64_t>(max_splits_for(max_ctx), (max_ctx + k_head_split - 1) / k_head_split);
    return size_t(n_tokens) * size_t(p.n_head) * size_t(n_splits) * size_t(p.head_dim + 2);
}

void paged_attention(const AttentionParams& p, const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* positions, const int32_t* seq, const int32_t* block_tables, int32_t table_stride,
                     int64_t n_tokens, int64_t max_ctx, float* scratch, float* out, cudaStream_t stream,
                     const int32_t* token_ids) {
    if (n_tokens <= 0) return;
    if (p.head_dim > k_max_head_dim || p.head_dim <= 0 || p.n_head_kv <= 0 || p.n_head % p.n_head_kv != 0 ||
        (p.n_head / p.n_head_kv) * p.head_dim > 16 * k_attn_threads)
        throw std::runtime_error("paged_attention: unsupported head geometry");
    const int64_t q_stride = p.q_stride > 0 ? p.q_stride : int64_t(p.n_head) * p.head_dim;
    if (!grouped(p)) {
        const int32_t n_sp = int32_t((std::max<int64_t>(max_ctx, 1) + k_head_split - 1) / k_head_split);
        const dim3 grid(unsigned(n_tokens), unsigned(p.n_head), unsigned(n_sp));
        auto go = [&](auto kernel, const auto* kc, const auto* vc) {
            kernel<<<grid, k_attn_threads, 0, stream>>>(p, q, q_stride, kc, vc, positions, seq, block_tables,
                                                        table_stride, n_sp, scratch, token_ids);
        };
        const auto* kh = static_cast<const __half*>(k_cache);
        const auto* vh = static_cast<const __half*>(v_cache);
        const auto* kf = static_cast<const float*>(k_cache);
        const auto* vf = static_cast<const float*>(v_cache);
        if (p.head_dim == 128) {
            if (p.kv_f16) go(head_split_kernel<__half, 4>, kh, vh);
            else go(head_split_kernel<float, 4>, kf, vf);
        } else if (p.head_dim == 64) {
            if (p.kv_f16) go(head_split_kernel<__half, 2>, kh, vh);
            else go(head_split_kernel<float, 2>, kf, vf);
        } else {
            if (p.kv_f16) go(head_split_kernel<__half, 0>, kh, vh);
            else go(head_split_kernel<float, 0>, kf, vf);
        }
        CUDA_CHECK_LAUNCH();
        head_merge_kernel<<<dim3(unsigned(n_tokens), unsigned(p.n_head)), 64, 0, stream>>>(p, positions, n_sp, scratch,
                                                                                           out, token_ids);
        CUDA_CHECK_LAUNCH();
        return;
    }
    const int32_t n_splits = max_splits_for(std::max<int64_t>(max_ctx, 1));
    const int G = p.n_head / p.n_head_kv;
    const size_t smem = smem_floats(G, p.head_dim) * sizeof(float);
    const dim3 grid(unsigned(n_tokens), unsigned(p.n_head_kv), unsigned(n_splits));
    auto go = [&](auto kernel, const auto* kc, const auto* vc) {
        // Above 48 KiB of shared memory a kernel has to opt in. Set on every launch: the template
        // instances share one function type, so a static flag here would cover only the first.
        if (smem > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        kernel<<<grid, k_attn_threads, smem, stream>>>(p, q, q_stride, kc, vc, positions, seq, block_tables,
                                                       table_stride, n_splits, scratch, out, token_ids);
        CUDA_CHECK_LAUNCH();
    };
    const auto* kh = static_cast<const __half*>(k_cache);
    const auto* vh = static_cast<const __half*>(v_cache);
    const auto* kf = static_cast<const float*>(k_cache);
    const auto* vf = static_cast<const float*>(v_cache);
    switch (p.head_dim) {
    case 64:
        if (p.kv_f16) go(split_kernel<__half, 64>, kh, vh);
        else go(split_kernel<float, 64>, kf, vf);
        break;
    case 128:
        if (p.kv_f16) go(split_kernel<__half, 128>, kh, vh);
        else go(split_kernel<float, 128>, kf, vf);
        break;
    default:
        if (p.kv_f16) go(split_kernel<__half, 0>, kh, vh);
        else go(split_kernel<float, 0>, kf, vf);
    }
    if (n_splits > 1) {
        merge_kernel<<<dim3(unsigned(n_tokens), unsigned(p.n_head)), 64, 0, stream>>>(p, positions, n_splits, scratch,
                                                                                      out, token_ids);
        CUDA_CHECK_LAUNCH();
    }
}

}  // namespace coinfer::kernels

namespace coinfer::kernels {

int32_t prefill_tile_tokens(const AttentionParams& p) {
    if (p.head_dim != 64 && p.head_dim != 128) return 0;
    const int G = p.n_head_kv > 0 ? p.n_head / p.n_head_kv : 0;
    if (G < 1 || p.n_head % p.n_head_kv != 0 || k_pf_rows % G != 0) return 0;
    return k_pf_rows / G;
}

void paged_attention_prefill(const AttentionParams& p, const float* q, const void* k_cache, const void* v_cache,
                             const int32_t* positions, const int32_t* seq, const int32_t* block_tables,
                             int32_t table_stride, const int32_t* tiles, int64_t n_tiles, float* out,
                             cudaStream_t stream) {
    if (n_tiles <= 0) return;
    if (prefill_tile_tokens(p) == 0) throw std::runtime_error("paged_attention_prefill: unsupported head geometry");
    const int64_t q_stride = p.q_stride > 0 ? p.q_stride : int64_t(p.n_head) * p.head_dim;
    const dim3 grid(unsigned(n_tiles), unsigned(p.n_head_kv));
    auto go = [&](auto kernel, size_t smem, const auto* kc, const auto* vc) {
        // Above 48 KiB a kernel has to opt in (every launch: the instances share one function type).
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        kernel<<<grid, k_attn_threads, smem, stream>>>(p, q, q_stride, kc, vc, positions, seq, block_tables,
                                                       table_stride, tiles, out);
        CUDA_CHECK_LAUNCH();
    };
    const auto* kh = static_cast<const __half*>(k_cache);
    const auto* vh = static_cast<const __half*>(v_cache);
    const auto* kf = static_cast<const float*>(k_cache);
    const auto* vf = static_cast<const float*>(v_cache);
    if (p.head_dim == 64) {
        const size_t smem = pf_smem_floats<64>() * sizeof(float);
        if (p.kv_f16) go(prefill_kernel<__half, 64>, smem, kh, vh);
        else go(prefill_kernel<float, 64>, smem, kf, vf);
    } else {
        const size_t smem = pf_smem_floats<128>() * sizeof(float);
        if (p.kv_f16) go(prefill_kernel<__half, 128>, smem, kh, vh);
        else go(prefill_kernel<float, 128>, smem, kf, vf);
    }
}

}  // namespace coinfer::kernels
