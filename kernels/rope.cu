// Bias + RoPE + paged KV write. One block per token; threads over (head, pair). The rotation is
// written as the CPU writes it (two products, then a difference / sum, no fused multiply-add).
#include <cuda_fp16.h>

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

template <typename KV>
__global__ void rope_kv_kernel(RopeParams p, float* __restrict__ q, float* __restrict__ k, float* __restrict__ v,
                               const float* __restrict__ bq, const float* __restrict__ bk,
                               const float* __restrict__ bv, const int32_t* __restrict__ positions,
                               const int32_t* __restrict__ slots, KV* __restrict__ k_cache, KV* __restrict__ v_cache) {
    const int64_t t = blockIdx.x;
    const int hd = p.head_dim, n_q = p.n_head * hd, n_kv = p.n_head_kv * hd;
    float* qt = q + t * n_q;
    float* kt = k + t * n_kv;
    float* vt = v + t * n_kv;
    if (bq) {
        for (int i = threadIdx.x; i < n_q; i += blockDim.x) qt[i] = __fadd_rn(qt[i], bq[i]);
        for (int i = threadIdx.x; i < n_kv; i += blockDim.x) {
            kt[i] = __fadd_rn(kt[i], bk[i]);
            vt[i] = __fadd_rn(vt[i], bv[i]);
        }
        __syncthreads();
    }
    const int half = p.n_rot / 2;
    const float pos = float(positions[t]);
    for (int j = threadIdx.x; j < (p.n_head + p.n_head_kv) * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        const float theta = __fmul_rn(pos, p.inv_freq[i]);
        float sn, cs;
        sincosf(theta, &sn, &cs);
        float* base = h < p.n_head ? qt + h * hd : kt + (h - p.n_head) * hd;
        rotate(base, i, half, p.neox, cs, sn);
    }
    __syncthreads();
    const int64_t s = slots[t];
    for (int i = threadIdx.x; i < n_kv; i += blockDim.x) {
        k_cache[s * n_kv + i] = to_kv<KV>(kt[i]);
        v_cache[s * n_kv + i] = to_kv<KV>(vt[i]);
    }
}

}  // namespace

void rope_kv_write(const RopeParams& p, float* q, float* k, float* v, const float* bq, const float* bk, const float* bv,
                   const int32_t* positions, const int32_t* slots, int64_t n_tokens, void* k_cache, void* v_cache,
                   bool kv_f16, cudaStream_t stream) {
    if (n_tokens <= 0) return;
    if (kv_f16)
        rope_kv_kernel<__half><<<unsigned(n_tokens), 128, 0, stream>>>(p, q, k, v, bq, bk, bv, positions, slots,
                                                                       static_cast<__half*>(k_cache),
                                                                       static_cast<__half*>(v_cache));
    else
        rope_kv_kernel<float><<<unsigned(n_tokens), 128, 0, stream>>>(p, q, k, v, bq, bk, bv, positions, slots,
                                                                      static_cast<float*>(k_cache),
                                                                      static_cast<float*>(v_cache));
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
