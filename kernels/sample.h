#pragma once
// Sampling on the device, with the CPU sampler's exact rules (engine/sampler.h): only ids (and
// requested logprobs) come back to the host.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

// Per-row greedy choice with the CPU sampler's rules (engine/sampler.h steps 1-3):
//   mask:      when mask_row[r] >= 0, logits[r][id] = -inf for every id whose bit is clear in
//              masks[mask_row[r]] (n_vocab bits in (n_vocab + 31) / 32 words): a grammar's bans
//   bias:      logits[r][bias_ids[j]] += bias_vals[j] for j in [bias_off[2r], bias_off[2r+1]) (rows'
//              ranges anywhere in the arrays: a backend keeps each request's list in place)
//   penalties: for j in [pen_off[r], pen_off[r+1]): token pen_ids[j] seen pen_counts[j] times,
//              repetition then frequency/presence with the row's rp, freq, presence
//   greedy:    the largest logit, lowest id on ties, NaN skipped; -1 when no logit is > -inf.
// Offsets arrays may be null (no bias / no penalties). The logits are edited in place.
struct GreedyRowParams {
    float repeat_penalty, frequency_penalty, presence_penalty;
    int32_t bias_repeats;  // 1: a token id occurs twice in the row's bias list (applied in order, serially)
};
struct SampleMasks {
    const int32_t* row = nullptr;     // [n_rows]: index into words, or -1 (null: no row masked)
    const uint32_t* words = nullptr;  // [n_masks, (n_vocab + 31) / 32]
};
void sample_greedy(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params, SampleMasks masks,
                   const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                   const int32_t* pen_ids, const int32_t* pen_counts, int32_t* out_ids, cudaStream_t stream);

// Steps 4-9 for a row that is not greedy (after sample_greedy applied its bias and penalties).
struct DistRowParams {
    int32_t row;          // logit row this applies to
    int32_t top_k;        // 0: off
    float inv_temperature;  // 1.0f / t, computed on the host exactly as the CPU does
    float top_p;          // 1: off
    float min_p;          // 0: off
    uint32_t pad_;
    uint64_t seed, token_index;
};
// How a row is drawn. Rows with top-k or top-p draw from their candidates in logit order: a
// top-k up to k_max_select_k by a radix select of the k best and a sort of those in shared
// memory, the others by a segmented sort of the whole row. The rest draw in id order, with no
// sort (engine/sampler.h step 4). sample_rows takes its dist rows ordered by path.
inline constexpr int32_t k_max_select_k = 1024;
enum class DistPath : int { sort = 0, select = 1, plain = 2 };
inline DistPath dist_path(const DistRowParams& p) {
    if (p.top_k > 0 && p.top_k <= k_max_select_k) return DistPath::select;
    if (p.top_k > 0 || p.top_p < 1.0f) return DistPath::sort;
    return DistPath::plain;
}

// Top-n logprobs of a raw row (before bias and penalties) and the chosen token's logprob.
inline constexpr int32_t k_max_device_logprobs = 20;
struct LogprobRowParams {
    int32_t row;  // logit row
    int32_t n;    // 1..k_max_device_logprobs
};
struct LogprobOut {
    float chosen;  // log_softmax(raw)[out_ids[row]] (-inf when no token was chosen)
    int32_t n;
    int32_t ids[k_max_device_logprobs];
    float logprobs[k_max_device_logprobs];  // descending, ties by lower id
};

// Device scratch sample_rows needs.
// n_sort of the n_dist rows take DistPath::sort.
size_t sample_workspace_bytes(int64_t n_vocab, int64_t n_dist, int64_t n_sort, int64_t n_lp);

// The whole chain for n_rows rows of logits [n_rows, n_vocab]: logprobs of the listed rows
// from the raw logits, then masks/bias/penalties and greedy for every row (as sample_greedy), then the
// full chain (sort, top-k, temperature, top-p, min-p, Philox draw keyed by (seed, token_index))
// for the n_dist listed rows, whose out_ids are overwritten: first n_sort rows of
// DistPath::sort, then n_select of DistPath::select, then the plain ones. dist and lp live in
// device memory.
void sample_rows(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params, SampleMasks masks,
                 const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                 const int32_t* pen_ids, const int32_t* pen_counts, const DistRowParams* dist, int64_t n_dist,
                 int64_t n_sort, int64_t n_select, const LogprobRowParams* lp, int64_t n_lp, void* workspace,
                 size_t workspace_bytes, int32_t* out_ids, LogprobOut* out_lp, cudaStream_t stream);

}  // namespace coinfer::kernels
