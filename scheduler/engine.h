#pragma once
// coinfer::Engine: the async engine. It owns the model, a backend, the KV block pool and the
// step loop (one thread). Any thread may submit; every caller resumes on its own executor.
//
//   coinfer::Engine engine(io.get_executor(), {.model = "model.gguf"});
//   auto stream = engine.generate(req);                      // tokens as they come
//   while (auto tok = co_await stream.next()) fmt::print("{}", tok->text);
//   auto done = co_await engine.async_complete(req, asio::use_awaitable);
//
// The async operations follow Asio's completion-token conventions (use_awaitable, deferred,
// callbacks), and cancellation comes through the handler's cancellation slot: for a stream's
// next(), a terminal cancellation cancels the request, a partial or total one only ends that
// wait (operation_aborted) and the request runs on for the next next(); async_complete's wait is
// its request, so any cancellation cancels it. A deferred async_complete does nothing until it
// is started (tokenization included) and, started after its Engine is gone, completes with
// EngineErrc::stopped. Dropping a TokenStream cancels its request. Invalid requests throw coinfer::Error from the initiating
// call. A full queue fails at once: generate() throws EngineError(queue_full), async_complete
// completes with EngineErrc::queue_full. Neither touches other requests.
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <asio.hpp>

#include "../engine/backend.h"
#include "planner.h"
#include "request_state.h"

namespace coinfer {

struct Request {
    std::string prompt{};
    std::vector<TokenId> prompt_ids{};  // used instead of `prompt` when not empty
    int32_t max_tokens = 128;
    SamplingParams sampling{};        // sampling.n_logprobs asks for top-n logprobs
    std::vector<std::string> stop{};
    bool ignore_eos = false;
    bool add_special = true;          // BOS/EOS as the model's tokenizer says
    bool parse_special = true;        // special tokens written in the prompt are recognised
    // Constrained output (at most one of the two): a GBNF grammar as llama.cpp writes it, or a
    // JSON Schema (as JSON text). Every token is then one the grammar allows; the request ends
    // with FINISH_REASON_STOP once the grammar can take nothing more. A bad grammar or schema
    // throws coinfer::Error from the initiating call, with the position and the reason.
    std::string grammar{};
    std::string json_schema{};
};

struct EngineOptions {
    std::string model{};                     // GGUF path (ignored when `loaded` is set)
    std::shared_ptr<const Model> loaded{};   // an already loaded model
    std::string device = "auto";             // "cpu", "cuda", "cuda:N" or "auto" (cuda:0 when present)
    BackendOptions backend{};                // KV pool size, block size, threads
    PlannerOptions planner{};                // token budget, max sequences, prefix cache
    int32_t max_waiting = 4096;              // submitted but not yet started requests
    int32_t n_ctx = 0;                       // per-request context limit; 0: the model's
    // Test hooks (make_fault_backend), 0 in any real use: this fraction of forward passes fails
    // by an injected fault, from a generator seeded with fault_seed; pass number fault_fatal_at
    // fails as a lost device would.
    double fault_rate = 0.0;
    uint64_t fault_seed = 1;
    int64_t fault_fatal_at = 0;
};

struct EngineStats {
    int32_t n_running = 0;
    int32_t n_waiting = 0;
    int32_t kv_blocks_total = 0;
    int32_t kv_blocks_used = 0;
    int32_t kv_blocks_free = 0;
    int32_t kv_blocks_cached = 0;   // free but holding a reusable prefix
    double prefix_hit_rate = 0;     // prompt tokens found cached / prompt tokens looked up
    int64_t prefix_hit_tokens = 0;
    int64_t n_preemptions = 0;
    int64_t n_steps = 0;
    int64_t n_prompt_tokens = 0;    // computed, prefix hits excluded
    int64_t n_generated_tokens = 0;
    int64_t n_requests_finished = 0;
    int64_t n_requests_cancelled = 0;
    int32_t last_batch_seqs = 0;    // sequences in the last step
    int32_t last_batch_tokens = 0;
    int32_t peak_batch_seqs = 0;
    double tokens_per_second = 0;   // generated tokens/s over the last second or so
    // The device failed for good: every request ended with engine_failed, new ones fail at once.
    bool failed = false;
    std::string failure;            // why, when failed
};

class GrammarContext;

class EngineError : public Error {
public:
    EngineError(std::error_code code, const std::string& what) : Error(what), code_(code) {}
    std::error_code code() const { return code_; }

private:
    std::error_code code_;
};

class Engine;

// A request's tokens as they come. Move-only; destroying it cancels the request.
class TokenStream {
public:
    TokenStream(TokenStream&&) noexcept = default;
    TokenStream& operator=(TokenStream&& o) noexcept {
        if (this != &o) {
            cancel();
            state_ = std::move(o.state_);
            prompt_ids_ = std::move(o.prompt_ids_);
            fallback_ = std::move(o.fallback_);
        }
        return *this;
    }
    ~TokenStream() { cancel(); }

    // Completion signature void(std::error_code, std::optional<TokenEvent>): an event per
    // generated token, then nullopt once the request has finished.
    template <typename CompletionToken = asio::use_awaitable_t<>>
    auto async_next(CompletionToken&& token = {}) {
        return asio::async_initiate<CompletionToken, void(std::error_code, std::optional<TokenEvent>)>(
            [state = state_, fallback = fallback_](auto handler) {
                auto slot = asio::get_associated_cancellation_slot(handler);
                if (slot.is_connected()) {
                    std::weak_ptr<detail::RequestState> weak = state;
                    slot.assign([weak](asio::cancellation_type type) {
                        auto s = weak.lock();
                        if (!s) return;
                        if ((type & asio::cancellation_type::terminal) != asio::cancellation_type::none) s->cancel();
                        else s->abort_wait();
                    });
                }
                state->next(detail::bind_to_executor<std::error_code, std::optional<TokenEvent>>(std::move(handler), fallback));
            },
            token);
    }
    // co_await stream.next(): the next token, or nullopt at the end. Errors throw.
    asio::awaitable<std::optional<TokenEvent>> next() { return async_next(asio::use_awaitable); }

    void cancel() {
        if (state_ && !state_->finished()) state_->cancel();
    }
    FinishReason finish_reason() const { return state_->finish_reason(); }
    std::error_code error() const { return state_->error(); }
    std::string error_message() const { return state_->error_message(); }
    const std::vector<TokenId>& prompt_ids() const { return prompt_ids_; }

private:
    friend class Engine;
    TokenStream(std::shared_ptr<detail::RequestState> s, std::vector<TokenId> prompt_ids, asio::any_io_executor ex)
        : state_(std::move(s)), prompt_ids_(std::move(prompt_ids)), fallback_(std::move(ex)) {}
    std::shared_ptr<detail::RequestState> state_;
    std::vector<TokenId> prompt_ids_;
    asio::any_io_executor fallback_;
};

class Engine {
public:
    // Loads the model (or takes opt.loaded), creates the backend and starts the step loop.
    Engine(asio::any_io_executor ex, EngineOptions opt);
    ~Engine();  // shutdown()
    // Stops the step loop (after the step on the device, whose tokens are delivered): every
    // unfinished request ends with EngineErrc::stopped, later ones are refused with it. Returns
    // once the loop has ended; idempotent. Call it from one thread at a time.
    void shutdown();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    TokenStream generate(const Request& req);

    // Completion signature void(std::error_code, Completion). The request is validated and
    // tokenized when the operation starts; an invalid one throws coinfer::Error from there.
    template <typename CompletionToken>
    auto async_complete(Request req, CompletionToken&& token) {
        return asio::async_initiate<CompletionToken, void(std::error_code, Completion)>(
            [impl = std::weak_ptr<Impl>(impl_), ex = executor_](auto handler, Request req) {
                auto slot = asio::get_associated_cancellation_slot(handler);
                const std::shared_ptr<Impl> im = impl.lock();
                // Validation first: a request that throws leaves the handler (and the work it
                // holds on its executor) untouched.
                std::optional<Prepared> p;
                if (im) p.emplace(prepare(*im, req));
                auto done = detail::bind_to_executor<std::error_code, Completion>(std::move(handler), ex);
                if (!im) done(EngineErrc::stopped, Completion{});
                else start_complete(*im, std::move(*p), std::move(done), slot);
            },
            token, std::move(req));
    }

    EngineStats stats() const;
    // Blocks the calling thread until pred(stats()) holds or `timeout` passes; returns whether
    // it held. The stats change after every step and when the loop goes idle. Not for the
    // thread that runs the engine's completion handlers.
    bool wait_for_stats(const std::function<bool(const EngineStats&)>& pred, std::chrono::milliseconds timeout) const;
    const Model& model() const;
    std::string backend_name() const;
    asio::any_io_executor get_executor() const { return executor_; }

    // Internal: a validated, tokenized request ready for the step loop.
    struct Prepared {
        std::shared_ptr<detail::RequestState> state;
        std::vector<TokenId> prompt_ids;
        Request request;
        std::shared_ptr<GrammarContext> grammar;  // compiled from request.grammar / json_schema
        std::chrono::steady_clock::time_point submitted;
    };

private:
    struct Impl;
    static Prepared prepare(Impl& im, const Request& req);
    static std::error_code submit(Impl& im, Prepared p);  // queue_full / stopped finish the request at once
    // async_complete, started and validated: the cancellation slot, the handler, submit.
    static void start_complete(Impl& im, Prepared p, detail::DoneHandler done, asio::cancellation_slot slot);

    asio::any_io_executor executor_;
    std::shared_ptr<Impl> impl_;  // shared with started operations, which hold it weakly
};

}  // namespace coinfer
