// Bias + RoPE + paged KV write. One block per (token, head); threads over the head's elements.
// The rotation is written as the CPU writes it (two products, then a difference / sum, no fused
// multiply-add).
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda_check.h"
#include "rope.h"

namespace coinfer::kernels {

namespace {

template <typename KV>
__device__ __forceinline__ KV to_kv(float v) {
    if constexpr (sizeof(KV) == 2) return __float2half_rn(v);
    else return v;
}

__device__ __forceinline__ void rotate(float* v, int i, int half, bool neox, float cs, float sn) {
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = v[a], x1 = v[b];
    v[a] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
    v[b] = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
}

// Grid (token, head): heads 0..n_head-1 are query heads, then the KV heads, whose block also
// writes K and V to the cache. Threads over the head's elements.
template <typename KV>
__global__ void rope_kv_kernel(RopeParams p, float* __restrict__ q, float* __restrict__ k, float* __restrict__ v,
                               const float* __restrict__ bq, const float* __restrict__ bk,
                               const float* __restrict__ bv, const int32_t* __restrict__ positions,
                               const int32_t* __restrict__ slots, KV* __restrict__ k_cache, KV* __restrict__ v_cache) {
    const int64_t t = blockIdx.x;
    const int head = blockIdx.y;
    const int hd = p.head_dim, n_q = p.n_head * hd, n_kv = p.n_head_kv * hd;
    const bool is_q = head < p.n_head;
    const int kvh = head - p.n_head;
    float* base = is_q ? q + t * (p.row_stride ? p.row_stride : n_q) + int64_t(head) * hd
                       : k + t * (p.row_stride ? p.row_stride : n_kv) + int64_t(kvh) * hd;
    const float* bias = is_q ? (bq ? bq + head * hd : nullptr) : (bk ? bk + kvh * hd : nullptr);
    if (bias) {
        for (int i = threadIdx.x; i < hd; i += blockDim.x) base[i] = __fadd_rn(base[i], bias[i]);
        __syncthreads();
    }
    const int half = p.n_rot / 2;
    const float pos = float(positions[t]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float theta = __fmul_rn(pos, p.inv_freq[i]);
        float sn, cs;
        sincosf(theta, &sn, &cs);
        rotate(base, i, half, p.neox, __fmul_rn(cs, p.mscale), __fmul_rn(sn, p.mscale));
    }
    if (is_q) return;
    __syncthreads();
    const int64_t s = int64_t(slots[t]) * n_kv + int64_t(kvh) * hd;
    float* vt = v + t * (p.row_stride ? p.row_stride : n_kv) + int64_t(kvh) * hd;
    const float* bvh = bv ? bv + kvh * hd : nullptr;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        k_cache[s + i] = to_kv<KV>(base[i]);
        const float vv = bvh ? __fadd_rn(vt[i], bvh[i]) : vt[i];
        vt[i] = vv;
        v_cache[s + i] = to_kv<KV>(vv);
    }
}

}  // namespace

void rope_kv_write(const RopeParams& p, float* q, float* k, float* v, const float* bq, const float* bk, const float* bv,
                   const int32_t* positions, const int32_t* slots, int64_t n_tokens, void* k_cache, void* v_cache,
                   bool kv_f16, cudaStream_t stream) {
    if (n_tokens <= 0) return;
    const dim3 grid(unsigned(n_tokens), unsigned(p.n_head + p.n_head_kv));
    const unsigned threads = unsigned(std::min(256, (std::max(p.head_dim, 32) + 31) / 32 * 32));
    if (kv_f16)
        rope_kv_kernel<__half><<<grid, threads, 0, stream>>>(p, q, k, v, bq, bk, bv, positions, slots,
                                                                       static_cast<__half*>(k_cache),
                                                                       static_cast<__half*>(v_cache));
    else
        rope_kv_kernel<float><<<grid, threads, 0, stream>>>(p, q, k, v, bq, bk, bv, positions, slots,
                                                                      static_cast<float*>(k_cache),
                                                                      static_cast<float*>(v_cache));
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
