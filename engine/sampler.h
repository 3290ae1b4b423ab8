#pragma once
// The CPU sampler: a chain of small stages over one row of logits (the llama.cpp
// llama_sampler_i shape: `apply` is required, stateful stages add `accept` and `reset`), plus
// top-n logprobs and the stop-string matcher.
//
// This is the reference the CUDA sampler must reproduce choice-for-choice, so the order and the
// float arithmetic are pinned down here. For one row of logits l[0..n_vocab) and token index n:
//
//  1. logit bias      l[id] += bias, for each (id, bias) in order; a -inf bias bans the token.
//  2. penalties       over the last penalty_last_n accepted tokens (-1: all of them), for each
//                     distinct id seen c times: repetition (llama.cpp): l = l > 0 ? l / rp
//                     : l * rp; then frequency/presence (OpenAI): l -= c*freq + presence.
//  3. temperature<1e-5 greedy (vLLM's epsilon; 0 is the usual spelling): the largest l, lowest
//                     id on ties; NaN is skipped. Done.
//  4. candidates      every id whose l is neither NaN nor -inf (+inf is clamped to FLT_MAX).
//                     With top-k or top-p on: sorted by l descending, ties by lower id, and
//                     every later stage keeps a prefix of that order. Otherwise in id order
//                     (no stage needs the logit order, so a device skips the sort).
//  5. top-k           (k > 0) keep the first k.
//  6. temperature     weights w_j = det_expf((l_j - l_max) * (1.0f / t)), so the max weighs 1. Temperature comes before top-p/min-p (vLLM / OpenAI semantics: the
//                     nucleus is taken from the distribution actually sampled). Weights that
//                     underflow to 0 can never be drawn and are dropped; this changes nothing.
//  7. top-p           (top_p < 1) with S the sum of the weights and cum_k the running sum to
//                     candidate k (both as in "Sums"): keep the smallest k with
//                     cum_k >= top_p * S.
//  8. min-p           (min_p > 0) keep the candidates with w_j >= min_p (p_j >= min_p * p_max);
//                     sorted, the longest prefix with w_j >= min_p.
//  9. draw            u = philox_uniform(seed, n); T = u * S over the m kept candidates;
//                     pick the first j with cum_j > T (the last kept one if rounding leaves
//                     none).
// Sums: the weights, in candidate order, fall in chunks of k_sample_sum_chunk (32): sorted
// candidates by position (the last chunk may be shorter), candidates in id order by id (chunk c
// holds the ids [32c, 32c + 32); dropped ids weigh nothing, and adding 0 is exact). A chunk sums left to right from 0; S is the left-to-right sum of the chunk sums.
// The first j whose running sum passes a bound is found the same way: the first chunk c with
// A_c + s_c passing it (A_c the running total of the chunks before c, s_c the chunk's sum; the
// last candidate if none does), then within c the first j with A_c + w_first + ... + w_j
// (left to right) passing it (c's last candidate if rounding leaves none). A device sums the
// chunks in parallel; only the short running totals are serial.
// All arithmetic is IEEE float with one rounding per written operation and no fused
// multiply-add (engine/ is built with -ffp-contract=off; CUDA code must use __fmul_rn/__fadd_rn
// or equivalent): c*freq + presence is a product then a sum. Sums run as above;
// det_expf (kernels/philox.h) is the one exp. No stage divides by S: nothing is normalised.
// Checked on an H100: det_expf and philox_uniform give the same bits on host and device.
//
// If no token survives steps 1-2 (everything NaN or -inf), sample() throws coinfer::Error.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace coinfer {

struct SamplingParams {
    float temperature = 1.0f;  // 0 (anything below k_greedy_temperature): greedy
    int32_t top_k = 0;         // 0: off
    float top_p = 1.0f;        // 1: off
    float min_p = 0.0f;        // 0: off
    float repeat_penalty = 1.0f;     // 1: off
    float frequency_penalty = 0.0f;  // 0: off
    float presence_penalty = 0.0f;   // 0: off
    int32_t penalty_last_n = 64;     // 0: off, -1: every accepted token
    std::vector<std::pair<int32_t, float>> logit_bias{};  // (token id, added to its logit)
    uint64_t seed = 0;
    int32_t n_logprobs = 0;  // top logprobs to report per token, 0..k_max_logprobs

    static constexpr int32_t k_max_logprobs = 20;
    static constexpr float k_greedy_temperature = 1e-5f;  // below this 1/t overflows or nearly

    // Throws coinfer::Error naming the field for values that make no sense (these come from
    // HTTP bodies). Token ids in logit_bias are range-checked against the vocab in sample().
    void validate() const;
};

// One candidate token of the row being narrowed down.
struct SamplerCandidate {
    int32_t id;
    float logit;   // after bias and penalties
    float weight;  // unnormalised probability, det_expf((logit - max) / t); set by temperature
};

// The row that flows through the chain.
struct SamplerRow {
    std::span<float> logits;  // [n_vocab], edited in place by bias and penalties
    uint64_t token_index = 0;
    std::vector<SamplerCandidate> candidates;  // sorted as in step 4 once built
    int32_t selected = -1;                     // set by the final stage
};

class SamplerStage {
public:
    virtual ~SamplerStage() = default;
    virtual const char* name() const = 0;
    virtual void apply(SamplerRow& row) = 0;
    virtual void accept(int32_t /*id*/) {}
    virtual void reset() {}
};

class Sampler {
public:
    explicit Sampler(SamplingParams params);  // validates params
    ~Sampler();
    Sampler(Sampler&&) noexcept;
    Sampler& operator=(Sampler&&) noexcept;

    // Picks the token for generated-token number `token_index` of this request. `logits` is
    // [n_vocab] and is modified in place: take logprobs from the raw row before calling this.
    int32_t sample(std::span<float> logits, uint64_t token_index);

    // Feeds a token into the penalty window. The engine calls it for the prompt tokens (if they
    // should be penalised) and for each generated token.
    void accept(int32_t id);
    void reset();

    const SamplingParams& params() const { return params_; }
    // True when sample() is a plain argmax after bias and penalties (temperature below
    // k_greedy_temperature): a device sampler can then decide the row.
    bool is_greedy() const { return params_.temperature < SamplingParams::k_greedy_temperature; }
    // The penalty window as (token id, times seen), or empty when no penalty stage is active.
    std::vector<std::pair<int32_t, int32_t>> penalty_counts() const;
    // The candidates that the last sample() drew from (empty after a greedy pick).
    std::span<const SamplerCandidate> last_candidates() const { return row_.candidates; }
    // Stage names in chain order, for logs and tests.
    std::vector<std::string> stage_names() const;

private:
    SamplingParams params_;
    std::vector<std::unique_ptr<SamplerStage>> stages_;
    SamplerRow row_;  // scratch reused between calls
};

struct TokenLogprob {
    int32_t id;
    float logprob;
};

// Top-n of log_softmax(logits) for the raw row (before any sampler stage), sorted by logprob
// descending, ties by lower id. Float only: max-subtract, sum of exp, log. NaN logits count as -inf.
// These are reported numbers, not choices, so they use libm and are outside the bit-exact contract.
std::vector<TokenLogprob> top_logprobs(const float* logits, int32_t n_vocab, int32_t n);
// log_softmax(logits)[id], computed the same way.
float token_logprob(const float* logits, int32_t n_vocab, int32_t id);

// Holds back streamed text that might be the start of a stop string. push() takes each decoded
// piece and returns the text safe to show now; once a stop string is complete, the text before
// it is returned, stopped() turns true, and the stop string itself is never emitted.
class StopMatcher {
public:
    explicit StopMatcher(std::vector<std::string> stops);  // empty strings are ignored

    std::string push(std::string_view piece);
    // End of generation without a stop string: release whatever is held back.
    std::string flush();
    bool stopped() const { return stopped_; }
    // Index into the constructor's list of the stop string that matched, or -1.
    int32_t matched() const { return matched_; }

private:
    std::vector<std::string> stops_;
    std::vector<std::vector<uint32_t>> fail_;  // KMP failure links per stop string
    std::vector<uint32_t> state_;              // per stop: bytes of it matched by the text's end
    std::string held_;
    bool stopped_ = false;
    int32_t matched_ = -1;
};

}  // namespace coinfer
