#pragma once
// Sampling on the device. Greedy rows are decided here; only ids come back to the host.
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

// Per-row greedy choice with the CPU sampler's rules (engine/sampler.h steps 1-3):
//   bias:      logits[r][bias_ids[j]] += bias_vals[j] for j in [bias_off[r], bias_off[r+1])
//   penalties: for j in [pen_off[r], pen_off[r+1]): token pen_ids[j] seen pen_counts[j] times,
//              repetition then frequency/presence with the row's rp, freq, presence
//   greedy:    the largest logit, lowest id on ties, NaN skipped; -1 when no logit is > -inf.
// Offsets arrays may be null (no bias / no penalties). The logits are edited in place.
struct GreedyRowParams {
    float repeat_penalty, frequency_penalty, presence_penalty;
};
void sample_greedy(float* logits, int64_t n_rows, int64_t n_vocab, const GreedyRowParams* params,
                   const int32_t* bias_off, const int32_t* bias_ids, const float* bias_vals, const int32_t* pen_off,
                   const int32_t* pen_ids, const int32_t* pen_counts, int32_t* out_ids, cudaStream_t stream);

}  // namespace coinfer::kernels
