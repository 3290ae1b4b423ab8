// Bias + RoPE + paged KV write. One block per (token, head); threads over the head's elements.
// The rotation is written as the CPU writes it (two products, then a difference / sum, no fused
// multiply-add).
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include <cuda_fp8.h>

#include "cuda_check.h"
#include "kv_layout.h"
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
// writes K and V to an F32 or F16 cache (KV = void: leaves them rotated / biased in k and v for
// kv_quant_kernel). Threads over the head's elements.
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
    if constexpr (std::is_void_v<KV>) {
        if (bv) {
            float* vt = v + t * (p.row_stride ? p.row_stride : n_kv) + int64_t(kvh) * hd;
            for (int i = threadIdx.x; i < hd; i += blockDim.x) vt[i] = __fadd_rn(vt[i], bv[kvh * hd + i]);
        }
        return;
    } else {
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
}

// Grid (token, K or V): one token's rotated K or biased V row into its quantized cache slot
// (kv_layout.h), with kv_codec.cpp's arithmetic. One warp per 32-value block (q8_0) or per head
// (fp8).
template <int32_t T>
__global__ void kv_quant_kernel(int32_t n_head_kv, int32_t head_dim, int32_t row_stride, const float* __restrict__ k,
                                const float* __restrict__ v, const int32_t* __restrict__ slots,
                                uint8_t* __restrict__ k_cache, uint8_t* __restrict__ v_cache) {
    const int64_t t = blockIdx.x;
    const int n_kv = n_head_kv * head_dim;
    const float* x = (blockIdx.y == 0 ? k : v) + t * (row_stride ? row_stride : n_kv);
    const int64_t row_bytes = kv_dev_row_bytes(T, n_head_kv, head_dim);
    uint8_t* dst = (blockIdx.y == 0 ? k_cache : v_cache) + int64_t(slots[t]) * row_bytes;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    if constexpr (T == KV_DEV_Q8_0) {
        for (int b = warp; b < n_kv / 32; b += n_warps) {
            const float xv = x[32 * b + lane];
            float amax = fabsf(xv);
            for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            dst[32 * b + lane] = uint8_t(int8_t(roundf(xv * id)));
            if (head_dim >= 32) {
                if (lane == 0) {
                    const int h = 32 * b / head_dim, bb = b % (head_dim / 32);
                    reinterpret_cast<__half*>(dst + kv_dev_scales_offset(T, n_head_kv, head_dim, h))[bb] =
                        __float2half_rn(d);
                }
            } else if (lane < 32 / head_dim) {  // every head of the block gets the scale
                const int h = 32 * b / head_dim + lane;
                *reinterpret_cast<__half*>(dst + kv_dev_scales_offset(T, n_head_kv, head_dim, h)) = __float2half_rn(d);
            }
        }
    } else {
        for (int h = warp; h < n_head_kv; h += n_warps) {
            const float* xh = x + h * head_dim;
            float amax = 0.0f;
            for (int i = lane; i < head_dim; i += 32) amax = fmaxf(amax, fabsf(xh[i]));
            for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
            const float scale = amax / 448.0f;
            const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            for (int i = lane; i < head_dim; i += 32)
                dst[h * head_dim + i] = __nv_cvt_float_to_fp8(xh[i] * inv, __NV_SATFINITE, __NV_E4M3);
            if (lane == 0) *reinterpret_cast<float*>(dst + kv_dev_scales_offset(T, n_head_kv, head_dim, h)) = scale;
        }
    }
}

}  // namespace

void rope_kv_write(const RopeParams& p, float* q, float* k, float* v, const float* bq, const float* bk, const float* bv,
                   const int32_t* positions, const int32_t* slots, int64_t n_tokens, void* k_cache, void* v_cache,
                   int32_t kv_type, cudaStream_t stream) {
    if (n_tokens <= 0) return;
    const dim3 grid(unsigned(n_tokens), unsigned(p.n_head + p.n_head_kv));
    const unsigned threads = unsigned(std::min(256, (std::max(p.head_dim, 32) + 31) / 32 * 32));
    if (kv_type == KV_DEV_Q8_0 || kv_type == KV_DEV_FP8) {
        rope_kv_kernel<void><<<grid, threads, 0, stream>>>(p, q, k, v, bq, bk, bv, positions, slots, nullptr, nullptr);
        CUDA_CHECK_LAUNCH();
        auto go = [&](auto kernel) {
            kernel<<<dim3(unsigned(n_tokens), 2), 128, 0, stream>>>(p.n_head_kv, p.head_dim, p.row_stride, k, v, slots,
                                                                 static_cast<uint8_t*>(k_cache),
                                                                 static_cast<uint8_t*>(v_cache));
        };
        if (kv_type == KV_DEV_Q8_0) go(kv_quant_kernel<KV_DEV_Q8_0>);
        else go(kv_quant_kernel<KV_DEV_FP8>);
        CUDA_CHECK_LAUNCH();
        return;
    }
    if (kv_type == KV_DEV_F16)
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
