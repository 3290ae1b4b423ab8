// The step planner and the KV block pool under chunked prefill, preemption and prefix sharing.
// No model: a fake forward pass writes a fake K/V value per position (a hash of the tokens up to
// it), and fake sampled tokens go back through update(), in the style of vLLM's tests/v1/core.
#include <doctest/doctest.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "engine/kv_pool.h"
#include "scheduler/planner.h"

using namespace coinfer;

namespace {

// A deterministic fake sample, easy to predict in tests.
TokenId fake_token(SeqId id, const SeqState& s) {
    return static_cast<TokenId>(1000 + id * 100 + static_cast<SeqId>(s.n_tokens()));
}

uint64_t mix(uint64_t h, TokenId t) {
    uint64_t x = h ^ (static_cast<uint64_t>(static_cast<uint32_t>(t)) + 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

std::vector<TokenId> iota_tokens(int32_t n, TokenId first) {
    std::vector<TokenId> v(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = first + i;
    return v;
}

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

// The pool and the planner plus a fake KV cache, checking every invariant on every step.
struct Sim {
    using SampleFn = std::function<TokenId(SeqId, const SeqState&)>;

    PlannerOptions opt;
    KvBlockPool pool;
    Planner planner;
    std::set<SeqId> live;       // added, not yet finished or rejected
    std::vector<uint64_t> kv;   // [n_blocks * block_size]: hash of tokens[0..pos] at pos's slot
    std::vector<StepPlan> plans;
    int64_t n_rejected = 0;
    // The planner's queues as this test expects them: admission order (the back is the
    // newest) and the waiting queue (preempted sequences go to its front).
    std::vector<SeqId> running_order;
    std::deque<SeqId> waiting_order;

    Sim(int32_t n_blocks, int32_t block_size, PlannerOptions o)
        : opt(o), pool(n_blocks, block_size), planner(pool, o),
          kv(static_cast<size_t>(n_blocks) * static_cast<size_t>(block_size), 0) {}

    void add(SeqId id, std::vector<TokenId> prompt) {
        planner.add(id, std::move(prompt));
        live.insert(id);
        waiting_order.push_back(id);
    }
    void finish(SeqId id) {
        planner.finish(id);
        live.erase(id);
        std::erase(running_order, id);
        std::erase(waiting_order, id);
        check_refcounts();
    }
    const SeqState& seq(SeqId id) const { return planner.seq(id); }

    size_t slot(const SeqState& s, int32_t pos) const {
        const int32_t bs = pool.block_size();
        return static_cast<size_t>(s.blocks[static_cast<size_t>(pos / bs)]) * static_cast<size_t>(bs) +
               static_cast<size_t>(pos % bs);
    }

    // Each block's refcount equals the number of live block tables holding it; waiting
    // sequences hold nothing.
    void check_refcounts() {
        std::map<int32_t, int32_t> refs;
        for (SeqId id : live) {
            const SeqState& s = planner.seq(id);
            std::set<int32_t> own(s.blocks.begin(), s.blocks.end());
            CHECK(own.size() == s.blocks.size());
            if (s.status == SEQ_STATUS_WAITING) {
                CHECK(s.blocks.empty());
                CHECK(s.n_computed == 0);
            }
            for (int32_t b : s.blocks) ++refs[b];
        }
        int32_t n_bad = 0;
        for (int32_t b = 0; b < pool.n_blocks(); ++b) {
            auto it = refs.find(b);
            if (pool.ref_count(b) != (it == refs.end() ? 0 : it->second)) ++n_bad;
        }
        CHECK(n_bad == 0);
        CHECK(pool.n_used() == static_cast<int32_t>(refs.size()));
        CHECK(pool.n_cached() <= pool.n_free());
        CHECK(pool.n_free() + pool.n_used() == pool.n_blocks());
    }

    StepPlan step(const SampleFn& sample = fake_token) {
        const int32_t bs = pool.block_size();
        std::map<SeqId, SeqStatus> status_before;
        std::map<SeqId, int32_t> n_tokens_before;
        for (SeqId id : live) {
            status_before[id] = seq(id).status;
            n_tokens_before[id] = seq(id).n_tokens();
        }

        StepPlan plan = planner.schedule();

        // Budget, caps and order.
        CHECK(plan.n_tokens <= opt.max_batch_tokens);
        CHECK(static_cast<int32_t>(plan.seqs.size()) <= opt.max_seqs);
        CHECK(planner.n_running() <= opt.max_seqs);
        int32_t n_sum = 0;
        bool seen_admitted = false;
        std::set<SeqId> planned;
        for (const PlannedSeq& p : plan.seqs) {
            CHECK(planned.insert(p.id).second);
            const SeqState* s = planner.find(p.id);
            REQUIRE(s != nullptr);
            CHECK(s->status == SEQ_STATUS_RUNNING);
            CHECK(p.start == s->n_computed);
            CHECK(p.n_new >= 1);
            CHECK(p.start + p.n_new <= s->n_tokens());
            CHECK(p.wants_logits == (p.start + p.n_new == s->n_tokens()));
            CHECK(static_cast<int32_t>(s->blocks.size()) * bs >= p.start + p.n_new);
            // Sequences that were running come first, then the newly admitted ones.
            if (status_before.at(p.id) == SEQ_STATUS_WAITING)
                seen_admitted = true;
            else
                CHECK_FALSE(seen_admitted);
            n_sum += p.n_new;
        }
        CHECK(n_sum == plan.n_tokens);

        // Victims are the newest running sequences, newest first; each goes to the front of
        // the waiting queue.
        for (SeqId id : plan.preempted) {
            REQUIRE(!running_order.empty());
            CHECK(running_order.back() == id);
            running_order.pop_back();
            waiting_order.push_front(id);
        }
        // Running sequences are planned oldest first (a prefix of the admission order, since
        // only the budget can cut the list short); admissions and rejections come off the
        // front of the waiting queue in order.
        size_t n_old = 0;
        while (n_old < plan.seqs.size() && status_before.at(plan.seqs[n_old].id) == SEQ_STATUS_RUNNING) ++n_old;
        CHECK(n_old <= running_order.size());
        for (size_t i = 0; i < n_old && i < running_order.size(); ++i) CHECK(plan.seqs[i].id == running_order[i]);
        size_t i_rej = 0;
        for (size_t i = n_old; i < plan.seqs.size(); ++i) {
            while (i_rej < plan.rejected.size() && !waiting_order.empty() && waiting_order.front() == plan.rejected[i_rej]) {
                waiting_order.pop_front();
                ++i_rej;
            }
            REQUIRE(!waiting_order.empty());
            CHECK(waiting_order.front() == plan.seqs[i].id);
            waiting_order.pop_front();
            running_order.push_back(plan.seqs[i].id);
        }
        for (; i_rej < plan.rejected.size(); ++i_rej) {
            REQUIRE(!waiting_order.empty());
            CHECK(waiting_order.front() == plan.rejected[i_rej]);
            waiting_order.pop_front();
        }
        CHECK(static_cast<int32_t>(running_order.size()) == planner.n_running());
        CHECK(static_cast<int32_t>(waiting_order.size()) == planner.n_waiting());
        for (SeqId id : running_order) CHECK(seq(id).status == SEQ_STATUS_RUNNING);
        for (SeqId id : plan.preempted) {
            CHECK(planned.count(id) == 0);
            const SeqState* s = planner.find(id);
            REQUIRE(s != nullptr);
            CHECK(status_before.at(id) == SEQ_STATUS_RUNNING);
            CHECK(s->status == SEQ_STATUS_WAITING);
            CHECK(s->n_computed == 0);
            CHECK(s->blocks.empty());
        }
        for (SeqId id : plan.rejected) {
            CHECK(planner.find(id) == nullptr);
            CHECK(planned.count(id) == 0);
            // Only what could never fit, even alone, is rejected.
            CHECK((n_tokens_before.at(id) + bs - 1) / bs > pool.n_blocks());
            live.erase(id);
            ++n_rejected;
        }
        check_refcounts();

        // The fake forward pass: everything before `start` must already be in the cache with
        // the right content (prefix hits included), and new K/V goes only into unshared blocks.
        std::vector<TokenId> sampled;
        for (const PlannedSeq& p : plan.seqs) {
            const SeqState& s = seq(p.id);
            uint64_t h = 0;
            int32_t n_wrong = 0, n_shared_writes = 0;
            for (int32_t pos = 0; pos < p.start + p.n_new; ++pos) {
                h = mix(h, s.tokens[static_cast<size_t>(pos)]);
                if (pos < p.start) {
                    if (kv[slot(s, pos)] != h) ++n_wrong;
                } else {
                    if (pool.ref_count(s.blocks[static_cast<size_t>(pos / bs)]) != 1) ++n_shared_writes;
                    kv[slot(s, pos)] = h;
                }
            }
            CHECK(n_wrong == 0);
            CHECK(n_shared_writes == 0);
            if (p.wants_logits) sampled.push_back(sample(p.id, s));
        }

        planner.update(plan, sampled);
        size_t k = 0;
        for (const PlannedSeq& p : plan.seqs) {
            const SeqState& s = seq(p.id);
            CHECK(s.n_computed == p.start + p.n_new);
            if (p.wants_logits) {
                CHECK(s.n_tokens() == p.start + p.n_new + 1);
                CHECK(s.tokens.back() == sampled[k++]);
            }
        }
        check_refcounts();
        plans.push_back(plan);
        return plan;
    }

    // Finishes everything left and checks the pool is whole again.
    void drain() {
        std::vector<SeqId> ids(live.begin(), live.end());
        for (SeqId id : ids) finish(id);
        CHECK(planner.idle());
        CHECK(pool.n_free() == pool.n_blocks());
        CHECK(pool.n_used() == 0);
    }
};

const PlannedSeq* find_planned(const StepPlan& plan, SeqId id) {
    for (const PlannedSeq& p : plan.seqs)
        if (p.id == id) return &p;
    return nullptr;
}

// Random arrivals, random lengths (sometimes sharing prefixes, sometimes too long for the
// pool), random cancels and finishes; Sim::step checks every invariant on every step.
PlannerStats run_random(uint32_t seed, int32_t n_blocks, int32_t bs, PlannerOptions opt, int32_t n_steps, int64_t* n_rejected) {
    CAPTURE(seed);
    CAPTURE(n_blocks);
    CAPTURE(bs);
    CAPTURE(opt.max_batch_tokens);
    CAPTURE(opt.max_seqs);
    CAPTURE(opt.prefix_cache);
    std::mt19937 rng(seed);
    auto uniform = [&](int32_t lo, int32_t hi) { return std::uniform_int_distribution<int32_t>(lo, hi)(rng); };
    const int32_t capacity = n_blocks * bs;
    const int32_t vocab = 6;  // small, so generated tokens collide and prefixes repeat

    std::vector<std::vector<TokenId>> prefixes;
    for (int i = 0; i < 3; ++i) {
        std::vector<TokenId> p;
        for (int32_t j = 0, n = uniform(bs, 3 * bs); j < n; ++j) p.push_back(uniform(0, vocab - 1));
        prefixes.push_back(std::move(p));
    }

    Sim sim(n_blocks, bs, opt);
    std::map<SeqId, int32_t> max_gen;
    SeqId next_id = 1;
    int64_t n_finished = 0;
    auto sample = [&](SeqId, const SeqState&) { return static_cast<TokenId>(uniform(0, vocab - 1)); };

    for (int32_t step = 0; step < n_steps || !sim.planner.idle(); ++step) {
        REQUIRE(step < n_steps + 20000);  // no livelock: everything drains
        if (step < n_steps) {
            for (int32_t n = uniform(0, 3) == 0 ? uniform(1, 3) : 0; n > 0; --n) {
                std::vector<TokenId> prompt;
                if (uniform(0, 1)) {
                    const auto& pre = prefixes[static_cast<size_t>(uniform(0, 2))];
                    prompt.assign(pre.begin(), pre.begin() + uniform(1, static_cast<int32_t>(pre.size())));
                }
                const int32_t n_more = uniform(0, 40) == 0 ? capacity + uniform(-4, 8)
                                                           : uniform(prompt.empty() ? 1 : 0, std::max(1, capacity / 3));
                for (int32_t j = 0; j < n_more; ++j) prompt.push_back(uniform(0, vocab - 1));
                max_gen[next_id] = uniform(1, 2 * bs);
                sim.add(next_id++, std::move(prompt));
            }
            if (!sim.live.empty() && uniform(0, 30) == 0) {
                auto it = sim.live.begin();
                std::advance(it, uniform(0, static_cast<int32_t>(sim.live.size()) - 1));
                sim.finish(*it);  // a cancel, running or waiting
                ++n_finished;
            }
        }
        sim.step(sample);
        std::vector<SeqId> done;
        for (SeqId id : sim.live) {
            const SeqState& s = sim.seq(id);
            if (s.status == SEQ_STATUS_RUNNING && s.n_generated() >= max_gen[id] && s.n_computed + 1 == s.n_tokens())
                done.push_back(id);
        }
        for (SeqId id : done) sim.finish(id);
        n_finished += static_cast<int64_t>(done.size());
    }
    CHECK(n_finished > 0);
    CHECK(sim.live.empty());
    CHECK(sim.pool.n_free() == sim.pool.n_blocks());
    CHECK(sim.pool.n_used() == 0);
    *n_rejected += sim.n_rejected;
    return sim.planner.stats();
}

}  // namespace

TEST_CASE("random traffic: the token budget and max_seqs hold, the cache stays consistent") {
    // Small pools force preemption; small budgets force chunking.
    struct Config {
        int32_t n_blocks, bs, max_batch_tokens, max_seqs;
        bool prefix_cache;
    };
    const Config configs[] = {
        {16, 4, 24, 8, true},   {16, 4, 24, 8, false}, {12, 16, 64, 4, true},
        {64, 16, 512, 32, true}, {8, 1, 5, 3, true},   {40, 8, 1, 64, true},
    };
    uint32_t seed = 1;
    int64_t n_preemptions = 0, n_hit_tokens = 0, n_rejected = 0;
    for (const Config& c : configs) {
        for (int rep = 0; rep < 3; ++rep) {
            PlannerOptions opt{.max_batch_tokens = c.max_batch_tokens, .max_seqs = c.max_seqs,
                               .prefix_cache = c.prefix_cache};
            PlannerStats st = run_random(seed++, c.n_blocks, c.bs, opt, 300, &n_rejected);
            n_preemptions += st.n_preemptions;
            n_hit_tokens += st.prefix_hit_tokens;
            if (!c.prefix_cache) CHECK(st.prefix_hit_tokens == 0);
        }
    }
    // The traffic did exercise preemption and prefix hits.
    MESSAGE(n_preemptions, " preemptions, ", n_hit_tokens, " prefix-hit tokens, ", n_rejected, " rejected");
    CHECK(n_rejected > 0);
    CHECK(n_preemptions > 20);
    CHECK(n_hit_tokens > 1000);
}

TEST_CASE("decodes come before prefill") {
    Sim sim(64, 16, {.max_batch_tokens = 64, .max_seqs = 16, .prefix_cache = true});
    sim.add(1, iota_tokens(5, 1));
    sim.add(2, iota_tokens(7, 100));
    StepPlan p0 = sim.step();
    REQUIRE(p0.seqs.size() == 2);
    CHECK(p0.seqs[0].id == 1);
    CHECK(p0.seqs[1].id == 2);

    sim.add(3, iota_tokens(20, 200));
    sim.add(4, iota_tokens(100, 300));
    StepPlan p1 = sim.step();
    // Two decodes of one token, then the waiting prompts in arrival order.
    REQUIRE(p1.seqs.size() == 4);
    CHECK(p1.seqs[0].id == 1);
    CHECK(p1.seqs[0].n_new == 1);
    CHECK(p1.seqs[0].start == 5);
    CHECK(p1.seqs[1].id == 2);
    CHECK(p1.seqs[1].n_new == 1);
    CHECK(p1.seqs[1].start == 7);
    CHECK(p1.seqs[2].id == 3);
    CHECK(p1.seqs[2].n_new == 20);
    CHECK(p1.seqs[2].wants_logits);
    CHECK(p1.seqs[3].id == 4);
    CHECK(p1.seqs[3].start == 0);
    CHECK(p1.seqs[3].n_new == 64 - 1 - 1 - 20);  // the rest of the budget: a chunk
    CHECK_FALSE(p1.seqs[3].wants_logits);
    CHECK(p1.n_tokens == 64);

    // Now three decodes, then the rest of sequence 4's prompt.
    StepPlan p2 = sim.step();
    REQUIRE(p2.seqs.size() == 4);
    for (int i = 0; i < 3; ++i) {
        CHECK(p2.seqs[static_cast<size_t>(i)].id == static_cast<SeqId>(i + 1));
        CHECK(p2.seqs[static_cast<size_t>(i)].n_new == 1);
        CHECK(p2.seqs[static_cast<size_t>(i)].wants_logits);
    }
    CHECK(p2.seqs[3].id == 4);
    CHECK(p2.seqs[3].start == 42);
    CHECK(p2.seqs[3].n_new == 58);
    CHECK(p2.seqs[3].wants_logits);
    CHECK(p2.n_tokens == 61);

    // All four decode now, oldest first, and a new arrival comes after them.
    sim.add(5, iota_tokens(3, 500));
    StepPlan p3 = sim.step();
    REQUIRE(p3.seqs.size() == 5);
    for (size_t i = 0; i < 5; ++i) CHECK(p3.seqs[i].id == static_cast<SeqId>(i + 1));
    CHECK(p3.n_tokens == 4 + 3);
    CHECK(sim.seq(1).tokens.size() == 5 + 4);  // a token from each of the 4 steps
    CHECK(sim.seq(1).tokens[5] == static_cast<TokenId>(1000 + 100 + 5));  // fake_token(1, 5 tokens)
    sim.drain();
}

TEST_CASE("a step that decodes takes at most max_prompt_tokens_mixed prompt tokens") {
    Sim sim(256, 16, {.max_batch_tokens = 256, .max_seqs = 16, .prefix_cache = false, .max_prompt_tokens_mixed = 40});
    // Nothing decodes yet: the whole budget goes to prompts.
    sim.add(1, iota_tokens(10, 1));
    sim.add(2, iota_tokens(100, 100));
    StepPlan p0 = sim.step();
    REQUIRE(p0.seqs.size() == 2);
    CHECK(p0.seqs[1].n_new == 100);
    CHECK(p0.n_tokens == 110);

    // Both decode now; two new prompts share 40 prompt tokens (a chunk of the second).
    sim.add(3, iota_tokens(30, 300));
    sim.add(4, iota_tokens(50, 400));
    StepPlan p1 = sim.step();
    REQUIRE(p1.seqs.size() == 4);
    CHECK(p1.seqs[0].n_new == 1);
    CHECK(p1.seqs[1].n_new == 1);
    CHECK(p1.seqs[2].id == 3);
    CHECK(p1.seqs[2].n_new == 30);
    CHECK(p1.seqs[3].id == 4);
    CHECK(p1.seqs[3].n_new == 10);
    CHECK_FALSE(p1.seqs[3].wants_logits);
    CHECK(p1.n_tokens == 42);

    // The running prompt of 4 continues under the same cap, behind three decodes.
    StepPlan p2 = sim.step();
    REQUIRE(p2.seqs.size() == 4);
    CHECK(p2.seqs[3].id == 4);
    CHECK(p2.seqs[3].start == 10);
    CHECK(p2.seqs[3].n_new == 40);
    CHECK(p2.n_tokens == 43);
    sim.drain();
}

TEST_CASE("chunked prefill: 100 tokens under a budget of 32") {
    SUBCASE("alone") {
        Sim sim(64, 16, {.max_batch_tokens = 32, .max_seqs = 8, .prefix_cache = true});
        sim.add(7, iota_tokens(100, 1));
        std::vector<int32_t> chunks, starts;
        std::vector<bool> logits;
        while (sim.seq(7).n_generated() == 0) {
            StepPlan p = sim.step();
            REQUIRE(p.seqs.size() == 1);
            chunks.push_back(p.seqs[0].n_new);
            starts.push_back(p.seqs[0].start);
            logits.push_back(p.seqs[0].wants_logits);
        }
        CHECK(chunks == std::vector<int32_t>{32, 32, 32, 4});
        CHECK(starts == std::vector<int32_t>{0, 32, 64, 96});
        CHECK(logits == std::vector<bool>{false, false, false, true});
        CHECK(sim.seq(7).n_computed == 100);
        CHECK(sim.seq(7).blocks.size() == 7);  // ceil(100 / 16)
        // Then one token a step.
        StepPlan p = sim.step();
        CHECK(p.seqs[0].start == 100);
        CHECK(p.seqs[0].n_new == 1);
        sim.drain();
    }
    SUBCASE("with two decoding sequences interleaved") {
        // The budget is 34: the two decodes take one token each, the prompt gets 32.
        Sim sim(64, 16, {.max_batch_tokens = 34, .max_seqs = 8, .prefix_cache = true});
        sim.add(1, {11});
        sim.add(2, {22});
        sim.step();  // both one-token prompts: from now on they decode
        sim.add(7, iota_tokens(100, 1));
        std::vector<int32_t> chunks;
        std::vector<bool> logits;
        while (sim.seq(7).n_generated() == 0) {
            StepPlan p = sim.step();
            REQUIRE(p.seqs.size() == 3);
            CHECK(p.seqs[0].id == 1);
            CHECK(p.seqs[0].n_new == 1);
            CHECK(p.seqs[0].wants_logits);
            CHECK(p.seqs[1].id == 2);
            CHECK(p.seqs[1].n_new == 1);
            CHECK(p.seqs[2].id == 7);
            chunks.push_back(p.seqs[2].n_new);
            logits.push_back(p.seqs[2].wants_logits);
            CHECK(p.n_tokens <= 34);
        }
        CHECK(chunks == std::vector<int32_t>{32, 32, 32, 4});
        CHECK(logits == std::vector<bool>{false, false, false, true});
        CHECK(sim.seq(1).n_generated() == 5);  // a token on every step
        sim.drain();
    }
    SUBCASE("decodes first take from the same budget of 32") {
        Sim sim(64, 16, {.max_batch_tokens = 32, .max_seqs = 8, .prefix_cache = true});
        sim.add(1, {11});
        sim.add(2, {22});
        sim.step();
        sim.add(7, iota_tokens(100, 1));
        std::vector<int32_t> chunks;
        while (sim.seq(7).n_generated() == 0) {
            StepPlan p = sim.step();
            REQUIRE(p.seqs.size() == 3);
            CHECK(p.seqs[2].id == 7);
            chunks.push_back(p.seqs[2].n_new);
            CHECK(p.n_tokens <= 32);
        }
        CHECK(chunks == std::vector<int32_t>{30, 30, 30, 10});
        sim.drain();
    }
}

TEST_CASE("preemption: the newest running sequence goes first, to the front of the queue") {
    // 6 blocks of 4 tokens. Three 4-token prompts grow one token a step; when each needs its
    // third block the pool is out.
    Sim sim(6, 4, {.max_batch_tokens = 64, .max_seqs = 3, .prefix_cache = false});
    sim.add(1, iota_tokens(4, 10));
    sim.add(2, iota_tokens(4, 20));
    sim.add(3, iota_tokens(4, 30));
    sim.add(4, iota_tokens(4, 40));  // over max_seqs: waits behind the others
    StepPlan first = sim.step();
    CHECK(first.seqs.size() == 3);
    CHECK(sim.seq(4).status == SEQ_STATUS_WAITING);
    // Decode until all three have 8 tokens computed (2 full blocks each: the pool is full).
    while (sim.seq(1).n_computed < 8) {
        StepPlan p = sim.step();
        CHECK(p.preempted.empty());
    }
    CHECK(sim.pool.n_free() == 0);
    CHECK(sim.seq(3).n_tokens() == 9);
    const std::vector<TokenId> tokens3 = sim.seq(3).tokens;  // prompt + 5 generated

    // Sequence 1 needs a third block: 3, the newest, is preempted; 1 and 2 each take one of
    // its two blocks.
    StepPlan p = sim.step();
    CHECK(p.preempted == std::vector<SeqId>{3});
    REQUIRE(p.seqs.size() == 2);
    CHECK(p.seqs[0].id == 1);
    CHECK(p.seqs[1].id == 2);
    const SeqState& s3 = sim.seq(3);
    CHECK(s3.status == SEQ_STATUS_WAITING);
    CHECK(s3.n_computed == 0);
    CHECK(s3.blocks.empty());
    CHECK(s3.n_preempted == 1);
    CHECK(s3.tokens == tokens3);  // the generated tokens stay
    CHECK(sim.pool.n_free() == 0);
    CHECK(sim.planner.n_waiting() == 2);
    CHECK(sim.planner.stats().n_preemptions == 1);

    // Nothing fits: 1 and 2 decode; neither 3 nor 4 is admitted.
    StepPlan q = sim.step();
    CHECK(q.seqs.size() == 2);
    CHECK(q.preempted.empty());
    CHECK(sim.seq(3).status == SEQ_STATUS_WAITING);
    CHECK(sim.seq(4).status == SEQ_STATUS_WAITING);

    // Sequence 1 and 2 finish: 3 comes back before 4 (it went to the front), recomputing
    // its prompt and the 5 tokens it generated, in one chunk.
    sim.finish(1);
    sim.finish(2);
    CHECK(sim.pool.n_free() == 6);
    StepPlan r = sim.step();
    REQUIRE(r.seqs.size() == 2);
    CHECK(r.seqs[0].id == 3);
    CHECK(r.seqs[0].start == 0);
    CHECK(r.seqs[0].n_new == 9);
    CHECK(r.seqs[0].wants_logits);
    CHECK(r.seqs[1].id == 4);
    const SeqState& s3b = sim.seq(3);
    CHECK(s3b.n_computed == 9);
    CHECK(s3b.n_tokens() == 10);
    CHECK(std::equal(tokens3.begin(), tokens3.end(), s3b.tokens.begin()));
    CHECK(s3b.tokens.back() == fake_token(3, s3b) - 1);  // sampled when it had 9 tokens
    CHECK(s3b.n_generated() == 6);
    sim.drain();
}

TEST_CASE("preemption of several: the newest first, and they come back oldest first") {
    // One 4-token block each; all sequences need a second block at the same step.
    Sim sim(4, 4, {.max_batch_tokens = 64, .max_seqs = 8, .prefix_cache = false});
    for (SeqId id = 1; id <= 4; ++id) sim.add(id, iota_tokens(3, static_cast<TokenId>(id * 10)));
    sim.step();  // prompts: 3 tokens computed, 4 tokens each
    StepPlan p = sim.step();  // position 3: still the first block
    CHECK(p.preempted.empty());
    CHECK(sim.pool.n_free() == 0);
    StepPlan q = sim.step();  // position 4: everybody needs a second block
    // 1 takes 4's block, 2 takes 3's block; 3 and 4 wait, 3 in front.
    CHECK(q.preempted == std::vector<SeqId>{4, 3});
    REQUIRE(q.seqs.size() == 2);
    sim.finish(1);
    sim.finish(2);
    StepPlan r = sim.step();
    REQUIRE(r.seqs.size() == 2);
    CHECK(r.seqs[0].id == 3);
    CHECK(r.seqs[1].id == 4);
    sim.drain();
}

TEST_CASE("prefix caching: a shared 48-token prefix") {
    const std::vector<TokenId> prefix = iota_tokens(48, 1);  // three 16-token blocks
    Sim sim(32, 16, {.max_batch_tokens = 256, .max_seqs = 8, .prefix_cache = true});
    sim.add(1, concat(prefix, {900, 901, 902}));
    StepPlan p0 = sim.step();
    CHECK(p0.seqs[0].start == 0);
    CHECK(p0.seqs[0].n_new == 51);
    const std::vector<int32_t> blocks1(sim.seq(1).blocks.begin(), sim.seq(1).blocks.begin() + 3);

    sim.add(2, concat(prefix, {800}));
    StepPlan p1 = sim.step();
    const PlannedSeq* e2 = find_planned(p1, 2);
    REQUIRE(e2 != nullptr);
    CHECK(e2->start == 48);  // 3 cached blocks
    CHECK(e2->n_new == 1);
    const SeqState& s2 = sim.seq(2);
    REQUIRE(s2.blocks.size() == 4);
    CHECK(std::equal(blocks1.begin(), blocks1.end(), s2.blocks.begin()));
    for (int32_t b : blocks1) CHECK(sim.pool.ref_count(b) == 2);
    CHECK(sim.pool.ref_count(s2.blocks[3]) == 1);
    CHECK(sim.planner.stats().prefix_hit_tokens == 48);

    // The whole prompt is cached: the last block is computed again anyway, so the step has a
    // token to take logits from.
    sim.add(3, prefix);
    StepPlan p2 = sim.step();
    const PlannedSeq* e3 = find_planned(p2, 3);
    REQUIRE(e3 != nullptr);
    CHECK(e3->start == 32);
    CHECK(e3->n_new == 16);
    CHECK(e3->wants_logits);
    const SeqState& s3 = sim.seq(3);
    CHECK(s3.blocks[0] == blocks1[0]);
    CHECK(s3.blocks[1] == blocks1[1]);
    CHECK(s3.blocks[2] != blocks1[2]);
    CHECK(sim.pool.ref_count(blocks1[0]) == 3);
    CHECK(sim.pool.ref_count(blocks1[2]) == 2);

    // Finishing one sharer leaves the shared blocks with the others.
    sim.finish(1);
    CHECK(sim.pool.ref_count(blocks1[0]) == 2);
    CHECK(sim.pool.ref_count(blocks1[2]) == 1);
    sim.finish(2);
    CHECK(sim.pool.ref_count(blocks1[0]) == 1);
    CHECK(sim.pool.ref_count(blocks1[2]) == 0);
    sim.finish(3);
    for (int32_t b : blocks1) CHECK(sim.pool.ref_count(b) == 0);
    CHECK(sim.pool.n_free() == sim.pool.n_blocks());
    CHECK(sim.pool.n_cached() >= 3);

    // A later sequence still hits the cached blocks.
    sim.add(4, concat(prefix, {700, 701}));
    StepPlan p3 = sim.step();
    REQUIRE(p3.seqs.size() == 1);
    CHECK(p3.seqs[0].start == 48);
    CHECK(p3.seqs[0].n_new == 2);
    CHECK(std::equal(blocks1.begin(), blocks1.end(), sim.seq(4).blocks.begin()));
    for (int32_t b : blocks1) CHECK(sim.pool.ref_count(b) == 1);
    // A different first block misses everything after it too.
    std::vector<TokenId> other = prefix;
    other[3] = 5555;
    sim.add(5, other);
    StepPlan p4 = sim.step();
    const PlannedSeq* e5 = find_planned(p4, 5);
    REQUIRE(e5 != nullptr);
    CHECK(e5->start == 0);
    sim.drain();
    CHECK(sim.pool.n_free() == sim.pool.n_blocks());
}

TEST_CASE("prefix caching: generated tokens are cached too, and a preempted sequence reuses its own blocks") {
    Sim sim(8, 4, {.max_batch_tokens = 64, .max_seqs = 8, .prefix_cache = true});
    sim.add(1, iota_tokens(6, 1));
    while (sim.seq(1).n_computed < 12) sim.step();
    const std::vector<TokenId> tokens1 = sim.seq(1).tokens;
    sim.finish(1);
    CHECK(sim.pool.n_cached() == 3);  // 12 computed tokens: three full blocks
    // The same prompt plus the same generated tokens: the first 12 positions are cached.
    sim.add(2, tokens1);
    StepPlan p = sim.step();
    CHECK(p.seqs[0].start == 12);
    CHECK(p.seqs[0].n_new == static_cast<int32_t>(tokens1.size()) - 12);
    sim.drain();
}

TEST_CASE("prefix caching: stats count each admission once, however often it was retried") {
    const std::vector<TokenId> prefix = iota_tokens(32, 1);
    Sim sim(4, 16, {.max_batch_tokens = 256, .max_seqs = 8, .prefix_cache = true});
    sim.add(1, concat(prefix, {9}));
    sim.step();
    // 2 shares two blocks with 1 but needs two more; only one is free until 1 finishes.
    sim.add(2, concat(prefix, iota_tokens(20, 300)));
    for (int i = 0; i < 3; ++i) {
        StepPlan p = sim.step();
        CHECK(find_planned(p, 2) == nullptr);
        CHECK(sim.seq(2).status == SEQ_STATUS_WAITING);
    }
    sim.finish(1);
    StepPlan p = sim.step();
    REQUIRE(p.seqs.size() == 1);
    CHECK(p.seqs[0].start == 32);
    CHECK(sim.planner.stats().prefix_hit_tokens == 32);
    CHECK(sim.planner.stats().prefix_query_tokens == 32 + 51);
    sim.drain();
}

TEST_CASE("prefix caching off: no sharing") {
    const std::vector<TokenId> prefix = iota_tokens(48, 1);
    Sim sim(32, 16, {.max_batch_tokens = 256, .max_seqs = 8, .prefix_cache = false});
    sim.add(1, concat(prefix, {900}));
    sim.step();
    sim.add(2, concat(prefix, {800}));
    StepPlan p = sim.step();
    const PlannedSeq* e2 = find_planned(p, 2);
    REQUIRE(e2 != nullptr);
    CHECK(e2->start == 0);
    CHECK(e2->n_new == 49);
    std::set<int32_t> b1(sim.seq(1).blocks.begin(), sim.seq(1).blocks.end());
    for (int32_t b : sim.seq(2).blocks) CHECK(b1.count(b) == 0);
    for (int32_t b : sim.seq(2).blocks) CHECK(sim.pool.ref_count(b) == 1);
    CHECK(sim.planner.stats().prefix_hit_tokens == 0);
    sim.drain();
    CHECK(sim.pool.n_cached() == 0);
}

TEST_CASE("cached blocks are evicted when space is needed") {
    const std::vector<TokenId> prefix = iota_tokens(32, 1);
    Sim sim(4, 16, {.max_batch_tokens = 256, .max_seqs = 8, .prefix_cache = true});
    sim.add(1, concat(prefix, {9}));
    sim.step();
    sim.finish(1);
    CHECK(sim.pool.n_cached() == 2);
    // A 64-token prompt needs the whole pool: the cached blocks go.
    sim.add(2, iota_tokens(64, 500));
    StepPlan p = sim.step();
    REQUIRE(p.seqs.size() == 1);
    CHECK(p.seqs[0].n_new == 64);
    CHECK(sim.pool.n_free() == 0);
    CHECK(sim.pool.n_cached() == 0);
    sim.finish(2);
    sim.add(3, concat(prefix, {9}));
    StepPlan q = sim.step();
    CHECK(q.seqs[0].start == 0);  // the old prefix is gone
    sim.drain();
}

TEST_CASE("a prompt larger than the whole pool is rejected and dropped") {
    Sim sim(4, 16, {.max_batch_tokens = 256, .max_seqs = 8, .prefix_cache = true});
    sim.add(1, iota_tokens(65, 1));  // 5 blocks > 4
    sim.add(2, iota_tokens(64, 1));  // exactly the pool
    StepPlan p = sim.step();
    CHECK(p.rejected == std::vector<SeqId>{1});
    CHECK(sim.planner.find(1) == nullptr);
    REQUIRE(p.seqs.size() == 1);
    CHECK(p.seqs[0].id == 2);
    CHECK(p.seqs[0].n_new == 64);
    CHECK(sim.planner.n_waiting() == 0);
    CHECK(sim.pool.n_free() == 0);
    sim.finish(1);  // finishing an unknown (already dropped) id is harmless
    sim.drain();
}

TEST_CASE("finish frees everything at once") {
    Sim sim(16, 4, {.max_batch_tokens = 8, .max_seqs = 2, .prefix_cache = true});
    sim.add(1, iota_tokens(20, 1));
    sim.add(2, iota_tokens(3, 100));
    sim.add(3, iota_tokens(3, 200));
    StepPlan p = sim.step();  // 1 takes the whole budget with a chunk
    REQUIRE(p.seqs.size() == 1);
    CHECK(sim.seq(1).n_computed == 8);
    CHECK(sim.pool.n_used() == 2);

    SUBCASE("a waiting sequence") {
        sim.finish(3);
        CHECK(sim.planner.find(3) == nullptr);
        CHECK(sim.planner.n_waiting() == 1);
        CHECK(sim.pool.n_used() == 2);
    }
    SUBCASE("a running sequence mid-prompt") {
        sim.finish(1);
        CHECK(sim.planner.find(1) == nullptr);
        CHECK(sim.planner.n_running() == 0);
        CHECK(sim.pool.n_used() == 0);
        CHECK(sim.pool.n_free() == sim.pool.n_blocks());
        StepPlan q = sim.step();
        REQUIRE(q.seqs.size() == 2);
        CHECK(q.seqs[0].id == 2);
        CHECK(q.seqs[1].id == 3);
    }
    SUBCASE("a running sequence while its step runs") {
        while (sim.seq(1).n_generated() == 0) sim.step();
        StepPlan q = sim.planner.schedule();  // 1 and 2 decode
        REQUIRE(q.seqs.size() == 2);
        CHECK(q.seqs[0].id == 1);
        CHECK(q.seqs[1].id == 2);
        CHECK(q.seqs[1].wants_logits);
        sim.planner.finish(1);  // cancelled mid-step
        sim.live.erase(1);
        std::erase(sim.running_order, SeqId{1});
        sim.check_refcounts();
        std::vector<TokenId> sampled{77, 88};
        sim.planner.update(q, sampled);
        CHECK(sim.seq(2).tokens.back() == 88);  // its own sample, not 1's
        CHECK(sim.seq(2).n_computed == q.seqs[1].start + q.seqs[1].n_new);
        sim.check_refcounts();
    }
    sim.drain();
}

// ---- pipelined use: update with placeholders while the step runs, patch afterwards ----

TEST_CASE("pipelining: a placeholder is patched before its block is hashed, and the hash is the unspeculated one") {
    const int32_t bs = 4;
    const std::vector<TokenId> prompt = iota_tokens(7, 1);  // the first token sampled fills block 1
    const TokenId first = 42, second = 43;

    // Without speculation: update gets the real tokens.
    KvBlockPool pool_ref(8, bs);
    Planner ref(pool_ref, {.max_batch_tokens = 16, .max_seqs = 4, .prefix_cache = true});
    ref.add(1, prompt);
    StepPlan r1 = ref.schedule();
    ref.update(r1, std::vector<TokenId>{first});
    StepPlan r2 = ref.schedule();
    ref.update(r2, std::vector<TokenId>{second});

    // With speculation: each step is applied with a placeholder, the next one planned, then patched.
    KvBlockPool pool(8, bs);
    Planner planner(pool, {.max_batch_tokens = 16, .max_seqs = 4, .prefix_cache = true});
    planner.add(1, prompt);
    StepPlan p1 = planner.schedule();
    REQUIRE(p1.seqs.size() == 1);
    CHECK(p1.seqs[0].wants_logits);
    planner.update(p1, std::vector<TokenId>{k_token_placeholder});
    const SeqState& s = planner.seq(1);
    CHECK(s.n_computed == 7);
    CHECK(s.n_tokens() == 8);
    CHECK(s.has_placeholder);
    CHECK(s.tokens.back() == k_token_placeholder);
    CHECK(s.n_hashed == 1);  // block 1 holds the placeholder and is not computed yet

    StepPlan p2 = planner.schedule();  // planned while step 1 "runs"
    REQUIRE(p2.seqs.size() == 1);
    CHECK(p2.seqs[0].start == 7);
    CHECK(p2.seqs[0].n_new == 1);
    CHECK(p2.seqs[0].wants_logits);
    planner.set_last_token(1, first);
    CHECK_FALSE(s.has_placeholder);
    CHECK(s.tokens[7] == first);
    CHECK_THROWS_AS(planner.set_last_token(1, 5), Error);   // no placeholder any more
    CHECK_THROWS_AS(planner.set_last_token(99, 5), Error);  // no such sequence

    planner.update(p2, std::vector<TokenId>{k_token_placeholder});
    CHECK(s.n_hashed == 2);  // block 1, with the patched token, is hashed now
    planner.set_last_token(1, second);
    CHECK(s.tokens == ref.seq(1).tokens);
    CHECK(s.block_hashes == ref.seq(1).block_hashes);
    CHECK(s.n_computed == ref.seq(1).n_computed);

    // A new prompt sharing the 8 tokens finds both blocks.
    std::vector<TokenId> shared(s.tokens.begin(), s.tokens.begin() + 8);
    shared.push_back(7);
    planner.add(2, shared);
    StepPlan p3 = planner.schedule();
    const PlannedSeq* two = find_planned(p3, 2);
    REQUIRE(two != nullptr);
    CHECK(two->start == 8);
    CHECK(planner.stats().prefix_hit_tokens == 8);
    planner.update(p3, std::vector<TokenId>{k_token_placeholder, k_token_placeholder});
    planner.set_last_token(1, 50);
    planner.set_last_token(2, 51);
    planner.finish(1);
    planner.finish(2);
    CHECK(pool.n_free() == pool.n_blocks());
}

TEST_CASE("pipelining: a sequence preempted while its token is a placeholder is patched and recomputed with it") {
    const int32_t bs = 4;
    KvBlockPool pool(3, bs);
    Planner planner(pool, {.max_batch_tokens = 16, .max_seqs = 4, .prefix_cache = true});
    planner.add(1, iota_tokens(4, 1));
    planner.add(2, iota_tokens(4, 100));
    StepPlan p1 = planner.schedule();
    REQUIRE(p1.seqs.size() == 2);
    planner.update(p1, std::vector<TokenId>{k_token_placeholder, k_token_placeholder});
    // Each needs a second block for position 4 and only one is left: 2, the newest, goes.
    StepPlan p2 = planner.schedule();
    REQUIRE(p2.seqs.size() == 1);
    CHECK(p2.seqs[0].id == 1);
    REQUIRE(p2.preempted == std::vector<SeqId>{2});
    const SeqState& two = planner.seq(2);
    CHECK(two.status == SEQ_STATUS_WAITING);
    CHECK(two.n_computed == 0);
    CHECK(two.has_placeholder);
    planner.set_last_token(1, 10);
    planner.set_last_token(2, 20);  // its result still arrives
    CHECK(two.tokens.back() == 20);
    CHECK_FALSE(two.has_placeholder);

    SUBCASE("its token ends it (EOS): finish takes a waiting sequence") {
        planner.finish(2);
        CHECK(planner.find(2) == nullptr);
        CHECK(planner.n_waiting() == 0);
        planner.update(p2, std::vector<TokenId>{k_token_placeholder});
        planner.set_last_token(1, 11);
        planner.finish(1);
    }
    SUBCASE("it comes back with its patched token") {
        planner.update(p2, std::vector<TokenId>{k_token_placeholder});
        planner.set_last_token(1, 11);
        planner.finish(1);
        StepPlan p3 = planner.schedule();
        REQUIRE(p3.seqs.size() == 1);
        CHECK(p3.seqs[0].id == 2);
        CHECK(p3.seqs[0].start == 4);  // its full block 0 was hashed at update and is found again
        CHECK(p3.seqs[0].n_new == 1);
        CHECK(p3.seqs[0].wants_logits);
        CHECK(planner.seq(2).tokens[4] == 20);
        planner.update(p3, std::vector<TokenId>{21});
        planner.finish(2);
    }
    CHECK(planner.idle());
    CHECK(pool.n_free() == pool.n_blocks());
}

TEST_CASE("pipelining: a failed step's hashes leave the prefix cache, and a sequence that picked one up recomputes") {
    const int32_t bs = 4;
    KvBlockPool pool(16, bs);
    Planner planner(pool, {.max_batch_tokens = 32, .max_seqs = 4, .prefix_cache = true});
    const std::vector<TokenId> prompt = iota_tokens(9, 1);
    planner.add(1, prompt);
    StepPlan p1 = planner.schedule();
    planner.update(p1, std::vector<TokenId>{k_token_placeholder});
    const std::vector<uint64_t> hashes = planner.seq(1).block_hashes;
    REQUIRE(hashes.size() == 2);
    // Planned while step 1 runs: 3 shares 1's first 8 tokens and hits both blocks.
    planner.add(3, concat(std::vector<TokenId>(prompt.begin(), prompt.begin() + 8), {77, 78}));
    StepPlan p2 = planner.schedule();
    const PlannedSeq* three = find_planned(p2, 3);
    REQUIRE(three != nullptr);
    CHECK(three->start == 8);
    // Step 1 fails: the engine finishes its sequences, then drops the step's hashes.
    planner.finish(1);
    planner.drop_last_hashes();
    CHECK_FALSE(pool.kv_block_lookup(hashes[0]).has_value());
    CHECK_FALSE(pool.kv_block_lookup(hashes[1]).has_value());
    const SeqState& s3 = planner.seq(3);
    CHECK(s3.status == SEQ_STATUS_WAITING);  // preempted: its plan entry is stale now
    CHECK(s3.n_computed == 0);
    CHECK(pool.n_free() == pool.n_blocks());
    StepPlan p3 = planner.schedule();
    REQUIRE(p3.seqs.size() == 1);
    CHECK(p3.seqs[0].id == 3);
    CHECK(p3.seqs[0].start == 0);  // no stale hit
    planner.update(p3, std::vector<TokenId>{5});
    planner.finish(3);
    CHECK(pool.n_free() == pool.n_blocks());
}
