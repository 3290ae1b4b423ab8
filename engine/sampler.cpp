#include "engine/sampler.h"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cfloat>
#include <cmath>
#include <deque>
#include <unordered_map>

#include "kernels/philox.h"
#include "io/error.h"

namespace coinfer {

void SamplingParams::validate() const {
    if (!std::isfinite(temperature) || temperature < 0.0f)
        throw_error("sampling.temperature must be a finite number >= 0 (got {})", temperature);
    if (top_k < 0) throw_error("sampling.top_k must be >= 0 (got {})", top_k);
    if (!(top_p > 0.0f && top_p <= 1.0f))
        throw_error("sampling.top_p must be in (0, 1] (got {})", top_p);
    if (!(min_p >= 0.0f && min_p <= 1.0f))
        throw_error("sampling.min_p must be in [0, 1] (got {})", min_p);
    if (!std::isfinite(repeat_penalty) || repeat_penalty <= 0.0f)
        throw_error("sampling.repeat_penalty must be a finite number > 0 (got {})", repeat_penalty);
    if (!std::isfinite(frequency_penalty))
        throw_error("sampling.frequency_penalty must be finite (got {})", frequency_penalty);
    if (!std::isfinite(presence_penalty))
        throw_error("sampling.presence_penalty must be finite (got {})", presence_penalty);
    if (penalty_last_n < -1)
        throw_error("sampling.penalty_last_n must be >= -1 (got {})", penalty_last_n);
    for (const auto& [id, bias] : logit_bias) {
        if (id < 0) throw_error("sampling.logit_bias: token id {} is negative", id);
        // -inf bans a token; +inf or NaN would poison the whole row.
        if (std::isnan(bias) || bias == INFINITY)
            throw_error("sampling.logit_bias: bias {} for token {} must be finite or -inf", bias, id);
    }
    if (n_logprobs < 0 || n_logprobs > k_max_logprobs)
        throw_error("sampling.n_logprobs must be in [0, {}] (got {})", k_max_logprobs, n_logprobs);
}

namespace {

// Sums (sampler.h): each chunk of k_sample_sum_chunk weights left to right from 0. Sorted
// candidates fall in chunks by position, candidates in id order by id (a chunk holds the ids
// [32c, 32c + 32), missing ones weighing nothing).
size_t chunk_of(std::span<const SamplerCandidate> cand, size_t j, bool by_id) {
    return (by_id ? size_t(cand[j].id) : j) / k_sample_sum_chunk;
}

void chunk_sums(std::span<const SamplerCandidate> cand, bool by_id, std::vector<float>& out) {
    out.assign(cand.empty() ? 0 : chunk_of(cand, cand.size() - 1, by_id) + 1, 0.0f);
    for (size_t j = 0; j < cand.size(); ++j) out[chunk_of(cand, j, by_id)] += cand[j].weight;
}

float chunked_total(const std::vector<float>& sums) {
    float a = 0.0f;
    for (float s : sums) a += s;
    return a;
}

// The first j whose running sum passes t (> t when strict, else >= t): first the chunk whose
// running total passes, then the weights of that chunk added to the total before it. The
// chunk's last (or the very last) candidate when rounding leaves none.
size_t first_passing(std::span<const SamplerCandidate> cand, bool by_id, const std::vector<float>& sums, float t,
                     bool strict) {
    auto passes = [&](float v) { return strict ? v > t : v >= t; };
    float a = 0.0f;
    size_t c = 0;
    for (; c < sums.size(); ++c) {
        const float next = a + sums[c];
        if (passes(next)) break;
        a = next;
    }
    if (c == sums.size()) return cand.size() - 1;
    size_t j = 0;  // the chunk's first candidate (chunks are contiguous either way)
    if (by_id) {
        j = size_t(std::lower_bound(cand.begin(), cand.end(), int32_t(c * k_sample_sum_chunk),
                                    [](const SamplerCandidate& x, int32_t id) { return x.id < id; }) -
                   cand.begin());
    } else {
        j = c * k_sample_sum_chunk;
    }
    for (; j < cand.size() && chunk_of(cand, j, by_id) == c; ++j) {
        a += cand[j].weight;
        if (passes(a)) return j;
    }
    return j - 1;
}

// Sort order of step 4: logit descending, then lower id first. A strict total order, so every
// sort algorithm on every device agrees.
bool candidate_before(const SamplerCandidate& a, const SamplerCandidate& b) {
    if (a.logit != b.logit) return a.logit > b.logit;
    return a.id < b.id;
}

class LogitBiasStage final : public SamplerStage {
public:
    explicit LogitBiasStage(std::vector<std::pair<int32_t, float>> bias) : bias_(std::move(bias)) {}
    const char* name() const override { return "logit_bias"; }
    void apply(SamplerRow& row) override {
        const auto n_vocab = row.logits.size();
        for (const auto& [id, bias] : bias_) {
            if (size_t(id) >= n_vocab)
                throw_error("sampling.logit_bias: token id {} is out of range (n_vocab {})", id, n_vocab);
            row.logits[size_t(id)] += bias;
        }
    }

private:
    std::vector<std::pair<int32_t, float>> bias_;
};

class PenaltyStage final : public SamplerStage {
public:
    PenaltyStage(int32_t last_n, float repeat, float freq, float presence)
        : last_n_(last_n), repeat_(repeat), freq_(freq), presence_(presence) {}
    const char* name() const override { return "penalties"; }

    void apply(SamplerRow& row) override {
        const auto n_vocab = row.logits.size();
        for (const auto& [id, count] : counts_) {
            if (size_t(id) >= n_vocab) continue;  // accepted ids are the engine's, not the user's
            float& l = row.logits[size_t(id)];
            if (repeat_ != 1.0f) l = l > 0.0f ? l / repeat_ : l * repeat_;
            l -= float(count) * freq_ + presence_;
        }
    }
    void accept(int32_t id) override {
        window_.push_back(id);
        ++counts_[id];
        if (last_n_ > 0 && window_.size() > size_t(last_n_)) {
            const int32_t old = window_.front();
            window_.pop_front();
            if (--counts_[old] == 0) counts_.erase(old);
        }
    }
    void reset() override {
        window_.clear();
        counts_.clear();
    }
    const std::unordered_map<int32_t, int32_t>& counts() const { return counts_; }

private:
    int32_t last_n_;  // > 0, or -1 for unbounded
    float repeat_, freq_, presence_;
    std::deque<int32_t> window_;                  // the last tokens, oldest first
    std::unordered_map<int32_t, int32_t> counts_;  // id -> occurrences in window_
};

class GreedyStage final : public SamplerStage {
public:
    const char* name() const override { return "greedy"; }
    void apply(SamplerRow& row) override {
        row.candidates.clear();
        int32_t best = -1;
        float best_logit = -INFINITY;
        for (size_t i = 0; i < row.logits.size(); ++i) {
            const float l = row.logits[i];
            if (l > best_logit) {  // strict: the first max wins; NaN and -inf never do
                best_logit = l;
                best = int32_t(i);
            }
        }
        if (best < 0) throw_error("sampling: every token is banned (all logits are -inf or NaN)");
        row.selected = best;
    }
};

// Steps 4 and 5: build the candidate list (sorted when `sort`, else in id order), cut to the
// first k (k == 0: all).
class TopKStage final : public SamplerStage {
public:
    TopKStage(int32_t k, bool sort) : k_(k), sort_(sort || k > 0) {}
    const char* name() const override { return k_ > 0 ? "top_k" : sort_ ? "sort" : "candidates"; }
    void apply(SamplerRow& row) override {
        if (!sort_) {
            auto& cand = row.candidates;
            cand.clear();
            for (size_t i = 0; i < row.logits.size(); ++i) {
                const float l = row.logits[i];
                if (std::isnan(l) || l == -INFINITY) continue;
                cand.push_back({int32_t(i), std::min(l, FLT_MAX), 0.0f});
            }
            if (cand.empty()) throw_error("sampling: every token is banned (all logits are -inf or NaN)");
            return;
        }
        // Sorting 64-bit keys is about 3x faster than sorting candidates with candidate_before,
        // and gives the same order: high half = ~(order-preserving bits of the logit), so larger
        // logits come first; low half = id, so ties go to the lower id.
        keys_.clear();
        for (size_t i = 0; i < row.logits.size(); ++i) {
            const float l = row.logits[i];
            if (std::isnan(l) || l == -INFINITY) continue;
            keys_.push_back(sort_key(l, uint32_t(i)));
        }
        if (keys_.empty()) throw_error("sampling: every token is banned (all logits are -inf or NaN)");
        if (k_ > 0 && size_t(k_) < keys_.size()) {
            std::partial_sort(keys_.begin(), keys_.begin() + k_, keys_.end());
            keys_.resize(size_t(k_));
        } else {
            std::sort(keys_.begin(), keys_.end());
        }
        auto& cand = row.candidates;
        cand.clear();
        for (const uint64_t key : keys_) {
            const auto id = uint32_t(key);
            cand.push_back({int32_t(id), std::min(row.logits[id], FLT_MAX), 0.0f});
        }
        assert(std::is_sorted(cand.begin(), cand.end(), candidate_before));
    }

private:
    static uint64_t sort_key(float l, uint32_t id) {
        l = std::min(l, FLT_MAX) + 0.0f;  // +inf -> FLT_MAX; -0 -> +0 so it ties with +0
        uint32_t u = std::bit_cast<uint32_t>(l);
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // unsigned order == float order
        return (uint64_t(~u) << 32) | id;
    }

    int32_t k_;
    bool sort_;
    std::vector<uint64_t> keys_;  // scratch reused between calls
};

// Step 6: weights relative to the max, at temperature t.
class TemperatureStage final : public SamplerStage {
public:
    TemperatureStage(float t, bool sorted) : inv_t_(1.0f / t), sorted_(sorted) {}
    const char* name() const override { return "temperature"; }
    void apply(SamplerRow& row) override {
        auto& cand = row.candidates;
        float l_max = cand.front().logit;
        if (!sorted_)
            for (const auto& c : cand) l_max = std::max(l_max, c.logit);
        for (auto& c : cand) c.weight = det_expf((c.logit - l_max) * inv_t_);
        // Sorted, the weights fall (weakly), so the zeros form a suffix; w_0 = 1.
        std::erase_if(cand, [](const SamplerCandidate& c) { return c.weight == 0.0f; });
    }

private:
    float inv_t_;
    bool sorted_;
};

// Step 7.
class TopPStage final : public SamplerStage {
public:
    explicit TopPStage(float p) : p_(p) {}
    const char* name() const override { return "top_p"; }
    void apply(SamplerRow& row) override {
        auto& cand = row.candidates;
        chunk_sums(cand, false, sums_);  // top-p runs on sorted candidates only
        const float target = p_ * chunked_total(sums_);
        cand.resize(first_passing(cand, false, sums_, target, false) + 1);
    }

private:
    float p_;
    std::vector<float> sums_;  // scratch
};

// Step 8.
class MinPStage final : public SamplerStage {
public:
    MinPStage(float p, bool sorted) : p_(p), sorted_(sorted) {}
    const char* name() const override { return "min_p"; }
    void apply(SamplerRow& row) override {
        auto& cand = row.candidates;
        if (!sorted_) {
            std::erase_if(cand, [&](const SamplerCandidate& c) { return !(c.weight >= p_); });
            return;
        }
        size_t n_keep = 1;  // w_0 = 1 >= any min_p
        while (n_keep < cand.size() && cand[n_keep].weight >= p_) ++n_keep;
        cand.resize(n_keep);
    }

private:
    float p_;
    bool sorted_;
};

// Step 9: inverse CDF over the kept prefix with the request's counter-based uniform.
class DistStage final : public SamplerStage {
public:
    DistStage(uint64_t seed, bool sorted) : seed_(seed), by_id_(!sorted) {}
    const char* name() const override { return "dist"; }
    void apply(SamplerRow& row) override {
        const auto& cand = row.candidates;
        chunk_sums(cand, by_id_, sums_);
        const float target = philox_uniform(seed_, row.token_index) * chunked_total(sums_);
        row.selected = cand[first_passing(cand, by_id_, sums_, target, true)].id;
    }

private:
    uint64_t seed_;
    bool by_id_;
    std::vector<float> sums_;  // scratch
};

}  // namespace

Sampler::Sampler(SamplingParams params) : params_(std::move(params)) {
    params_.validate();
    const auto& p = params_;
    if (!p.logit_bias.empty()) stages_.push_back(std::make_unique<LogitBiasStage>(p.logit_bias));
    const bool any_penalty =
        p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
    if (any_penalty && p.penalty_last_n != 0)
        stages_.push_back(std::make_unique<PenaltyStage>(p.penalty_last_n, p.repeat_penalty,
                                                         p.frequency_penalty, p.presence_penalty));
    if (p.temperature < SamplingParams::k_greedy_temperature) {
        stages_.push_back(std::make_unique<GreedyStage>());
        return;
    }
    // Only top-k and top-p need the candidates in logit order (sampler.h, step 4).
    const bool sorted = p.top_k > 0 || p.top_p < 1.0f;
    stages_.push_back(std::make_unique<TopKStage>(p.top_k, sorted));
    stages_.push_back(std::make_unique<TemperatureStage>(p.temperature, sorted));
    if (p.top_p < 1.0f) stages_.push_back(std::make_unique<TopPStage>(p.top_p));
    if (p.min_p > 0.0f) stages_.push_back(std::make_unique<MinPStage>(p.min_p, sorted));
    stages_.push_back(std::make_unique<DistStage>(p.seed, sorted));
}

Sampler::~Sampler() = default;
Sampler::Sampler(Sampler&&) noexcept = default;
Sampler& Sampler::operator=(Sampler&&) noexcept = default;

int32_t Sampler::sample(std::span<float> logits, uint64_t token_index) {
    if (logits.empty()) throw_error("sampling: empty logits row");
    row_.logits = logits;
    row_.token_index = token_index;
    row_.selected = -1;
    for (auto& stage : stages_) stage->apply(row_);
    row_.logits = {};
    return row_.selected;
}

std::vector<std::pair<int32_t, int32_t>> Sampler::penalty_counts() const {
    for (const auto& stage : stages_)
        if (const auto* p = dynamic_cast<const PenaltyStage*>(stage.get()))
            return {p->counts().begin(), p->counts().end()};
    return {};
}

void Sampler::accept(int32_t id) {
    for (auto& stage : stages_) stage->accept(id);
}

void Sampler::reset() {
    for (auto& stage : stages_) stage->reset();
    row_.candidates.clear();
}

std::vector<std::string> Sampler::stage_names() const {
    std::vector<std::string> names;
    for (const auto& stage : stages_) names.emplace_back(stage->name());
    return names;
}

namespace {

// max and log(sum(exp(l - max))) of a row, NaN counted as -inf.
std::pair<float, float> log_softmax_terms(const float* logits, int32_t n_vocab) {
    float l_max = -INFINITY;
    for (int32_t i = 0; i < n_vocab; ++i)
        if (logits[i] > l_max) l_max = logits[i];
    if (l_max == -INFINITY) return {l_max, 0.0f};
    float sum = 0.0f;
    for (int32_t i = 0; i < n_vocab; ++i)
        if (!std::isnan(logits[i])) sum += std::exp(logits[i] - l_max);
    return {l_max, std::log(sum)};
}

float logprob_from_terms(float l, std::pair<float, float> terms) {
    if (std::isnan(l) || terms.first == -INFINITY) return -INFINITY;
    return (l - terms.first) - terms.second;
}

}  // namespace

std::vector<TokenLogprob> top_logprobs(const float* logits, int32_t n_vocab, int32_t n) {
    std::vector<TokenLogprob> out;
    if (n_vocab <= 0 || n <= 0) return out;
    const auto terms = log_softmax_terms(logits, n_vocab);
    out.reserve(size_t(n_vocab));
    for (int32_t i = 0; i < n_vocab; ++i) out.push_back({i, logprob_from_terms(logits[i], terms)});
    const auto n_top = std::min(size_t(n), out.size());
    std::partial_sort(out.begin(), out.begin() + ptrdiff_t(n_top), out.end(),
                      [](const TokenLogprob& a, const TokenLogprob& b) {
                          if (a.logprob != b.logprob) return a.logprob > b.logprob;
                          return a.id < b.id;
                      });
    out.resize(n_top);
    return out;
}

float token_logprob(const float* logits, int32_t n_vocab, int32_t id) {
    if (id < 0 || id >= n_vocab) throw_error("logprob: token id {} is out of range (n_vocab {})", id, n_vocab);
    return logprob_from_terms(logits[id], log_softmax_terms(logits, n_vocab));
}

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
    // KMP failure links: fail_[s][k] = the longest proper prefix of stop s that is also a suffix
    // of its first k + 1 bytes.
    fail_.resize(stops_.size());
    state_.assign(stops_.size(), 0);
    for (size_t s = 0; s < stops_.size(); ++s) {
        const std::string& p = stops_[s];
        std::vector<uint32_t>& f = fail_[s];
        f.assign(p.size(), 0);
        uint32_t k = 0;
        for (size_t i = 1; i < p.size(); ++i) {
            while (k > 0 && p[i] != p[k]) k = f[k - 1];
            if (p[i] == p[k]) ++k;
            f[i] = k;
        }
    }
}

// Every stop string's matcher takes each new byte once (amortised O(1) a byte and stop), so a
// token costs its own length times the number of stops, whatever the stops' lengths.
std::string StopMatcher::push(std::string_view piece) {
    if (stopped_) return {};
    const size_t base = held_.size();
    held_.append(piece);

    // A stop string completed by this piece: cut at the one that starts earliest.
    matched_ = -1;
    size_t cut = std::string::npos;
    for (size_t i = base; i < held_.size(); ++i) {
        const char ch = held_[i];
        for (size_t s = 0; s < stops_.size(); ++s) {
            const std::string& p = stops_[s];
            if (p.empty()) continue;
            uint32_t& k = state_[s];
            while (k > 0 && ch != p[k]) k = fail_[s][k - 1];
            if (ch == p[k]) ++k;
            if (k == p.size()) {
                const size_t start = i + 1 - p.size();
                // Ties (same start) go to the earlier stop in the list.
                if (start < cut || (start == cut && int32_t(s) < matched_)) {
                    cut = start;
                    matched_ = int32_t(s);
                }
                k = fail_[s][k - 1];
            }
        }
    }
    if (cut != std::string::npos) {
        std::string out = held_.substr(0, cut);
        held_.clear();
        stopped_ = true;
        return out;
    }

    // Otherwise hold back the longest suffix that is a proper prefix of some stop string (the
    // matchers' states): only it could grow into a match. Anything before it is safe.
    size_t n_hold = 0;
    for (uint32_t k : state_) n_hold = std::max<size_t>(n_hold, k);
    std::string out = held_.substr(0, held_.size() - n_hold);
    held_.erase(0, held_.size() - n_hold);
    return out;
}

std::string StopMatcher::flush() {
    if (stopped_) return {};
    std::string out = std::move(held_);
    held_.clear();
    return out;
}

}  // namespace coinfer
