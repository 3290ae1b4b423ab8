#include "request_state.h"

namespace coinfer {

const char* finish_reason_name(FinishReason r) {
    switch (r) {
        case FINISH_REASON_NONE: return "none";
        case FINISH_REASON_STOP: return "stop";
        case FINISH_REASON_LENGTH: return "length";
        case FINISH_REASON_CANCELLED: return "cancelled";
        case FINISH_REASON_ERROR: return "error";
    }
    return "unknown";
}

namespace {

class EngineCategory final : public std::error_category {
public:
    const char* name() const noexcept override { return "coinfer.engine"; }
    std::string message(int ev) const override {
        switch (static_cast<EngineErrc>(ev)) {
            case EngineErrc::queue_full: return "too many waiting requests (--max-waiting reached)";
            case EngineErrc::cancelled: return "request cancelled";
            case EngineErrc::stopped: return "engine stopped";
            case EngineErrc::too_long: return "request needs more KV cache than the pool holds";
            case EngineErrc::backend_failed: return "forward pass failed";
            case EngineErrc::engine_failed: return "the engine failed (its device can run nothing more)";
            case EngineErrc::invalid_request: return "invalid request";
        }
        return "unknown engine error";
    }
};

}  // namespace

const std::error_category& engine_category() {
    static const EngineCategory cat;
    return cat;
}

namespace detail {

void RequestState::next(NextHandler h) {
    std::unique_lock lock(m_);
    if (!events_.empty()) {
        TokenEvent ev = std::move(events_.front());
        events_.pop_front();
        lock.unlock();
        h({}, std::move(ev));
        return;
    }
    if (reason_ != FINISH_REASON_NONE) {
        std::error_code ec = error_;
        lock.unlock();
        h(ec, std::nullopt);
        return;
    }
    if (waiter_) {
        // One next() at a time: a second one fails rather than silently replacing the first.
        lock.unlock();
        h(asio::error::in_progress, std::nullopt);
        return;
    }
    waiter_ = std::move(h);
}

void RequestState::cancel() {
    cancel_requested_.store(true, std::memory_order_release);
    std::unique_lock lock(m_);
    NextHandler w = std::move(waiter_);
    lock.unlock();
    if (w) w(asio::error::operation_aborted, std::nullopt);
}

void RequestState::abort_wait() {
    std::unique_lock lock(m_);
    NextHandler w = std::move(waiter_);
    lock.unlock();
    if (w) w(asio::error::operation_aborted, std::nullopt);
}

FinishReason RequestState::finish_reason() const {
    std::lock_guard lock(m_);
    return reason_;
}

std::error_code RequestState::error() const {
    std::lock_guard lock(m_);
    return error_;
}

std::string RequestState::error_message() const {
    std::lock_guard lock(m_);
    return error_message_;
}

bool RequestState::finished() const {
    std::lock_guard lock(m_);
    return reason_ != FINISH_REASON_NONE;
}

void RequestState::on_done(DoneHandler h, std::vector<TokenId> prompt_ids) {
    std::lock_guard lock(m_);
    collect_ = true;
    done_ = std::move(h);
    completion_.prompt_ids = std::move(prompt_ids);
}

void RequestState::push(TokenEvent ev, double seconds_since_submit) {
    std::unique_lock lock(m_);
    if (reason_ != FINISH_REASON_NONE) return;
    if (collect_) {
        if (completion_.ids.empty()) completion_.ttft_seconds = seconds_since_submit;
        completion_.ids.push_back(ev.id);
        completion_.text += ev.text;
        if (ev.logprob) completion_.logprobs.push_back(*ev.logprob);
        if (!ev.top_logprobs.empty()) completion_.top_logprobs.push_back(std::move(ev.top_logprobs));
        return;
    }
    if (waiter_) {
        NextHandler w = std::move(waiter_);
        lock.unlock();
        w({}, std::move(ev));
        return;
    }
    events_.push_back(std::move(ev));
}

void RequestState::finish(FinishReason reason, std::error_code ec, std::string message, double seconds_since_submit) {
    std::unique_lock lock(m_);
    if (reason_ != FINISH_REASON_NONE) return;
    reason_ = reason;
    error_ = ec;
    error_message_ = std::move(message);
    if (collect_) {
        completion_.finish_reason = reason;
        completion_.total_seconds = seconds_since_submit;
        DoneHandler d = std::move(done_);
        Completion c = std::move(completion_);
        lock.unlock();
        if (d) d(ec, std::move(c));
        return;
    }
    NextHandler w = std::move(waiter_);
    lock.unlock();
    if (w) w(ec, std::nullopt);
}

}  // namespace detail
}  // namespace coinfer
