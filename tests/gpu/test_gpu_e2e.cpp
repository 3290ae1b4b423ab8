// End-to-end runs of the CUDA backend against the shared references and the CPU backend:
// stories260K greedy ids and perplexity, quant-base logits in every weight format, GPU vs CPU
// logits on a ragged batch, on-device greedy sampling, and batch invariance (alone vs 64).
// Without a CUDA device every case prints SKIP and passes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "engine/generate.h"
#include "test_models.h"

using namespace coinfer;

namespace {

bool have_gpu() {
    static const bool ok = [] {
        const bool a = cuda_device_available();
        if (!a) std::fprintf(stderr, "SKIP: no CUDA device (or a build without CUDA): GPU tests not run\n");
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
        for (int s : which) tables.push_back(*pool.kv_block_alloc_n(8));
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
