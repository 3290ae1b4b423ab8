#include "router.h"

#include <algorithm>
#include <limits>

namespace coinfer::server {

namespace {

uint64_t mix(uint64_t x) {  // splitmix64's finalizer
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Chained hashes of the prompt's whole blocks: block i's hash stands for tokens [0, 16 (i + 1)).
std::vector<uint64_t> block_hashes(const std::vector<TokenId>& ids) {
    std::vector<uint64_t> out;
    uint64_t h = 0x9e3779b97f4a7c15ull;
    const size_t n_blocks = ids.size() / Router::k_block_tokens;
    out.reserve(n_blocks);
    for (size_t b = 0; b < n_blocks; ++b) {
        for (size_t t = 0; t < Router::k_block_tokens; ++t)
            h = mix(h ^ static_cast<uint32_t>(ids[b * Router::k_block_tokens + t]));
        out.push_back(h);
    }
    return out;
}

}  // namespace

Router::Router(std::vector<Engine*> replicas)
    : replicas_(std::move(replicas)),
      load_(std::make_shared<std::vector<int64_t>>(replicas_.size(), 0)),
      prefixes_(replicas_.size()) {}

Router::Lease& Router::Lease::operator=(Lease&& o) noexcept {
    if (this != &o) {
        release();
        load_ = std::move(o.load_);
        replica_ = o.replica_;
        prompt_left_ = o.prompt_left_;
        gen_left_ = o.gen_left_;
        o.load_.reset();
    }
    return *this;
}

void Router::Lease::on_token() {
    const auto loads = load_.lock();
    if (!loads) return;
    int64_t& load = (*loads)[replica_];
    load -= prompt_left_;
    prompt_left_ = 0;
    if (gen_left_ > 0) {
        --gen_left_;
        --load;
    }
}

void Router::Lease::release() {
    if (const auto loads = load_.lock()) (*loads)[replica_] -= prompt_left_ + gen_left_;
    load_.reset();
}

std::vector<EngineStats> Router::stats() const {
    std::vector<EngineStats> out;
    out.reserve(replicas_.size());
    for (const Engine* e : replicas_) out.push_back(e->stats());
    return out;
}

size_t Router::pick(const std::vector<uint64_t>& blocks, int64_t* matched_tokens) {
    size_t best = replicas_.size();
    int64_t best_score = std::numeric_limits<int64_t>::max(), best_match = 0;
    const size_t n = replicas_.size();
    for (size_t k = 0; k < n; ++k) {
        const size_t r = (next_ + k) % n;
        if (n > 1 && replicas_[r]->stats().failed) continue;
        size_t m = 0;
        while (m < blocks.size() && prefixes_[r].contains(blocks[m])) ++m;
        const int64_t match = int64_t(m) * k_block_tokens;
        // Tokens of work in hand, less the prompt tokens a cache hit would spare.
        const int64_t score = (*load_)[r] - match;
        if (score < best_score) best = r, best_score = score, best_match = match;
    }
    if (best == replicas_.size()) best = next_ % n;  // every replica lost: one answers engine_failed
    next_ = (best + 1) % n;
    *matched_tokens = best_match;
    return best;
}

void Router::remember(size_t r, const std::vector<uint64_t>& blocks) {
    auto& seen = prefixes_[r];
    ++tick_;
    for (uint64_t h : blocks) seen[h] = tick_;
    if (seen.size() <= k_max_prefixes) return;
    // Forget the older half.
    std::vector<uint64_t> ticks;
    ticks.reserve(seen.size());
    for (const auto& [h, t] : seen) ticks.push_back(t);
    std::nth_element(ticks.begin(), ticks.begin() + ticks.size() / 2, ticks.end());
    const uint64_t cut = ticks[ticks.size() / 2];
    std::erase_if(seen, [cut](const auto& kv) { return kv.second < cut; });
}

Router::Routed Router::generate(Request req) {
    if (req.prompt_ids.empty() && !req.prompt.empty())
        req.prompt_ids = model().tokenizer().encode(req.prompt, req.add_special, req.parse_special);
    const std::vector<uint64_t> blocks = replicas_.size() > 1 ? block_hashes(req.prompt_ids) : std::vector<uint64_t>{};
    int64_t matched = 0;
    const size_t r = pick(blocks, &matched);
    Routed out{replicas_[r]->generate(req), Lease{}};
    remember(r, blocks);
    Lease& l = out.lease;
    l.load_ = load_;
    l.replica_ = r;
    l.prompt_left_ = std::max<int64_t>(1, int64_t(req.prompt_ids.size()) - matched);
    l.gen_left_ = std::min<int64_t>(req.max_tokens, k_gen_horizon);
    (*load_)[r] += l.prompt_left_ + l.gen_left_;
    return out;
}

}  // namespace coinfer::server
