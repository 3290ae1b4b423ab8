#include "planner.h"

#include <algorithm>
#include <cassert>

#include <xxhash.h>

#include "io/error.h"

namespace coinfer {

Planner::Planner(KvBlockPool& pool, PlannerOptions opt) : pool_(pool), opt_(opt) {
    if (opt_.max_batch_tokens < 1 || opt_.max_seqs < 1)
        throw_error("planner: max_batch_tokens and max_seqs must be positive");
}

void Planner::add(SeqId id, std::vector<TokenId> prompt) {
    assert(!prompt.empty());
    auto s = std::make_unique<SeqState>();
    s->id = id;
    s->n_prompt = static_cast<int32_t>(prompt.size());
    s->tokens = std::move(prompt);
    auto [it, inserted] = seqs_.emplace(id, std::move(s));
    assert(inserted);
    (void)it;
    waiting_.push_back(id);
}

const SeqState* Planner::find(SeqId id) const {
    auto it = seqs_.find(id);
    return it == seqs_.end() ? nullptr : it->second.get();
}

const SeqState& Planner::seq(SeqId id) const {
    const SeqState* s = find(id);
    assert(s);
    return *s;
}

void Planner::release(SeqState& s) {
    pool_.kv_block_free_seq(s.blocks);
    s.blocks.clear();
    s.block_hashes.clear();
    s.block_canon.clear();
    s.n_hashed = 0;
    s.n_computed = 0;
}

void Planner::finish(SeqId id) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return;
    SeqState& s = *it->second;
    release(s);
    if (s.status == SEQ_STATUS_RUNNING)
        running_.erase(std::find(running_.begin(), running_.end(), id));
    else
        waiting_.erase(std::find(waiting_.begin(), waiting_.end(), id));
    seqs_.erase(it);
}

void Planner::preempt(SeqState& s) {
    // Recompute later: the generated tokens become part of what must be computed again.
    release(s);
    s.status = SEQ_STATUS_WAITING;
    ++s.n_preempted;
    ++stats_.n_preemptions;
    running_.erase(std::find(running_.begin(), running_.end(), s.id));
    waiting_.push_front(s.id);
}

bool Planner::ensure_blocks(SeqState& s, int32_t n_positions) {
    const int32_t bs = pool_.block_size();
    const int32_t need = (n_positions + bs - 1) / bs - static_cast<int32_t>(s.blocks.size());
    if (need <= 0) return true;
    auto ids = pool_.kv_block_alloc_n(need);
    if (!ids) return false;
    s.blocks.insert(s.blocks.end(), ids->begin(), ids->end());
    return true;
}

uint64_t Planner::block_hash(uint64_t parent, const TokenId* tokens) const {
    return XXH3_64bits_withSeed(tokens, sizeof(TokenId) * static_cast<size_t>(pool_.block_size()), parent);
}

void Planner::match_prefix(SeqState& s) {
    if (!opt_.prefix_cache) return;
    const int32_t bs = pool_.block_size();
    // At least one token is always computed, so the step yields logits for the sequence.
    const int32_t max_blocks = (s.n_tokens() - 1) / bs;
    uint64_t parent = 0;
    int32_t parent_block = -1;
    for (int32_t b = 0; b < max_blocks; ++b) {
        const TokenId* toks = &s.tokens[static_cast<size_t>(b) * bs];
        uint64_t h = block_hash(parent, toks);
        // The hash finds a candidate; its tokens and its parent block must match too.
        auto id = pool_.kv_block_match(h, parent_block, std::span<const int32_t>(toks, static_cast<size_t>(bs)));
        if (!id) break;
        parent_block = *id;
        s.block_canon.push_back(*id);
        pool_.kv_block_ref(*id);
        s.blocks.push_back(*id);
        s.block_hashes.push_back(h);
        parent = h;
    }
    s.n_hashed = static_cast<int32_t>(s.blocks.size());
    s.n_computed = s.n_hashed * bs;
}

void Planner::hash_full_blocks(SeqState& s) {
    if (!opt_.prefix_cache) return;
    const int32_t bs = pool_.block_size();
    while (s.n_hashed < s.n_computed / bs) {
        // The placeholder is at n_computed or later, never inside a block hashed here.
        assert(!s.has_placeholder || (s.n_hashed + 1) * bs < s.n_tokens());
        uint64_t parent = s.n_hashed ? s.block_hashes[static_cast<size_t>(s.n_hashed) - 1] : 0;
        const TokenId* toks = &s.tokens[static_cast<size_t>(s.n_hashed) * bs];
        const std::span<const int32_t> span(toks, static_cast<size_t>(bs));
        uint64_t h = block_hash(parent, toks);
        const int32_t block = s.blocks[static_cast<size_t>(s.n_hashed)];
        // Registered under the block the cache finds for its predecessor, if that block still
        // holds the predecessor's tokens under its parent (it may be another sequence's, since
        // evicted); not at all otherwise (a first block's parent is -1: a later one must not
        // claim it).
        const size_t n = static_cast<size_t>(s.n_hashed);
        const int32_t parent_canon = n ? s.block_canon[n - 1] : -1;
        bool chained = n == 0;
        if (n && parent_canon >= 0) {
            const std::span<const int32_t> prev(&s.tokens[(n - 1) * static_cast<size_t>(bs)], static_cast<size_t>(bs));
            chained = pool_.kv_block_match(s.block_hashes[n - 1], n >= 2 ? s.block_canon[n - 2] : -1, prev) == parent_canon;
        }
        int32_t canon = -1;
        if (chained) {
            pool_.kv_block_set_hash(block, h, parent_canon, span);
            last_hashed_.emplace_back(block, h);
            canon = pool_.kv_block_match(h, parent_canon, span).value_or(-1);
        }
        s.block_canon.push_back(canon);
        s.block_hashes.push_back(h);
        ++s.n_hashed;
    }
}

StepPlan Planner::schedule() {
    StepPlan plan;
    int32_t budget = opt_.max_batch_tokens;
    // Prompt work (more than one pending token) is capped when the step also decodes.
    bool decoding = false;
    for (SeqId id : running_) {
        const SeqState& s = *seqs_.at(id);
        if (s.n_tokens() - s.n_computed == 1) {
            decoding = true;
            break;
        }
    }
    int32_t prompt_budget =
        decoding && opt_.max_prompt_tokens_mixed > 0 ? opt_.max_prompt_tokens_mixed : opt_.max_batch_tokens;

    // 1. Running sequences, oldest first. Each takes what it still needs (one token for a
    //    decode), preempting the newest running sequence when blocks run out.
    for (size_t i = 0; i < running_.size() && budget > 0;) {
        SeqState& s = *seqs_.at(running_[i]);
        const int32_t pending = s.n_tokens() - s.n_computed;
        assert(pending > 0);  // a running sequence always has a token to compute
        const int32_t n_new = pending > 1 ? std::min({pending, budget, prompt_budget}) : std::min(pending, budget);
        if (n_new <= 0) {
            ++i;  // a prompt chunk waits for a step with prompt budget left
            continue;
        }
        bool ok = ensure_blocks(s, s.n_computed + n_new);
        while (!ok && running_.back() != s.id) {
            SeqState& victim = *seqs_.at(running_.back());
            plan.preempted.push_back(victim.id);
            preempt(victim);
            ok = ensure_blocks(s, s.n_computed + n_new);
        }
        if (!ok) {
            // s is itself the newest: it waits, and nothing older is left to run this step.
            plan.preempted.push_back(s.id);
            preempt(s);
            break;
        }
        plan.seqs.push_back({s.id, s.n_computed, n_new, s.n_computed + n_new == s.n_tokens()});
        budget -= n_new;
        if (pending > 1) prompt_budget -= n_new;
        ++i;
    }

    // 2. Waiting prompts in order, while the budget, the sequence cap and the pool allow.
    //    A preempted sequence sits at the front and is readmitted first, but not in the step
    //    that preempted it.
    const bool just_preempted = !plan.preempted.empty();
    while (!just_preempted && budget > 0 && prompt_budget > 0 && !waiting_.empty() &&
           static_cast<int32_t>(running_.size()) < opt_.max_seqs) {
        SeqState& s = *seqs_.at(waiting_.front());
        const int32_t bs = pool_.block_size();
        if ((s.n_tokens() + bs - 1) / bs > pool_.n_blocks()) {
            // Could never fit, even alone: the caller fails it.
            const SeqId id = s.id;
            plan.rejected.push_back(id);
            waiting_.pop_front();
            seqs_.erase(id);
            continue;
        }
        if (s.blocks.empty()) match_prefix(s);
        const int32_t pending = s.n_tokens() - s.n_computed;
        const int32_t n_new = pending > 1 ? std::min({pending, budget, prompt_budget}) : std::min(pending, budget);
        if (!ensure_blocks(s, s.n_computed + n_new)) {
            release(s);  // give back prefix hits; retried next step
            break;
        }
        waiting_.pop_front();
        if (opt_.prefix_cache) {
            // Counted on admission only: a failed admission is retried and would count twice.
            stats_.prefix_query_tokens += s.n_tokens() - 1;
            stats_.prefix_hit_tokens += s.n_computed;
        }
        s.status = SEQ_STATUS_RUNNING;
        running_.push_back(s.id);
        plan.seqs.push_back({s.id, s.n_computed, n_new, s.n_computed + n_new == s.n_tokens()});
        budget -= n_new;
        if (pending > 1) prompt_budget -= n_new;
    }
    plan.n_tokens = opt_.max_batch_tokens - budget;
    return plan;
}

void Planner::update(const StepPlan& plan, std::span<const TokenId> sampled) {
    last_hashed_.clear();
    size_t k = 0;
    for (const PlannedSeq& p : plan.seqs) {
        auto it = seqs_.find(p.id);
        if (it == seqs_.end()) {
            if (p.wants_logits) ++k;  // finished (e.g. cancelled) while the step ran
            continue;
        }
        SeqState& s = *it->second;
        assert(!s.has_placeholder);  // patched before its next step
        s.n_computed = p.start + p.n_new;
        hash_full_blocks(s);
        if (p.wants_logits) {
            assert(k < sampled.size());
            s.tokens.push_back(sampled[k]);
            s.has_placeholder = sampled[k] == k_token_placeholder;
            ++k;
        }
    }
}

void Planner::set_last_token(SeqId id, TokenId token) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) throw_error("planner: set_last_token for unknown sequence {}", id);
    SeqState& s = *it->second;
    if (!s.has_placeholder || s.tokens.empty() || s.tokens.back() != k_token_placeholder)
        throw_error("planner: sequence {} has no placeholder token to set", id);
    if (token == k_token_placeholder) throw_error("planner: set_last_token needs a real token (sequence {})", id);
    s.tokens.back() = token;
    s.has_placeholder = false;
}

void Planner::drop_last_hashes() {
    std::vector<int32_t> dropped;
    for (auto [b, h] : last_hashed_) {
        auto found = pool_.kv_block_lookup(h);
        if (!found || *found != b) continue;  // evicted and handed out again since
        pool_.kv_block_drop_hash(b);
        dropped.push_back(b);
    }
    last_hashed_.clear();
    if (dropped.empty()) return;
    std::sort(dropped.begin(), dropped.end());
    const std::vector<SeqId> running = running_;
    for (SeqId id : running) {
        SeqState& s = *seqs_.at(id);
        const bool holds = std::any_of(s.blocks.begin(), s.blocks.end(), [&](int32_t b) {
            return std::binary_search(dropped.begin(), dropped.end(), b);
        });
        if (holds) preempt(s);
    }
}

}  // namespace coinfer
