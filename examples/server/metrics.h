#pragma once
// The server's Prometheus metrics. Everything is touched from the server's one io_context
// thread, so nothing here locks. render() appends the engine's own gauges and counters.
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "scheduler/engine.h"

namespace coinfer::server {

class Histogram {
public:
    explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
    void observe(double v);
    // Appends the _bucket/_sum/_count lines; `name` is the metric name.
    void render(std::string& out, const std::string& name, const std::string& help) const;

private:
    std::vector<double> bounds_;   // upper bounds, ascending; +Inf is implicit
    std::vector<uint64_t> counts_;  // per bucket (not cumulative), last is +Inf
    double sum_ = 0;
    uint64_t count_ = 0;
};

class Metrics {
public:
    Metrics();

    void count_response(int status) { ++n_responses_[status]; }
    void count_finish(const std::string& reason) { ++n_finished_[reason]; }
    void add_tokens(int64_t n_prompt, int64_t n_generated) {
        n_prompt_tokens_ += n_prompt;
        n_generated_tokens_ += n_generated;
    }
    void observe_ttft(double seconds) { ttft_.observe(seconds); }
    void observe_itl(double seconds) { itl_.observe(seconds); }
    void connection_opened() { ++n_connections_; ++n_connections_total_; }
    void connection_closed() { --n_connections_; }

    // The Prometheus text exposition (format 0.0.4), with each engine replica's gauges.
    std::string render(std::span<const EngineStats> stats) const;

private:
    std::map<int, uint64_t> n_responses_;
    std::map<std::string, uint64_t> n_finished_;
    int64_t n_prompt_tokens_ = 0;
    int64_t n_generated_tokens_ = 0;
    Histogram ttft_;
    Histogram itl_;
    int64_t n_connections_ = 0;
    uint64_t n_connections_total_ = 0;
};

}  // namespace coinfer::server
