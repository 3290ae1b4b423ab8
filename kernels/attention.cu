// Paged attention, flash-decoding style.
//
//   split_kernel  grid (token, head, split): scores of up to k_attention_split positions in
//                 shared memory, FP32 max / exp / sum, partial output. Writes (m, l, o[hd]).
//   merge_kernel  grid (token, head): out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// GQA: query head h reads KV head h / (n_head / n_head_kv). The split size is fixed, so a
// token's result does not depend on its batch.
#include <cuda_fp16.h>

#include "attention.h"
#include "cuda_check.h"

namespace coinfer::kernels {

namespace {

constexpr int k_attn_threads = 128;
constexpr int k_max_head_dim = 256;

template <typename KV>
__device__ __forceinline__ float kv_load(const KV* p) {
    if constexpr (sizeof(KV) == 2) return __half2float(*p);
    else return *p;
}

template <typename KV>
__global__ void __launch_bounds__(k_attn_threads)
split_kernel(AttentionParams p, const float* __restrict__ q, const KV* __restrict__ k_cache,
             const KV* __restrict__ v_cache, const int32_t* __restrict__ positions, const int32_t* __restrict__ seq,
             const int32_t* __restrict__ block_tables, int32_t table_stride, int32_t n_splits,
             float* __restrict__ part) {
    const int64_t t = blockIdx.x;
    const int h = blockIdx.y, sp = blockIdx.z;
    const int hd = p.head_dim;
    const int n_ctx = positions[t] + 1;
    const int p0 = sp * k_attention_split;
    // part: [n_tokens, n_head, n_splits, hd + 2]
    float* my = part + ((t * p.n_head + h) * n_splits + sp) * (hd + 2);
    if (p0 >= n_ctx) {
        if (threadIdx.x == 0) {
            my[0] = -INFINITY;
            my[1] = 0.0f;
        }
        return;
    }
    const int len = min(k_attention_split, n_ctx - p0);
    const int kvh = h / (p.n_head / p.n_head_kv);
    const int64_t n_kv = int64_t(p.n_head_kv) * hd;
    const int32_t* table = block_tables + int64_t(seq[t]) * table_stride;
    __shared__ float s_q[k_max_head_dim];
    __shared__ float s_p[k_attention_split];
    __shared__ float s_red[k_attn_threads / 32];
    for (int i = threadIdx.x; i < hd; i += k_attn_threads) s_q[i] = q[t * int64_t(p.n_head) * hd + int64_t(h) * hd + i];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll 4
    for (int j = warp; j < len; j += k_attn_threads / 32) {
        const int pos = p0 + j;
        const int64_t slot = int64_t(table[pos / p.block_size]) * p.block_size + pos % p.block_size;
        const KV* kp = k_cache + slot * n_kv + int64_t(kvh) * hd;
        float dot = 0.0f;
        for (int i = lane; i < hd; i += 32) dot = fmaf(s_q[i], kv_load(kp + i), dot);
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
#pragma unroll
        for (int c = 0; c < k_dims_per_lane; ++c)
            if (lane + 32 * c < hd) acc[c] = fmaf(pj, kv_load(vp + lane + 32 * c), acc[c]);
    }
    __shared__ float s_o[k_attn_threads / 32][k_max_head_dim];
#pragma unroll
    for (int c = 0; c < k_dims_per_lane; ++c)
        if (lane + 32 * c < hd) s_o[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += k_attn_threads) {
        float o = s_o[0][i];
        for (int w = 1; w < k_attn_threads / 32; ++w) o += s_o[w][i];
        my[2 + i] = o;
    }
}

__global__ void merge_kernel(AttentionParams p, const int32_t* __restrict__ positions, int32_t n_splits,
                             const float* __restrict__ part, float* __restrict__ out) {
    const int64_t t = blockIdx.x;
    const int h = blockIdx.y, hd = p.head_dim;
    const int used = (positions[t] + k_attention_split) / k_attention_split;  // splits with positions
    const float* base = part + (t * p.n_head + h) * int64_t(n_splits) * (hd + 2);
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

}  // namespace

size_t attention_scratch_floats(const AttentionParams& p, int64_t n_tokens, int64_t max_ctx) {
    const int64_t n_splits = (max_ctx + k_attention_split - 1) / k_attention_split;
    return size_t(n_tokens) * size_t(p.n_head) * size_t(n_splits) * size_t(p.head_dim + 2);
}

void paged_attention(const AttentionParams& p, const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* positions, const int32_t* seq, const int32_t* block_tables, int32_t table_stride,
                     int64_t n_tokens, int64_t max_ctx, float* scratch, float* out, cudaStream_t stream) {
    if (n_tokens <= 0) return;
    if (p.head_dim > k_max_head_dim || p.head_dim <= 0 || p.n_head_kv <= 0 || p.n_head % p.n_head_kv != 0)
        throw std::runtime_error("paged_attention: unsupported head geometry");
    const int32_t n_splits = int32_t((max_ctx + k_attention_split - 1) / k_attention_split);
    const dim3 grid(unsigned(n_tokens), unsigned(p.n_head), unsigned(n_splits));
    if (p.kv_f16)
        split_kernel<__half><<<grid, k_attn_threads, 0, stream>>>(p, q, static_cast<const __half*>(k_cache),
                                                                 static_cast<const __half*>(v_cache), positions, seq,
                                                                 block_tables, table_stride, n_splits, scratch);
    else
        split_kernel<float><<<grid, k_attn_threads, 0, stream>>>(p, q, static_cast<const float*>(k_cache),
                                                                static_cast<const float*>(v_cache), positions, seq,
                                                                block_tables, table_stride, n_splits, scratch);
    CUDA_CHECK_LAUNCH();
    merge_kernel<<<dim3(unsigned(n_tokens), unsigned(p.n_head)), 64, 0, stream>>>(p, positions, n_splits, scratch,
                                                                                  out);
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
