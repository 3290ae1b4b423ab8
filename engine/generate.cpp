#include "generate.h"

#include <chrono>
#include <cmath>

namespace coinfer {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The blocks one sequence holds, returned to the pool however the scope ends.
struct SeqBlocks {
    KvBlockPool& pool;
    std::vector<int32_t> table;
    ~SeqBlocks() { pool.kv_block_free_seq(table); }

    // Grows the table to cover n_tokens positions.
    void reserve(int64_t n_tokens) {
        const int64_t need = (n_tokens + pool.block_size() - 1) / pool.block_size();
        while (static_cast<int64_t>(table.size()) < need) {
            auto id = pool.kv_block_alloc();
            if (!id) throw_error("out of KV cache blocks ({} blocks of {} tokens)", pool.n_blocks(), pool.block_size());
            table.push_back(*id);
        }
    }
};

int32_t context_of(const Model& model, const GenerateOptions& opt) {
    return opt.n_ctx > 0 ? opt.n_ctx : static_cast<int32_t>(std::min<int64_t>(model.config().n_ctx_train, INT32_MAX));
}

}  // namespace

void validate_generate(const Model& model, size_t n_prompt, const GenerateOptions& opt) {
    if (opt.max_tokens < 0) throw_error("max_tokens must not be negative (got {})", opt.max_tokens);
    opt.sampling.validate();
    const int32_t n_ctx = context_of(model, opt);
    if (n_prompt == 0) throw_error("the prompt is empty");
    if (n_prompt >= static_cast<size_t>(n_ctx))
        throw_error("the prompt has {} tokens, which does not fit the context of {} tokens", n_prompt, n_ctx);
    for (const auto& [id, bias] : opt.sampling.logit_bias)
        if (id < 0 || id >= model.config().n_vocab)
            throw_error("logit_bias names token {}, outside the vocabulary (0..{})", id, model.config().n_vocab - 1);
}

GenerateResult generate(Backend& backend, KvBlockPool& pool, const Model& model,
                        std::vector<TokenId> prompt_ids, const GenerateOptions& opt,
                        const std::function<void(std::string_view)>& on_text) {
    validate_generate(model, prompt_ids.size(), opt);
    const Tokenizer& tok = model.tokenizer();
    const int32_t n_ctx = context_of(model, opt);
    const int64_t n_vocab = model.config().n_vocab;

    GenerateResult res;
    res.prompt_ids = std::move(prompt_ids);
    Sampler sampler(opt.sampling);
    for (TokenId id : res.prompt_ids) sampler.accept(id);
    StreamDecoder decoder(tok);
    StopMatcher stop(opt.stop);
    auto emit = [&](std::string s) {
        if (s.empty()) return;
        res.text += s;
        if (on_text) on_text(s);
    };

    SeqBlocks blocks{pool, {}};
    std::vector<float> logits(static_cast<size_t>(n_vocab));
    Batch batch;

    // Prefill in chunks; logits only for the last prompt token.
    auto t0 = Clock::now();
    const int64_t n_prompt = static_cast<int64_t>(res.prompt_ids.size());
    blocks.reserve(n_prompt);
    for (int64_t start = 0; start < n_prompt; start += opt.prefill_chunk) {
        const int64_t end = std::min<int64_t>(n_prompt, start + opt.prefill_chunk);
        batch.clear();
        int32_t s = batch.add_seq(blocks.table);
        for (int64_t i = start; i < end; ++i)
            batch.add(res.prompt_ids[i], static_cast<int32_t>(i), s, i == n_prompt - 1);
        backend.forward(batch, std::span<float>(logits.data(), batch.logit_rows.size() * n_vocab));
    }
    res.prompt_seconds = seconds_since(t0);

    t0 = Clock::now();
    res.finish_reason = "length";
    int64_t pos = n_prompt;
    for (int32_t n = 0; n < opt.max_tokens; ++n) {
        if (opt.sampling.n_logprobs > 0)
            res.top_logprobs.push_back(top_logprobs(logits.data(), static_cast<int32_t>(n_vocab), opt.sampling.n_logprobs));
        TokenId id = sampler.sample(logits, static_cast<uint64_t>(n));
        sampler.accept(id);
        res.ids.push_back(id);
        if (!opt.ignore_eos && tok.is_eog(id)) {
            res.finish_reason = "stop";
            break;
        }
        emit(stop.push(decoder.push(id)));
        if (stop.stopped()) {
            res.finish_reason = "stop";
            break;
        }
        if (n + 1 == opt.max_tokens || pos + 1 >= n_ctx) break;
        blocks.reserve(pos + 1);
        batch.clear();
        int32_t s = batch.add_seq(blocks.table);
        batch.add(id, static_cast<int32_t>(pos), s, true);
        backend.forward(batch, logits);
        ++pos;
    }
    if (!stop.stopped()) {
        emit(stop.push(decoder.flush()));
        if (!stop.stopped()) emit(stop.flush());
    }
    res.gen_seconds = seconds_since(t0);
    return res;
}

PerplexityResult perplexity(Backend& backend, KvBlockPool& pool, const Model& model,
                            std::string_view text, int32_t n_ctx,
                            const std::function<void(const PerplexityResult&)>& on_chunk) {
    if (n_ctx < 4) throw_error("perplexity context must be at least 4 tokens (got {})", n_ctx);
    const Tokenizer& tok = model.tokenizer();
    const int64_t n_vocab = model.config().n_vocab;
    std::vector<TokenId> ids = tok.encode(text, true, false);
    const int64_t n_chunks = static_cast<int64_t>(ids.size()) / n_ctx;
    if (n_chunks == 0)
        throw_error("the text has {} tokens, fewer than one context of {}", ids.size(), n_ctx);
    const TokenId bos = tok.vocab().bos;

    PerplexityResult res;
    double nll = 0, nll2 = 0;
    std::vector<float> logits(static_cast<size_t>(n_ctx) * n_vocab);
    Batch batch;
    const int64_t first = n_ctx / 2;
    for (int64_t c = 0; c < n_chunks; ++c) {
        SeqBlocks blocks{pool, {}};
        blocks.reserve(n_ctx);
        batch.clear();
        int32_t s = batch.add_seq(blocks.table);
        const TokenId* chunk = ids.data() + c * n_ctx;
        for (int32_t i = 0; i < n_ctx; ++i)
            batch.add(i == 0 && bos >= 0 ? bos : chunk[i], i, s, i >= first && i < n_ctx - 1);
        backend.forward(batch, std::span<float>(logits.data(), batch.logit_rows.size() * n_vocab));
        for (size_t r = 0; r < batch.logit_rows.size(); ++r) {
            const int64_t i = batch.logit_rows[r];
            const double lp = token_logprob(&logits[r * n_vocab], static_cast<int32_t>(n_vocab), chunk[i + 1]);
            nll -= lp;
            nll2 += lp * lp;
            ++res.n_scored;
        }
        res.n_chunks = c + 1;
        const double mean = nll / static_cast<double>(res.n_scored);
        res.ppl = std::exp(mean);
        // Standard error of the mean NLL, carried through exp (llama.cpp's estimate).
        const double var = nll2 / static_cast<double>(res.n_scored) - mean * mean;
        res.ppl_stderr = res.n_scored > 1 ? res.ppl * std::sqrt(std::max(0.0, var) / static_cast<double>(res.n_scored - 1)) : 0;
        res.chunk_ppl.push_back(res.ppl);
        if (on_chunk) on_chunk(res);
    }
    return res;
}

}  // namespace coinfer
