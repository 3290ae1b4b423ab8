#include "metrics.h"

#include <tuple>

#include <fmt/format.h>

namespace coinfer::server {

void Histogram::observe(double v) {
    size_t i = 0;
    while (i < bounds_.size() && v > bounds_[i]) ++i;
    ++counts_[i];
    sum_ += v;
    ++count_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
    out += fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
    uint64_t cum = 0;
    for (size_t i = 0; i < bounds_.size(); ++i) {
        cum += counts_[i];
        out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds_[i], cum);
    }
    cum += counts_.back();
    out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, cum, name, sum_, name, count_);
}

Metrics::Metrics()
    : ttft_({0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}) {}

namespace {

void metric(std::string& out, const char* name, const char* type, const char* help, double value) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, value);
}

}  // namespace

std::string Metrics::render(std::span<const EngineStats> stats) const {
    std::string out;
    out += "# HELP coinfer_requests_total HTTP responses sent, by status code.\n"
           "# TYPE coinfer_requests_total counter\n";
    for (auto [status, n] : n_responses_) out += fmt::format("coinfer_requests_total{{status=\"{}\"}} {}\n", status, n);
    out += "# HELP coinfer_request_finish_total Generation requests finished, by finish reason.\n"
           "# TYPE coinfer_request_finish_total counter\n";
    for (const auto& [reason, n] : n_finished_)
        out += fmt::format("coinfer_request_finish_total{{reason=\"{}\"}} {}\n", reason, n);
    metric(out, "coinfer_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
           static_cast<double>(n_prompt_tokens_));
    metric(out, "coinfer_generation_tokens_total", "counter", "Tokens generated for HTTP clients.",
           static_cast<double>(n_generated_tokens_));
    ttft_.render(out, "coinfer_time_to_first_token_seconds", "Request received to first token sent, server-measured.");
    itl_.render(out, "coinfer_inter_token_latency_seconds", "Time between consecutive tokens of a request.");
    // The engines' own: one table row per metric (name, type, help, value).
    using Row = std::tuple<const char*, const char*, const char*, double (*)(const EngineStats&)>;
    static constexpr Row k_engine[] = {
        {"coinfer_requests_running", "gauge", "Requests being generated.",
         [](const EngineStats& s) { return static_cast<double>(s.n_running); }},
        {"coinfer_requests_waiting", "gauge", "Requests submitted but not yet started.",
         [](const EngineStats& s) { return static_cast<double>(s.n_waiting); }},
        {"coinfer_kv_blocks_total", "gauge", "KV cache blocks in the pool.",
         [](const EngineStats& s) { return static_cast<double>(s.kv_blocks_total); }},
        {"coinfer_kv_blocks_used", "gauge", "KV cache blocks held by requests.",
         [](const EngineStats& s) { return static_cast<double>(s.kv_blocks_used); }},
        {"coinfer_kv_blocks_free", "gauge", "KV cache blocks free (cached prefixes included).",
         [](const EngineStats& s) { return static_cast<double>(s.kv_blocks_free); }},
        {"coinfer_kv_blocks_cached", "gauge", "Free KV cache blocks that still hold a reusable prefix.",
         [](const EngineStats& s) { return static_cast<double>(s.kv_blocks_cached); }},
        {"coinfer_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
         [](const EngineStats& s) { return static_cast<double>(s.prefix_hit_tokens); }},
        {"coinfer_prefix_cache_hit_rate", "gauge", "Prompt tokens found cached / prompt tokens looked up.",
         [](const EngineStats& s) { return static_cast<double>(s.prefix_hit_rate); }},
        {"coinfer_preemptions_total", "counter", "Requests preempted (by recompute) for KV space.",
         [](const EngineStats& s) { return static_cast<double>(s.n_preemptions); }},
        {"coinfer_batch_size", "gauge", "Sequences in the last engine step.",
         [](const EngineStats& s) { return static_cast<double>(s.last_batch_seqs); }},
        {"coinfer_batch_tokens", "gauge", "Tokens in the last engine step.",
         [](const EngineStats& s) { return static_cast<double>(s.last_batch_tokens); }},
        {"coinfer_batch_size_peak", "gauge", "Most sequences in one engine step so far.",
         [](const EngineStats& s) { return static_cast<double>(s.peak_batch_seqs); }},
        {"coinfer_engine_steps_total", "counter", "Engine steps run.",
         [](const EngineStats& s) { return static_cast<double>(s.n_steps); }},
        {"coinfer_engine_prompt_tokens_total", "counter", "Prompt tokens computed (prefix hits excluded).",
         [](const EngineStats& s) { return static_cast<double>(s.n_prompt_tokens); }},
        {"coinfer_engine_generated_tokens_total", "counter", "Tokens generated by the engine.",
         [](const EngineStats& s) { return static_cast<double>(s.n_generated_tokens); }},
        {"coinfer_generation_tokens_per_second", "gauge", "Generated tokens per second, recent.",
         [](const EngineStats& s) { return static_cast<double>(s.tokens_per_second); }},
        {"coinfer_engine_failed", "gauge", "1 when the engine's device is lost (every request then fails).",
         [](const EngineStats& s) { return static_cast<double>(s.failed ? 1 : 0); }},
    };
    for (const auto& [name, type, help, get] : k_engine) {
        out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
        // One engine: unlabelled; data parallel replicas: a line each, labelled replica="i".
        if (stats.size() == 1) out += fmt::format("{} {}\n", name, get(stats[0]));
        else
            for (size_t i = 0; i < stats.size(); ++i)
                out += fmt::format("{}{{replica=\"{}\"}} {}\n", name, i, get(stats[i]));
    }
    metric(out, "coinfer_http_connections", "gauge", "Open HTTP connections.", static_cast<double>(n_connections_));
    metric(out, "coinfer_http_connections_total", "counter", "HTTP connections accepted.",
           static_cast<double>(n_connections_total_));
    return out;
}

}  // namespace coinfer::server
