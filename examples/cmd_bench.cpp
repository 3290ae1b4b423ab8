// coinfer bench: throughput and latency, either through the async engine (--mode serve) or
// straight on a backend in llama-batched-bench's shape (--mode batched).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <random>
#include <thread>

#include <unistd.h>

#include <asio.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "engine/kv_pool.h"
#include "scheduler/engine.h"


namespace coinfer::cli {

// bench_allreduce.cpp / bench_grammar.cpp: --mode allreduce / grammar; the table goes to `out`.
nlohmann::json bench_allreduce(Args& args, FILE* out);
nlohmann::json bench_grammar(Args& args, const std::string& path, FILE* out);

namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Peak figures the achieved rates are set against: H100 80GB HBM3 (device-to-device copy and
// fp16 dense GEMM as measured for issue 6, rounded). The CPU gets no peak: just the figures.
constexpr double k_h100_bytes_per_s = 3.0e12;
constexpr double k_h100_flops = 800e12;

struct Options {
    std::string model_path;
    std::string device = "auto";
    int32_t n_threads = 1;
    int32_t kv_blocks = 0;
    bool batch_invariant = false;
    KvType kv_type = KV_TYPE_AUTO;
    int32_t max_batch_tokens = 2048;
    int32_t max_seqs = 256;
    int32_t max_prompt_mixed = 512;
    uint64_t seed = 42;
    float temperature = 0.0f;
    int32_t top_k = 0;
    float top_p = 1.0f, min_p = 0.0f;
    bool json_stdout = false;
    std::string json_path;
    bool progress = false;
    std::FILE* out = stdout;  // text results (stderr when JSON goes to stdout)
};

// What one forward pass costs, from the model's shapes.
struct ModelCost {
    double weight_bytes = 0;       // read once per step: every matrix but token_embd (only rows are gathered)
    double params = 0;             // elements of those matrices: a token costs 2 x params FLOPs
    double kv_bytes_per_pos = 0;   // K and V of one position, all layers
    double embd_bytes = 0;
};

KvType effective_kv_type(KvType t, bool cuda) { return t != KV_TYPE_AUTO ? t : cuda ? KV_TYPE_F16 : KV_TYPE_F32; }

// kv_type: what the backend stores (KV_TYPE_AUTO resolved by the caller).
ModelCost model_cost(const Model& m, KvType kv_type) {
    ModelCost c;
    const ModelWeights& w = m.weights();
    auto add = [&](const WeightView& v) {
        c.weight_bytes += static_cast<double>(v.row_bytes) * static_cast<double>(v.n_out);
        c.params += static_cast<double>(v.n_in) * static_cast<double>(v.n_out);
    };
    for (const auto& L : w.layers)
        for (const WeightView* v : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) add(*v);
    add(w.output);
    c.embd_bytes = static_cast<double>(w.token_embd.row_bytes) * static_cast<double>(w.token_embd.n_out);
    const ModelConfig& cfg = m.config();
    c.kv_bytes_per_pos = 2.0 * static_cast<double>(cfg.n_layer) *
                         static_cast<double>(kv_row_bytes(kv_type, cfg.n_embd_kv(), cfg.head_dim));
    return c;
}

bool is_cuda(const std::string& backend_name) { return backend_name.find("cuda") != std::string::npos; }

// Bandwidth and FLOP rate lines (and their JSON), against the H100's peaks on cuda.
json rates(std::FILE* out, const std::string& backend_name, double bytes, double flops, double seconds, const char* what) {
    json j;
    const double bps = seconds > 0 ? bytes / seconds : 0;
    const double fps = seconds > 0 ? flops / seconds : 0;
    j["bytes_per_s"] = bps;
    j["flops_per_s"] = fps;
    if (is_cuda(backend_name)) {
        j["peak_bytes_per_s"] = k_h100_bytes_per_s;
        j["peak_flops_per_s"] = k_h100_flops;
        fmt::print(out, "  {:<14} {:>9.1f} GB/s ({:.1f}% of {:.0f}), {:>9.2f} TFLOP/s ({:.1f}% of {:.0f})\n", what, bps / 1e9,
                   100 * bps / k_h100_bytes_per_s, k_h100_bytes_per_s / 1e9, fps / 1e12, 100 * fps / k_h100_flops,
                   k_h100_flops / 1e12);
    } else {
        fmt::print(out, "  {:<14} {:>9.2f} GB/s, {:.2f} GFLOP/s\n", what, bps / 1e9, fps / 1e9);
    }
    return j;
}

// Nearest-rank percentile of sorted values.
double percentile(const std::vector<double>& sorted, double p) {
    if (sorted.empty()) return 0;
    auto rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
    return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

json latency(std::FILE* out, std::vector<double> v, const char* name) {
    std::sort(v.begin(), v.end());
    json j{{"p50", percentile(v, 50) * 1e3}, {"p90", percentile(v, 90) * 1e3}, {"p99", percentile(v, 99) * 1e3}};
    fmt::print(out, "{:<15} p50 {:>9.2f}   p90 {:>9.2f}   p99 {:>9.2f}\n", name, j["p50"].get<double>(),
               j["p90"].get<double>(), j["p99"].get<double>());
    return j;
}

// "A:B" -> [A, B], or "N" -> [N, N].
std::pair<int32_t, int32_t> parse_range(const std::string& s, const char* opt) {
    auto colon = s.find(':');
    try {
        size_t p1 = 0, p2 = 0;
        const std::string a = s.substr(0, colon);
        const std::string b = colon == std::string::npos ? a : s.substr(colon + 1);
        const long long lo = std::stoll(a, &p1), hi = std::stoll(b, &p2);
        if (p1 == a.size() && p2 == b.size() && lo >= 1 && hi >= lo && hi <= (1 << 24))
            return {static_cast<int32_t>(lo), static_cast<int32_t>(hi)};
    } catch (const std::exception&) {
    }
    throw UsageError(fmt::format("{} '{}' must be A:B with 1 <= A <= B", opt, s));
}

std::vector<int32_t> parse_list(const std::string& s, const char* opt) {
    std::vector<int32_t> out;
    size_t at = 0;
    while (at <= s.size()) {
        size_t comma = s.find(',', at);
        if (comma == std::string::npos) comma = s.size();
        const std::string item = s.substr(at, comma - at);
        try {
            size_t p = 0;
            const long long v = std::stoll(item, &p);
            if (p != item.size() || v < 1 || v > 65536) throw std::invalid_argument(item);
            out.push_back(static_cast<int32_t>(v));
        } catch (const std::exception&) {
            throw UsageError(fmt::format("{}: '{}' is not a positive integer", opt, item));
        }
        at = comma + 1;
    }
    return out;
}

// Random prompt tokens: a seeded stream per request over the vocab, special ids skipped.
class PromptMaker {
public:
    PromptMaker(const Model& m, uint64_t seed) : seed_(seed), n_vocab_(static_cast<int32_t>(m.config().n_vocab)) {
        if (m.has_tokenizer()) {
            const Vocab& v = m.tokenizer().vocab();
            for (TokenId id : {v.bos, v.eos, v.eot, v.eom, v.pad, v.unk})
                if (id >= 0) skip_.push_back(id);
            for (TokenId id : v.eog) skip_.push_back(id);
        } else {
            skip_ = {0, 1, 2};
        }
    }
    std::vector<TokenId> make(uint64_t index, int32_t n) const {
        std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ull + index);
        std::uniform_int_distribution<int32_t> dist(0, n_vocab_ - 1);
        std::vector<TokenId> out;
        out.reserve(static_cast<size_t>(n));
        while (static_cast<int32_t>(out.size()) < n) {
            const TokenId t = dist(rng);
            if (std::find(skip_.begin(), skip_.end(), t) == skip_.end() || n_vocab_ <= static_cast<int32_t>(skip_.size()))
                out.push_back(t);
        }
        return out;
    }

private:
    uint64_t seed_;
    int32_t n_vocab_;
    std::vector<TokenId> skip_;
};

void print_model(std::FILE* out, const Model& m, const std::string& path, const ModelCost& c) {
    const ModelConfig& cfg = m.config();
    fmt::print(out, "model: {} (d {}, {} layers, {} heads, {} KV heads, ff {}, vocab {}; {:.2f} M params, {:.1f} MB weights read per step)\n",
               path, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.n_ff, cfg.n_vocab, c.params / 1e6,
               c.weight_bytes / 1e6);
}

json model_json(const Model& m, const std::string& path, const ModelCost& c) {
    const ModelConfig& cfg = m.config();
    return {{"path", path},          {"n_embd", cfg.n_embd},       {"n_layer", cfg.n_layer},
            {"n_head", cfg.n_head},  {"n_head_kv", cfg.n_head_kv}, {"n_ff", cfg.n_ff},
            {"n_vocab", cfg.n_vocab}, {"params", c.params},        {"weight_bytes", c.weight_bytes}};
}

void progress_bar(bool on, const std::string& label, double done, double total, const std::string& extra) {
    if (!on) return;
    constexpr int k_width = 30;
    const int n = total > 0 ? static_cast<int>(k_width * std::min(1.0, done / total)) : 0;
    fmt::print(stderr, "\r{} [{}{}] {:.0f}/{:.0f} {}\x1b[K", label, std::string(n, '#'), std::string(k_width - n, ' '), done,
               total, extra);
    std::fflush(stderr);
}

void progress_done(bool on) {
    if (on) fmt::print(stderr, "\r\x1b[K");
}

// ---- --mode serve ----

struct ReqResult {
    bool ok = false;
    std::string error;
    int32_t n_prompt = 0;
    int32_t n_gen = 0;
    double ttft = 0;
    double finish = 0;  // seconds from the start of the run
    std::vector<double> itl;
};

struct ServeOptions {
    int64_t n_requests = 256;
    std::optional<int64_t> concurrency;
    std::optional<double> rate;
    std::pair<int32_t, int32_t> pr{128, 128}, gr{128, 128};  // prompt and generation length ranges
    std::string json_schema;  // every request constrained to it (--json-schema FILE)
};

ServeOptions parse_serve(Args& args) {
    ServeOptions so;
    so.n_requests = args.int_value("--requests", "-n").value_or(256);
    so.concurrency = args.int_value("--concurrency", "-C");
    so.rate = args.float_value("--rate");
    const auto prompt_len = args.int_value("--prompt-len");
    const auto gen_len = args.int_value("--gen-len");
    const auto prompt_range = args.value("--prompt-len-range");
    const auto gen_range = args.value("--gen-len-range");
    if (so.n_requests < 1 || so.n_requests > 10'000'000) throw UsageError("--requests must be at least 1");
    if (so.concurrency && (*so.concurrency < 1 || *so.concurrency > 1'000'000)) throw UsageError("--concurrency must be at least 1");
    if (so.rate && !(*so.rate > 0 && std::isfinite(*so.rate))) throw UsageError("--rate must be a positive number");
    if (prompt_len && prompt_range) throw UsageError("give --prompt-len or --prompt-len-range, not both");
    if (gen_len && gen_range) throw UsageError("give --gen-len or --gen-len-range, not both");
    if (prompt_len) so.pr = parse_range(std::to_string(*prompt_len), "--prompt-len");
    if (gen_len) so.gr = parse_range(std::to_string(*gen_len), "--gen-len");
    if (prompt_range) so.pr = parse_range(*prompt_range, "--prompt-len-range");
    if (gen_range) so.gr = parse_range(*gen_range, "--gen-len-range");
    if (auto f = args.value("--json-schema")) so.json_schema = read_file(*f);
    return so;
}

json run_serve(const ServeOptions& so, const Options& o, std::shared_ptr<const Model> model) {
    const int64_t n_requests = so.n_requests;
    const auto& concurrency = so.concurrency;
    const auto& rate = so.rate;
    const auto pr = so.pr, gr = so.gr;
    const int64_t n_ctx = model->config().n_ctx_train;
    if (pr.second + gr.second > n_ctx)
        throw UsageError(fmt::format("prompt ({}) plus generation ({}) exceed the model's context of {}", pr.second,
                                     gr.second, n_ctx));
    const int64_t n_conc = concurrency.value_or(rate ? n_requests : std::min<int64_t>(n_requests, 256));

    // Lengths and prompts, all drawn before the clock starts.
    std::mt19937_64 rng(o.seed);
    std::vector<Request> reqs(static_cast<size_t>(n_requests));
    PromptMaker prompts(*model, o.seed);
    double kv_read_bytes = 0;  // decode attention reads: context length at each generated token
    const ModelCost cost = model_cost(*model, effective_kv_type(o.kv_type, o.device != "cpu"));
    for (int64_t i = 0; i < n_requests; ++i) {
        const int32_t p = std::uniform_int_distribution<int32_t>(pr.first, pr.second)(rng);
        const int32_t g = std::uniform_int_distribution<int32_t>(gr.first, gr.second)(rng);
        Request& r = reqs[static_cast<size_t>(i)];
        r.prompt_ids = prompts.make(static_cast<uint64_t>(i), p);
        r.max_tokens = g;
        r.ignore_eos = true;
        r.sampling.temperature = o.temperature;
        r.sampling.top_k = o.top_k;
        r.sampling.top_p = o.top_p;
        r.sampling.min_p = o.min_p;
        r.sampling.seed = o.seed + static_cast<uint64_t>(i);
        r.json_schema = so.json_schema;
        kv_read_bytes += cost.kv_bytes_per_pos * (static_cast<double>(g) * p + 0.5 * static_cast<double>(g) * (g - 1));
    }
    std::vector<double> gaps;  // Poisson inter-arrival times
    if (rate) {
        std::exponential_distribution<double> exp(*rate);
        for (int64_t i = 0; i < n_requests; ++i) gaps.push_back(exp(rng));
    }

    EngineOptions eo;
    eo.loaded = model;
    eo.device = o.device;
    eo.backend.n_blocks = o.kv_blocks;
    eo.backend.batch_invariant = o.batch_invariant;
    eo.backend.kv_type = o.kv_type;
    // The CPU backend's own default pool is small; size it so the concurrency fits (no preemption
    // unless asked for with --kv-blocks). A GPU backend sizes its pool from free memory.
    const bool on_cpu = !parse_device(o.device).cuda;
    if (o.kv_blocks == 0 && on_cpu)
        eo.backend.n_blocks = static_cast<int32_t>(std::min<int64_t>(
            1 << 22, std::min(n_conc, n_requests) * ((pr.second + gr.second + eo.backend.block_size - 1) / eo.backend.block_size) + 1));
    eo.backend.n_threads = o.n_threads;
    eo.planner.max_batch_tokens = o.max_batch_tokens;
    eo.planner.max_seqs = o.max_seqs;
    eo.planner.max_prompt_tokens_mixed = o.max_prompt_mixed;
    eo.max_waiting = static_cast<int32_t>(std::max<int64_t>(4096, n_requests));
    asio::io_context io;
    Engine engine(io.get_executor(), eo);
    const std::string backend_name = engine.backend_name();
    const EngineStats s0 = engine.stats();
    fmt::print(o.out, "backend: {}, {} KV blocks of {} tokens, max {} tokens / {} seqs per step\n", backend_name,
               s0.kv_blocks_total, eo.backend.block_size, o.max_batch_tokens, o.max_seqs);
    fmt::print(o.out, "serve: {} requests, {}, prompt {}, gen {}, ignore_eos\n", n_requests,
               rate ? fmt::format("Poisson rate {}/s", *rate) : fmt::format("concurrency {}", n_conc),
               pr.first == pr.second ? fmt::format("{}", pr.first) : fmt::format("{}:{}", pr.first, pr.second),
               gr.first == gr.second ? fmt::format("{}", gr.first) : fmt::format("{}:{}", gr.first, gr.second));

    std::vector<ReqResult> results(static_cast<size_t>(n_requests));
    int64_t n_done = 0, n_started = 0, n_gen_total = 0;
    int32_t peak_kv = 0, peak_seqs = 0;
    const Clock::time_point t0 = Clock::now();

    auto run_one = [&](int64_t i) -> asio::awaitable<void> {
        ReqResult& rr = results[static_cast<size_t>(i)];
        const Request& r = reqs[static_cast<size_t>(i)];
        rr.n_prompt = static_cast<int32_t>(r.prompt_ids.size());
        const Clock::time_point submit = Clock::now();
        try {
            TokenStream stream = engine.generate(r);
            Clock::time_point last = submit;
            while (auto tok = co_await stream.next()) {
                const Clock::time_point now = Clock::now();
                if (rr.n_gen == 0) rr.ttft = std::chrono::duration<double>(now - submit).count();
                else rr.itl.push_back(std::chrono::duration<double>(now - last).count());
                last = now;
                ++rr.n_gen;
                ++n_gen_total;
            }
            rr.ok = stream.error() ? false : true;
            if (!rr.ok) rr.error = stream.error_message();
        } catch (const std::exception& e) {
            rr.error = e.what();
        }
        rr.finish = seconds_since(t0);
        ++n_done;
    };
    auto worker = [&]() -> asio::awaitable<void> {
        while (n_started < n_requests) co_await run_one(n_started++);
    };
    auto arrivals = [&]() -> asio::awaitable<void> {
        asio::steady_timer timer(io);
        Clock::time_point at = t0;
        int64_t in_flight_cap = n_conc;
        for (int64_t i = 0; i < n_requests; ++i) {
            at += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gaps[static_cast<size_t>(i)]));
            timer.expires_at(at);
            co_await timer.async_wait(asio::use_awaitable);
            while (n_started - n_done >= in_flight_cap) {  // --concurrency also caps a rate run
                timer.expires_after(std::chrono::milliseconds(1));
                co_await timer.async_wait(asio::use_awaitable);
            }
            ++n_started;
            asio::co_spawn(io, run_one(i), asio::detached);
        }
    };
    auto monitor = [&]() -> asio::awaitable<void> {
        asio::steady_timer timer(io);
        int ticks = 0;
        while (n_done < n_requests) {
            const EngineStats s = engine.stats();
            peak_kv = std::max(peak_kv, s.kv_blocks_used);
            peak_seqs = std::max(peak_seqs, s.last_batch_seqs);
            if (o.progress && ++ticks % 5 == 0) {
                const double el = seconds_since(t0);
                progress_bar(true, "serve", static_cast<double>(n_done), static_cast<double>(n_requests),
                             fmt::format("reqs, {:.0f} tok/s, batch {}, KV {}/{}", el > 0 ? n_gen_total / el : 0,
                                         s.last_batch_seqs, s.kv_blocks_used, s.kv_blocks_total));
            }
            timer.expires_after(std::chrono::milliseconds(20));
            co_await timer.async_wait(asio::use_awaitable);
        }
    };
    if (rate) {
        asio::co_spawn(io, arrivals(), asio::detached);
    } else {
        for (int64_t w = 0; w < n_conc; ++w) asio::co_spawn(io, worker(), asio::detached);
    }
    asio::co_spawn(io, monitor(), asio::detached);
    io.run();
    progress_done(o.progress);

    // Figures over the whole run: first submission to last completion.
    const EngineStats s = engine.stats();
    double duration = 0;
    int64_t n_ok = 0, n_prompt = 0, n_gen = 0;
    std::vector<double> ttft, itl;
    std::string first_error;
    for (const auto& r : results) {
        duration = std::max(duration, r.finish);
        if (!r.ok) {
            if (first_error.empty()) first_error = r.error;
            continue;
        }
        ++n_ok;
        n_prompt += r.n_prompt;
        n_gen += r.n_gen;
        ttft.push_back(r.ttft);
        itl.insert(itl.end(), r.itl.begin(), r.itl.end());
    }
    peak_seqs = std::max(peak_seqs, s.peak_batch_seqs);
    json j;
    j["mode"] = "serve";
    j["backend"] = backend_name;
    j["requests"] = n_requests;
    j["requests_ok"] = n_ok;
    j["requests_failed"] = n_requests - n_ok;
    j["concurrency"] = rate ? json(nullptr) : json(n_conc);
    j["rate"] = rate ? json(*rate) : json(nullptr);
    j["prompt_len"] = {pr.first, pr.second};
    j["gen_len"] = {gr.first, gr.second};
    j["duration_s"] = duration;
    j["prompt_tokens"] = n_prompt;
    j["output_tokens"] = n_gen;
    j["output_tokens_per_s"] = duration > 0 ? n_gen / duration : 0;
    j["total_tokens_per_s"] = duration > 0 ? (n_prompt + n_gen) / duration : 0;
    j["requests_per_s"] = duration > 0 ? n_ok / duration : 0;
    fmt::print(o.out, "requests:       {} ok, {} failed, in {:.3f} s\n", n_ok, n_requests - n_ok, duration);
    if (!first_error.empty()) fmt::print(o.out, "first error:    {}\n", first_error);
    fmt::print(o.out, "output tok/s:   {:.1f}\n", j["output_tokens_per_s"].get<double>());
    fmt::print(o.out, "total tok/s:    {:.1f}\n", j["total_tokens_per_s"].get<double>());
    fmt::print(o.out, "requests/s:     {:.3f}\n", j["requests_per_s"].get<double>());
    fmt::print(o.out, "latency (ms):\n");
    j["ttft_ms"] = latency(o.out, ttft, "  TTFT");
    j["itl_ms"] = latency(o.out, itl, "  ITL");
    fmt::print(o.out, "peak batch:     {} seqs\n", peak_seqs);
    fmt::print(o.out, "KV use:         peak {} of {} blocks ({:.1f}%)\n", peak_kv, s.kv_blocks_total,
               s.kv_blocks_total ? 100.0 * peak_kv / s.kv_blocks_total : 0.0);
    fmt::print(o.out, "preemptions:    {}\n", s.n_preemptions);
    fmt::print(o.out, "steps:          {}\n", s.n_steps);
    j["peak_batch_seqs"] = peak_seqs;
    j["kv_blocks_total"] = s.kv_blocks_total;
    j["kv_blocks_peak"] = peak_kv;
    j["preemptions"] = s.n_preemptions;
    j["steps"] = s.n_steps;
    // Each step reads every weight once; decode attention reads each token's context.
    const double bytes = cost.weight_bytes * static_cast<double>(s.n_steps) + kv_read_bytes;
    const double flops = 2.0 * cost.params * static_cast<double>(n_prompt + n_gen);
    fmt::print(o.out, "achieved (weights x steps + decode KV reads; 2 x params x tokens):\n");
    j["achieved"] = rates(o.out, backend_name, bytes, flops, duration, "whole run");
    if (n_requests - n_ok > 0) j["first_error"] = first_error;
    return j;
}

// ---- --mode batched ----

std::unique_ptr<Backend> open_backend(const Options& o, std::shared_ptr<const Model> model, const BackendOptions& bo) {
    return make_backend(std::move(model), o.device, bo);
}

TokenId argmax(const float* row, int64_t n) {
    return static_cast<TokenId>(std::max_element(row, row + n) - row);
}

struct BatchedOptions {
    std::vector<int32_t> batches;
    int64_t pp = 128, tg = 128;
};

BatchedOptions parse_batched(Args& args) {
    BatchedOptions bo;
    bo.batches = parse_list(args.value("--batches").value_or("1,16,64,128,256"), "--batches");
    bo.pp = args.int_value("--pp").value_or(128);
    bo.tg = args.int_value("--tg").value_or(128);
    return bo;
}

json run_batched(const BatchedOptions& bopt, const Options& o, std::shared_ptr<const Model> model) {
    const std::vector<int32_t>& batches = bopt.batches;
    const int64_t pp = bopt.pp, tg = bopt.tg;
    if (pp < 1 || tg < 0 || pp + tg > model->config().n_ctx_train)
        throw UsageError(fmt::format("--pp {} and --tg {} must be >= 1 and >= 0 and fit the context of {}", pp, tg,
                                     model->config().n_ctx_train));
    const int32_t max_b = *std::max_element(batches.begin(), batches.end());
    BackendOptions bo;
    bo.n_threads = o.n_threads;
    const int32_t blocks_per_seq = static_cast<int32_t>((pp + tg + bo.block_size - 1) / bo.block_size);
    // cuda without --kv-blocks: the pool the device memory allows (batches it cannot hold are
    // reported skipped); cpu: just enough for the largest batch (+1: the warm-up).
    bo.n_blocks = o.kv_blocks > 0 ? o.kv_blocks : parse_device(o.device).cuda ? 0 : max_b * blocks_per_seq + 1;
    bo.batch_invariant = o.batch_invariant;
    bo.kv_type = o.kv_type;
    auto backend = open_backend(o, model, bo);
    const std::string backend_name = backend->name();
    KvBlockPool pool(backend->n_blocks(), backend->block_size());
    const int64_t n_vocab = model->config().n_vocab;
    const ModelCost cost = model_cost(*model, effective_kv_type(o.kv_type, is_cuda(backend_name)));
    fmt::print(o.out, "backend: {}, {} KV blocks of {} tokens, max {} tokens per forward\n", backend_name, pool.n_blocks(),
               pool.block_size(), o.max_batch_tokens);
    PromptMaker prompts(*model, o.seed);

    // Warm-up, not timed: one token (first-touch of weights, graph capture), then one prompt-sized
    // pass, so that CUDA's lazy loading of the cuBLAS kernels (tens of ms on first use) is not
    // charged to the first timed prompt.
    for (const int64_t n_warm : {int64_t(1), std::min<int64_t>(pp, o.max_batch_tokens)}) {
        const int32_t n_blk = static_cast<int32_t>((n_warm + pool.block_size() - 1) / pool.block_size());
        auto blks = pool.kv_block_alloc_n(n_blk);
        if (!blks) {
            if (n_warm == 1) throw Error("the KV pool has no blocks");
            break;
        }
        Batch b;
        const int32_t si = b.add_seq(*blks);
        const auto toks = prompts.make(0, static_cast<int32_t>(n_warm));
        for (int64_t i = 0; i < n_warm; ++i) b.add(toks[static_cast<size_t>(i)], static_cast<int32_t>(i), si, i == n_warm - 1);
        std::vector<float> logits(static_cast<size_t>(n_vocab));
        backend->forward(b, logits);
        pool.kv_block_free_seq(*blks);
    }

    fmt::print(o.out, "\n|{:>6} |{:>6} |{:>5} |{:>7} |{:>9} |{:>10} |{:>9} |{:>10} |{:>9} |{:>10} |\n", "PP", "TG", "B", "N_KV",
               "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s");
    fmt::print(o.out, "|{:->7}|{:->7}|{:->6}|{:->8}|{:->10}|{:->11}|{:->10}|{:->11}|{:->10}|{:->11}|\n", "", "", "", "", "", "",
               "", "", "", "");
    json rows = json::array();
    std::vector<std::pair<int32_t, std::pair<json, json>>> achieved;
    for (int32_t B : batches) {
        std::vector<std::vector<int32_t>> tables;
        for (int32_t s = 0; s < B; ++s) {
            auto t = pool.kv_block_alloc_n(blocks_per_seq);
            if (!t) break;
            tables.push_back(std::move(*t));
        }
        if (static_cast<int32_t>(tables.size()) < B) {
            for (auto& t : tables) pool.kv_block_free_seq(t);
            fmt::print(o.out, "|{:>6} |{:>6} |{:>5} | skipped: the KV pool ({} blocks) cannot hold {} x {} blocks\n", pp, tg, B,
                       pool.n_blocks(), B, blocks_per_seq);
            continue;
        }
        std::vector<std::vector<TokenId>> prompt(static_cast<size_t>(B));
        for (int32_t s = 0; s < B; ++s) prompt[static_cast<size_t>(s)] = prompts.make(static_cast<uint64_t>(s) + 1, static_cast<int32_t>(pp));
        const bool on_device = backend->samples_on_device();
        std::vector<float> logits(on_device ? 0 : static_cast<size_t>(B) * static_cast<size_t>(n_vocab));  // [B, n_vocab]
        std::vector<TokenId> next(static_cast<size_t>(B));

        // Prompt: B x pp tokens in forwards of at most max_batch_tokens, each sequence's prompt in order.
        const Clock::time_point t_pp0 = Clock::now();
        Batch b;
        std::vector<int32_t> rows_seq;  // sequence of each logit row of the current forward
        std::vector<DeviceGreedyRow> greedy_rows(static_cast<size_t>(B));
        std::vector<int32_t> ids(static_cast<size_t>(B));
        auto flush = [&] {
            if (b.tokens.empty()) return;
            const size_t n_rows = b.logit_rows.size();
            if (on_device) {  // greedy on the device: only ids come back, as in serving
                backend->forward_greedy(b, std::span(greedy_rows.data(), n_rows), std::span(ids.data(), n_rows));
                for (size_t r = 0; r < n_rows; ++r) next[static_cast<size_t>(rows_seq[r])] = std::max(ids[r], 0);
            } else {
                backend->forward(b, std::span<float>(logits.data(), n_rows * static_cast<size_t>(n_vocab)));
                for (size_t r = 0; r < n_rows; ++r)
                    next[static_cast<size_t>(rows_seq[r])] = argmax(logits.data() + r * static_cast<size_t>(n_vocab), n_vocab);
            }
            b.clear();
            rows_seq.clear();
        };
        for (int32_t s = 0; s < B; ++s) {
            int64_t pos = 0;
            while (pos < pp) {
                if (b.n_tokens() >= o.max_batch_tokens) flush();
                const int32_t seq_index = b.add_seq(tables[static_cast<size_t>(s)]);
                const int64_t n = std::min<int64_t>(pp - pos, o.max_batch_tokens - b.n_tokens());
                for (int64_t k = 0; k < n; ++k, ++pos) {
                    const bool last = pos == pp - 1;
                    b.add(prompt[static_cast<size_t>(s)][static_cast<size_t>(pos)], static_cast<int32_t>(pos), seq_index, last);
                    if (last) rows_seq.push_back(s);
                }
            }
            progress_bar(o.progress, fmt::format("B={} PP", B), s + 1, B, "seqs");
        }
        flush();
        const double t_pp = seconds_since(t_pp0);

        // Generation: tg steps of B tokens, the greedy choice fed back.
        const Clock::time_point t_tg0 = Clock::now();
        for (int64_t i = 0; i < tg; ++i) {
            for (int32_t s = 0; s < B; ++s)
                b.add(next[static_cast<size_t>(s)], static_cast<int32_t>(pp + i), b.add_seq(tables[static_cast<size_t>(s)]), true);
            for (int32_t s = 0; s < B; ++s) rows_seq.push_back(s);
            flush();
            progress_bar(o.progress, fmt::format("B={} TG", B), static_cast<double>(i + 1), static_cast<double>(tg), "steps");
        }
        const double t_tg = seconds_since(t_tg0);
        progress_done(o.progress);
        for (auto& t : tables) pool.kv_block_free_seq(t);

        const double n_kv = static_cast<double>(B) * static_cast<double>(pp + tg);
        const double s_pp = t_pp > 0 ? B * pp / t_pp : 0;
        const double s_tg = t_tg > 0 ? B * tg / t_tg : 0;
        const double t_all = t_pp + t_tg;
        fmt::print(o.out, "|{:>6} |{:>6} |{:>5} |{:>7} |{:>9.3f} |{:>10.2f} |{:>9.3f} |{:>10.2f} |{:>9.3f} |{:>10.2f} |\n", pp, tg, B,
                   static_cast<int64_t>(n_kv), t_pp, s_pp, t_tg, s_tg, t_all, t_all > 0 ? n_kv / t_all : 0);
        json row{{"pp", pp}, {"tg", tg}, {"b", B}, {"n_kv", n_kv}, {"t_pp", t_pp}, {"s_pp", s_pp},
                 {"t_tg", t_tg}, {"s_tg", s_tg}, {"t", t_all}, {"s", t_all > 0 ? n_kv / t_all : 0}};
        rows.push_back(row);
        achieved.push_back({B, {json{{"t_pp", t_pp}, {"t_tg", t_tg}}, json()}});
    }

    // Bandwidth and FLOPs per B: a prompt forward reads the weights once per max_batch_tokens
    // chunk; a decode step reads all weights plus every sequence's context K/V.
    fmt::print(o.out, "\nachieved (PP: weights read; TG: weights + KV read; 2 x params x tokens):\n");
    for (size_t i = 0; i < achieved.size(); ++i) {
        const int32_t B = achieved[i].first;
        const double t_pp = achieved[i].second.first["t_pp"], t_tg = achieved[i].second.first["t_tg"];
        const double n_pp_fwd = std::ceil(static_cast<double>(B) * pp / o.max_batch_tokens);
        // Prompt K/V is read once per tile of tokens, not per token: only the weights count.
        const double pp_bytes = cost.weight_bytes * n_pp_fwd;
        const double tg_bytes = cost.weight_bytes * tg + cost.kv_bytes_per_pos * B * (tg * pp + tg * (tg - 1) / 2.0);
        json a;
        a["pp"] = rates(o.out, backend_name, pp_bytes, 2.0 * cost.params * B * pp, t_pp, fmt::format("B={} PP", B).c_str());
        if (tg > 0) a["tg"] = rates(o.out, backend_name, tg_bytes, 2.0 * cost.params * B * tg, t_tg, fmt::format("B={} TG", B).c_str());
        if (tg > 0 && t_tg > 0) {
            // The context's K/V alone over the whole decode time (weights and other ops
            // included in the time): a floor on the attention kernels' own rate.
            const double kv = cost.kv_bytes_per_pos * B * (tg * pp + tg * (tg - 1) / 2.0);
            fmt::print(o.out, "  {:<14} {:>9.1f} GB/s of K/V over the decode time ({:.1f} GB per step)\n",
                       fmt::format("B={} TG KV", B), kv / t_tg / 1e9, kv / tg / 1e9);
            a["tg_kv_gbps"] = kv / t_tg / 1e9;
        }
        for (auto& r : rows)
            if (r["b"] == B) r["achieved"] = a;
    }
    json j;
    j["mode"] = "batched";
    j["backend"] = backend_name;
    j["max_batch_tokens"] = o.max_batch_tokens;
    j["results"] = rows;
    return j;
}

}  // namespace

int cmd_bench(Args& args) {
    if (args.help()) {
        fmt::print(
            "usage: coinfer bench -m MODEL [--mode serve|batched] [options]\n"
            "       coinfer bench --mode allreduce [--tp N] [--json]\n"
            "       coinfer bench --mode grammar -m FILE.gguf [--schema F | --grammar F] [--json]\n\n"
            "Measures throughput and latency. MODEL is a GGUF file or synthetic:SHAPE[:TYPE]\n"
            "(random weights built in memory; shapes tiny, tinyllama-1.1b, llama2-7b, llama3-8b;\n"
            "types f16 (default), bf16, q8_0, q4_0, q4_k, q5_k, q6_k, q4_k_m, q5_k_m).\n\n"
            "common:\n"
            "  -m, --model MODEL          GGUF file or synthetic:SHAPE[:TYPE]\n"
            "  --mode serve|batched       (default serve)\n"
            "  --device cpu|cuda|cuda:N|auto (default auto: cuda:0 when present)\n"
            "  -t, --threads N            CPU threads (default 1)\n"
            "  --kv-blocks N              KV pool blocks (default: just enough on cpu; from free memory on cuda,\n"
            "                             where batched mode skips batches the pool cannot hold)\n"
            "  --batch-invariant          cuda: GEMV kernels only, same bits in any batch (slower)\n"
            "  --kv-type T                KV cache: auto (f32 on cpu, f16 on cuda), f32, f16, q8_0, fp8\n"
            "  --max-batch-tokens N       tokens per forward pass (default 2048)\n"
            "  --max-seqs N               sequences per step, serve (default 256)\n"
            "  --max-prompt-mixed N       prompt tokens in a step that also decodes, serve (default 512, 0: no cap)\n"
            "  --seed S                   prompt tokens and lengths (default 42)\n"
            "  --json [FILE]              results as JSON to FILE, or to stdout (text goes to stderr)\n\n"
            "--mode serve (through the async engine, ignore_eos on):\n"
            "  -n, --requests N           requests (default 256)\n"
            "  -C, --concurrency C        at most C at a time (default min(N, 256))\n"
            "  --rate R                   Poisson arrivals at R requests/s instead\n"
            "  --prompt-len P, --gen-len G                 (default 128 each)\n"
            "  --prompt-len-range A:B, --gen-len-range A:B  uniform, seeded\n"
            "  --temp T                   sampling temperature (default 0: greedy)\n"
            "  --top-k K, --top-p P, --min-p M   with --temp > 0 (default off: 0, 1, 0)\n"
            "  --json-schema FILE         constrain every request to this JSON schema (a document that\n"
            "                             completes early ends its request early)\n\n"
            "--mode batched (straight on the backend, like llama-batched-bench):\n"
            "  --batches LIST             sequence counts (default 1,16,64,128,256)\n"
            "  --pp N, --tg N             prompt tokens and generated tokens per sequence (default 128, 128)\n\n"
            "--mode allreduce (no model: tensor parallelism's collective on this host's GPUs):\n"
            "  --tp N                     GPUs cuda:0..N-1 (default all); F16 sums of 8 KiB..64 MiB, peer\n"
            "                             kernel and NCCL, eager and from a CUDA graph, checked\n\n"
            "--mode grammar (no forward pass: constrained decoding's host cost per step):\n"
            "  -m FILE.gguf               a model or vocab-only GGUF (its tokenizer)\n"
            "  --schema FILE | --grammar FILE  JSON schema or GBNF (default: a built-in schema)\n"
            "  --walks N                  random documents walked through the mask (default 20)\n");
        return 0;
    }
    Options o;
    // --json alone writes to stdout; --json FILE (or --json=FILE) to a file. A bare --json is
    // consumed as a flag, so its FILE is left as the only positional.
    const bool json_flag = args.flag("--json");
    auto json_inline = args.value("--json");
    o.model_path = args.value("--model", "-m").value_or("");
    const std::string mode = args.value("--mode").value_or("serve");
    if (mode == "allreduce" || mode == "grammar") {  // no forward pass: the collective, or the masks
        const bool to_stdout = json_flag || json_inline;
        const json j = mode == "allreduce" ? bench_allreduce(args, to_stdout ? stderr : stdout)
                                           : bench_grammar(args, o.model_path, to_stdout ? stderr : stdout);
        if (to_stdout) fmt::print("{}\n", j.dump(2));
        return 0;
    }
    o.device = args.value("--device").value_or("auto");
    const int64_t threads = args.int_value("--threads", "-t").value_or(1);
    const int64_t kv_blocks = args.int_value("--kv-blocks").value_or(0);
    const int64_t mbt = args.int_value("--max-batch-tokens").value_or(2048);
    const int64_t max_seqs = args.int_value("--max-seqs").value_or(256);
    const int64_t max_prompt_mixed = args.int_value("--max-prompt-mixed").value_or(512);
    o.seed = static_cast<uint64_t>(args.int_value("--seed").value_or(42));
    o.temperature = static_cast<float>(args.float_value("--temp").value_or(0.0));
    const int64_t top_k = args.int_value("--top-k").value_or(0);
    o.top_p = static_cast<float>(args.float_value("--top-p").value_or(1.0));
    o.min_p = static_cast<float>(args.float_value("--min-p").value_or(0.0));
    if (top_k < 0 || top_k > (1 << 30)) throw UsageError("--top-k is out of range");
    if (!(o.top_p > 0 && o.top_p <= 1)) throw UsageError("--top-p must be in (0, 1]");
    if (!(o.min_p >= 0 && o.min_p <= 1)) throw UsageError("--min-p must be in [0, 1]");
    o.top_k = static_cast<int32_t>(top_k);
    if (o.model_path.empty()) throw UsageError("missing -m MODEL");
    if (mode != "serve" && mode != "batched") throw UsageError(fmt::format("--mode must be serve or batched, not '{}'", mode));
    (void)parse_device(o.device);  // a clear error before the model loads
    if (threads < 1 || threads > 256) throw UsageError(fmt::format("--threads {} is out of range (1..256)", threads));
    if (kv_blocks < 0 || kv_blocks > (1 << 24)) throw UsageError("--kv-blocks is out of range");
    if (mbt < 1 || mbt > (1 << 20)) throw UsageError("--max-batch-tokens is out of range");
    if (max_seqs < 1 || max_seqs > (1 << 16)) throw UsageError("--max-seqs is out of range");
    if (max_prompt_mixed < 0 || max_prompt_mixed > (1 << 20)) throw UsageError("--max-prompt-mixed is out of range");
    if (!(o.temperature >= 0 && std::isfinite(o.temperature))) throw UsageError("--temp must be >= 0");
    o.n_threads = static_cast<int32_t>(threads);
    o.kv_blocks = static_cast<int32_t>(kv_blocks);
    o.batch_invariant = args.flag("--batch-invariant");
    o.kv_type = kv_type_option(args);
    o.max_batch_tokens = static_cast<int32_t>(mbt);
    o.max_seqs = static_cast<int32_t>(max_seqs);
    o.max_prompt_mixed = static_cast<int32_t>(max_prompt_mixed);
    ServeOptions so;
    BatchedOptions bopt;
    if (mode == "serve") so = parse_serve(args);
    else bopt = parse_batched(args);
    auto pos = args.positionals();
    if (json_inline) {
        o.json_path = *json_inline;
    } else if (json_flag && !pos.empty()) {
        o.json_path = pos[0];
        pos.erase(pos.begin());
    }
    if (!pos.empty()) throw UsageError(fmt::format("unexpected argument '{}'", pos[0]));
    if (o.json_path == "-") o.json_path.clear();
    o.json_stdout = (json_flag || json_inline) && o.json_path.empty();
    if (o.json_stdout) o.out = stderr;
    // Progress only on a terminal, so logs and pipes stay clean.
    o.progress = isatty(STDERR_FILENO);

    const Clock::time_point t_load = Clock::now();
    auto model = Model::load(o.model_path);
    const double load_s = seconds_since(t_load);
    const ModelCost cost = model_cost(*model, effective_kv_type(o.kv_type, o.device != "cpu"));
    print_model(o.out, *model, o.model_path, cost);
    fmt::print(o.out, "loaded in {:.2f} s\n", load_s);

    json result = mode == "serve" ? run_serve(so, o, model) : run_batched(bopt, o, model);
    json j;
    j["model"] = model_json(*model, o.model_path, cost);
    j["model"]["load_seconds"] = load_s;
    j["device"] = o.device;
    j["threads"] = o.n_threads;
    j["seed"] = o.seed;
    j.update(result);
    if (o.json_stdout) {
        fmt::print("{}\n", j.dump(2));
    } else if (!o.json_path.empty()) {
        std::ofstream f(o.json_path);
        f << j.dump(2) << "\n";
        if (!f) throw Error(fmt::format("{}: cannot write", o.json_path));
    }
    if (mode == "serve" && j["requests_failed"].get<int64_t>() > 0) return 1;
    return 0;
}

}  // namespace coinfer::cli
