// The CPU engine on quant-base in every weight format against llama.cpp's recorded runs:
// logits after each prompt, and 16 teacher-forced steps (../shared/models/quant/README.md).
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "engine/kv_pool.h"
#include "test_models.h"

using namespace coinfer;

namespace {

std::optional<nlohmann::json> read_json(const std::string& rel) {
    auto path = test::model_file(rel);
    if (!path) return std::nullopt;
    std::ifstream in(*path);
    return nlohmann::json::parse(in);
}

// Tolerance against llama.cpp's own logits (which round activations to the weights' dot type).
float llama_cpp_tolerance(const std::string& type) {
    if (type == "F32" || type == "F16") return 2e-3f;
    if (type == "BF16") return 2e-2f;
    return 0.1f;
}

struct Run {
    std::vector<float> after_prompt;       // [n_vocab]
    std::vector<std::vector<float>> steps;  // [16][n_vocab]: logits before each recorded step
};

// Prompt then the recorded ids, teacher-forced in one batch with logits from the last prompt row on.
Run run(Backend& backend, KvBlockPool& pool, const nlohmann::json& result) {
    auto prompt = result["prompt_ids"].get<std::vector<TokenId>>();
    auto gen = result["generated_ids"].get<std::vector<TokenId>>();
    std::vector<TokenId> all = prompt;
    all.insert(all.end(), gen.begin(), gen.end() - 1);
    auto blocks = pool.kv_block_alloc_n((static_cast<int32_t>(all.size()) + 15) / 16).value();
    Batch b;
    int32_t s = b.add_seq(blocks);
    for (size_t i = 0; i < all.size(); ++i) b.add(all[i], static_cast<int32_t>(i), s, i + 1 >= prompt.size());
    const size_t n_vocab = 512;
    std::vector<float> logits(b.logit_rows.size() * n_vocab);
    backend.forward(b, logits);
    pool.kv_block_free_seq(blocks);
    Run r;
    for (size_t k = 0; k < b.logit_rows.size(); ++k)
        r.steps.emplace_back(logits.begin() + k * n_vocab, logits.begin() + (k + 1) * n_vocab);
    r.after_prompt = r.steps[0];
    return r;
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    float m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
    return m;
}

}  // namespace

TEST_CASE("quant-base logits in every weight format match llama.cpp") {
    const char* types[] = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                           "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"};
    for (std::string type : types) {
        CAPTURE(type);
        auto path = test::model_file("quant/quant-base-" + type + ".gguf");
        auto ref = read_json("quant/logits/" + type + ".json");
        // F32 has no dequant file: its weights are exact, so llama.cpp's own run is the reference.
        auto exact = type == "F32" ? ref : read_json("quant/logits-dequant-f32/" + type + ".json");
        if (!path || !ref || !exact) continue;
        auto model = Model::load(*path);
        BackendOptions opt;
        opt.n_blocks = 8;
        auto backend = make_cpu_backend(model, opt);
        KvBlockPool pool(backend->n_blocks(), backend->block_size());
        const float tol = llama_cpp_tolerance(type);
        const float tol_exact = type == "F32" ? 2e-4f : 1e-4f;

        for (size_t p = 0; p < 2; ++p) {
            const auto& rr = (*ref)["results"][p];
            const auto& re = (*exact)["results"][p];
            CHECK(model->tokenizer().encode(rr["prompt"].get<std::string>(), true, true) ==
                  rr["prompt_ids"].get<std::vector<TokenId>>());
            Run got = run(*backend, pool, rr);
            float d_exact = max_abs_diff(got.after_prompt, re["logits_after_prompt"].get<std::vector<float>>());
            float d_ref = max_abs_diff(got.after_prompt, rr["logits_after_prompt"].get<std::vector<float>>());
            MESSAGE(type << " prompt " << p << ": max diff vs exact-dequant " << d_exact << ", vs llama.cpp " << d_ref);
            CHECK(d_exact <= tol_exact);
            CHECK(d_ref <= tol);

            // Teacher-forced steps (the recorded ids of the llama.cpp run).
            float step_ref = 0;
            int n_argmax_checked = 0;
            for (size_t k = 0; k < rr["steps"].size(); ++k) {
                const auto& top5 = rr["steps"][k]["top5"];
                const auto& row = got.steps[k];
                for (const auto& pair : top5)
                    step_ref = std::max(step_ref, std::abs(row[pair[0].get<size_t>()] - pair[1].get<float>()));
                const float gap = top5[0][1].get<float>() - top5[1][1].get<float>();
                if (gap > 2 * tol) {
                    const auto argmax = std::max_element(row.begin(), row.end()) - row.begin();
                    CHECK(argmax == top5[0][0].get<long>());
                    ++n_argmax_checked;
                }
            }
            MESSAGE(type << " prompt " << p << ": teacher-forced top-5 max diff " << step_ref << ", argmax checked at "
                         << n_argmax_checked << " of 16 steps");
            CHECK(step_ref <= tol);
            // The same steps against the exact-dequant run, whose recorded ids may differ: only
            // compare where the two runs fed the same tokens.
            if (re["generated_ids"] == rr["generated_ids"]) {
                float step_exact = 0;
                for (size_t k = 0; k < re["steps"].size(); ++k)
                    for (const auto& pair : re["steps"][k]["top5"])
                        step_exact = std::max(step_exact, std::abs(got.steps[k][pair[0].get<size_t>()] - pair[1].get<float>()));
                CHECK(step_exact <= tol_exact);
            }
        }
    }
}
