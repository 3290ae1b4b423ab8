#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <concurrentqueue/blockingconcurrentqueue.h>
#include <fmt/format.h>

#include "engine/generate.h"
#include "engine/grammar.h"

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
    std::unique_ptr<GrammarMatcher> grammar;  // constrained output: what may come next
    StreamDecoder decoder;
    StopMatcher stop;
    Clock::time_point submitted;
    bool started = false;         // left the waiting queue at least once
    bool length_reached = false;  // the token in flight is its last (max_tokens or context)
};

// The step on the device (at most one). The backend reads the batch and the rows until the
// step has been waited for, so they live here until then.
struct InFlight {
    StepPlan plan;                      // the planned sequences that run, in batch order
    Batch batch;
    std::vector<SeqId> row_seq;         // [n_logit_rows] the sequence of each logit row
    std::vector<DeviceSampleRow> rows;  // [n_logit_rows] device sampling's inputs
    std::vector<uint64_t> token_index;  // [n_logit_rows] host sampling's Philox counters
    int64_t n_prompt_tokens = 0;
};

// One sampled token of a finished step, delivered after the next step has been launched.
struct Sampled {
    SeqId id;
    TokenEvent ev;                       // ev.id < 0: no token could be sampled
    FinishReason end = FINISH_REASON_NONE;  // EOS (STOP) or length, decided before the next launch
    bool grammar_done = false;              // STOP because the grammar is complete: the token is text
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
    std::atomic<bool> failed{false};  // the backend threw FatalBackendError: nothing runs any more
    std::mutex submit_mutex;  // orders submissions against shutdown(): none is queued after it
    std::thread thread;

    std::unordered_map<SeqId, std::unique_ptr<Active>> active;  // step-loop thread only
    // The vocabulary's byte trie (built with the engine: 15-300 ms, not on a request's thread),
    // and the compiled grammars of recent requests by their source (a schema sent again reuses
    // its stack nodes and cached masks). Contexts are used on the step loop only.
    std::shared_ptr<const TokenTrie> trie;
    std::mutex grammars_mutex;
    std::vector<std::pair<std::string, std::shared_ptr<GrammarContext>>> grammars;  // most recent last
    static constexpr size_t k_max_grammars = 16;  // each holds up to 16 MiB of masks
    std::shared_ptr<GrammarContext> grammar_context(const Request& req);
    std::vector<uint32_t> mask;  // step loop: the allowed-token bits of the row at hand

    // The allowed tokens of a constrained row, left in `mask`: EOS only where the grammar may
    // end, and with ignore_eos only when nothing else can follow (the document is complete).
    void grammar_mask(Active& a) {
        a.grammar->fill_mask(mask);
        if (!a.req.ignore_eos || !a.grammar->can_end()) return;
        std::vector<uint32_t> other = mask;
        for (TokenId id : trie->eog_ids()) other[size_t(id) >> 5] &= ~(1u << (id & 31));
        if (std::any_of(other.begin(), other.end(), [](uint32_t w) { return w != 0; })) mask.swap(other);
    }
    std::unique_ptr<InFlight> in_flight;                        // step-loop thread only

    mutable std::mutex stats_mutex;
    mutable std::condition_variable stats_cv;  // notified when the stats are published
    EngineStats stats;
    // Throughput window.
    Clock::time_point window_start = Clock::now();
    int64_t window_tokens = 0;

    void run();
    void admit(std::unique_ptr<Prepared> p);
    void admit_or_fail(std::unique_ptr<Prepared> p);
    void step();
    void apply_in_flight();
    std::unique_ptr<InFlight> launch(const StepPlan& plan, const std::unordered_set<SeqId>& ending);
    std::vector<TokenEvent> wait(InFlight& f);
    std::vector<Sampled> complete(InFlight& f, std::unordered_set<SeqId>& ending);
    void deliver(std::vector<Sampled>& done);
    void fail_step(const InFlight& f, const std::string& what);
    // A step's error: FatalBackendError fails the engine (every request, and all later ones),
    // anything else the step's requests.
    void step_error(const std::exception& e, const InFlight* f);
    void fail_engine(const std::string& why);
    void fail_all(std::error_code ec, const std::string& why);
    std::string failure_message() const {
        std::lock_guard lock(stats_mutex);
        return stats.failure;
    }
    void finish(SeqId id, FinishReason reason, std::error_code ec = {}, std::string message = {});
    void publish_stats(bool idle, const InFlight* launched = nullptr);  // and notifies stats_cv
    void publish_stats_locked(bool idle, const InFlight* launched);
};

// ---- construction ----

namespace {

// Options a caller may get wrong, refused by name before anything is loaded or uploaded.
void validate_options(const EngineOptions& o) {
    const BackendOptions& b = o.backend;
    const PlannerOptions& p = o.planner;
    (void)parse_device(o.device);
    if (b.block_size < 1 || b.block_size > 1024) throw_error("backend.block_size {} is not in 1..1024", b.block_size);
    if (b.n_blocks < 0) throw_error("backend.n_blocks {} is negative (0: the backend's choice)", b.n_blocks);
    if (b.n_threads < 1 || b.n_threads > 1024) throw_error("backend.n_threads {} is not in 1..1024", b.n_threads);
    if (!(b.gpu_memory_fraction > 0.0f && b.gpu_memory_fraction <= 1.0f))
        throw_error("backend.gpu_memory_fraction {} is not in (0, 1]", b.gpu_memory_fraction);
    if (b.cuda_device < 0) throw_error("backend.cuda_device {} is negative", b.cuda_device);
    if (p.max_batch_tokens < 1) throw_error("planner.max_batch_tokens must be at least 1 (got {})", p.max_batch_tokens);
    if (p.max_seqs < 1) throw_error("planner.max_seqs must be at least 1 (got {})", p.max_seqs);
    if (p.max_prompt_tokens_mixed < 0)
        throw_error("planner.max_prompt_tokens_mixed {} is negative (0: no cap)", p.max_prompt_tokens_mixed);
    if (o.max_waiting < 1) throw_error("max_waiting must be at least 1 (got {})", o.max_waiting);
    if (o.n_ctx < 0) throw_error("n_ctx {} is negative (0: the model's)", o.n_ctx);
    if (!(o.fault_rate >= 0.0 && o.fault_rate <= 1.0)) throw_error("fault_rate {} is not in [0, 1]", o.fault_rate);
    if (o.fault_fatal_at < 0) throw_error("fault_fatal_at {} is negative", o.fault_fatal_at);
}

}  // namespace

Engine::Engine(asio::any_io_executor ex, EngineOptions opt) : executor_(std::move(ex)), impl_(std::make_shared<Impl>()) {
    Impl& im = *impl_;
    validate_options(opt);
    im.opt = std::move(opt);
    im.model = im.opt.loaded ? im.opt.loaded : Model::load(im.opt.model);
    im.trie = std::make_shared<TokenTrie>(im.model->tokenizer());
    im.opt.backend.max_step_tokens = std::max(im.opt.planner.max_batch_tokens, 1);
    im.backend = make_backend(im.model, im.opt.device, im.opt.backend);
    if (im.opt.fault_rate > 0.0 || im.opt.fault_fatal_at > 0)
        im.backend = make_fault_backend(std::move(im.backend), im.opt.fault_rate, im.opt.fault_seed, im.opt.fault_fatal_at);
    im.pool = std::make_unique<KvBlockPool>(im.backend->n_blocks(), im.backend->block_size());
    im.planner = std::make_unique<Planner>(*im.pool, im.opt.planner);
    im.n_ctx = im.opt.n_ctx > 0 ? im.opt.n_ctx
                                : static_cast<int32_t>(std::min<int64_t>(im.model->config().n_ctx_train, INT32_MAX));
    im.publish_stats(true);
    im.thread = std::thread([&im] { im.run(); });
}

Engine::~Engine() { shutdown(); }

void Engine::shutdown() {
    if (!impl_->thread.joinable()) return;
    {
        std::lock_guard lock(impl_->submit_mutex);
        impl_->stopping.store(true);
    }
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

bool Engine::wait_for_stats(const std::function<bool(const EngineStats&)>& pred,
                            std::chrono::milliseconds timeout) const {
    std::unique_lock lock(impl_->stats_mutex);
    return impl_->stats_cv.wait_for(lock, timeout, [&] {
        EngineStats s = impl_->stats;
        s.n_waiting += static_cast<int32_t>(impl_->queue.size_approx());
        return pred(s);
    });
}

// ---- submission (any thread) ----

std::shared_ptr<GrammarContext> Engine::Impl::grammar_context(const Request& req) {
    std::string key = req.grammar.empty() ? "s:" + req.json_schema : "g:" + req.grammar;
    {
        std::lock_guard lock(grammars_mutex);
        for (auto it = grammars.begin(); it != grammars.end(); ++it)
            if (it->first == key) {
                auto hit = *it;
                grammars.erase(it);
                grammars.push_back(hit);
                return hit.second;
            }
    }
    // Compiled outside the lock (a bad one throws to its caller alone), or found compiled.
    auto g = req.grammar.empty() ? Grammar::cached_json_schema(req.json_schema) : Grammar::cached_gbnf(req.grammar);
    auto ctx = std::make_shared<GrammarContext>(std::move(g), trie);
    std::lock_guard lock(grammars_mutex);
    if (grammars.size() >= k_max_grammars) grammars.erase(grammars.begin());
    grammars.push_back({std::move(key), ctx});
    return ctx;
}

Engine::Prepared Engine::prepare(Impl& im, const Request& req) {
    const Model& model = *im.model;
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
    g.n_ctx = im.n_ctx;
    // Too long for the context: its own error code, so a server can say so (OpenAI's
    // context_length_exceeded).
    if (im.n_ctx > 0 && p.prompt_ids.size() >= static_cast<size_t>(im.n_ctx))
        throw EngineError(make_error_code(EngineErrc::too_long),
                          fmt::format("the prompt has {} tokens, which does not fit the context of {} tokens",
                                      p.prompt_ids.size(), im.n_ctx));
    validate_generate(model, p.prompt_ids.size(), g);  // empty prompt, context, sampling values
    if (!req.grammar.empty() && !req.json_schema.empty()) throw_error("give a grammar or a JSON schema, not both");
    if (!req.grammar.empty() || !req.json_schema.empty()) p.grammar = im.grammar_context(req);
    if (static_cast<int64_t>(p.prompt_ids.size()) + req.max_tokens > im.n_ctx)
        throw_error("prompt ({} tokens) plus max_tokens ({}) exceeds the context of {} tokens",
                    p.prompt_ids.size(), req.max_tokens, im.n_ctx);
    p.state = std::make_shared<detail::RequestState>(im.next_id.fetch_add(1));
    p.submitted = std::chrono::steady_clock::now();
    return p;
}

std::error_code Engine::submit(Impl& im, Prepared p) {
    std::error_code ec;
    std::unique_lock lock(im.submit_mutex);
    if (im.stopping.load()) {
        ec = EngineErrc::stopped;
    } else if (im.failed.load()) {
        ec = EngineErrc::engine_failed;
    } else if (im.n_not_started.fetch_add(1) >= im.opt.max_waiting) {
        im.n_not_started.fetch_sub(1);
        ec = EngineErrc::queue_full;
    }
    if (ec) {
        lock.unlock();
        // The request never started: finishing it tells a waiting handler (async_complete).
        p.state->finish(FINISH_REASON_ERROR, ec,
                        ec == EngineErrc::engine_failed ? ec.message() + ": " + im.failure_message() : ec.message(), 0);
        return ec;
    }
    im.queue.enqueue(std::make_unique<Prepared>(std::move(p)));
    return {};
}

void Engine::start_complete(Impl& im, Prepared p, detail::DoneHandler done, asio::cancellation_slot slot) {
    if (slot.is_connected()) {
        std::weak_ptr<detail::RequestState> weak = p.state;
        slot.assign([weak](asio::cancellation_type) {
            if (auto s = weak.lock()) s->cancel();
        });
    }
    p.state->on_done(std::move(done), p.prompt_ids);
    submit(im, std::move(p));
}

TokenStream Engine::generate(const Request& req) {
    Prepared p = prepare(*impl_, req);
    TokenStream stream(p.state, p.prompt_ids, executor_);
    if (auto ec = submit(*impl_, std::move(p)))
        throw EngineError(ec, ec == EngineErrc::queue_full
                                  ? fmt::format("too many waiting requests (max_waiting = {})", impl_->opt.max_waiting)
                                  : stream.error_message());
    return stream;
}

// ---- the step loop (its own thread) ----

void Engine::Impl::admit(std::unique_ptr<Prepared> p) {
    const SeqId id = p->state->id();
    const Request& req = p->request;
    auto a = std::make_unique<Active>(Active{p->state, req, Sampler(req.sampling), nullptr, StreamDecoder(model->tokenizer()),
                                             StopMatcher(req.stop), p->submitted, false});
    if (p->grammar) a->grammar = std::make_unique<GrammarMatcher>(p->grammar);
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
    stats_cv.notify_all();
}

// The loop keeps one step on the device while the host plans the next (speculative planning,
// as vLLM's async scheduling), so the device does not idle through the host's work:
//   1. step k (in flight) is applied to the planner with a placeholder token per sampled row;
//   2. step k+1 is planned;
//   3. step k's ids come back: placeholders are patched, samplers accept, EOS/length decided;
//   4. step k+1 is built (after the accepts: penalties and Philox counters include step k) and
//      launched, leaving out sequences that end with step k;
//   5. step k's tokens are delivered: detokenizing, stop strings, pushes, finishes.
// A sequence finished in 5 (a stop string) may already run in step k+1; its row is dropped when
// step k+1 comes back. On the CPU backend "launch" does nothing and step 3 runs the forward pass
// and the host sampler, through the same logic.
void Engine::Impl::run() {
    std::unique_ptr<Prepared> p;
    while (true) {
        // Take every submission that is waiting; block only when there is nothing to run.
        const bool idle = planner->idle() && !in_flight;
        bool got = idle ? queue.wait_dequeue_timed(p, std::chrono::milliseconds(200)) : queue.try_dequeue(p);
        while (got) {
            if (p) admit_or_fail(std::move(p));
            got = queue.try_dequeue(p);
        }
        if (stopping.load()) break;
        try {
            // Submitted before the failure was seen: they end as every other request did.
            if (failed.load()) fail_all(EngineErrc::engine_failed, failure_message());
            // Cancellations take effect here, so their blocks are free within one step.
            std::vector<SeqId> cancelled;
            for (auto& [id, a] : active)
                if (a->state->cancel_requested()) cancelled.push_back(id);
            for (SeqId id : cancelled) finish(id, FINISH_REASON_CANCELLED, asio::error::operation_aborted);
            if (planner->idle() && !in_flight) {
                publish_stats(true);
                continue;
            }
            step();
        } catch (const std::exception& e) {
            // Nothing escapes the loop: an error outside a step's own handling (planning, an
            // allocation) fails the requests in hand, and the loop serves the next ones.
            std::fprintf(stderr, "engine: step loop error: %s\n", e.what());
            step_error(e, nullptr);
        }
    }
    // Shutting down: the step on the device is drained (its tokens delivered), then everything
    // unfinished ends with `stopped`.
    if (in_flight) {
        apply_in_flight();
        std::unique_ptr<InFlight> f = std::move(in_flight);
        std::unordered_set<SeqId> ending;
        std::vector<Sampled> done;
        try {
            done = complete(*f, ending);
            deliver(done);
        } catch (const std::exception& e) {
            fail_step(*f, e.what());
        }
    }
    while (queue.try_dequeue(p))
        if (p) admit_or_fail(std::move(p));
    std::vector<SeqId> ids;
    for (auto& [id, a] : active) ids.push_back(id);
    for (SeqId id : ids) finish(id, FINISH_REASON_ERROR, EngineErrc::stopped, "engine stopped");
}

void Engine::Impl::step() {
    // 1-2. Plan step k+1 as if step k were done, while the device runs it.
    apply_in_flight();
    StepPlan next = planner->schedule();
    // The planner already dropped these; the requests still have to hear why.
    for (SeqId id : next.rejected)
        finish(id, FINISH_REASON_ERROR, EngineErrc::too_long,
               fmt::format("the request needs more KV blocks than the pool's {}", pool->n_blocks()));

    // 3. Step k's ids.
    std::vector<Sampled> done;
    std::unordered_set<SeqId> ending;  // end with step k's token: not part of step k+1
    if (in_flight) {
        std::unique_ptr<InFlight> f = std::move(in_flight);
        try {
            done = complete(*f, ending);
        } catch (const std::exception& e) {
            // Whatever failed (the forward pass, an allocation, a bad id from the device) fails
            // the requests of this step, never the engine or the others (unless the device is
            // lost: then everything).
            step_error(e, f.get());
            done.clear();
            ending.clear();
            if (failed.load()) return;
        }
    }

    // 4. Step k+1 goes to the device.
    if (!next.empty()) in_flight = launch(next, ending);

    // 5. Step k's tokens, while the device runs step k+1.
    try {
        deliver(done);
    } catch (const std::exception& e) {
        for (const Sampled& d : done) finish(d.id, FINISH_REASON_ERROR, EngineErrc::backend_failed, e.what());
    }
    publish_stats(false, in_flight.get());
}

void Engine::Impl::apply_in_flight() {
    if (!in_flight) return;
    // The planner advances n_computed now and appends a placeholder per sampled row, patched in
    // complete(). Only computed positions are hashed, so no placeholder enters a block hash.
    std::vector<TokenId> placeholders(in_flight->row_seq.size(), k_token_placeholder);
    planner->update(in_flight->plan, placeholders);
    // A sequence whose token in flight reaches max_tokens or the context limit ends whatever
    // that token is. It leaves the planner now, so the next plan neither runs it nor preempts
    // others to make room for it. Its blocks may be handed out while step k still writes them:
    // every device step runs on one stream, in order, so step k is done with them first.
    for (SeqId id : in_flight->row_seq) {
        const SeqState* s = planner->find(id);
        if (!s) continue;
        Active& a = *active.at(id);
        if (s->n_generated() >= a.req.max_tokens || s->n_tokens() >= n_ctx) {
            a.length_reached = true;
            planner->finish(id);
        }
    }
}

std::unique_ptr<InFlight> Engine::Impl::launch(const StepPlan& plan, const std::unordered_set<SeqId>& ending) {
    auto f = std::make_unique<InFlight>();
    for (const PlannedSeq& ps : plan.seqs) {
        // Left out: sequences that end with step k, were finished since planning (a failed
        // step), or were preempted since (drop_last_hashes): the plan is stale for them.
        if (ending.count(ps.id)) continue;
        const SeqState* s = planner->find(ps.id);
        if (!s || s->status != SEQ_STATUS_RUNNING || s->n_computed != ps.start) continue;
        f->plan.seqs.push_back(ps);
        f->plan.n_tokens += ps.n_new;
    }
    if (f->plan.empty()) return nullptr;
    const bool device_sampling = backend->samples_on_device();
    std::vector<std::pair<size_t, Active*>> masked;  // constrained rows: (row, request)
    bool forward_queued = false;
    try {
        for (const PlannedSeq& ps : f->plan.seqs) {
            const SeqState& s = planner->seq(ps.id);
            Active& a = *active.at(ps.id);
            if (!a.started) {
                a.started = true;
                n_not_started.fetch_sub(1);
            }
            const int32_t si = f->batch.add_seq(s.blocks);
            for (int32_t i = ps.start; i < ps.start + ps.n_new; ++i) {
                const TokenId t = s.tokens[static_cast<size_t>(i)];
                if (t == k_token_placeholder) throw_error("engine: sequence {} has an unpatched token at {}", ps.id, i);
                f->batch.add(t, i, si, ps.wants_logits && i == ps.start + ps.n_new - 1);
                if (i < s.n_prompt) ++f->n_prompt_tokens;
            }
            if (!ps.wants_logits) continue;
            // Built after step k's accept: the penalty window and the Philox counter include it.
            const uint64_t token_index = static_cast<uint64_t>(s.n_generated());
            f->row_seq.push_back(ps.id);
            if (!device_sampling) {
                f->token_index.push_back(token_index);
                continue;
            }
            const SamplingParams& sp = a.sampler.params();
            DeviceSampleRow r;
            r.logit_bias = sp.logit_bias;
            r.bias_key = static_cast<uint64_t>(ps.id) + 1;  // a request's bias list never changes
            r.penalty_counts = a.sampler.penalty_counts();
            r.repeat_penalty = sp.repeat_penalty;
            r.frequency_penalty = sp.frequency_penalty;
            r.presence_penalty = sp.presence_penalty;
            r.temperature = sp.temperature;
            r.top_k = sp.top_k;
            r.top_p = sp.top_p;
            r.min_p = sp.min_p;
            r.seed = sp.seed;
            r.token_index = token_index;
            r.n_logprobs = sp.n_logprobs;
            if (a.grammar) masked.push_back({f->rows.size(), &a});
            f->rows.push_back(std::move(r));
        }
        // The CPU path runs the forward pass and the host sampler in wait().
        if (device_sampling) {
            if (!masked.empty()) {
                // The grammar's masks (the device sampler bans what they do not allow) take host
                // time: the pass runs meanwhile.
                backend->launch_forward(f->batch);
                forward_queued = true;
                for (auto [row, a] : masked) {
                    grammar_mask(*a);
                    f->rows[row].allowed = mask;
                }
            }
            backend->launch_sample(f->batch, f->rows);
            forward_queued = false;
        }
    } catch (const std::exception& e) {
        if (forward_queued) backend->abandon_forward();
        // Nothing was hashed for this step yet (update comes next iteration).
        if (dynamic_cast<const FatalBackendError*>(&e)) {
            fail_engine(e.what());
            return nullptr;
        }
        for (const PlannedSeq& ps : f->plan.seqs) finish(ps.id, FINISH_REASON_ERROR, EngineErrc::backend_failed, e.what());
        return nullptr;
    }
    return f;
}

std::vector<TokenEvent> Engine::Impl::wait(InFlight& f) {
    const int64_t n_vocab = model->config().n_vocab;
    const size_t n_rows = f.row_seq.size();
    std::vector<TokenEvent> evs(n_rows);
    if (backend->samples_on_device()) {
        // The whole chain (and any logprobs) ran on the device; only ids come back.
        std::vector<DeviceSampleOut> out(n_rows);
        backend->wait_sample(out);
        for (size_t r = 0; r < n_rows; ++r) {
            DeviceSampleOut& o = out[r];
            TokenEvent& ev = evs[r];
            ev.id = o.id < n_vocab ? o.id : -1;
            if (ev.id >= 0 && f.rows[r].n_logprobs > 0) {
                ev.logprob = o.logprob;
                ev.top_logprobs = std::move(o.top_logprobs);
            }
        }
        return evs;
    }
    // Logits come back and the CPU sampler decides. The sampler's state is what it was at
    // launch: accepts happen only between a step's wait and the next launch.
    std::vector<float> logits(n_rows * static_cast<size_t>(n_vocab), 0.0f);  // [n_rows, n_vocab]
    backend->forward(f.batch, logits);
    for (size_t r = 0; r < n_rows; ++r) {
        auto it = active.find(f.row_seq[r]);
        if (it == active.end()) continue;  // finished while the step ran: the row is dropped
        Active& a = *it->second;
        float* l = &logits[r * static_cast<size_t>(n_vocab)];
        TokenEvent& ev = evs[r];
        const int32_t n_lp = a.req.sampling.n_logprobs;
        if (n_lp > 0) ev.top_logprobs = top_logprobs(l, static_cast<int32_t>(n_vocab), n_lp);
        std::vector<float> raw;
        if (n_lp > 0) raw.assign(l, l + n_vocab);
        if (a.grammar) {
            grammar_mask(a);
            for (int64_t t = 0; t < n_vocab; ++t)
                if (!(mask[size_t(t) >> 5] >> (t & 31) & 1)) l[t] = -INFINITY;
        }
        TokenId id = -1;
        try {
            id = a.sampler.sample(std::span<float>(l, static_cast<size_t>(n_vocab)), f.token_index[r]);
        } catch (const Error&) {
            id = -1;  // nothing left to sample (e.g. every token banned); ends in deliver()
        }
        if (id >= 0 && n_lp > 0) ev.logprob = token_logprob(raw.data(), static_cast<int32_t>(n_vocab), id);
        ev.id = id;
    }
    return evs;
}

std::vector<Sampled> Engine::Impl::complete(InFlight& f, std::unordered_set<SeqId>& ending) {
    std::vector<TokenEvent> evs = wait(f);
    {
        std::lock_guard lock(stats_mutex);
        ++stats.n_steps;
        stats.n_prompt_tokens += f.n_prompt_tokens;
    }
    const Tokenizer& tok = model->tokenizer();
    std::vector<Sampled> done;
    done.reserve(evs.size());
    for (size_t r = 0; r < evs.size(); ++r) {
        const SeqId id = f.row_seq[r];
        auto it = active.find(id);
        if (it == active.end()) continue;  // finished while the step ran (cancel, stop string)
        Active& a = *it->second;
        Sampled d{id, std::move(evs[r])};
        // Still in the planner unless it reached its length (possibly preempted meanwhile:
        // the token is kept for its recompute).
        if (planner->find(id)) planner->set_last_token(id, d.ev.id < 0 ? 0 : d.ev.id);
        if (d.ev.id < 0) {
            ending.insert(id);
        } else {
            a.sampler.accept(d.ev.id);
            if (a.grammar && !tok.is_eog(d.ev.id) && !a.grammar->accept_token(d.ev.id)) {
                d.ev.id = -2;  // cannot happen: the row was masked; ends in deliver()
                ending.insert(id);
                done.push_back(std::move(d));
                continue;
            }
            // EOS ends a constrained request even with ignore_eos: the mask allowed it only there.
            if ((!a.req.ignore_eos || a.grammar) && tok.is_eog(d.ev.id)) d.end = FINISH_REASON_STOP;
            else if (a.grammar && a.grammar->must_end()) d.end = FINISH_REASON_STOP, d.grammar_done = true;
            else if (a.length_reached) d.end = FINISH_REASON_LENGTH;
            if (d.end != FINISH_REASON_NONE) ending.insert(id);
        }
        done.push_back(std::move(d));
    }
    return done;
}

void Engine::Impl::deliver(std::vector<Sampled>& done) {
    int64_t n_gen = 0;
    for (Sampled& d : done) {
        auto it = active.find(d.id);
        if (it == active.end()) continue;
        Active& a = *it->second;
        TokenEvent& ev = d.ev;
        if (ev.id < 0) {
            if (ev.id == -2) finish(d.id, FINISH_REASON_ERROR, EngineErrc::backend_failed, "a sampled token broke the grammar");
            else finish(d.id, FINISH_REASON_ERROR, EngineErrc::invalid_request, "no token can be sampled (all banned)");
            continue;
        }
        ++n_gen;
        const bool eog = d.end == FINISH_REASON_STOP && !d.grammar_done;
        FinishReason reason = FINISH_REASON_NONE;
        if (!eog) ev.text = a.stop.push(a.decoder.push(ev.id));
        if (eog || a.stop.stopped()) reason = FINISH_REASON_STOP;
        else if (d.end == FINISH_REASON_LENGTH) reason = FINISH_REASON_LENGTH;
        if (reason != FINISH_REASON_NONE && !a.stop.stopped()) {
            ev.text += a.stop.push(a.decoder.flush());
            if (!a.stop.stopped()) ev.text += a.stop.flush();
        }
        a.state->push(std::move(ev), seconds_between(a.submitted, Clock::now()));
        // A stop string may end a sequence that already runs in step k+1: that row is dropped.
        if (reason != FINISH_REASON_NONE) finish(d.id, reason);
    }
    {
        std::lock_guard lock(stats_mutex);
        stats.n_generated_tokens += n_gen;
    }
    window_tokens += n_gen;
}

void Engine::Impl::fail_step(const InFlight& f, const std::string& what) {
    for (const PlannedSeq& ps : f.plan.seqs) finish(ps.id, FINISH_REASON_ERROR, EngineErrc::backend_failed, what);
    // The blocks that the step's update hashed never got their K/V.
    planner->drop_last_hashes();
}

void Engine::Impl::step_error(const std::exception& e, const InFlight* f) {
    if (dynamic_cast<const FatalBackendError*>(&e)) {
        fail_engine(e.what());
    } else if (f) {
        fail_step(*f, e.what());
    } else {
        // Which requests the error touched is unknown: the step on the device (if any) is
        // waited for, then every request in hand fails.
        if (in_flight) {
            std::unique_ptr<InFlight> g = std::move(in_flight);
            std::unordered_set<SeqId> ending;
            try {
                complete(*g, ending);
            } catch (const std::exception&) {
            }
            planner->drop_last_hashes();
        }
        fail_all(EngineErrc::backend_failed, e.what());
    }
}

void Engine::Impl::fail_engine(const std::string& why) {
    if (!failed.exchange(true)) {
        std::fprintf(stderr, "engine: %s: every request fails from now on\n", why.c_str());
        std::lock_guard lock(stats_mutex);
        stats.failed = true;
        stats.failure = why;
    }
    in_flight.reset();  // the device runs nothing more: its step is not waited for
    fail_all(EngineErrc::engine_failed, why);
}

void Engine::Impl::fail_all(std::error_code ec, const std::string& why) {
    std::vector<SeqId> ids;
    for (auto& [id, a] : active) ids.push_back(id);
    for (SeqId id : ids) finish(id, FINISH_REASON_ERROR, ec, why);
}

void Engine::Impl::publish_stats(bool idle, const InFlight* launched) {
    publish_stats_locked(idle, launched);
    stats_cv.notify_all();
}

void Engine::Impl::publish_stats_locked(bool idle, const InFlight* launched) {
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
    if (launched) {
        stats.last_batch_seqs = static_cast<int32_t>(launched->plan.seqs.size());
        stats.last_batch_tokens = launched->plan.n_tokens;
        stats.peak_batch_seqs = std::max(stats.peak_batch_seqs, stats.last_batch_seqs);
    }
    const auto now = Clock::now();
    const double dt = seconds_between(window_start, now);
    if (dt >= 1.0 || (idle && dt > 0.2)) {
        stats.tokens_per_second = window_tokens / dt;
        window_start = now;
        window_tokens = 0;
    }
}

}  // namespace coinfer
