#pragma once
// What a request shares between the step loop (producer) and its caller (consumer): buffered
// token events, the finish reason, and at most one waiting completion handler, which is always
// run on the handler's own executor.
#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include <asio.hpp>

#include "../engine/sampler.h"
#include "../io/tokenizer.h"

namespace coinfer {

enum FinishReason {
    FINISH_REASON_NONE,       // still running
    FINISH_REASON_STOP,       // end-of-generation token or a stop string
    FINISH_REASON_LENGTH,     // max_tokens or the context limit
    FINISH_REASON_CANCELLED,  // the caller cancelled or dropped the stream
    FINISH_REASON_ERROR,      // the engine could not run it (see the error code)
};

const char* finish_reason_name(FinishReason r);

// Error codes of the async API.
enum class EngineErrc {
    queue_full = 1,   // --max-waiting reached: the submission was refused at once
    cancelled,        // the request was cancelled
    stopped,          // the engine shut down before the request finished
    too_long,         // the request needs more KV blocks than the whole pool holds
    backend_failed,   // the forward pass failed (the message is in the log and the completion)
    engine_failed,    // the device can run nothing more: every request fails (EngineStats::failure)
    invalid_request,  // the request cannot be served as asked (e.g. every token banned)
};

const std::error_category& engine_category();
inline std::error_code make_error_code(EngineErrc e) { return {static_cast<int>(e), engine_category()}; }

// One generated token as a stream hands it out.
struct TokenEvent {
    TokenId id = -1;
    std::string text;                        // text made safe to show by this token (may be "")
    std::optional<float> logprob;            // of the chosen token, when logprobs were asked
    std::vector<TokenLogprob> top_logprobs;  // top-n, when asked
};

struct Completion {
    std::vector<TokenId> prompt_ids;
    std::vector<TokenId> ids;
    std::string text;
    FinishReason finish_reason = FINISH_REASON_NONE;
    std::vector<float> logprobs;                          // per generated token, when asked
    std::vector<std::vector<TokenLogprob>> top_logprobs;  // per generated token, when asked
    double ttft_seconds = 0;   // submission to first token
    double total_seconds = 0;  // submission to finish
};

namespace detail {

// A move-only type-erased callable (handlers are move-only; std::function is not enough).
template <typename Sig>
class UniqueFunction;

template <typename R, typename... Args>
class UniqueFunction<R(Args...)> {
public:
    UniqueFunction() = default;
    template <typename F>
    UniqueFunction(F f) : impl_(std::make_unique<Impl<F>>(std::move(f))) {}
    explicit operator bool() const { return impl_ != nullptr; }
    R operator()(Args... args) { return impl_->call(std::forward<Args>(args)...); }

private:
    struct Base {
        virtual ~Base() = default;
        virtual R call(Args... args) = 0;
    };
    template <typename F>
    struct Impl : Base {
        explicit Impl(F f) : f(std::move(f)) {}
        R call(Args... args) override { return f(std::forward<Args>(args)...); }
        F f;
    };
    std::unique_ptr<Base> impl_;
};

using NextHandler = UniqueFunction<void(std::error_code, std::optional<TokenEvent>)>;
using DoneHandler = UniqueFunction<void(std::error_code, Completion)>;

// Wraps a completion handler so that calling it runs the handler on its associated executor
// (falling back to `fallback`), keeping that executor busy until then. The handler's
// cancellation slot is cleared just before it runs, on that executor. Always posted, never
// dispatched: an immediate completion (a buffered token, cancel()) must not run the handler
// inside the initiating call, as Asio requires (a callback chain would recurse per token).
template <typename... Args, typename Handler>
UniqueFunction<void(Args...)> bind_to_executor(Handler handler, const asio::any_io_executor& fallback) {
    auto ex = asio::get_associated_executor(handler, fallback);
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto work = asio::make_work_guard(ex);
    return [h = std::move(handler), slot, work = std::move(work)](Args... args) mutable {
        auto ex = work.get_executor();
        asio::post(ex, [h = std::move(h), slot, work = std::move(work),
                            tup = std::make_tuple(std::move(args)...)]() mutable {
            if (slot.is_connected()) slot.clear();
            std::apply([&](auto&&... a) { std::move(h)(std::move(a)...); }, std::move(tup));
        });
    };
}

class RequestState {
public:
    explicit RequestState(uint64_t id) : id_(id) {}

    uint64_t id() const { return id_; }

    // ---- consumer side ----
    // Completes `h` with the next event, with nullopt at the end, or with the error.
    void next(NextHandler h);
    // Marks the request cancelled; a pending next() completes with operation_aborted, and the
    // step loop frees the blocks at its next step.
    void cancel();
    // Ends a pending next() with operation_aborted and leaves the request running (a partial or
    // total cancellation of the wait).
    void abort_wait();
    bool cancel_requested() const { return cancel_requested_.load(std::memory_order_acquire); }
    FinishReason finish_reason() const;
    std::error_code error() const;
    std::string error_message() const;
    // Switches to whole-completion mode: events are gathered and `h` runs once at the end.
    void on_done(DoneHandler h, std::vector<TokenId> prompt_ids);

    // ---- producer side (the step loop) ----
    void push(TokenEvent ev, double seconds_since_submit);
    void finish(FinishReason reason, std::error_code ec, std::string message, double seconds_since_submit);
    bool finished() const;

private:
    const uint64_t id_;
    mutable std::mutex m_;
    std::deque<TokenEvent> events_;
    FinishReason reason_ = FINISH_REASON_NONE;
    std::error_code error_;
    std::string error_message_;
    NextHandler waiter_;
    bool collect_ = false;
    Completion completion_;
    DoneHandler done_;
    std::atomic<bool> cancel_requested_{false};
};

}  // namespace detail
}  // namespace coinfer

template <>
struct std::is_error_code_enum<coinfer::EngineErrc> : std::true_type {};
