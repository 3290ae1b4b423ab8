#pragma once
// The step planner: pure CPU policy in the vLLM-v1 style, no tensors.
//
// Each sequence has n_tokens (prompt + generated so far) and n_computed (tokens whose K/V are
// in the cache). A step lets n_computed catch up under a token budget: running sequences first
// (a decode is one token; an unfinished prompt continues in chunks), then waiting prompts in
// arrival order. There is no separate prefill or decode phase.
//
// KV blocks come from the pool during schedule(). Running out is not an error: the newest
// running sequence is preempted (its blocks freed, n_computed reset, back to the front of the
// waiting queue, recomputed later) and allocation is retried. Full blocks are hashed by
// (parent hash, token ids) so a prompt sharing a prefix with an earlier one reuses its blocks
// (automatic prefix caching).
//
// schedule() returns a plan; the caller runs it and hands the sampled tokens to update(). All
// KV bookkeeping for a step happens in those two calls.
//
// Pipelined use (the engine plans step k+1 while the device runs step k): update(plan_k) is
// called at once with k_token_placeholder for every row that wants logits, then schedule()
// plans step k+1, and set_last_token() patches each placeholder once step k's ids are known,
// before step k+1's batch is built. Only computed positions are hashed and the placeholder
// sits at the first position not yet computed, so it never enters a block hash.
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "../engine/kv_pool.h"
#include "../io/tokenizer.h"

namespace coinfer {

using SeqId = uint64_t;

// Stands for a token that the device is still sampling (see set_last_token).
constexpr TokenId k_token_placeholder = -1;

struct PlannerOptions {
    int32_t max_batch_tokens = 2048;  // tokens per step
    int32_t max_seqs = 256;           // sequences per step
    bool prefix_cache = true;
    // Prompt tokens in a step that also decodes: a long prompt chunk would hold back every
    // running stream's next token (inter-token latency spikes). 0: no cap beyond the budget.
    int32_t max_prompt_tokens_mixed = 512;
};

enum SeqStatus {
    SEQ_STATUS_WAITING,
    SEQ_STATUS_RUNNING,
};

struct SeqState {
    SeqId id = 0;
    std::vector<TokenId> tokens;  // prompt then generated
    int32_t n_prompt = 0;
    int32_t n_computed = 0;       // positions [0, n_computed) are in the cache
    std::vector<int32_t> blocks;  // block table
    int32_t n_hashed = 0;         // leading blocks registered in the prefix cache
    std::vector<uint64_t> block_hashes;  // hash chain of the leading full blocks
    // The block the prefix cache finds for each of them (this sequence's own, or an identical
    // one cached first); -1 where none is: the blocks after it are not registered.
    std::vector<int32_t> block_canon;
    SeqStatus status = SEQ_STATUS_WAITING;
    int32_t n_preempted = 0;
    bool has_placeholder = false;  // tokens.back() is k_token_placeholder, awaiting set_last_token

    int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
    int32_t n_generated() const { return n_tokens() - n_prompt; }
};

// One sequence's share of a step.
struct PlannedSeq {
    SeqId id;
    int32_t start;        // first position computed this step (= n_computed)
    int32_t n_new;        // positions [start, start + n_new)
    bool wants_logits;    // the chunk reaches the end of the sequence: sample its next token
};

struct StepPlan {
    std::vector<PlannedSeq> seqs;  // running decodes first, then prefill chunks
    std::vector<SeqId> preempted;  // sequences preempted while planning this step
    std::vector<SeqId> rejected;   // sequences that can never fit the pool (caller fails them)
    int32_t n_tokens = 0;

    bool empty() const { return seqs.empty(); }
};

struct PlannerStats {
    int64_t n_preemptions = 0;
    int64_t prefix_query_tokens = 0;  // prompt tokens looked up in the prefix cache
    int64_t prefix_hit_tokens = 0;    // of those, found cached
};

class Planner {
public:
    Planner(KvBlockPool& pool, PlannerOptions opt);

    // A new sequence joins the back of the waiting queue.
    void add(SeqId id, std::vector<TokenId> prompt);
    // Removes a sequence (finished or cancelled) and frees its blocks at once.
    void finish(SeqId id);

    StepPlan schedule();
    // Applies a step: n_computed catches up, full blocks are hashed, and each sequence that
    // wanted logits gets its sampled token appended (`sampled` is in plan order, one per
    // wants_logits entry; sequences finished meanwhile are skipped). An entry may be
    // k_token_placeholder while the step still runs: patch it with set_last_token before the
    // sequence's next step is built or updated.
    void update(const StepPlan& plan, std::span<const TokenId> sampled);
    // Replaces a sequence's placeholder (its last token) with the real sampled token; the
    // sequence may have been preempted meanwhile. Throws Error when it has no placeholder.
    void set_last_token(SeqId id, TokenId token);
    // The step of the last update() failed, so the blocks it hashed hold no valid K/V: they
    // leave the prefix cache, and a sequence that has picked one up since (a prefix hit in
    // the next plan) is preempted to recompute. Call after finishing the failed sequences.
    void drop_last_hashes();

    const SeqState* find(SeqId id) const;
    const SeqState& seq(SeqId id) const;
    int32_t n_running() const { return static_cast<int32_t>(running_.size()); }
    int32_t n_waiting() const { return static_cast<int32_t>(waiting_.size()); }
    bool idle() const { return running_.empty() && waiting_.empty(); }
    const PlannerStats& stats() const { return stats_; }
    const KvBlockPool& pool() const { return pool_; }

private:
    bool ensure_blocks(SeqState& s, int32_t n_positions);
    void preempt(SeqState& s);
    void release(SeqState& s);
    void match_prefix(SeqState& s);
    void hash_full_blocks(SeqState& s);
    uint64_t block_hash(uint64_t parent, const TokenId* tokens) const;

    KvBlockPool& pool_;
    PlannerOptions opt_;
    std::unordered_map<SeqId, std::unique_ptr<SeqState>> seqs_;
    std::vector<SeqId> running_;  // admission order: the back is the newest
    std::deque<SeqId> waiting_;
    std::vector<std::pair<int32_t, uint64_t>> last_hashed_;  // (block, hash) set by the last update()
    PlannerStats stats_;
};

}  // namespace coinfer
