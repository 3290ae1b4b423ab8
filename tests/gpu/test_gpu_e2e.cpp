// End-to-end runs of the CUDA backend against the shared references and the CPU backend:
// stories260K greedy ids and perplexity, quant-base logits in every weight format, GPU vs CPU
// logits on a ragged batch, on-device greedy sampling, batch invariance (alone vs 64), and the
// on-device sampling chain and logprobs against the CPU Sampler on random rows.
// Without a CUDA device every case prints SKIP and passes.
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <random>
#include <set>

#include "engine/generate.h"
#include "engine/sampler.h"
#include "kernels/cuda_check.h"
#include "kernels/sample.h"
#include "test_models.h"

using namespace coinfer;

namespace {

bool have_gpu() {
    static const bool ok = [] {
        const bool a = cuda_device_available();
        if (!a) {
            std::fprintf(stderr, "SKIP: no CUDA device (or a build without CUDA): GPU tests not run\n");
            test::mark_skipped("no CUDA device");
        }
        return a;
    }();
    return ok;
}

std::optional<nlohmann::json> read_json(const std::string& rel) {
    auto path = test::model_file(rel);
    if (!path) return std::nullopt;
    std::ifstream in(*path);
    return nlohmann::json::parse(in);
}

std::string read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
}

float max_abs_diff(std::span<const float> a, std::span<const float> b) {
    float m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
    return m;
}

std::unique_ptr<Backend> cuda(std::shared_ptr<const Model> m, int32_t n_blocks = 1024) {
    BackendOptions opt;
    opt.n_blocks = n_blocks;
    opt.batch_invariant = true;  // these tests compare runs alone with runs in a batch
    return make_cuda_backend(std::move(m), opt);
}

// Prompt + recorded ids teacher-forced in one batch; logits from the last prompt row on.
std::vector<float> teacher_forced(Backend& be, KvBlockPool& pool, const std::vector<TokenId>& prompt,
                                  const std::vector<TokenId>& gen, int64_t n_vocab, size_t* n_rows) {
    std::vector<TokenId> all = prompt;
    all.insert(all.end(), gen.begin(), gen.end() - 1);
    auto blocks = pool.kv_block_alloc_n((static_cast<int32_t>(all.size()) + 15) / 16).value();
    Batch b;
    const int32_t s = b.add_seq(blocks);
    for (size_t i = 0; i < all.size(); ++i) b.add(all[i], static_cast<int32_t>(i), s, i + 1 >= prompt.size());
    std::vector<float> logits(b.logit_rows.size() * static_cast<size_t>(n_vocab));
    be.forward(b, logits);
    pool.kv_block_free_seq(blocks);
    *n_rows = b.logit_rows.size();
    return logits;
}

}  // namespace

TEST_CASE("gpu: stories260K greedy reproduces llama.cpp's ids") {
    if (!have_gpu()) return;
    auto path = test::model_file("stories260K.gguf");
    auto refs = read_json("refs/stories260K-greedy.json");
    if (!path || !refs) return;
    auto model = Model::load(*path);
    auto be = cuda(model);
    KvBlockPool pool(be->n_blocks(), be->block_size());
    auto cpu = make_cpu_backend(model, BackendOptions{.n_blocks = 64});
    KvBlockPool cpu_pool(cpu->n_blocks(), cpu->block_size());
    int n_prompts = 0;
    for (const auto& r : (*refs)["results"]) {
        auto prompt = r["prompt_ids"].get<std::vector<TokenId>>();
        auto want = r["generated_ids"].get<std::vector<TokenId>>();
        GenerateOptions opt;
        opt.max_tokens = static_cast<int32_t>(want.size());
        opt.sampling.temperature = 0;
        opt.ignore_eos = true;
        auto res = generate(*be, pool, *model, prompt, opt);
        CHECK(res.ids == want);
        // Logits after the prompt against llama.cpp (f32 KV) and the CPU backend.
        size_t n_rows = 0;
        auto gpu_l = teacher_forced(*be, pool, prompt, want, 512, &n_rows);
        auto cpu_l = teacher_forced(*cpu, cpu_pool, prompt, want, 512, &n_rows);
        auto ref = r["logits_after_prompt"].get<std::vector<float>>();
        const float d_ref = max_abs_diff(std::span(gpu_l).first(512), ref);
        const float d_cpu = max_abs_diff(gpu_l, cpu_l);
        // With an F32 KV cache the GPU matches the CPU (F32 KV) closely; the default F16 cache
        // moves logits by a few hundredths (llama.cpp saw up to 0.018 itself) without changing ids.
        setenv("COINFER_KV_TYPE", "f32", 1);
        auto be32 = cuda(model, 64);
        unsetenv("COINFER_KV_TYPE");
        KvBlockPool pool32(be32->n_blocks(), be32->block_size());
        auto gpu32 = teacher_forced(*be32, pool32, prompt, want, 512, &n_rows);
        const float d_cpu32 = max_abs_diff(gpu32, cpu_l);
        MESSAGE("prompt " << n_prompts << ": ids " << (res.ids == want ? "equal" : "DIFFER")
                          << ", max |gpu - llama.cpp| after prompt " << d_ref << ", max |gpu - cpu| over " << n_rows
                          << " teacher-forced rows: f16 KV " << d_cpu << ", f32 KV " << d_cpu32);
        CHECK(d_ref <= 2e-2f);
        CHECK(d_cpu <= 5e-2f);
        CHECK(d_cpu32 <= 1e-3f);
        ++n_prompts;
    }
    CHECK(n_prompts == 3);
}

TEST_CASE("gpu: a failed CUDA graph capture falls back to eager launches with the same ids") {
    if (!have_gpu()) return;
    auto path = test::model_file("stories260K.gguf");
    if (!path) return;
    auto model = Model::load(*path);
    const std::vector<TokenId> prompt = model->tokenizer().encode("Once upon a time", true);
    GenerateOptions opt;
    opt.max_tokens = 24;
    opt.sampling.temperature = 0;
    opt.ignore_eos = true;
    auto be = cuda(model, 64);
    KvBlockPool pool(be->n_blocks(), be->block_size());
    const auto want = generate(*be, pool, *model, prompt, opt).ids;
    setenv("COINFER_TEST_FAIL_GRAPH_CAPTURE", "1", 1);
    auto be2 = cuda(model, 64);
    KvBlockPool pool2(be2->n_blocks(), be2->block_size());
    std::vector<TokenId> got;
    CHECK_NOTHROW(got = generate(*be2, pool2, *model, prompt, opt).ids);
    unsetenv("COINFER_TEST_FAIL_GRAPH_CAPTURE");
    CHECK(got == want);
    // A backend whose construction fails frees what it had taken: build and fail many times.
    size_t free_before = 0, free_after = 0, total = 0;
    CHECK(cudaMemGetInfo(&free_before, &total) == cudaSuccess);
    for (int i = 0; i < 20; ++i) {
        BackendOptions bad;
        bad.n_blocks = 1 << 30;  // more K/V than any device holds: fails after the weights are up
        CHECK_THROWS(make_cuda_backend(model, bad));
    }
    CHECK(cudaMemGetInfo(&free_after, &total) == cudaSuccess);
    MESSAGE("device memory free before 20 failed constructions " << free_before / (1 << 20) << " MiB, after "
                                                                 << free_after / (1 << 20) << " MiB");
    CHECK(free_after + (size_t(64) << 20) >= free_before);
}

TEST_CASE("gpu: stories260K perplexity on tale.txt at c=128 is 4.4525 +- 0.001") {
    if (!have_gpu()) return;
    auto path = test::model_file("stories260K.gguf");
    auto tale = test::model_file("refs/tale.txt");
    if (!path || !tale) return;
    auto model = Model::load(*path);
    auto be = cuda(model);
    KvBlockPool pool(be->n_blocks(), be->block_size());
    auto r = perplexity(*be, pool, *model, read(*tale), 128);
    MESSAGE("gpu perplexity c=128: " << r.ppl << " over " << r.n_chunks << " chunks");
    CHECK(std::abs(r.ppl - 4.4525) <= 0.001);
}

TEST_CASE("gpu: quant-base logits in every weight format match the exactly dequantized runs") {
    if (!have_gpu()) return;
    const char* types[] = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                           "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"};
    for (std::string type : types) {
        CAPTURE(type);
        auto path = test::model_file("quant/quant-base-" + type + ".gguf");
        auto exact = read_json(type == "F32" ? "quant/logits/F32.json" : "quant/logits-dequant-f32/" + type + ".json");
        if (!path || !exact) continue;
        auto model = Model::load(*path);
        auto be = cuda(model, 64);
        KvBlockPool pool(be->n_blocks(), be->block_size());
        auto cpu = make_cpu_backend(model, BackendOptions{.n_blocks = 64});
        KvBlockPool cpu_pool(cpu->n_blocks(), cpu->block_size());
        for (size_t p = 0; p < 2; ++p) {
            const auto& re = (*exact)["results"][p];
            auto prompt = re["prompt_ids"].get<std::vector<TokenId>>();
            auto gen = re["generated_ids"].get<std::vector<TokenId>>();
            size_t n_rows = 0;
            auto g = teacher_forced(*be, pool, prompt, gen, 512, &n_rows);
            auto c = teacher_forced(*cpu, cpu_pool, prompt, gen, 512, &n_rows);
            const float d_exact = max_abs_diff(std::span(g).first(512), re["logits_after_prompt"].get<std::vector<float>>());
            const float d_cpu = max_abs_diff(g, c);
            // Teacher-forced steps: the GPU's top-1 equals the CPU's on every step.
            int n_same = 0;
            for (size_t k = 0; k < n_rows; ++k) {
                auto row_g = std::span(g).subspan(k * 512, 512), row_c = std::span(c).subspan(k * 512, 512);
                n_same += std::max_element(row_g.begin(), row_g.end()) - row_g.begin() ==
                          std::max_element(row_c.begin(), row_c.end()) - row_c.begin();
            }
            MESSAGE(type << " prompt " << p << ": max |gpu - exact-dequant| " << d_exact << ", max |gpu - cpu| over "
                         << n_rows << " steps " << d_cpu << ", top-1 equal on " << n_same << "/" << n_rows);
            CHECK(d_exact <= 2e-3f);
            CHECK(d_cpu <= 2e-3f);
            CHECK(n_same == static_cast<int>(n_rows));
        }
    }
}

TEST_CASE("gpu: a ragged batch matches the CPU backend, and on-device greedy matches host argmax") {
    if (!have_gpu()) return;
    auto path = test::model_file("quant/quant-base-Q4_K_M.gguf");
    if (!path) return;
    auto model = Model::load(*path);
    auto be = cuda(model, 64);
    auto cpu = make_cpu_backend(model, BackendOptions{.n_blocks = 64});
    // Three sequences: a 40-token prompt, a 5-token chunk after 20 cached positions, a decode at 33.
    auto run = [&](Backend& b, bool greedy, std::vector<int32_t>* ids) {
        std::vector<float> logits;
        for (int pass = 0; pass < 2; ++pass) {
            Batch bt;
            const int32_t s0 = bt.add_seq({0, 1, 2}), s1 = bt.add_seq({3, 4}), s2 = bt.add_seq({5, 6, 7});
            if (pass == 0) {  // fill the caches
                for (int i = 0; i < 20; ++i) bt.add((i * 7 + 3) % 512, i, s1, false);
                for (int i = 0; i < 33; ++i) bt.add((i * 11 + 5) % 512, i, s2, false);
            } else {
                for (int i = 0; i < 40; ++i) bt.add((i * 13 + 1) % 512, i, s0, i % 8 == 7);
                for (int i = 20; i < 25; ++i) bt.add((i * 7 + 3) % 512, i, s1, true);
                bt.add(77, 33, s2, true);
            }
            logits.assign(bt.logit_rows.size() * 512, 0.0f);
            if (pass == 1 && greedy) {
                std::vector<DeviceGreedyRow> rows(bt.logit_rows.size());
                rows[1].logit_bias = {{5, 100.0f}};
                rows[2].penalty_counts = {{3, 2}};
                rows[2].repeat_penalty = 1.3f;
                ids->assign(rows.size(), -2);
                b.forward_greedy(bt, rows, *ids);
            } else {
                b.forward(bt, logits);
            }
        }
        return logits;
    };
    auto c = run(*cpu, false, nullptr);
    auto g = run(*be, false, nullptr);
    const float d = max_abs_diff(g, c);
    MESSAGE("ragged batch (prefill + chunk after cache + decode): max |gpu - cpu| = " << d);
    CHECK(d <= 2e-3f);
    std::vector<int32_t> ids;
    run(*be, true, &ids);
    REQUIRE(ids.size() == g.size() / 512);
    for (size_t r = 0; r < ids.size(); ++r) {
        std::vector<float> row(g.begin() + r * 512, g.begin() + (r + 1) * 512);
        if (r == 1) row[5] += 100.0f;
        if (r == 2) row[3] = row[3] > 0 ? row[3] / 1.3f : row[3] * 1.3f;
        const int32_t want = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
        CHECK(ids[r] == want);
    }
}

TEST_CASE("gpu: a request's logit_bias stays on the device between steps, and a full arena starts over") {
    if (!have_gpu()) return;
    auto path = test::model_file("stories260K.gguf");
    if (!path) return;
    auto model = Model::load(*path);
    auto be = cuda(model, 64);
    const int32_t n_vocab = model->config().n_vocab;
    // Request k's list: +100 on its target token and 299 entries of 0 (arena room): greedy then
    // picks the target. 400 requests, revisited in rounds, pass the arena's first 65,536 entries,
    // so slots are reused, appended and rebuilt; a keyless row rides along every step.
    auto target = [&](uint64_t k) { return int32_t((k * 37 + 11) % uint64_t(n_vocab)); };
    auto list = [&](uint64_t k) {
        std::vector<std::pair<int32_t, float>> l{{target(k), 100.0f}};
        for (int32_t j = 0; l.size() < 300; ++j)
            if (j != target(k)) l.push_back({j, 0.0f});
        return l;
    };
    int n_ok = 0, n = 0;
    std::mt19937 rng(3);
    for (int step = 0; step < 1200; ++step) {
        Batch bt;
        const int32_t s0 = bt.add_seq({0}), s1 = bt.add_seq({1});
        bt.add(1, 0, s0, true);
        bt.add(2, 0, s1, true);
        std::vector<DeviceGreedyRow> rows(2);
        const uint64_t k = step < 400 ? uint64_t(step) : uint64_t(rng() % 400);
        rows[0].bias_key = k + 1;
        rows[0].logit_bias = list(k);
        rows[1].logit_bias = {{int32_t(step % n_vocab), 100.0f}};  // keyless: sent with the step
        std::vector<int32_t> ids(2, -2);
        be->forward_greedy(bt, rows, ids);
        n_ok += ids[0] == target(k) && ids[1] == step % n_vocab;
        ++n;
    }
    MESSAGE(n_ok << " of " << n << " steps picked both biased targets");
    CHECK(n_ok == n);
}

TEST_CASE("gpu: greedy output is the same alone and inside a batch of 64 mixed requests") {
    if (!have_gpu()) return;
    auto path = test::model_file("stories260K.gguf");
    if (!path) return;
    auto model = Model::load(*path);
    auto be = cuda(model, 4096);
    KvBlockPool pool(be->n_blocks(), be->block_size());
    const int n_seq = 64, n_gen = 24;
    std::vector<std::vector<TokenId>> prompts;
    for (int s = 0; s < n_seq; ++s) {
        std::vector<TokenId> p{1};
        for (int i = 0; i < 3 + (s * 5) % 37; ++i) p.push_back((s * 31 + i * 17 + 7) % 509 + 3);
        prompts.push_back(p);
    }
    // Alone: one request at a time, prompt in one batch then 1-token decodes.
    auto decode_all = [&](const std::vector<int>& which) {
        std::vector<std::vector<TokenId>> out(which.size());
        std::vector<std::vector<int32_t>> tables;
        for (size_t k = 0; k < which.size(); ++k) tables.push_back(*pool.kv_block_alloc_n(8));
        std::vector<TokenId> last(which.size());
        for (int step = 0; step <= n_gen; ++step) {
            Batch b;
            for (size_t k = 0; k < which.size(); ++k) {
                const int32_t si = b.add_seq(tables[k]);
                const auto& p = prompts[static_cast<size_t>(which[k])];
                if (step == 0)
                    for (size_t i = 0; i < p.size(); ++i) b.add(p[i], static_cast<int32_t>(i), si, i + 1 == p.size());
                else
                    b.add(last[k], static_cast<int32_t>(p.size()) + step - 1, si, true);
            }
            std::vector<DeviceGreedyRow> rows(which.size());
            std::vector<int32_t> ids(which.size());
            be->forward_greedy(b, rows, ids);
            for (size_t k = 0; k < which.size(); ++k) {
                last[k] = ids[k];
                if (step < n_gen) out[k].push_back(ids[k]);
            }
        }
        for (auto& t : tables) pool.kv_block_free_seq(t);
        return out;
    };
    std::vector<int> all;
    for (int s = 0; s < n_seq; ++s) all.push_back(s);
    auto batched = decode_all(all);
    int n_equal = 0;
    for (int s = 0; s < n_seq; ++s) {
        auto alone = decode_all({s});
        n_equal += alone[0] == batched[static_cast<size_t>(s)];
    }
    MESSAGE("greedy alone == in a batch of 64 for " << n_equal << "/" << n_seq << " requests (" << n_gen << " tokens each)");
    CHECK(n_equal == n_seq);
}

TEST_CASE("gpu: the on-device sampling chain picks what the CPU Sampler picks, and logprobs agree") {
    if (!have_gpu()) return;
    namespace kn = coinfer::kernels;
    std::mt19937_64 rng(std::random_device{}());
    for (const int32_t n_vocab : {512, 32000}) {
        const int32_t n_rows = 256;
        // Random rows: normal logits, some rounded to few values (ties), some NaN / -inf / +inf.
        std::vector<float> logits(size_t(n_rows) * n_vocab);
        std::normal_distribution<float> nd(0.0f, 3.0f);
        std::uniform_real_distribution<float> ud(0.0f, 1.0f);
        std::vector<SamplingParams> params(n_rows);
        auto allowed = std::vector<std::vector<uint32_t>>(size_t(n_rows));  // grammar masks (empty: none)
        std::vector<std::vector<std::pair<int32_t, int32_t>>> pen(n_rows);
        for (int32_t r = 0; r < n_rows; ++r) {
            const int kind = r % 4;
            for (int32_t i = 0; i < n_vocab; ++i) {
                float v = nd(rng) * (r % 3 == 0 ? 4.0f : 1.0f);
                if (kind == 1) v = std::round(v * 2.0f) / 2.0f;  // many exact ties
                const float z = ud(rng);
                if (z < 0.01f) v = NAN;
                else if (z < 0.03f) v = -INFINITY;
                else if (kind == 2 && z < 0.0305f) v = INFINITY;
                logits[size_t(r) * n_vocab + i] = v;
            }
            if (r == 7)
                for (int32_t i = 0; i < n_vocab; ++i) logits[size_t(r) * n_vocab + i] = -INFINITY;  // all banned
            SamplingParams& p = params[r];
            p.temperature = (r % 8 == 0) ? 0.0f : 0.05f + 2.0f * ud(rng);
            p.top_k = (r % 5 == 0) ? 0 : int32_t(1 + rng() % 100);
            if (r % 17 == 3) p.top_k = 1024;  // the largest the select path takes
            if (r % 17 == 8) p.top_k = 1025 + int32_t(rng() % 3000);  // larger: the sort path
            p.top_p = (r % 3 == 0) ? 1.0f : 0.05f + 0.95f * ud(rng);
            p.min_p = (r % 4 == 1) ? 0.0f : 0.2f * ud(rng);
            if (r % 6 == 0) p.top_k = 0, p.top_p = 1.0f, p.min_p = 0.0f;  // the whole vocab
            p.seed = rng();
            p.repeat_penalty = (r % 2) ? 1.0f + ud(rng) : 1.0f;
            p.frequency_penalty = (r % 3 == 1) ? ud(rng) : 0.0f;
            p.presence_penalty = (r % 3 == 2) ? ud(rng) : 0.0f;
            for (int j = 0; j < int(r % 4); ++j) p.logit_bias.push_back({int32_t(rng() % n_vocab), nd(rng)});
            if (r % 9 == 3) p.logit_bias.push_back({int32_t(rng() % n_vocab), -INFINITY});
            if (r % 10 == 5) {  // one id twice: applied in order
                const int32_t id = int32_t(rng() % n_vocab);
                p.logit_bias.push_back({id, nd(rng)});
                p.logit_bias.push_back({id, nd(rng)});
            }
            if (r % 11 == 4) {  // 300 distinct ids, as the server's cap allows
                std::set<int32_t> seen;
                for (const auto& [id, b] : p.logit_bias) seen.insert(id);
                const size_t target = seen.size() + 300;
                while (seen.size() < target) {
                    const int32_t id = int32_t(rng() % n_vocab);
                    if (seen.insert(id).second) p.logit_bias.push_back({id, nd(rng)});
                }
            }
            p.n_logprobs = (r % 7 == 0) ? int32_t(1 + rng() % 20) : 0;
            if (r % 5 == 2) {  // a grammar's mask: about half the vocabulary banned, or all but a few
                allowed[r].assign(size_t((n_vocab + 31) / 32), 0u);
                const bool few = r % 10 == 7;
                for (int32_t i = 0; i < n_vocab; ++i)
                    if (few ? rng() % 997 == 0 : rng() % 2 == 0) allowed[r][size_t(i) >> 5] |= 1u << (i & 31);
            }
        }
        // CPU reference, with penalty windows fed through accept().
        std::vector<int32_t> want(n_rows);
        std::vector<uint64_t> token_index(n_rows);
        std::vector<std::vector<TokenLogprob>> want_lp(n_rows);
        std::vector<Sampler> samplers;
        for (int32_t r = 0; r < n_rows; ++r) {
            samplers.emplace_back(params[r]);
            for (int j = 0; j < 40; ++j) samplers[r].accept(int32_t(rng() % 64));
            pen[r] = samplers[r].penalty_counts();
            token_index[r] = rng() % 1000;
            std::vector<float> row(logits.begin() + size_t(r) * n_vocab, logits.begin() + size_t(r + 1) * n_vocab);
            if (params[r].n_logprobs) want_lp[r] = top_logprobs(row.data(), n_vocab, params[r].n_logprobs);
            if (!allowed[r].empty())  // as the engine's CPU path: the mask before the sampler
                for (int32_t i = 0; i < n_vocab; ++i)
                    if (!(allowed[r][size_t(i) >> 5] >> (i & 31) & 1u)) row[size_t(i)] = -INFINITY;
            try {
                want[r] = samplers[r].sample(row, token_index[r]);
            } catch (const Error&) {
                want[r] = -1;
            }
        }
        // Device inputs, as the CUDA backend packs them.
        std::vector<kn::GreedyRowParams> gp(n_rows);
        std::vector<int32_t> bias_off{0}, bias_ids, pen_off{0}, pen_ids, pen_counts;
        std::vector<float> bias_vals;
        std::vector<kn::DistRowParams> dist;
        std::vector<kn::LogprobRowParams> lp;
        for (int32_t r = 0; r < n_rows; ++r) {
            const SamplingParams& p = params[r];
            std::vector<int32_t> ids;
            for (auto [id, b] : p.logit_bias) ids.push_back(id);
            std::sort(ids.begin(), ids.end());
            gp[r] = {p.repeat_penalty, p.frequency_penalty, p.presence_penalty,
                     std::adjacent_find(ids.begin(), ids.end()) != ids.end() ? 1 : 0};
            for (auto [id, b] : p.logit_bias) bias_ids.push_back(id), bias_vals.push_back(b);
            bias_off.push_back(int32_t(bias_ids.size()));
            for (auto [id, c] : pen[r]) pen_ids.push_back(id), pen_counts.push_back(c);
            pen_off.push_back(int32_t(pen_ids.size()));
            if (p.temperature >= SamplingParams::k_greedy_temperature) {
                kn::DistRowParams d{};
                d.row = r;
                d.top_k = p.top_k;
                d.inv_temperature = 1.0f / p.temperature;
                d.top_p = p.top_p;
                d.min_p = p.min_p;
                d.seed = p.seed;
                d.token_index = token_index[r];
                dist.push_back(d);
            }
            if (p.n_logprobs) lp.push_back({r, p.n_logprobs});
        }
        std::vector<int32_t> bias_pairs;  // (begin, end) a row, as sample_rows takes them
        for (int32_t r = 0; r < n_rows; ++r) {
            bias_pairs.push_back(bias_off[size_t(r)]);
            bias_pairs.push_back(bias_off[size_t(r) + 1]);
        }
        std::stable_sort(dist.begin(), dist.end(), [](const auto& a, const auto& b) { return kn::dist_path(a) < kn::dist_path(b); });
    const auto n_sort = std::count_if(dist.begin(), dist.end(), [](const auto& d) { return kn::dist_path(d) == kn::DistPath::sort; });
    const auto n_select = std::count_if(dist.begin(), dist.end(), [](const auto& d) { return kn::dist_path(d) == kn::DistPath::select; });
        std::vector<int32_t> mask_row(size_t(n_rows), -1);
        std::vector<uint32_t> mask_words;
        for (int32_t r = 0; r < n_rows; ++r)
            if (!allowed[r].empty()) {
                mask_row[size_t(r)] = int32_t(mask_words.size() / allowed[r].size());
                mask_words.insert(mask_words.end(), allowed[r].begin(), allowed[r].end());
            }
        auto up = [](const auto& v) {
            void* d = nullptr;
            const size_t bytes = std::max<size_t>(1, v.size() * sizeof(v[0]));
            CUDA_CHECK(cudaMalloc(&d, bytes));
            if (!v.empty()) CUDA_CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(v[0]), cudaMemcpyHostToDevice));
            return d;
        };
        std::vector<void*> owned;
        auto U = [&](const auto& v) {
            owned.push_back(up(v));
            return owned.back();
        };
        auto* d_logits = static_cast<float*>(U(logits));
        const size_t ws_bytes =
            kn::sample_workspace_bytes(n_vocab, int64_t(dist.size()), int64_t(n_sort), int64_t(lp.size()));
        void* ws = nullptr;
        CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
        owned.push_back(ws);
        std::vector<int32_t> got(n_rows, -2);
        std::vector<kn::LogprobOut> got_lp(lp.size());
        auto* d_ids = static_cast<int32_t*>(U(got));
        auto* d_lp = static_cast<kn::LogprobOut*>(U(got_lp));
        const kn::SampleMasks masks{static_cast<int32_t*>(U(mask_row)), static_cast<uint32_t*>(U(mask_words))};
        kn::sample_rows(d_logits, n_rows, n_vocab, static_cast<kn::GreedyRowParams*>(U(gp)), masks,
                        static_cast<int32_t*>(U(bias_pairs)), static_cast<int32_t*>(U(bias_ids)),
                        static_cast<float*>(U(bias_vals)), static_cast<int32_t*>(U(pen_off)),
                        static_cast<int32_t*>(U(pen_ids)), static_cast<int32_t*>(U(pen_counts)),
                        static_cast<kn::DistRowParams*>(U(dist)), int64_t(dist.size()), int64_t(n_sort), int64_t(n_select),
                        static_cast<kn::LogprobRowParams*>(U(lp)), int64_t(lp.size()), ws, ws_bytes, d_ids, d_lp,
                        nullptr);
        CUDA_CHECK(cudaMemcpy(got.data(), d_ids, got.size() * 4, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(got_lp.data(), d_lp, got_lp.size() * sizeof(kn::LogprobOut), cudaMemcpyDeviceToHost));
        for (void* p : owned) cudaFree(p);
        int n_mismatch = 0;
        for (int32_t r = 0; r < n_rows; ++r)
            if (got[r] != want[r]) {
                if (++n_mismatch <= 5)
                    MESSAGE("row " << r << ": gpu " << got[r] << " cpu " << want[r] << " t " << params[r].temperature
                                   << " k " << params[r].top_k << " p " << params[r].top_p << " minp " << params[r].min_p);
            }
        int n_lp_mismatch = 0;
        float lp_err = 0.0f;
        int n_lp_skipped = 0;
        for (size_t j = 0; j < lp.size(); ++j) {
            const int32_t r = lp[j].row;
            const auto& w = want_lp[r];
            // A +inf logit makes log_softmax NaN everywhere (inf - inf): no order to compare.
            if (std::any_of(logits.begin() + size_t(r) * n_vocab, logits.begin() + size_t(r + 1) * n_vocab,
                            [](float v) { return v == INFINITY; })) {
                ++n_lp_skipped;
                continue;
            }
            if (got_lp[j].n != int32_t(w.size())) {
                ++n_lp_mismatch;
                continue;
            }
            for (size_t t = 0; t < w.size(); ++t) {
                if (got_lp[j].ids[t] != w[t].id) ++n_lp_mismatch;
                if (std::isfinite(w[t].logprob)) lp_err = std::max(lp_err, std::abs(got_lp[j].logprobs[t] - w[t].logprob));
            }
            if (want[r] >= 0) {
                std::vector<float> row(logits.begin() + size_t(r) * n_vocab, logits.begin() + size_t(r + 1) * n_vocab);
                const float cl = token_logprob(row.data(), n_vocab, want[r]);
                if (std::isfinite(cl)) lp_err = std::max(lp_err, std::abs(got_lp[j].chosen - cl));
            }
        }
        MESSAGE("sampling n_vocab " << n_vocab << ": " << n_rows << " rows (" << dist.size() << " full chain, " << n_sort << " of them sorted, " << n_select << " by top-k select, "
                                    << lp.size() << " with logprobs, " << n_lp_skipped << " of them with +inf skipped): "
                                    << n_mismatch << " mismatches; top-logprob id mismatches " << n_lp_mismatch << ", max |logprob diff| " << lp_err);
        CHECK(n_mismatch == 0);
        CHECK(n_lp_mismatch == 0);
        // The CPU sums exp() serially in float over the whole row: its error grows with n_vocab.
        CHECK(lp_err < 1e-3f);
    }
}
