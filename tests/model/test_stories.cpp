// Golden tests of the CPU reference engine on stories260K against llama.cpp's recorded outputs.
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "engine/generate.h"
#include "test_models.h"

using namespace coinfer;

namespace {

struct Fixture {
    std::shared_ptr<const Model> model;
    std::unique_ptr<Backend> backend;
    std::unique_ptr<KvBlockPool> pool;
};

std::optional<Fixture> load(int32_t n_blocks = 256, KvType kv_type = KV_TYPE_AUTO) {
    auto path = test::model_file("stories260K.gguf");
    if (!path) return std::nullopt;
    Fixture f;
    f.model = Model::load(*path);
    BackendOptions opt;
    opt.n_blocks = n_blocks;
    opt.kv_type = kv_type;
    f.backend = make_cpu_backend(f.model, opt);
    f.pool = std::make_unique<KvBlockPool>(f.backend->n_blocks(), f.backend->block_size());
    return f;
}

nlohmann::json load_refs() {
    auto path = test::model_file("refs/stories260K-greedy.json");
    if (!path) return {};
    std::ifstream in(*path);
    return nlohmann::json::parse(in);
}

std::string read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
}

}  // namespace

TEST_CASE("stories260K greedy matches llama.cpp: ids, text and logits after the prompt") {
    auto f = load();
    auto refs = load_refs();
    if (!f || refs.is_null()) return;
    for (const auto& r : refs["results"]) {
        const std::string prompt = r["prompt"];
        CAPTURE(prompt);
        auto ids = f->model->tokenizer().encode(prompt, true, true);
        CHECK(ids == r["prompt_ids"].get<std::vector<TokenId>>());

        // Logits after the prompt, within 1e-3 of llama.cpp's.
        KvBlockPool& pool = *f->pool;
        auto blocks = pool.kv_block_alloc_n(4).value();
        Batch b;
        int32_t s = b.add_seq(blocks);
        for (size_t i = 0; i < ids.size(); ++i) b.add(ids[i], static_cast<int32_t>(i), s, i + 1 == ids.size());
        std::vector<float> logits(512);
        f->backend->forward(b, logits);
        auto ref_logits = r["logits_after_prompt"].get<std::vector<float>>();
        REQUIRE(ref_logits.size() == logits.size());
        float max_diff = 0;
        for (size_t i = 0; i < logits.size(); ++i) max_diff = std::max(max_diff, std::abs(logits[i] - ref_logits[i]));
        MESSAGE("max |logit - llama.cpp| after '" << prompt << "': " << max_diff);
        CHECK(max_diff < 1e-3f);
        pool.kv_block_free_seq(blocks);

        GenerateOptions opt;
        opt.max_tokens = 64;
        opt.sampling.temperature = 0;
        opt.ignore_eos = true;
        auto res = generate(*f->backend, pool, *f->model, ids, opt);
        CHECK(res.ids == r["generated_ids"].get<std::vector<TokenId>>());
        CHECK(res.text == r["generated_text"].get<std::string>());
        CHECK(pool.n_free() == pool.n_blocks());

        // Teacher-forced in one batch: every step's recorded top-5 logits agree too.
        const auto& steps = r["steps"];
        REQUIRE(steps.size() == 64);
        std::vector<TokenId> all = ids;
        for (const auto& st : steps) all.push_back(st["id"].get<TokenId>());
        blocks = pool.kv_block_alloc_n(8).value();
        Batch tf;
        s = tf.add_seq(blocks);
        for (size_t i = 0; i + 1 < all.size(); ++i) tf.add(all[i], static_cast<int32_t>(i), s, i + 1 >= ids.size());
        std::vector<float> tl(tf.logit_rows.size() * 512);
        f->backend->forward(tf, tl);
        float step_diff = 0;
        for (size_t k = 0; k < steps.size(); ++k)
            for (const auto& pair : steps[k]["top5"])
                step_diff = std::max(step_diff, std::abs(tl[k * 512 + pair[0].get<size_t>()] - pair[1].get<float>()));
        MESSAGE("max |top-5 logit - llama.cpp| over 64 steps: " << step_diff);
        CHECK(step_diff < 1e-3f);
        pool.kv_block_free_seq(blocks);
    }
}

TEST_CASE("stories260K perplexity on tale.txt matches llama.cpp") {
    auto f = load();
    auto tale = test::model_file("refs/tale.txt");
    if (!f || !tale) return;
    std::string text = read(*tale);
    auto r128 = perplexity(*f->backend, *f->pool, *f->model, text, 128);
    MESSAGE("PPL c=128: " << r128.ppl << " +/- " << r128.ppl_stderr << " (" << r128.n_chunks << " chunks)");
    CHECK(std::abs(r128.ppl - 4.4525) <= 5e-4);
    CHECK(r128.n_chunks == 6);
    CHECK(std::abs(r128.ppl_stderr - 0.36864) < 1e-3);
    auto r64 = perplexity(*f->backend, *f->pool, *f->model, text, 64);
    MESSAGE("PPL c=64: " << r64.ppl << " +/- " << r64.ppl_stderr);
    CHECK(std::abs(r64.ppl - 5.1807) <= 5e-4);
    CHECK(std::abs(r64.ppl_stderr - 0.47521) < 1e-3);
    CHECK(f->pool->n_free() == f->pool->n_blocks());
}

TEST_CASE("stories260K perplexity with a quantized KV cache") {
    // llama.cpp's q8_0 blocks within 1% of the F16 cache's perplexity, fp8 (E4M3, a scale per
    // head) within 3%; tale.txt, c = 128.
    auto tale = test::model_file("refs/tale.txt");
    if (!tale || !load()) return;
    const std::string text = read(*tale);
    auto ppl = [&](KvType t) {
        auto f = load(256, t);
        const double p = perplexity(*f->backend, *f->pool, *f->model, text, 128).ppl;
        MESSAGE("PPL c=128, KV " << kv_type_name(t) << ": " << p);
        return p;
    };
    const double p32 = ppl(KV_TYPE_F32), p16 = ppl(KV_TYPE_F16), p8 = ppl(KV_TYPE_Q8_0), pf8 = ppl(KV_TYPE_FP8);
    CHECK(std::abs(p32 - 4.4525) <= 5e-4);
    CHECK(std::abs(p16 - p32) / p32 < 0.01);
    CHECK(std::abs(p8 - p16) / p16 < 0.01);
    CHECK(std::abs(pf8 - p16) / p16 < 0.03);
    CHECK(p8 != p16);  // the cache really is quantized
}

TEST_CASE("a ragged batch gives each sequence the same logits bits as running it alone") {
    auto f = load(2048);
    if (!f) return;
    std::mt19937 rng(1234);
    const int32_t n_vocab = 512, bs = f->backend->block_size();
    for (int32_t n_seqs : {1, 2, 5, 17, 64}) {
        CAPTURE(n_seqs);
        // Each sequence: a random prefix already in the cache, then a chunk of new tokens.
        struct Seq {
            std::vector<TokenId> ids;
            int32_t n_cached;
            std::vector<int32_t> blocks;
        };
        std::vector<Seq> seqs(static_cast<size_t>(n_seqs));
        for (auto& s : seqs) {
            int32_t len = std::uniform_int_distribution<int32_t>(1, 40)(rng);
            s.ids.push_back(1);
            for (int32_t i = 1; i < len; ++i) s.ids.push_back(std::uniform_int_distribution<int32_t>(3, n_vocab - 1)(rng));
            s.n_cached = std::uniform_int_distribution<int32_t>(0, len - 1)(rng);
        }
        auto run = [&](const std::vector<size_t>& which) {
            // Prefill each sequence's cached part alone, then run the new parts as one batch.
            for (size_t k : which) {
                auto& s = seqs[k];
                s.blocks = f->pool->kv_block_alloc_n((static_cast<int32_t>(s.ids.size()) + bs - 1) / bs).value();
                if (s.n_cached > 0) {
                    Batch pre;
                    int32_t si = pre.add_seq(s.blocks);
                    for (int32_t i = 0; i < s.n_cached; ++i) pre.add(s.ids[i], i, si, false);
                    f->backend->forward(pre, {});
                }
            }
            Batch b;
            for (size_t k : which) {
                auto& s = seqs[k];
                int32_t si = b.add_seq(s.blocks);
                for (int32_t i = s.n_cached; i < static_cast<int32_t>(s.ids.size()); ++i)
                    b.add(s.ids[i], i, si, true);
            }
            std::vector<float> logits(b.logit_rows.size() * n_vocab);
            f->backend->forward(b, logits);
            for (size_t k : which) f->pool->kv_block_free_seq(seqs[k].blocks);
            return logits;
        };
        std::vector<size_t> all(static_cast<size_t>(n_seqs));
        for (size_t k = 0; k < all.size(); ++k) all[k] = k;
        auto batched = run(all);
        size_t row = 0;
        bool same = true;
        for (size_t k = 0; k < all.size(); ++k) {
            auto alone = run({k});
            for (size_t i = 0; i < alone.size(); ++i) same &= std::memcmp(&alone[i], &batched[row * n_vocab + i], 4) == 0;
            row += alone.size() / n_vocab;
        }
        CHECK(same);
        CHECK(f->pool->n_free() == f->pool->n_blocks());
    }
}
