// The CPU sampler chain, Philox randomness, logprobs and stop strings. No model needed.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "kernels/philox.h"
#include "engine/sampler.h"
#include "io/error.h"

using namespace coinfer;

namespace {

constexpr float k_inf = std::numeric_limits<float>::infinity();

std::vector<int32_t> ids_of(std::span<const SamplerCandidate> cand) {
    std::vector<int32_t> ids;
    for (const auto& c : cand) ids.push_back(c.id);
    return ids;
}

// The candidate ids left for the final draw, in chain order.
std::vector<int32_t> kept(SamplingParams p, std::vector<float> logits) {
    Sampler s(std::move(p));
    s.sample(logits, 0);
    return ids_of(s.last_candidates());
}

std::vector<float> log_probs(const std::vector<double>& probs) {
    std::vector<float> l;
    for (double p : probs) l.push_back(float(std::log(p)));
    return l;
}

}  // namespace

TEST_CASE("philox4x32-10 matches the Random123 known-answer vectors") {
    struct Kat {
        PhiloxCounter ctr;
        PhiloxKey key;
        uint32_t expected[4];
    };
    const Kat kats[] = {
        {{{0, 0, 0, 0}}, {{0, 0}}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}}, {{0xffffffff, 0xffffffff}},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}}, {{0xa4093822, 0x299f31d0}},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (const auto& k : kats) {
        const PhiloxCounter out = philox4x32_10(k.ctr, k.key);
        for (int i = 0; i < 4; ++i) CHECK(out.v[i] == k.expected[i]);
    }
    // Usable at compile time.
    static_assert(philox4x32_10(PhiloxCounter{{0, 0, 0, 0}}, PhiloxKey{{0, 0}}).v[0] == 0x6627e8d5u);
    static_assert(philox_uniform(0, 0) == float(0x6627e8d5u >> 8) / 16777216.0f);
}

TEST_CASE("philox_uniform is in [0,1) with 24-bit resolution and keyed by (seed, counter)") {
    double sum = 0.0;
    for (uint64_t i = 0; i < 100000; ++i) {
        const float u = philox_uniform(42, i);
        REQUIRE(u >= 0.0f);
        REQUIRE(u < 1.0f);
        const float scaled = u * 16777216.0f;
        REQUIRE(scaled == std::floor(scaled));
        sum += u;
    }
    CHECK(sum / 100000 == doctest::Approx(0.5).epsilon(0.01));
    CHECK(philox_uniform(42, 7) == philox_uniform(42, 7));
    CHECK(philox_uniform(42, 7) != philox_uniform(43, 7));
    CHECK(philox_uniform(42, 7) != philox_uniform(42, 8));
    // High halves of seed and counter matter too.
    CHECK(philox_uniform(1ull << 40, 0) != philox_uniform(0, 0));
    CHECK(philox_uniform(0, 1ull << 40) != philox_uniform(0, 0));
}

TEST_CASE("det_expf is within a few ulp of exp") {
    CHECK(det_expf(0.0f) == 1.0f);
    CHECK(det_expf(-100.0f) == 0.0f);
    CHECK(det_expf(-k_inf) == 0.0f);
    CHECK(std::isnan(det_expf(std::nanf(""))));
    float worst = 0.0f;
    for (int i = 0; i <= 200000; ++i) {
        const float x = -87.0f * float(i) / 200000.0f;
        const double ref = std::exp(double(x));
        const float rel = float(std::fabs(det_expf(x) - ref) / ref);
        worst = std::max(worst, rel);
    }
    MESSAGE("det_expf worst relative error on [-87, 0]: " << worst);
    CHECK(worst < 4.0f * std::numeric_limits<float>::epsilon());
    for (float x = -87.0f; x < 0.0f; x += 0.001f) REQUIRE(det_expf(x) <= det_expf(x + 0.001f));
}

TEST_CASE("top-k keeps the first k in (logit desc, id asc) order") {
    const std::vector<float> logits = {1.0f, 3.0f, 3.0f, 2.0f, 0.0f};
    CHECK(kept({.top_k = 1}, logits) == std::vector<int32_t>{1});  // tie: lower id
    CHECK(kept({.top_k = 2}, logits) == std::vector<int32_t>{1, 2});
    CHECK(kept({.top_k = 3}, logits) == std::vector<int32_t>{1, 2, 3});
    CHECK(kept({.top_k = 5}, logits) == std::vector<int32_t>{1, 2, 3, 0, 4});
    CHECK(kept({.top_k = 100}, logits) == std::vector<int32_t>{1, 2, 3, 0, 4});  // k > n_vocab
    CHECK(kept({.top_k = 0}, logits) == std::vector<int32_t>{0, 1, 2, 3, 4});    // off: id order, no sort
    CHECK(kept({.top_k = 0, .top_p = 0.99f}, logits) == std::vector<int32_t>{1, 2, 3, 0, 4});  // top-p sorts
}

TEST_CASE("top-p keeps the smallest prefix reaching p of the tempered mass") {
    // weights relative to the max: 1, 0.6, 0.3, 0.1 (sum 2)
    const auto logits = log_probs({0.5, 0.3, 0.15, 0.05});
    CHECK(kept({.top_p = 0.4f}, logits) == std::vector<int32_t>{0});
    CHECK(kept({.top_p = 0.7f}, logits) == std::vector<int32_t>{0, 1});
    CHECK(kept({.top_p = 0.85f}, logits) == std::vector<int32_t>{0, 1, 2});
    CHECK(kept({.top_p = 0.99f}, logits) == std::vector<int32_t>{0, 1, 2, 3});
    CHECK(kept({.top_p = 1.0f}, logits) == std::vector<int32_t>{0, 1, 2, 3});
    // Temperature is applied first: at t=0.5 the probabilities are ~ 0.685, 0.247, 0.062, 0.007,
    // so 0.9 of the mass needs two tokens instead of three.
    CHECK(kept({.temperature = 1.0f, .top_p = 0.9f}, logits) == std::vector<int32_t>{0, 1, 2});
    CHECK(kept({.temperature = 0.5f, .top_p = 0.9f}, logits) == std::vector<int32_t>{0, 1});
    // Ties keep the lower id first.
    CHECK(kept({.top_p = 0.3f}, {0.0f, 1.0f, 1.0f}) == std::vector<int32_t>{1});
    CHECK(kept({.top_p = 0.5f}, {0.0f, 1.0f, 1.0f}) == std::vector<int32_t>{1, 2});
}

TEST_CASE("min-p keeps tokens with p >= min_p * p_max") {
    const auto logits = log_probs({0.5, 0.3, 0.15, 0.05});
    CHECK(kept({.min_p = 0.0f}, logits) == std::vector<int32_t>{0, 1, 2, 3});
    CHECK(kept({.min_p = 0.25f}, logits) == std::vector<int32_t>{0, 1, 2});
    CHECK(kept({.min_p = 0.5f}, logits) == std::vector<int32_t>{0, 1});
    CHECK(kept({.min_p = 0.7f}, logits) == std::vector<int32_t>{0});
    CHECK(kept({.min_p = 1.0f}, {2.0f, 1.0f, 2.0f}) == std::vector<int32_t>{0, 2});  // ties with max
    // Combined with top-k and top-p: each cuts a prefix of the same order.
    const std::vector<float> wide = {0.0f, 4.0f, 3.0f, 2.0f, 1.0f, -1.0f};
    CHECK(kept({.top_k = 4, .top_p = 1.0f, .min_p = 0.01f}, wide) == std::vector<int32_t>{1, 2, 3, 4});
    CHECK(kept({.top_k = 4, .top_p = 1.0f, .min_p = 0.2f}, wide) == std::vector<int32_t>{1, 2});
}

namespace {

// Draws 10,000 tokens (token_index 0..9999) from `probs` and returns the chi-square statistic
// against `expected` (the distribution the chain should sample from).
double chi_square_of_draws(const SamplingParams& params, const std::vector<double>& probs,
                           const std::vector<double>& expected) {
    Sampler s(params);
    const int n_draws = 10000;
    std::vector<int> counts(probs.size(), 0);
    const auto logits = log_probs(probs);
    for (int i = 0; i < n_draws; ++i) {
        auto row = logits;
        const int32_t id = s.sample(row, uint64_t(i));
        REQUIRE(id >= 0);
        REQUIRE(size_t(id) < expected.size());
        ++counts[size_t(id)];
    }
    double chi2 = 0.0;
    for (size_t i = 0; i < expected.size(); ++i) {
        const double e = expected[i] * n_draws;
        chi2 += (counts[i] - e) * (counts[i] - e) / e;
    }
    return chi2;
}

}  // namespace

TEST_CASE("top-p and the draw use the chunked sums of sampler.h, over thousands of candidates") {
    // Equal weights make every sum exact: top_p = 0.5 keeps exactly half, and the draw takes
    // the candidate floor(u * n) (the first whose running sum n' > u * n).
    const int n = 1000;
    std::vector<float> flat(n, 0.25f);
    CHECK(kept({.top_p = 0.5f}, flat).size() == 500);
    for (uint64_t t = 0; t < 200; ++t) {
        Sampler s({.temperature = 1.0f, .seed = 11});
        std::vector<float> row = flat;
        CHECK(s.sample(row, t) == int32_t(std::floor(double(philox_uniform(11, t)) * n)));
    }
    // Uneven weights: the chain equals the contract written out directly.
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 3.0f);
    for (int r = 0; r < 50; ++r) {
        std::vector<float> l(4000);
        for (float& v : l) v = nd(rng);
        const float top_p = r % 2 ? 0.9f : 1.0f, t = 0.5f + 0.1f * float(r % 7);
        // Sorted for top-p; id order (chunks by id) without it. l has no NaN or -inf.
        const bool sorted = top_p < 1.0f;
        std::vector<int32_t> order(l.size());
        for (size_t i = 0; i < l.size(); ++i) order[i] = int32_t(i);
        if (sorted)
            std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; });
        const float l_max = *std::max_element(l.begin(), l.end());
        std::vector<float> w;
        std::vector<int32_t> ids;
        for (int32_t id : order) {
            const float wi = det_expf((l[id] - l_max) * (1.0f / t));
            if (wi == 0.0f) continue;
            w.push_back(wi);
            ids.push_back(id);
        }
        auto chunk_id = [&](size_t i) { return (sorted ? i : size_t(ids[i])) / 32; };
        auto chunk_of = [&](size_t n_w, size_t c) {
            float a = 0.0f;
            for (size_t i = 0; i < n_w; ++i)
                if (chunk_id(i) == c) a += w[i];
            return a;
        };
        auto first = [&](size_t n_w, float bound, bool strict) {
            const size_t n_c = chunk_id(n_w - 1) + 1;
            float a = 0.0f;
            for (size_t c = 0; c < n_c; ++c) {
                const float next = a + chunk_of(n_w, c);
                if (strict ? next > bound : next >= bound) {
                    size_t last = 0;
                    for (size_t i = 0; i < n_w; ++i) {
                        if (chunk_id(i) != c) continue;
                        last = i;
                        a += w[i];
                        if (strict ? a > bound : a >= bound) return i;
                    }
                    return last;
                }
                a = next;
            }
            return n_w - 1;
        };
        auto total = [&](size_t n_w) {
            float a = 0.0f;
            for (size_t c = 0; c <= chunk_id(n_w - 1); ++c) a += chunk_of(n_w, c);
            return a;
        };
        size_t m = w.size();
        if (top_p < 1.0f) m = first(m, top_p * total(m), false) + 1;
        const float u = philox_uniform(3, uint64_t(r));
        const int32_t want = ids[first(m, u * total(m), true)];
        Sampler s({.temperature = t, .top_p = top_p, .seed = 3});
        CHECK(s.last_candidates().empty());
        CHECK(s.sample(l, uint64_t(r)) == want);
        CHECK(s.last_candidates().size() == m);
    }
}

TEST_CASE("10,000 seeded draws follow the distribution (chi-square, p = 0.001)") {
    // A fixed seed makes this deterministic. Over 1000 seeds the statistic averaged its degrees
    // of freedom, as it should, so these seeds do not hide a bias.
    const std::vector<double> probs = {0.4, 0.25, 0.15, 0.1, 0.06, 0.04};
    const double critical_5 = 20.515;  // chi-square at p = 0.001, 5 degrees of freedom
    const double critical_2 = 13.816;  // 2 degrees of freedom

    SamplingParams plain;
    plain.seed = 1234;
    const double chi_plain = chi_square_of_draws(plain, probs, probs);
    MESSAGE("plain: chi-square " << chi_plain);
    CHECK(chi_plain < critical_5);

    SamplingParams tempered;  // p^(1/t), normalised
    tempered.temperature = 0.7f;
    tempered.seed = 99;
    std::vector<double> expected;
    double z = 0.0;
    for (double p : probs) z += std::pow(p, 1.0 / 0.7);
    for (double p : probs) expected.push_back(std::pow(p, 1.0 / 0.7) / z);
    const double chi_tempered = chi_square_of_draws(tempered, probs, expected);
    MESSAGE("t=0.7: chi-square " << chi_tempered);
    CHECK(chi_tempered < critical_5);

    SamplingParams top3;  // renormalised over the top 3
    top3.top_k = 3;
    top3.seed = 3;
    const double chi_top3 = chi_square_of_draws(top3, probs, {0.4 / 0.8, 0.25 / 0.8, 0.15 / 0.8});
    MESSAGE("top_k=3: chi-square " << chi_top3);
    CHECK(chi_top3 < critical_2);
}

TEST_CASE("the draw depends only on (seed, token index)") {
    const auto logits = log_probs({0.2, 0.2, 0.2, 0.2, 0.2});
    auto draw = [&](Sampler& s, uint64_t index) {
        auto row = logits;
        return s.sample(row, index);
    };
    Sampler a({.seed = 5});
    std::vector<int32_t> first;
    for (uint64_t i = 0; i < 50; ++i) first.push_back(draw(a, i));

    // Other samplers drawing in between, and this one drawing out of order, change nothing.
    Sampler other({.seed = 6});
    Sampler same_seed({.seed = 5});
    for (uint64_t i = 0; i < 50; ++i) {
        draw(other, 1000 + i);
        draw(same_seed, 49 - i);
    }
    for (uint64_t i = 50; i-- > 0;) CHECK(draw(a, i) == first[i]);
    Sampler fresh({.seed = 5});
    for (uint64_t i = 0; i < 50; ++i) CHECK(draw(fresh, i) == first[i]);

    // Not constant, and a different seed gives a different sequence.
    std::vector<int32_t> other_seq;
    for (uint64_t i = 0; i < 50; ++i) other_seq.push_back(draw(other, i));
    CHECK(other_seq != first);
    CHECK(std::count(first.begin(), first.end(), first[0]) < 50);
}

TEST_CASE("greedy takes the first maximum") {
    Sampler s({.temperature = 0.0f});
    std::vector<float> row = {1.0f, 3.0f, 3.0f, 2.0f};
    CHECK(s.sample(row, 0) == 1);
    row = {std::nanf(""), -1.0f, -1.0f};
    CHECK(s.sample(row, 0) == 1);
    row = {-k_inf, -k_inf, -5.0f};
    CHECK(s.sample(row, 0) == 2);
    // Below the greedy epsilon counts as greedy too.
    Sampler tiny({.temperature = 1e-7f});
    row = {1.0f, 3.0f, 3.0f, 2.0f};
    CHECK(tiny.sample(row, 0) == 1);
    CHECK(tiny.stage_names() == std::vector<std::string>{"greedy"});
}

TEST_CASE("repetition, frequency and presence penalties") {
    SUBCASE("repetition divides positive and multiplies negative logits") {
        Sampler s({.temperature = 0.0f, .repeat_penalty = 2.0f});
        s.accept(0);
        s.accept(1);
        s.accept(1);
        std::vector<float> row = {2.0f, -2.0f, 1.0f, 0.0f};
        CHECK(s.sample(row, 0) == 0);  // 2 -> 1 ties with token 2; lower id wins
        CHECK(row == std::vector<float>{1.0f, -4.0f, 1.0f, 0.0f});
    }
    SUBCASE("frequency and presence subtract count*freq + presence") {
        Sampler s({.temperature = 0.0f, .frequency_penalty = 0.5f, .presence_penalty = 0.25f});
        s.accept(2);
        s.accept(2);
        s.accept(3);
        std::vector<float> row = {0.0f, 0.0f, 1.0f, 1.0f};
        s.sample(row, 0);
        CHECK(row == std::vector<float>{0.0f, 0.0f, -0.25f, 0.25f});
    }
    SUBCASE("only the last penalty_last_n tokens count; reset forgets") {
        Sampler s({.temperature = 0.0f, .presence_penalty = 1.0f, .penalty_last_n = 2});
        for (int32_t id : {0, 1, 2}) s.accept(id);
        std::vector<float> row = {0.0f, 0.0f, 0.0f, 0.0f};
        CHECK(s.sample(row, 0) == 0);
        CHECK(row == std::vector<float>{0.0f, -1.0f, -1.0f, 0.0f});
        s.reset();
        row = {0.0f, 0.0f, 0.0f, 0.0f};
        s.sample(row, 0);
        CHECK(row == std::vector<float>{0.0f, 0.0f, 0.0f, 0.0f});
    }
    SUBCASE("penalty_last_n = 0 disables, -1 is unbounded") {
        Sampler off({.temperature = 0.0f, .presence_penalty = 1.0f, .penalty_last_n = 0});
        off.accept(0);
        std::vector<float> row = {1.0f, 0.5f};
        CHECK(off.sample(row, 0) == 0);
        Sampler all({.temperature = 0.0f, .presence_penalty = 1.0f, .penalty_last_n = -1});
        all.accept(0);
        for (int i = 0; i < 1000; ++i) all.accept(1);
        row = {1.0f, 0.5f};
        all.sample(row, 0);
        CHECK(row == std::vector<float>{0.0f, -0.5f});
    }
    SUBCASE("neutral settings add no stage") {
        Sampler s({});
        CHECK(s.stage_names() == std::vector<std::string>{"candidates", "temperature", "dist"});
        Sampler full({.temperature = 0.8f, .top_k = 40, .top_p = 0.9f, .min_p = 0.05f,
                      .repeat_penalty = 1.1f, .logit_bias = {{1, 1.0f}}});
        CHECK(full.stage_names() == std::vector<std::string>{"logit_bias", "penalties", "top_k",
                                                             "temperature", "top_p", "min_p", "dist"});
    }
}

TEST_CASE("logit bias, bans and their errors") {
    SamplingParams p{.temperature = 0.0f, .logit_bias = {{0, -k_inf}, {2, 1.5f}}};
    Sampler greedy(p);
    std::vector<float> row = {5.0f, 1.0f, 0.0f};
    CHECK(greedy.sample(row, 0) == 2);  // 0 banned, 2 lifted to 1.5
    CHECK(row[0] == -k_inf);
    CHECK(row[2] == 1.5f);

    p.temperature = 1.0f;
    for (uint64_t i = 0; i < 200; ++i) {
        Sampler s(p);
        row = {5.0f, 1.0f, 0.0f};
        REQUIRE(s.sample(row, i) != 0);
        REQUIRE(ids_of(s.last_candidates()) == std::vector<int32_t>{1, 2});  // id order (no top-k/top-p)
    }

    Sampler out_of_range({.logit_bias = {{3, 1.0f}}});
    row = {0.0f, 0.0f, 0.0f};
    CHECK_THROWS_AS(out_of_range.sample(row, 0), Error);

    for (float t : {0.0f, 1.0f}) {
        Sampler ban_all({.temperature = t, .logit_bias = {{0, -k_inf}, {1, -k_inf}}});
        row = {1.0f, 2.0f};
        CHECK_THROWS_AS(ban_all.sample(row, 0), Error);
    }
}

TEST_CASE("validate() rejects nonsense with the field's name") {
    const std::vector<std::pair<const char*, std::function<void(SamplingParams&)>>> bad = {
        {"temperature", [](SamplingParams& p) { p.temperature = -0.1f; }},
        {"temperature", [](SamplingParams& p) { p.temperature = std::nanf(""); }},
        {"temperature", [](SamplingParams& p) { p.temperature = k_inf; }},
        {"top_k", [](SamplingParams& p) { p.top_k = -1; }},
        {"top_p", [](SamplingParams& p) { p.top_p = 0.0f; }},
        {"top_p", [](SamplingParams& p) { p.top_p = 1.01f; }},
        {"top_p", [](SamplingParams& p) { p.top_p = std::nanf(""); }},
        {"min_p", [](SamplingParams& p) { p.min_p = -0.01f; }},
        {"min_p", [](SamplingParams& p) { p.min_p = 1.5f; }},
        {"min_p", [](SamplingParams& p) { p.min_p = std::nanf(""); }},
        {"repeat_penalty", [](SamplingParams& p) { p.repeat_penalty = 0.0f; }},
        {"repeat_penalty", [](SamplingParams& p) { p.repeat_penalty = -1.0f; }},
        {"repeat_penalty", [](SamplingParams& p) { p.repeat_penalty = std::nanf(""); }},
        {"frequency_penalty", [](SamplingParams& p) { p.frequency_penalty = std::nanf(""); }},
        {"presence_penalty", [](SamplingParams& p) { p.presence_penalty = -k_inf; }},
        {"penalty_last_n", [](SamplingParams& p) { p.penalty_last_n = -2; }},
        {"logit_bias", [](SamplingParams& p) { p.logit_bias = {{-1, 0.0f}}; }},
        {"logit_bias", [](SamplingParams& p) { p.logit_bias = {{1, std::nanf("")}}; }},
        {"logit_bias", [](SamplingParams& p) { p.logit_bias = {{1, k_inf}}; }},
        {"n_logprobs", [](SamplingParams& p) { p.n_logprobs = -1; }},
        {"n_logprobs", [](SamplingParams& p) { p.n_logprobs = 21; }},
    };
    for (const auto& [field, mutate] : bad) {
        SamplingParams p;
        mutate(p);
        CAPTURE(field);
        try {
            p.validate();
            FAIL("no error for " << field);
        } catch (const Error& e) {
            CHECK(std::string(e.what()).find(field) != std::string::npos);
        }
        CHECK_THROWS_AS(Sampler{p}, Error);
    }
    SamplingParams ok{.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .min_p = 1.0f,
                      .repeat_penalty = 0.5f, .frequency_penalty = -2.0f, .penalty_last_n = -1,
                      .logit_bias = {{0, -k_inf}}, .n_logprobs = 20};
    CHECK_NOTHROW(ok.validate());
}

TEST_CASE("top_logprobs of the raw row") {
    const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f};
    double z = 0.0;
    for (float l : logits) z += std::exp(double(l));
    const auto top = top_logprobs(logits.data(), 4, 3);
    REQUIRE(top.size() == 3);
    CHECK(top[0].id == 1);  // tie with 3: lower id first
    CHECK(top[1].id == 3);
    CHECK(top[2].id == 2);
    for (const auto& t : top)
        CHECK(t.logprob == doctest::Approx(double(logits[size_t(t.id)]) - std::log(z)).epsilon(1e-6));
    CHECK(top_logprobs(logits.data(), 4, 10).size() == 4);
    CHECK(top_logprobs(logits.data(), 4, 0).empty());
    CHECK(token_logprob(logits.data(), 4, 0) == doctest::Approx(1.0 - std::log(z)).epsilon(1e-6));
    CHECK_THROWS_AS(token_logprob(logits.data(), 4, 4), Error);

    // Large logits stay finite (max-subtract), -inf gives -inf.
    const std::vector<float> big = {1000.0f, 1000.0f, -k_inf};
    const auto lp = top_logprobs(big.data(), 3, 3);
    CHECK(lp[0].logprob == doctest::Approx(-std::log(2.0)));
    CHECK(lp[2].id == 2);
    CHECK(lp[2].logprob == -k_inf);
}

TEST_CASE("StopMatcher equals the definition on random texts, pieces and overlapping stops") {
    // The definition: at each push, emit all text not yet emitted but the longest suffix that is a
    // proper prefix of a stop; once a stop occurs, emit up to its earliest start and stop.
    std::mt19937 rng(11);
    for (int trial = 0; trial < 3000; ++trial) {
        const char* alpha = trial % 2 ? "ab" : "abc";
        auto rand_str = [&](size_t lo, size_t hi) {
            std::string out(std::uniform_int_distribution<size_t>(lo, hi)(rng), ' ');
            for (char& c : out) c = alpha[rng() % std::strlen(alpha)];
            return out;
        };
        std::vector<std::string> stops;
        for (int i = 0, n = int(rng() % 3) + 1; i < n; ++i) stops.push_back(rand_str(1, 6));
        StopMatcher m(stops);
        std::string text, emitted_want, emitted_got;
        bool stopped = false;
        int32_t matched = -1;
        for (int k = 0; k < 12 && !stopped; ++k) {
            const std::string piece = rand_str(0, 5);
            text += piece;
            size_t cut = std::string::npos;
            for (size_t si = 0; si < stops.size(); ++si) {
                const size_t pos = text.find(stops[si]);
                if (pos < cut) cut = pos, matched = int32_t(si);
            }
            std::string want;
            if (cut != std::string::npos) {
                want = text.substr(emitted_want.size(), cut - emitted_want.size());
                stopped = true;
            } else {
                size_t hold = 0;
                for (const auto& st : stops)
                    for (size_t n = std::min(st.size() - 1, text.size()); n > hold; --n)
                        if (text.compare(text.size() - n, n, st, 0, n) == 0) {
                            hold = n;
                            break;
                        }
                want = text.substr(emitted_want.size(), text.size() - hold - emitted_want.size());
            }
            emitted_want += want;
            const std::string got = m.push(piece);
            emitted_got += got;
            REQUIRE(got == want);
            REQUIRE(m.stopped() == stopped);
        }
        if (stopped) CHECK(m.matched() == matched);
    }
}

TEST_CASE("StopMatcher holds back partial stops and cuts complete ones") {
    SUBCASE("a stop string split across pieces") {
        StopMatcher m({"end"});
        CHECK(m.push("The e") == "The ");
        CHECK_FALSE(m.stopped());
        CHECK(m.push("nd") == "");
        CHECK(m.stopped());
        CHECK(m.matched() == 0);
        CHECK(m.push("more") == "");
        CHECK(m.flush() == "");
    }
    SUBCASE("a partial match that fails is released") {
        StopMatcher m({"end"});
        CHECK(m.push("The e") == "The ");
        CHECK(m.push("n") == "");
        CHECK(m.push("try") == "entry");
        CHECK_FALSE(m.stopped());
        CHECK(m.push(" e") == " ");
        CHECK(m.flush() == "e");
    }
    SUBCASE("text after the stop string inside one piece is dropped") {
        StopMatcher m({"\n\n"});
        CHECK(m.push("Hello\n\nWorld") == "Hello");
        CHECK(m.stopped());
    }
    SUBCASE("several stop strings: the earliest complete one wins") {
        StopMatcher m({"STOP", "</s>", "xyz"});
        CHECK(m.push("a </") == "a ");
        CHECK(m.push("s") == "");
        CHECK(m.push(">STOP") == "");
        CHECK(m.stopped());
        CHECK(m.matched() == 1);
    }
    SUBCASE("overlapping prefixes hold back the longest candidate") {
        StopMatcher m({"abc", "bcd"});
        CHECK(m.push("xab") == "x");
        CHECK(m.push("c") == "");
        CHECK(m.matched() == 0);

        StopMatcher n({"aab"});
        CHECK(n.push("aaa") == "a");  // "aa" could still start "aab"
        CHECK(n.push("b") == "");
        CHECK(n.stopped());
    }
    SUBCASE("a stop string arriving one byte at a time") {
        StopMatcher m({"###"});
        std::string out;
        for (char c : std::string("ab##c##d###e")) out += m.push(std::string(1, c));
        CHECK(out == "ab##c##d");
        CHECK(m.stopped());
    }
    SUBCASE("no stop strings (or only empty ones) passes everything through") {
        StopMatcher m({"", ""});
        CHECK(m.push("abc") == "abc");
        CHECK(m.flush() == "");
        CHECK_FALSE(m.stopped());
        CHECK(m.matched() == -1);
    }
}
