// Sampling on the device, choice-for-choice equal to engine/sampler.cpp.
//
//   logprob_kernel  grid (lp row): copy of the raw row, max, log-sum-exp, top-n by n block argmaxes
//   greedy_kernel   grid (row): logit bias and penalties in the CPU's order (serial over the row's
//                   list so repeated ids add in order), then an argmax, lowest id winning ties
//   keys_kernel     grid (dist row, chunk): the CPU's sort order as keys of 32 + id_bits bits (order
//                   bits of the logit, then the id); NaN and -inf become all ones, which sort last
//   cub segmented radix sort of the keys, one segment per dist row
//   dist_kernel     grid (dist row): top-k cut, weights, the chunk sums of top-p and the draw and
//                   the min-p cut in parallel; one thread runs the running totals over the chunk
//                   sums (n/32 adds) and the last chunk, so every float operation matches the
//                   CPU's (no FMA contraction: explicit _rn intrinsics)
//   chosen_logprob_kernel: log_softmax(raw)[chosen] for the lp rows
#include <cfloat>
#include <climits>

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
              SampleMasks masks, const int32_t* __restrict__ bias_off, const int32_t* __restrict__ bias_ids,
              const float* __restrict__ bias_vals, const int32_t* __restrict__ pen_off,
              const int32_t* __restrict__ pen_ids, const int32_t* __restrict__ pen_counts,
              int32_t* __restrict__ out_ids) {
    const int64_t r = blockIdx.x;
    float* l = logits + r * n_vocab;
    // A grammar's mask first: a banned token stays -inf whatever bias or penalty follows.
    if (masks.row && masks.row[r] >= 0) {
        const uint32_t* m = masks.words + int64_t(masks.row[r]) * ((n_vocab + 31) / 32);
        for (int64_t i = threadIdx.x; i < n_vocab; i += k_sample_threads)
            if (!(m[i >> 5] >> (i & 31) & 1u)) l[i] = -INFINITY;
        __syncthreads();
    }
    // Bias, then penalties, as the CPU orders them. Each list names a token once (the penalty
    // counts always; the bias unless the row says otherwise), so the block's threads share the
    // entries: a request's 300 bias entries cost every step one pass, not 300 dependent ones.
    if (bias_off) {
        const int j0 = bias_off[2 * r], j1 = bias_off[2 * r + 1];
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

// Sort keys: the logit's order bits (larger first) above the id (lower first), in 32 + id_bits
// bits so the radix sort runs only over bits that can differ (49 for a 128k vocabulary).
__device__ __forceinline__ uint64_t sort_key(float l, uint32_t id, int id_bits) {
    l = __fadd_rn(fminf(l, FLT_MAX), 0.0f);  // +inf -> FLT_MAX; -0 -> +0 so it ties with +0
    uint32_t u = __float_as_uint(l);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (uint64_t(~u) << id_bits) | id;
}
// Above every valid key (whose top 32 bits are at most ~order(-FLT_MAX) = 0xFF7FFFFF), so NaN
// and -inf sort last.
__host__ __device__ constexpr uint64_t invalid_key(int id_bits) { return (uint64_t(1) << (32 + id_bits)) - 1; }

__global__ void keys_kernel(const float* __restrict__ logits, int64_t n_vocab, int id_bits,
                            const DistRowParams* __restrict__ dist, uint64_t* __restrict__ keys) {
    const int64_t j = blockIdx.y;
    const float* l = logits + int64_t(dist[j].row) * n_vocab;
    uint64_t* k = keys + j * n_vocab;
    const uint64_t bad = invalid_key(id_bits);
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vocab; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = l[i];
        k[i] = (v != v || v == -INFINITY) ? bad : sort_key(v, uint32_t(i), id_bits);
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

__device__ __forceinline__ int block_min_int(int v, int* s_tmp) {
    for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, off));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s_tmp[threadIdx.x >> 5] = v;
    __syncthreads();
    int t = INT_MAX;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) t = min(t, s_tmp[w]);
    return t;
}

constexpr int k_chunk = k_sample_sum_chunk;
__host__ __device__ constexpr int64_t n_chunks_of(int64_t n) { return (n + k_chunk - 1) / k_chunk; }

// The sums of engine/sampler.h over w[0..n): every chunk's sum in parallel (each left to right),
// then the running totals run[0..n_chunks] (run[0] = 0, run[c+1] = run[c] + s_c) by one thread:
// the only serial part, n / 32 adds.
__device__ void chunked_totals(const float* w, int n, float* cs, float* run) {
    const int n_chunks = int(n_chunks_of(n));
    for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        const int lo = c * k_chunk, hi = min(lo + k_chunk, n);
        float sum = 0.0f;
        for (int i = lo; i < hi; ++i) sum = __fadd_rn(sum, w[i]);
        cs[c] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float a = 0.0f;
        run[0] = 0.0f;
#pragma unroll 8
        for (int c = 0; c < n_chunks; ++c) {
            a = __fadd_rn(a, cs[c]);
            run[c + 1] = a;
        }
    }
    __syncthreads();
}

// The first j in [0, n) whose running sum passes t (> t when strict, else >= t), for every
// thread; `last` when no chunk passes, the chunk's last weighted j when rounding leaves none.
__device__ int first_passing(const float* w, int n, const float* run, float t, bool strict, int last, int* s_tmp,
                             int* s_out) {
    const int n_chunks = int(n_chunks_of(n));
    int first = INT_MAX;
    for (int c = threadIdx.x; c < n_chunks; c += blockDim.x) {
        const float v = run[c + 1];
        if (strict ? v > t : v >= t) {
            first = c;
            break;
        }
    }
    first = block_min_int(first, s_tmp);
    if (threadIdx.x == 0) {
        int r = last;
        if (first != INT_MAX) {
            const int hi = min(n, (first + 1) * k_chunk);
            float a = run[first];
            for (int i = first * k_chunk; i < hi; ++i) {
                if (!(w[i] > 0.0f)) continue;  // an id that is not a candidate (id order)
                r = i;
                a = __fadd_rn(a, w[i]);
                if (strict ? a > t : a >= t) break;
            }
        }
        *s_out = r;
    }
    __syncthreads();
    return *s_out;
}

// Steps 5-9 for one row whose n_valid valid candidates are k[0..n_valid) in sort-key order (k in
// global or shared memory). weights w: [n_valid]; cs, run: the row's chunk sums.
__device__ void draw_sorted(const float* l, const uint64_t* k, int n_valid, uint64_t id_mask, const DistRowParams& p,
                            float* w, float* cs, float* run, int32_t* out_ids, int* s_tmp, int* s_out) {
    // Step 5: top-k.
    const int m = p.top_k > 0 ? min(p.top_k, n_valid) : n_valid;
    // Step 6: weights relative to the max (candidate 0); the nonzero ones are a prefix.
    const float l0 = fminf(l[uint32_t(k[0] & id_mask)], FLT_MAX);
    int cnt = 0;
    for (int i = threadIdx.x; i < m; i += k_sample_threads) {
        const float li = fminf(l[uint32_t(k[i] & id_mask)], FLT_MAX);
        const float wi = det_expf(__fmul_rn(__fsub_rn(li, l0), p.inv_temperature));
        w[i] = wi;
        cnt += wi > 0.0f;
    }
    int n_keep = block_sum_int(cnt, s_tmp);  // ends with __syncthreads: w is visible
    // Step 7: top-p.
    if (p.top_p < 1.0f) {
        chunked_totals(w, n_keep, cs, run);
        const float target = __fmul_rn(p.top_p, run[n_chunks_of(n_keep)]);
        n_keep = first_passing(w, n_keep, run, target, false, n_keep - 1, s_tmp, s_out) + 1;
    }
    // Step 8: min-p, the longest prefix with w >= min_p (w_0 = 1 always stays).
    if (p.min_p > 0.0f) {
        int first = n_keep;
        for (int i = 1 + threadIdx.x; i < n_keep; i += k_sample_threads)
            if (w[i] < p.min_p) {
                first = i;
                break;
            }
        n_keep = block_min_int(first, s_tmp);
    }
    // Step 9: the draw.
    chunked_totals(w, n_keep, cs, run);
    const float target = __fmul_rn(philox_uniform(p.seed, p.token_index), run[n_chunks_of(n_keep)]);
    const int sel = first_passing(w, n_keep, run, target, true, n_keep - 1, s_tmp, s_out);
    if (threadIdx.x == 0) out_ids[p.row] = int32_t(uint32_t(k[sel] & id_mask));
}

// Rows sorted by cub. weights: [n_dist, n_vocab] scratch; sums: [n_dist, 2 * (n_chunks_of(n_vocab) + 1)].
__global__ void __launch_bounds__(k_sample_threads)
dist_kernel(const float* __restrict__ logits, int64_t n_vocab, int id_bits, const DistRowParams* __restrict__ dist,
            const uint64_t* __restrict__ keys, float* __restrict__ weights, float* __restrict__ sums,
            int32_t* __restrict__ out_ids) {
    __shared__ int s_tmp[k_sample_threads / 32];
    __shared__ int s_out;
    const int64_t j = blockIdx.x;
    const DistRowParams p = dist[j];
    const uint64_t* k = keys + j * n_vocab;
    const uint64_t bad = invalid_key(id_bits);
    // Step 4: the valid candidates are a prefix of the sorted keys.
    int cnt = 0;
    for (int64_t i = threadIdx.x; i < n_vocab; i += k_sample_threads) cnt += k[i] != bad;
    const int n_valid = block_sum_int(cnt, s_tmp);
    if (n_valid == 0) {
        if (threadIdx.x == 0) out_ids[p.row] = -1;
        return;
    }
    draw_sorted(logits + int64_t(p.row) * n_vocab, k, n_valid, (uint64_t(1) << id_bits) - 1, p,
                weights + j * n_vocab, sums + j * 2 * (n_chunks_of(n_vocab) + 1),
                sums + j * 2 * (n_chunks_of(n_vocab) + 1) + n_chunks_of(n_vocab) + 1, out_ids, s_tmp, &s_out);
}

// Rows with 0 < top_k <= k_max_select_k (dist rows row0..): the k best keys found without a
// sort of the row. A radix select over the logits' 32 order bits (4 passes of 8 bits, integer
// counts) finds the k-th best value T; the candidates better than T and, of those equal to T, the
// lowest ids (each thread owns a contiguous id range, so a scan of the counts ranks them in id
// order) are the k best keys exactly; a bitonic sort of those k in shared memory orders them.
__global__ void __launch_bounds__(k_sample_threads)
topk_dist_kernel(const float* __restrict__ logits, int64_t n_vocab, int id_bits, const DistRowParams* __restrict__ dist,
                 int64_t row0, float* __restrict__ weights, float* __restrict__ sums, int32_t* __restrict__ out_ids) {
    __shared__ int s_tmp[k_sample_threads / 32];
    __shared__ int s_out;
    __shared__ uint32_t s_hist[256];
    __shared__ uint32_t s_prefix, s_need;
    __shared__ int s_lt[k_sample_threads], s_eq[k_sample_threads];
    __shared__ uint64_t s_keys[k_max_select_k];
    const int64_t j = row0 + blockIdx.x;
    const DistRowParams p = dist[j];
    const float* l = logits + int64_t(p.row) * n_vocab;
    const int n = int(n_vocab);
    auto order = [](float v) {  // sort_key's high part: smaller is better
        v = __fadd_rn(fminf(v, FLT_MAX), 0.0f);
        uint32_t u = __float_as_uint(v);
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        return ~u;
    };
    int cnt = 0;
    for (int i = threadIdx.x; i < n; i += k_sample_threads) {
        const float v = l[i];
        cnt += v == v && v != -INFINITY;
    }
    const int n_valid = block_sum_int(cnt, s_tmp);
    if (n_valid == 0) {
        if (threadIdx.x == 0) out_ids[p.row] = -1;
        return;
    }
    const int m = min(p.top_k, n_valid);
    // Radix select: the m-th smallest order value T, and how many of the T ties to take.
    if (threadIdx.x == 0) {
        s_prefix = 0;
        s_need = uint32_t(m);
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += k_sample_threads) s_hist[b] = 0;
        __syncthreads();
        const uint32_t prefix = s_prefix;
        const uint32_t high_mask = shift == 24 ? 0u : ~uint32_t(0) << (shift + 8);
        for (int i = threadIdx.x; i < n; i += k_sample_threads) {
            const float v = l[i];
            if (!(v == v && v != -INFINITY)) continue;
            const uint32_t o = order(v);
            if ((o & high_mask) == (prefix & high_mask)) atomicAdd(&s_hist[(o >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t need = s_need, b = 0;
            for (; b < 255 && s_hist[b] < need; ++b) need -= s_hist[b];
            s_need = need;
            s_prefix = prefix | (b << shift);
        }
        __syncthreads();
    }
    const uint32_t t_val = s_prefix;
    const int need = int(s_need);  // ties at T taken, by lowest id; m - need are better than T
    // Contiguous id ranges: count, scan (in thread order = id order), then place.
    const int span = (n + k_sample_threads - 1) / k_sample_threads;
    const int lo = min(n, int(threadIdx.x) * span), hi = min(n, lo + span);
    int n_lt = 0, n_eq = 0;
    for (int i = lo; i < hi; ++i) {
        const float v = l[i];
        if (!(v == v && v != -INFINITY)) continue;
        const uint32_t o = order(v);
        n_lt += o < t_val;
        n_eq += o == t_val;
    }
    s_lt[threadIdx.x] = n_lt;
    s_eq[threadIdx.x] = n_eq;
    __syncthreads();
    if (threadIdx.x == 0) {  // exclusive scans, 256 entries
        int a = 0, e = 0;
        for (int t = 0; t < k_sample_threads; ++t) {
            const int x = s_lt[t], y = s_eq[t];
            s_lt[t] = a;
            s_eq[t] = e;
            a += x;
            e += y;
        }
    }
    __syncthreads();
    int at_lt = s_lt[threadIdx.x], at_eq = s_eq[threadIdx.x];
    const int n_better = m - need;
    for (int i = lo; i < hi; ++i) {
        const float v = l[i];
        if (!(v == v && v != -INFINITY)) continue;
        const uint32_t o = order(v);
        const uint64_t key = (uint64_t(o) << id_bits) | uint32_t(i);
        if (o < t_val) s_keys[at_lt++] = key;
        else if (o == t_val && at_eq < need) s_keys[n_better + at_eq++] = key;
    }
    // Bitonic sort of the m keys, padded to a power of two with keys above every valid one.
    int n_pow = 1;
    while (n_pow < m) n_pow <<= 1;
    for (int i = m + threadIdx.x; i < n_pow; i += k_sample_threads) s_keys[i] = ~uint64_t(0);
    __syncthreads();
    for (int size = 2; size <= n_pow; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n_pow; i += k_sample_threads) {
                const int partner = i ^ stride;
                if (partner > i) {
                    const bool up = (i & size) == 0;
                    const uint64_t x = s_keys[i], y = s_keys[partner];
                    if ((x > y) == up) {
                        s_keys[i] = y;
                        s_keys[partner] = x;
                    }
                }
            }
            __syncthreads();
        }
    draw_sorted(l, s_keys, m, (uint64_t(1) << id_bits) - 1, p, weights + j * n_vocab,
                sums + j * 2 * (n_chunks_of(n_vocab) + 1), sums + j * 2 * (n_chunks_of(n_vocab) + 1) + n_chunks_of(n_vocab) + 1,
                out_ids, s_tmp, &s_out);
}

__device__ __forceinline__ int block_max_int(int v, int* s_tmp) { return -block_min_int(-v, s_tmp); }

__device__ __forceinline__ float block_max_float(float v, float* s_tmp) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s_tmp[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = -INFINITY;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) t = fmaxf(t, s_tmp[w]);
    return t;
}

// Dist rows row0.. without top-k and top-p: candidates in id order (sampler.h step 4), so no
// sort; the chunks are the ids' (a dropped id weighs 0). Same scratch as dist_kernel.
__global__ void __launch_bounds__(k_sample_threads)
plain_dist_kernel(const float* __restrict__ logits, int64_t n_vocab, const DistRowParams* __restrict__ dist,
                  int64_t row0, float* __restrict__ weights, float* __restrict__ sums, int32_t* __restrict__ out_ids) {
    __shared__ float s_f[k_sample_threads / 32];
    __shared__ int s_tmp[k_sample_threads / 32];
    __shared__ int s_out;
    const int64_t j = row0 + blockIdx.x;
    const DistRowParams p = dist[j];
    const float* l = logits + int64_t(p.row) * n_vocab;
    float* w = weights + j * n_vocab;
    float* cs = sums + j * 2 * (n_chunks_of(n_vocab) + 1);
    float* run = cs + n_chunks_of(n_vocab) + 1;
    const int n = int(n_vocab);
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += k_sample_threads) {
        const float v = l[i];
        if (v == v && v != -INFINITY) mx = fmaxf(mx, fminf(v, FLT_MAX));
    }
    const float l_max = block_max_float(mx, s_f);
    if (l_max == -INFINITY) {
        if (threadIdx.x == 0) out_ids[p.row] = -1;
        return;
    }
    int last = -1;
    for (int i = threadIdx.x; i < n; i += k_sample_threads) {
        const float v = l[i];
        float wi = 0.0f;
        if (v == v && v != -INFINITY) {
            wi = det_expf(__fmul_rn(__fsub_rn(fminf(v, FLT_MAX), l_max), p.inv_temperature));
            if (p.min_p > 0.0f && !(wi >= p.min_p)) wi = 0.0f;
        }
        w[i] = wi;
        if (wi > 0.0f) last = i;
    }
    last = block_max_int(last, s_tmp);  // ends with __syncthreads: w is visible
    chunked_totals(w, n, cs, run);
    const float target = __fmul_rn(philox_uniform(p.seed, p.token_index), run[n_chunks_of(n)]);
    const int sel = first_passing(w, n, run, target, true, last, s_tmp, &s_out);
    if (threadIdx.x == 0) out_ids[p.row] = sel;
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

// Bits that hold an id below n_vocab.
int id_bits_of(int64_t n_vocab) {
    int b = 1;
    while ((int64_t(1) << b) < n_vocab) ++b;
    return b;
}

size_t cub_temp_bytes(int64_t n_vocab, int64_t n_dist) {
    size_t bytes = 0;
    CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(
        nullptr, bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr), n_vocab * n_dist,
        int(n_dist), static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(nullptr), 0,
        32 + id_bits_of(n_vocab), cudaStream_t(0)));
    return bytes;
}

size_t sums_floats(int64_t n_vocab, int64_t n_dist) { return size_t(n_dist) * 2 * size_t(n_chunks_of(n_vocab) + 1); }

__global__ void offsets_kernel(int64_t n_dist, int64_t n_vocab, int64_t* __restrict__ off) {
    const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j <= n_dist) off[j] = j * n_vocab;
}

}  // namespace

size_t sample_workspace_bytes(int64_t n_vocab, int64_t n_dist, int64_t n_sort, int64_t n_lp) {
    const int64_t n_sorted = n_sort;
    size_t b = 0;
    if (n_lp > 0) b += align_up(size_t(n_lp * n_vocab) * 4) + align_up(size_t(n_lp) * 8);
    if (n_dist > 0) b += align_up(size_t(n_dist * n_vocab) * 4) + align_up(sums_floats(n_vocab, n_dist) * 4);
    if (n_sorted > 0)
        b += 2 * align_up(size_t(n_sorted * n_vocab) * 8) + align_up(size_t(n_sorted + 1) * 8) +
             align_up(cub_temp_bytes(n_vocab, n_sorted));
    return b;
}

void sample_rows(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params, SampleMasks masks,
                 const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                 const int32_t* pen_ids, const int32_t* pen_counts, const DistRowParams* dist, int64_t n_dist,
                 int64_t n_sort, int64_t n_select, const LogprobRowParams* lp, int64_t n_lp, void* workspace,
                 size_t workspace_bytes, int32_t* out_ids, LogprobOut* out_lp, cudaStream_t stream) {
    if (n_rows <= 0) return;
    if (n_sort < 0 || n_select < 0 || n_sort + n_select > n_dist)
        throw std::runtime_error("sample_rows: n_sort / n_select out of range");
    const int64_t n_sorted = n_sort;
    if (workspace_bytes < sample_workspace_bytes(n_vocab, n_dist, n_sorted, n_lp))
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
    sample_greedy(logits, n_rows, n_vocab, params, masks, bias_off, bias_ids, bias_vals, pen_off, pen_ids, pen_counts, out_ids,
                  stream);
    if (n_dist > 0) {
        auto* weights = reinterpret_cast<float*>(take(size_t(n_dist * n_vocab) * 4));
        auto* sums = reinterpret_cast<float*>(take(sums_floats(n_vocab, n_dist) * 4));
        if (n_sorted > 0) {
            auto* keys_in = reinterpret_cast<uint64_t*>(take(size_t(n_sorted * n_vocab) * 8));
            auto* keys_out = reinterpret_cast<uint64_t*>(take(size_t(n_sorted * n_vocab) * 8));
            auto* off = reinterpret_cast<int64_t*>(take(size_t(n_sorted + 1) * 8));
            size_t temp_bytes = cub_temp_bytes(n_vocab, n_sorted);
            void* temp = take(temp_bytes);
            offsets_kernel<<<unsigned((n_sorted + 1 + 255) / 256), 256, 0, stream>>>(n_sorted, n_vocab, off);
            CUDA_CHECK_LAUNCH();
            const unsigned chunks = unsigned(std::min<int64_t>((n_vocab + 1023) / 1024, 64));
            const int id_bits = id_bits_of(n_vocab);
            keys_kernel<<<dim3(chunks, unsigned(n_sorted)), 256, 0, stream>>>(logits, n_vocab, id_bits, dist, keys_in);
            CUDA_CHECK_LAUNCH();
            CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeys(temp, temp_bytes, keys_in, keys_out, n_vocab * n_sorted,
                                                               int(n_sorted), off, off + 1, 0, 32 + id_bits, stream));
            dist_kernel<<<unsigned(n_sorted), k_sample_threads, 0, stream>>>(logits, n_vocab, id_bits, dist, keys_out,
                                                                              weights, sums, out_ids);
            CUDA_CHECK_LAUNCH();
        }
        if (n_select > 0) {
            topk_dist_kernel<<<unsigned(n_select), k_sample_threads, 0, stream>>>(
                logits, n_vocab, id_bits_of(n_vocab), dist, n_sort, weights, sums, out_ids);
            CUDA_CHECK_LAUNCH();
        }
        if (n_dist > n_sort + n_select) {
            plain_dist_kernel<<<unsigned(n_dist - n_sort - n_select), k_sample_threads, 0, stream>>>(
                logits, n_vocab, dist, n_sort + n_select, weights, sums, out_ids);
            CUDA_CHECK_LAUNCH();
        }
    }
    if (n_lp > 0) {
        chosen_logprob_kernel<<<unsigned((n_lp + 127) / 128), 128, 0, stream>>>(n_lp, n_vocab, lp, raw, terms, out_ids,
                                                                               out_lp);
        CUDA_CHECK_LAUNCH();
    }
}

void sample_greedy(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params, SampleMasks masks,
                   const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                   const int32_t* pen_ids, const int32_t* pen_counts, int32_t* out_ids, cudaStream_t stream) {
    if (n_rows <= 0) return;
    greedy_kernel<<<unsigned(n_rows), k_sample_threads, 0, stream>>>(logits, n_vocab, params, masks, bias_off, bias_ids,
                                                                    bias_vals, pen_off, pen_ids, pen_counts, out_ids);
    CUDA_CHECK_LAUNCH();
}

}  // namespace coinfer::kernels
