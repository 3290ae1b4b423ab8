#include "engine.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <thread>
#include <unordered_map>

#include <concurrentqueue/blockingconcurrentqueue.h>
#include <fmt/format.h>

#include "engine/generate.h"

namespace coinfer {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
}

}  // namespace

// One request as the step loop sees it.
struct Active {
    std::shared_ptr<detail::RequestState> state;
    Request req;
    Sampler sampler;
    StreamDecoder decoder;
    StopMatcher stop;
    Clock::time_point submitted;
    bool started = false;  // left the waiting queue at least once
};

struct Engine::Impl {
    EngineOptions opt;
    std::shared_ptr<const Model> model;
    std::unique_ptr<Backend> backend;
    std::unique_ptr<KvBlockPool> pool;
    std::unique_ptr<Planner> planner;
    int32_t n_ctx = 0;

    moodycamel::BlockingConcurrentQueue<std::unique_ptr<Prepared>> queue;
    std::atomic<int32_t> n_not_started{0};  // submitted, not yet admitted to a step
    std::atomic<uint64_t> next_id{1};
    std::atomic<bool> stopping{false};
    std::thread thread;

    std::unordered_map<SeqId, std::unique_ptr<Active>> active;  // step-loop thread only

    mutable std::mutex stats_mutex;
    EngineStats stats;
    // Throughput window.
    Clock::time_point window_start = Clock::now();
    int64_t window_tokens = 0;

    void run();
    void admit(std::unique_ptr<Prepared> p);
    void admit_or_fail(std::unique_ptr<Prepared> p);
    void step();
    void run_plan(const StepPlan& plan);
    void finish(SeqId id, FinishReason reason, std::error_code ec = {}, std::string message = {});
    void publish_stats(const StepPlan* plan);
};

// ---- construction ----

Engine::Engine(asio::any_io_executor ex, EngineOptions opt) : executor_(std::move(ex)), impl_(std::make_unique<Impl>()) {
    Impl& im = *impl_;
    im.opt = std::move(opt);
    im.model = im.opt.loaded ? im.opt.loaded : Model::load(im.opt.model);
    const std::string device = im.opt.device == "auto" ? (cuda_device_available() ? "cuda" : "cpu") : im.opt.device;
    if (device == "cuda") {
        im.backend = make_cuda_backend(im.model, im.opt.backend);
    } else if (device == "cpu") {
        im.backend = make_cpu_backend(im.model, im.opt.backend);
    } else {
        throw_error("device '{}' is not available in this build (use cpu)", im.opt.device);
    }
    im.pool = std::make_unique<KvBlockPool>(im.backend->n_blocks(), im.backend->block_size());
    im.planner = std::make_unique<Planner>(*im.pool, im.opt.planner);
    im.n_ctx = im.opt.n_ctx > 0 ? im.opt.n_ctx
                                : static_cast<int32_t>(std::min<int64_t>(im.model->config().n_ctx_train, INT32_MAX));
    if (im.opt.max_waiting < 1) throw_error("max_waiting must be at least 1");
    im.publish_stats(nullptr);
    im.thread = std::thread([&im] { im.run(); });
}

Engine::~Engine() {
    impl_->stopping.store(true);
    impl_->queue.enqueue(nullptr);  // wakes an idle loop
    impl_->thread.join();
    // A submission that raced with shutdown past the loop's last drain still has to hear.
    std::unique_ptr<Prepared> p;
    while (impl_->queue.try_dequeue(p))
        if (p) p->state->finish(FINISH_REASON_ERROR, EngineErrc::stopped, "engine stopped", 0);
}

const Model& Engine::model() const { return *impl_->model; }
std::string Engine::backend_name() const { return impl_->backend->name(); }

EngineStats Engine::stats() const {
    std::lock_guard lock(impl_->stats_mutex);
    EngineStats s = impl_->stats;
    s.n_waiting += static_cast<int32_t>(impl_->queue.size_approx());  // submitted, not yet taken
    return s;
}

// ---- submission (any thread) ----

Engine::Prepared Engine::prepare(const Request& req) {
    const Model& model = *impl_->model;
    Prepared p;
    p.request = req;
    if (!req.prompt_ids.empty()) {
        p.prompt_ids = req.prompt_ids;
        for (TokenId id : p.prompt_ids)
            if (id < 0 || id >= model.config().n_vocab)
                throw_error("prompt token {} is outside the vocabulary (0..{})", id, model.config().n_vocab - 1);
    } else {
        p.prompt_ids = model.tokenizer().encode(req.prompt, req.add_special, req.parse_special);
    }
    if (req.max_tokens < 1) throw_error("max_tokens must be at least 1 (got {})", req.max_tokens);
    GenerateOptions g;
    g.max_tokens = req.max_tokens;
    g.sampling = req.sampling;
    g.n_ctx = impl_->n_ctx;
    validate_generate(model, p.prompt_ids.size(), g);  // empty prompt, context, sampling values
    if (static_cast<int64_t>(p.prompt_ids.size()) + req.max_tokens > impl_->n_ctx)
        throw_error("prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens",
                    p.prompt_ids.size(), req.max_tokens, impl_->n_ctx);
    p.state = std::make_shared<detail::RequestState>(impl_->next_id.fetch_add(1));
    p.submitted = std::chrono::steady_clock::now();
    return p;
}

std::error_code Engine::submit(Prepared p) {
    Impl& im = *impl_;
    std::error_code ec;
    if (im.stopping.load()) {
        ec = EngineErrc::stopped;
    } else if (im.n_not_started.fetch_add(1) >= im.opt.max_waiting) {
        im.n_not_started.fetch_sub(1);
        ec = EngineErrc::queue_full;
    }
    if (ec) {
        // The request never started: finishing it tells a waiting handler (async_complete).
        p.state->finish(FINISH_REASON_ERROR, ec, ec.message(), 0);
        return ec;
    }
    im.queue.enqueue(std::make_unique<Prepared>(std::move(p)));
    return {};
}

TokenStream Engine::generate(const Request& req) {
    Prepared p = prepare(req);
    TokenStream stream(p.state, p.prompt_ids, executor_);
    if (auto ec = submit(std::move(p)))
        throw EngineError(ec, ec == EngineErrc::queue_full
                                  ? fmt::format("too many waiting requests (max_waiting = {})", impl_->opt.max_waiting)
                                  : ec.message());
    return stream;
}

// ---- the step loop (its own thread) ----

void Engine::Impl::admit(std::unique_ptr<Prepared> p) {
    const SeqId id = p->state->id();
    const Request& req = p->request;
    auto a = std::make_unique<Active>(Active{p->state, req, Sampler(req.sampling), StreamDecoder(model->tokenizer()),
                                             StopMatcher(req.stop), p->submitted, false});
    // Repetition penalties look at the prompt too, as llama.cpp's do.
    for (TokenId t : p->prompt_ids) a->sampler.accept(t);
    planner->add(id, std::move(p->prompt_ids));
    active.emplace(id, std::move(a));
}

void Engine::Impl::admit_or_fail(std::unique_ptr<Prepared> p) {
    auto state = p->state;
    try {
        admit(std::move(p));
    } catch (const std::exception& e) {
        // Only this request fails.
        planner->finish(state->id());
        active.erase(state->id());
        n_not_started.fetch_sub(1);
        state->finish(FINISH_REASON_ERROR, EngineErrc::backend_failed, e.what(), 0);
    }
}

void Engine::Impl::finish(SeqId id, FinishReason reason, std::error_code ec, std::string message) {
    auto it = active.find(id);
    if (it == active.end()) return;
    Active& a = *it->second;
    if (!a.started) n_not_started.fetch_sub(1);
    planner->finish(id);
    {
        // Published before the caller hears, so a caller reading stats() sees its blocks back.
        std::lock_guard lock(stats_mutex);
        ++stats.n_requests_finished;
        if (reason == FINISH_REASON_CANCELLED) ++stats.n_requests_cancelled;
        stats.n_running = planner->n_running();
        stats.n_waiting = planner->n_waiting();
        stats.kv_blocks_used = pool->n_used();
        stats.kv_blocks_free = pool->n_free();
        stats.kv_blocks_cached = pool->n_cached();
    }
    a.state->finish(reason, ec, std::move(message), seconds_between(a.submitted, Clock::now()));
    active.erase(it);
}

void Engine::Impl::run() {
    std::unique_ptr<Prepared> p;
    while (true) {
        // Take every submission that is waiting; block only when there is nothing to run.
        bool got = planner->idle() ? queue.wait_dequeue_timed(p, std::chrono::milliseconds(200))
                                   : queue.try_dequeue(p);
        while (got) {
            if (p) admit_or_fail(std::move(p));
            got = queue.try_dequeue(p);
        }
        if (stopping.load()) break;
        // Cancellations take effect here, so their blocks are free within one step.
        std::vector<SeqId> cancelled;
        for (auto& [id, a] : active)
            if (a->state->cancel_requested()) cancelled.push_back(id);
        for (SeqId id : cancelled) finish(id, FINISH_REASON_CANCELLED, asio::error::operation_aborted);
        if (planner->idle()) {
            publish_stats(nullptr);
            continue;
        }
        step();
    }
    // Shutting down: everything unfinished ends with `stopped`.
    while (queue.try_dequeue(p))
        if (p) admit_or_fail(std::move(p));
    std::vector<SeqId> ids;
    for (auto& [id, a] : active) ids.push_back(id);
    for (SeqId id : ids) finish(id, FINISH_REASON_ERROR, EngineErrc::stopped, "engine stopped");
}

void Engine::Impl::step() {
    StepPlan plan = planner->schedule();
    // The planner already dropped these; the requests still have to hear why.
    for (SeqId id : plan.rejected)
        finish(id, FINISH_REASON_ERROR, EngineErrc::too_long,
               fmt::format("the request needs more KV blocks than the pool's {}", pool->n_blocks()));
    if (plan.empty()) {
        publish_stats(&plan);
        return;
    }
    try {
        run_plan(plan);
    } catch (const std::exception& e) {
        // Whatever failed (the forward pass, an allocation, a bad id from the device) fails the
        // requests of this step, never the engine or the others.
        for (const PlannedSeq& ps : plan.seqs) finish(ps.id, FINISH_REASON_ERROR, EngineErrc::backend_failed, e.what());
        publish_stats(&plan);
    }
}

void Engine::Impl::run_plan(const StepPlan& plan) {
    Batch batch;
    int64_t n_prompt_tokens = 0;
    for (const PlannedSeq& ps : plan.seqs) {
        const SeqState& s = planner->seq(ps.id);
        Active& a = *active.at(ps.id);
        if (!a.started) {
            a.started = true;
            n_not_started.fetch_sub(1);
        }
        const int32_t si = batch.add_seq(s.blocks);
        for (int32_t i = ps.start; i < ps.start + ps.n_new; ++i) {
            batch.add(s.tokens[static_cast<size_t>(i)], i, si, ps.wants_logits && i == ps.start + ps.n_new - 1);
            if (i < s.n_prompt) ++n_prompt_tokens;
        }
    }
    const int64_t n_vocab = model->config().n_vocab;
    // On-device sampling when the backend offers it: the whole chain (and any logprobs) runs
    // there and only ids come back. Otherwise logits come back and the CPU sampler decides.
    const bool device_sampling = backend->samples_on_device();
    std::vector<float> logits;
    std::vector<DeviceSampleOut> device_out;
    {
        if (device_sampling) {
            std::vector<DeviceSampleRow> rows;
            for (const PlannedSeq& ps : plan.seqs) {
                if (!ps.wants_logits) continue;
                const Active& a = *active.at(ps.id);
                const SamplingParams& sp = a.sampler.params();
                DeviceSampleRow r;
                r.logit_bias = sp.logit_bias;
                r.penalty_counts = a.sampler.penalty_counts();
                r.repeat_penalty = sp.repeat_penalty;
                r.frequency_penalty = sp.frequency_penalty;
                r.presence_penalty = sp.presence_penalty;
                r.temperature = sp.temperature;
                r.top_k = sp.top_k;
                r.top_p = sp.top_p;
                r.min_p = sp.min_p;
                r.seed = sp.seed;
                r.token_index = static_cast<uint64_t>(planner->seq(ps.id).n_generated());
                r.n_logprobs = sp.n_logprobs;
                rows.push_back(std::move(r));
            }
            device_out.resize(rows.size());
            backend->forward_sample(batch, rows, device_out);
        } else {
            logits.assign(batch.logit_rows.size() * static_cast<size_t>(n_vocab), 0.0f);
            backend->forward(batch, logits);
        }
    }

    // Sample each sequence that reached its end, in plan order.
    std::vector<TokenId> sampled;
    std::vector<TokenEvent> events;
    size_t row = 0;
    for (const PlannedSeq& ps : plan.seqs) {
        if (!ps.wants_logits) continue;
        Active& a = *active.at(ps.id);
        if (device_sampling) {
            DeviceSampleOut& o = device_out[row++];
            TokenEvent ev;
            ev.id = o.id < n_vocab ? o.id : -1;
            if (ev.id >= 0 && a.req.sampling.n_logprobs > 0) {
                ev.logprob = o.logprob;
                ev.top_logprobs = std::move(o.top_logprobs);
            }
            if (ev.id >= 0) a.sampler.accept(ev.id);
            sampled.push_back(ev.id < 0 ? 0 : ev.id);
            events.push_back(std::move(ev));
            continue;
        }
        float* l = &logits[row++ * static_cast<size_t>(n_vocab)];
        TokenEvent ev;
        const int32_t n_lp = a.req.sampling.n_logprobs;
        if (n_lp > 0) ev.top_logprobs = top_logprobs(l, static_cast<int32_t>(n_vocab), n_lp);
        const uint64_t token_index = static_cast<uint64_t>(planner->seq(ps.id).n_generated());
        std::vector<float> raw;
        if (n_lp > 0) raw.assign(l, l + n_vocab);
        TokenId id = -1;
        try {
            id = a.sampler.sample(std::span<float>(l, static_cast<size_t>(n_vocab)), token_index);
        } catch (const Error&) {
            id = -1;  // nothing left to sample (e.g. every token banned); ends below
        }
        if (id >= 0 && n_lp > 0) ev.logprob = token_logprob(raw.data(), static_cast<int32_t>(n_vocab), id);
        if (id >= 0) a.sampler.accept(id);
        ev.id = id;
        sampled.push_back(id < 0 ? 0 : id);
        events.push_back(std::move(ev));
    }
    planner->update(plan, sampled);

    // Deliver tokens and decide who is done.
    size_t k = 0;
    int64_t n_gen = 0;
    const Tokenizer& tok = model->tokenizer();
    for (const PlannedSeq& ps : plan.seqs) {
        if (!ps.wants_logits) continue;
        TokenEvent ev = std::move(events[k++]);
        Active& a = *active.at(ps.id);
        if (ev.id < 0) {
            finish(ps.id, FINISH_REASON_ERROR, EngineErrc::backend_failed, "no token can be sampled (all banned)");
            continue;
        }
        ++n_gen;
        const SeqState& s = planner->seq(ps.id);
        const bool eog = !a.req.ignore_eos && tok.is_eog(ev.id);
        FinishReason reason = FINISH_REASON_NONE;
        if (!eog) ev.text = a.stop.push(a.decoder.push(ev.id));
        if (eog || a.stop.stopped()) reason = FINISH_REASON_STOP;
        else if (s.n_generated() >= a.req.max_tokens || s.n_tokens() >= n_ctx) reason = FINISH_REASON_LENGTH;
        if (reason != FINISH_REASON_NONE && !a.stop.stopped()) {
            ev.text += a.stop.push(a.decoder.flush());
            if (!a.stop.stopped()) ev.text += a.stop.flush();
        }
        a.state->push(std::move(ev), seconds_between(a.submitted, Clock::now()));
        if (reason != FINISH_REASON_NONE) finish(ps.id, reason);
    }
    {
        std::lock_guard lock(stats_mutex);
        ++stats.n_steps;
        stats.n_prompt_tokens += n_prompt_tokens;
        stats.n_generated_tokens += n_gen;
    }
    window_tokens += n_gen;
    publish_stats(&plan);
}

void Engine::Impl::publish_stats(const StepPlan* plan) {
    std::lock_guard lock(stats_mutex);
    stats.n_running = planner->n_running();
    stats.n_waiting = planner->n_waiting();
    stats.kv_blocks_total = pool->n_blocks();
    stats.kv_blocks_used = pool->n_used();
    stats.kv_blocks_free = pool->n_free();
    stats.kv_blocks_cached = pool->n_cached();
    const PlannerStats& ps = planner->stats();
    stats.n_preemptions = ps.n_preemptions;
    stats.prefix_hit_tokens = ps.prefix_hit_tokens;
    stats.prefix_hit_rate = ps.prefix_query_tokens ? double(ps.prefix_hit_tokens) / double(ps.prefix_query_tokens) : 0.0;
    if (plan) {
        stats.last_batch_seqs = static_cast<int32_t>(plan->seqs.size());
        stats.last_batch_tokens = plan->n_tokens;
        stats.peak_batch_seqs = std::max(stats.peak_batch_seqs, stats.last_batch_seqs);
    }
    const auto now = Clock::now();
    const double dt = seconds_between(window_start, now);
    if (dt >= 1.0 || (!plan && dt > 0.2)) {
        stats.tokens_per_second = window_tokens / dt;
        window_start = now;
        window_tokens = 0;
    }
}

}  // namespace coinfer
