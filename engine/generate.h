#pragma once
// Single-request generation and perplexity straight on a backend, without the async engine:
// the reference path that `coinfer generate` / `coinfer perplexity` and the golden tests use.
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "backend.h"
#include "kv_pool.h"
#include "sampler.h"

namespace coinfer {

struct GenerateOptions {
    int32_t max_tokens = 128;
    SamplingParams sampling;
    std::vector<std::string> stop;
    bool ignore_eos = false;
    int32_t n_ctx = 0;          // 0: the model's training context
    int32_t prefill_chunk = 512;
};

struct GenerateResult {
    std::vector<TokenId> prompt_ids;
    std::vector<TokenId> ids;    // generated
    std::string text;            // generated text, stop string excluded
    std::string finish_reason;   // "stop" (EOG or stop string) or "length"
    std::vector<std::vector<TokenLogprob>> top_logprobs;  // per generated token, if asked
    double prompt_seconds = 0;
    double gen_seconds = 0;
};

// Checks options against the model: Error for a prompt longer than the context, max_tokens < 0,
// bad sampling values.
void validate_generate(const Model& model, size_t n_prompt, const GenerateOptions& opt);

// Runs one generation. on_text receives text as it becomes safe to show (whole UTF-8
// characters, never part of a stop string). Blocks come from `pool` and go back before return.
GenerateResult generate(Backend& backend, KvBlockPool& pool, const Model& model,
                        std::vector<TokenId> prompt_ids, const GenerateOptions& opt,
                        const std::function<void(std::string_view)>& on_text = {});

struct PerplexityResult {
    double ppl = 0;
    double ppl_stderr = 0;
    int64_t n_chunks = 0;
    int64_t n_scored = 0;
    std::vector<double> chunk_ppl;  // running PPL after each chunk
};

// llama.cpp's method: whole text tokenized with BOS, consecutive chunks of n_ctx tokens (the
// partial last chunk dropped), first token of each chunk replaced by BOS, the second half of each
// chunk scored.
PerplexityResult perplexity(Backend& backend, KvBlockPool& pool, const Model& model,
                            std::string_view text, int32_t n_ctx,
                            const std::function<void(const PerplexityResult&)>& on_chunk = {});

}  // namespace coinfer
