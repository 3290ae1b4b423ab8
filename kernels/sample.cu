// Greedy sampling on the device: logit bias and penalties applied in the CPU's order (one
// thread per listed token, serial over the row's list so repeated ids add in order), then an
// argmax with the lowest id winning ties. One block per row.
#include <cfloat>

#include "cuda_check.h"
#include "sample.h"

namespace coinfer::kernels {

namespace {

constexpr int k_sample_threads = 256;

__device__ __forceinline__ bool better(float v, int id, float bv, int bid) {
    // NaN never wins; larger wins; equal: lower id.
    if (v != v) return false;
    if (bid < 0) return v > -INFINITY;
    return v > bv || (v == bv && id < bid);
}

__global__ void __launch_bounds__(k_sample_threads)
greedy_kernel(float* __restrict__ logits, int64_t n_vocab, const GreedyRowParams* __restrict__ params,
              const int32_t* __restrict__ bias_off, const int32_t* __restrict__ bias_ids,
              const float* __restrict__ bias_vals, const int32_t* __restrict__ pen_off,
              const int32_t* __restrict__ pen_ids, const int32_t* __restrict__ pen_counts,
              int32_t* __restrict__ out_ids) {
    const int64_t r = blockIdx.x;
    float* l = logits + r * n_vocab;
    if (threadIdx.x == 0) {
        if (bias_off)
            for (int j = bias_off[r]; j < bias_off[r + 1]; ++j) l[bias_ids[j]] = __fadd_rn(l[bias_ids[j]], bias_vals[j]);
        if (pen_off) {
            const GreedyRowParams p = params[r];
            for (int j = pen_off[r]; j < pen_off[r + 1]; ++j) {
                float v = l[pen_ids[j]];
                if (p.repeat_penalty != 1.0f) v = v > 0.0f ? __fdiv_rn(v, p.repeat_penalty) : __fmul_rn(v, p.repeat_penalty);
                const float c = float(pen_counts[j]);
                v = __fsub_rn(v, __fadd_rn(__fmul_rn(c, p.frequency_penalty), p.presence_penalty));
                l[pen_ids[j]] = v;
            }
        }
    }
    __syncthreads();
    float bv = 0.0f;
    int bid = -1;
    for (int64_t i = threadIdx.x; i < n_vocab; i += k_sample_threads)
        if (better(l[i], int(i), bv, bid)) {
            bv = l[i];
            bid = int(i);
        }
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oid = __shfl_xor_sync(0xffffffffu, bid, off);
        if (oid >= 0 && better(ov, oid, bv, bid)) {
            bv = ov;
            bid = oid;
        }
    }
    __shared__ float s_v[k_sample_threads / 32];
    __shared__ int s_id[k_sample_threads / 32];
    if ((threadIdx.x & 31) == 0) {
        s_v[threadIdx.x >> 5] = bv;
        s_id[threadIdx.x >> 5] = bid;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < k_sample_threads / 32; ++w)
            if (s_id[w] >= 0 && better(s_v[w], s_id[w], bv, bid)) {
                bv = s_v[w];
                bid = s_id[w];
            }
        out_ids[r] = bid;
    }
}

}  // namespace

void sample_greedy(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params,
                   const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                   const int32_t* pen_ids, const int32_t* pen_counts, int32_t* out_ids, cudaStream_t stream) {
    if (n_rows <= 0) return;
    greedy_kernel<<<unsigned(n_rows), k_sample_threads, 0, stream>>>(logits, n_vocab, params, bias_off, bias_ids,
                                                                    bias_vals, pen_off, pen_ids, pen_counts, out_ids);
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
