// Sampling on the device, choice-for-choice equal to engine/sampler.cpp.
//
//   logprob_kernel  grid (lp row): copy of the raw row, max, log-sum-exp, top-n by n block argmaxes
//   greedy_kernel   grid (row): logit bias and penalties in the CPU's order (serial over the row's
//                   list so repeated ids add in order), then an argmax, lowest id winning ties
//   keys_kernel     grid (dist row, chunk): the CPU's 64-bit sort keys (order bits of the logit,
//                   then the id); NaN and -inf become ~0, which sorts last
//   cub segmented radix sort of the keys, one segment per dist row
//   dist_kernel     grid (dist row): top-k cut, weights in parallel, then one thread runs the
//                   serial left-to-right sums of top-p, min-p and the Philox draw, so every float
//                   operation matches the CPU's (no FMA contraction: explicit _rn intrinsics)
//   chosen_logprob_kernel: log_softmax(raw)[chosen] for the lp rows
#include <cfloat>

#include <cub/device/device_segmented_radix_sort.cuh>

#include "philox.h"  // header-only Philox and det_expf, shared bit-for-bit with the CPU sampler
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
    // Bias, then penalties, as the CPU orders them. Each list names a token once (the penalty
    // counts always; the bias unless the row says otherwise), so the block's threads share the
    // entries: a request's 300 bias entries cost every step one pass, not 300 dependent ones.
    if (bias_off) {
        const int j0 = bias_off[r], j1 = bias_off[r + 1];
        if (!(params && params[r].bias_repeats)) {
            for (int j = j0 + int(threadIdx.x); j < j1; j += k_sample_threads)
                l[bias_ids[j]] = __fadd_rn(l[bias_ids[j]], bias_vals[j]);
        } else if (threadIdx.x == 0) {
            for (int j = j0; j < j1; ++j) l[bias_ids[j]] = __fadd_rn(l[bias_ids[j]], bias_vals[j]);
        }
        __syncthreads();
    }
    if (pen_off) {
        const GreedyRowParams p = params[r];
        for (int j = pen_off[r] + int(threadIdx.x); j < pen_off[r + 1]; j += k_sample_threads) {
            float v = l[pen_ids[j]];
            if (p.repeat_penalty != 1.0f) v = v > 0.0f ? __fdiv_rn(v, p.repeat_penalty) : __fmul_rn(v, p.repeat_penalty);
            const float c = float(pen_counts[j]);
            v = __fsub_rn(v, __fadd_rn(__fmul_rn(c, p.frequency_penalty), p.presence_penalty));
            l[pen_ids[j]] = v;
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

__device__ __forceinline__ uint64_t sort_key(float l, uint32_t id) {
    l = __fadd_rn(fminf(l, FLT_MAX), 0.0f);  // +inf -> FLT_MAX; -0 -> +0 so it ties with +0
    uint32_t u = __float_as_uint(l);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (uint64_t(~u) << 32) | id;
}
constexpr uint64_t k_invalid_key = ~uint64_t(0);

__global__ void keys_kernel(const float* __restrict__ logits, int64_t n_vocab, const DistRowParams* __restrict__ dist,
                            uint64_t* __restrict__ keys) {
    const int64_t j = blockIdx.y;
    const float* l = logits + int64_t(dist[j].row) * n_vocab;
    uint64_t* k = keys + j * n_vocab;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vocab; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = l[i];
        k[i] = (v != v || v == -INFINITY) ? k_invalid_key : sort_key(v, uint32_t(i));
    }
}

__device__ __forceinline__ int block_sum_int(int v, int* s_tmp) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s_tmp[threadIdx.x >> 5] = v;
    __syncthreads();
    int t = 0;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) t += s_tmp[w];
    return t;
}

// weights: [n_dist, n_vocab] scratch.
__global__ void __launch_bounds__(k_sample_threads)
dist_kernel(const float* __restrict__ logits, int64_t n_vocab, const DistRowParams* __restrict__ dist,
            const uint64_t* __restrict__ keys, float* __restrict__ weights, int32_t* __restrict__ out_ids) {
    __shared__ int s_tmp[k_sample_threads / 32];
    const int64_t j = blockIdx.x;
    const DistRowParams p = dist[j];
    const float* l = logits + int64_t(p.row) * n_vocab;
    const uint64_t* k = keys + j * n_vocab;
    float* w = weights + j * n_vocab;
    // Step 4: the valid candidates are a prefix of the sorted keys.
    int cnt = 0;
    for (int64_t i = threadIdx.x; i < n_vocab; i += k_sample_threads) cnt += k[i] != k_invalid_key;
    const int n_valid = block_sum_int(cnt, s_tmp);
    if (n_valid == 0) {
        if (threadIdx.x == 0) out_ids[p.row] = -1;
        return;
    }
    // Step 5: top-k.
    const int m = p.top_k > 0 ? min(p.top_k, n_valid) : n_valid;
    // Step 6: weights relative to the max (candidate 0), count of nonzero ones.
    const float l0 = fminf(l[uint32_t(k[0])], FLT_MAX);
    cnt = 0;
    for (int i = threadIdx.x; i < m; i += k_sample_threads) {
        const float li = fminf(l[uint32_t(k[i])], FLT_MAX);
        const float wi = det_expf(__fmul_rn(__fsub_rn(li, l0), p.inv_temperature));
        w[i] = wi;
        cnt += wi > 0.0f;
    }
    int n_keep = block_sum_int(cnt, s_tmp);  // ends with __syncthreads: w is visible
    if (threadIdx.x != 0) return;
    // Step 7: top-p, serial sums left to right.
    if (p.top_p < 1.0f) {
        float sum = 0.0f;
        for (int i = 0; i < n_keep; ++i) sum = __fadd_rn(sum, w[i]);
        const float target = __fmul_rn(p.top_p, sum);
        float cum = 0.0f;
        for (int i = 0; i < n_keep; ++i) {
            cum = __fadd_rn(cum, w[i]);
            if (cum >= target) {
                n_keep = i + 1;
                break;
            }
        }
    }
    // Step 8: min-p.
    if (p.min_p > 0.0f) {
        int nk = 1;
        while (nk < n_keep && w[nk] >= p.min_p) ++nk;
        n_keep = nk;
    }
    // Step 9: the draw.
    float sum = 0.0f;
    for (int i = 0; i < n_keep; ++i) sum = __fadd_rn(sum, w[i]);
    const float target = __fmul_rn(philox_uniform(p.seed, p.token_index), sum);
    float cum = 0.0f;
    int sel = n_keep - 1;
    for (int i = 0; i < n_keep; ++i) {
        cum = __fadd_rn(cum, w[i]);
        if (cum > target) {
            sel = i;
            break;
        }
    }
    out_ids[p.row] = int32_t(uint32_t(k[sel]));
}

// (lp, id) order of top_logprobs: larger logprob first, then lower id.
__device__ __forceinline__ bool lp_before(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

__device__ __forceinline__ float lp_of(float l, float l_max, float log_sum) {
    if (l != l || l_max == -INFINITY) return -INFINITY;
    return (l - l_max) - log_sum;
}

// terms: [n_lp, 2] (max, log sum); raw: [n_lp, n_vocab].
__global__ void __launch_bounds__(k_sample_threads)
logprob_kernel(const float* __restrict__ logits, int64_t n_vocab, const LogprobRowParams* __restrict__ lp,
               float* __restrict__ raw, float* __restrict__ terms, LogprobOut* __restrict__ out) {
    __shared__ float s_v[k_sample_threads / 32];
    __shared__ int s_id[k_sample_threads / 32];
    __shared__ float s_bcast;
    const int64_t j = blockIdx.x;
    const LogprobRowParams p = lp[j];
    const float* l = logits + int64_t(p.row) * n_vocab;
    float* r = raw + j * n_vocab;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < n_vocab; i += k_sample_threads) {
        const float v = l[i];
        r[i] = v;
        if (v > mx) mx = v;
    }
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) s_v[warp] = mx;
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = -INFINITY;
        for (int w = 0; w < k_sample_threads / 32; ++w) m = fmaxf(m, s_v[w]);
        s_bcast = m;
    }
    __syncthreads();
    const float l_max = s_bcast;
    __syncthreads();
    float sum = 0.0f;
    if (l_max != -INFINITY)
        for (int64_t i = threadIdx.x; i < n_vocab; i += k_sample_threads)
            if (l[i] == l[i]) sum += expf(l[i] - l_max);
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) s_v[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < k_sample_threads / 32; ++w) s += s_v[w];
        s_bcast = logf(s);
    }
    __syncthreads();
    const float log_sum = l_max == -INFINITY ? 0.0f : s_bcast;
    if (threadIdx.x == 0) {
        terms[2 * j] = l_max;
        terms[2 * j + 1] = log_sum;
    }
    // Top-n: n block argmaxes, each over the entries strictly after the previous pick.
    const int n = int(int64_t(p.n) < n_vocab ? int64_t(p.n) : n_vocab);
    float prev_v = INFINITY;
    int prev_id = -1;
    for (int t = 0; t < n; ++t) {
        float bv = -INFINITY;
        int bid = -1;
        for (int64_t i = threadIdx.x; i < n_vocab; i += k_sample_threads) {
            const float v = lp_of(l[i], l_max, log_sum);
            if (prev_id >= 0 && !lp_before(prev_v, prev_id, v, int(i))) continue;
            if (bid < 0 || lp_before(v, int(i), bv, bid)) {
                bv = v;
                bid = int(i);
            }
        }
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
            const int oid = __shfl_xor_sync(0xffffffffu, bid, off);
            if (oid >= 0 && (bid < 0 || lp_before(ov, oid, bv, bid))) {
                bv = ov;
                bid = oid;
            }
        }
        __syncthreads();
        if (lane == 0) {
            s_v[warp] = bv;
            s_id[warp] = bid;
        }
        __syncthreads();
        bv = s_v[0];
        bid = s_id[0];
        for (int w = 1; w < k_sample_threads / 32; ++w)
            if (s_id[w] >= 0 && (bid < 0 || lp_before(s_v[w], s_id[w], bv, bid))) {
                bv = s_v[w];
                bid = s_id[w];
            }
        if (threadIdx.x == 0) {
            out[j].ids[t] = bid;
            out[j].logprobs[t] = bv;
        }
        prev_v = bv;
        prev_id = bid;
    }
    if (threadIdx.x == 0) out[j].n = n;
}

__global__ void chosen_logprob_kernel(int64_t n_lp, int64_t n_vocab, const LogprobRowParams* __restrict__ lp,
                                      const float* __restrict__ raw, const float* __restrict__ terms,
                                      const int32_t* __restrict__ ids, LogprobOut* __restrict__ out) {
    const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= n_lp) return;
    const int32_t id = ids[lp[j].row];
    out[j].chosen = id < 0 ? -INFINITY : lp_of(raw[j * n_vocab + id], terms[2 * j], terms[2 * j + 1]);
}

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

size_t cub_temp_bytes(int64_t n_vocab, int64_t n_dist) {
    size_t bytes = 0;
    CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                                                       static_cast<uint64_t*>(nullptr), n_vocab * n_dist, int(n_dist),
                                                       static_cast<const int64_t*>(nullptr),
                                                       static_cast<const int64_t*>(nullptr), 0, 64, cudaStream_t(0)));
    return bytes;
}

__global__ void offsets_kernel(int64_t n_dist, int64_t n_vocab, int64_t* __restrict__ off) {
    const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j <= n_dist) off[j] = j * n_vocab;
}

}  // namespace

size_t sample_workspace_bytes(int64_t n_vocab, int64_t n_dist, int64_t n_lp) {
    size_t b = 0;
    if (n_lp > 0) b += align_up(size_t(n_lp * n_vocab) * 4) + align_up(size_t(n_lp) * 8);
    if (n_dist > 0)
        b += 2 * align_up(size_t(n_dist * n_vocab) * 8) + align_up(size_t(n_dist * n_vocab) * 4) +
             align_up(size_t(n_dist + 1) * 8) + align_up(cub_temp_bytes(n_vocab, n_dist));
    return b;
}

void sample_rows(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params,
                 const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                 const int32_t* pen_ids, const int32_t* pen_counts, const DistRowParams* dist, int64_t n_dist,
                 const LogprobRowParams* lp, int64_t n_lp, void* workspace, size_t workspace_bytes,
                 int32_t* out_ids, LogprobOut* out_lp, cudaStream_t stream) {
    if (n_rows <= 0) return;
    if (workspace_bytes < sample_workspace_bytes(n_vocab, n_dist, n_lp))
        throw std::runtime_error("sample_rows: workspace too small");
    auto* ws = static_cast<char*>(workspace);
    auto take = [&](size_t bytes) {
        char* p = ws;
        ws += align_up(bytes);
        return p;
    };
    float *raw = nullptr, *terms = nullptr;
    if (n_lp > 0) {
        raw = reinterpret_cast<float*>(take(size_t(n_lp * n_vocab) * 4));
        terms = reinterpret_cast<float*>(take(size_t(n_lp) * 8));
        logprob_kernel<<<unsigned(n_lp), k_sample_threads, 0, stream>>>(logits, n_vocab, lp, raw, terms, out_lp);
        CUDA_CHECK_LAUNCH();
    }
    sample_greedy(logits, n_rows, n_vocab, params, bias_off, bias_ids, bias_vals, pen_off, pen_ids, pen_counts, out_ids,
                  stream);
    if (n_dist > 0) {
        auto* keys_in = reinterpret_cast<uint64_t*>(take(size_t(n_dist * n_vocab) * 8));
        auto* keys_out = reinterpret_cast<uint64_t*>(take(size_t(n_dist * n_vocab) * 8));
        auto* weights = reinterpret_cast<float*>(take(size_t(n_dist * n_vocab) * 4));
        auto* off = reinterpret_cast<int64_t*>(take(size_t(n_dist + 1) * 8));
        size_t temp_bytes = cub_temp_bytes(n_vocab, n_dist);
        void* temp = take(temp_bytes);
        offsets_kernel<<<unsigned((n_dist + 1 + 255) / 256), 256, 0, stream>>>(n_dist, n_vocab, off);
        CUDA_CHECK_LAUNCH();
        const unsigned chunks = unsigned(std::min<int64_t>((n_vocab + 1023) / 1024, 64));
        keys_kernel<<<dim3(chunks, unsigned(n_dist)), 256, 0, stream>>>(logits, n_vocab, dist, keys_in);
        CUDA_CHECK_LAUNCH();
        CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(temp, temp_bytes, keys_in, keys_out, n_vocab * n_dist,
                                                           int(n_dist), off, off + 1, 0, 64, stream));
        dist_kernel<<<unsigned(n_dist), k_sample_threads, 0, stream>>>(logits, n_vocab, dist, keys_out, weights,
                                                                        out_ids);
        CUDA_CHECK_LAUNCH();
    }
    if (n_lp > 0) {
        chosen_logprob_kernel<<<unsigned((n_lp + 127) / 128), 128, 0, stream>>>(n_lp, n_vocab, lp, raw, terms, out_ids,
                                                                               out_lp);
        CUDA_CHECK_LAUNCH();
    }
}

void sample_greedy(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params,
                   const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                   const int32_t* pen_ids, const int32_t* pen_counts, int32_t* out_ids, cudaStream_t stream) {
    if (n_rows <= 0) return;
    greedy_kernel<<<unsigned(n_rows), k_sample_threads, 0, stream>>>(logits, n_vocab, params, bias_off, bias_ids,
                                                                    bias_vals, pen_off, pen_ids, pen_counts, out_ids);
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
