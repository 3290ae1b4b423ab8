// Model hyper-parameters from GGUF metadata: the shared models and hand-written files.
#include <doctest/doctest.h>

#include <cmath>

#include "io/gguf.h"
#include "io/model_config.h"
#include "test_models.h"

using namespace coinfer;

namespace {

GgufWriter base(const std::string& arch) {
    GgufWriter w;
    w.set("general.architecture", arch);
    w.set(arch + ".context_length", uint32_t(4096));
    w.set(arch + ".embedding_length", uint32_t(4096));
    w.set(arch + ".block_count", uint32_t(32));
    w.set(arch + ".feed_forward_length", uint32_t(14336));
    w.set(arch + ".attention.head_count", uint32_t(32));
    w.set(arch + ".attention.head_count_kv", uint32_t(8));
    w.set(arch + ".attention.layer_norm_rms_epsilon", 1e-6f);
    w.set(arch + ".vocab_size", uint32_t(32000));
    return w;
}

ModelConfig parse(const GgufWriter& w) { return ModelConfig::from_gguf(GgufFile::from_bytes(w.to_bytes(), "test.gguf")); }

std::string error_of(const GgufWriter& w) {
    try {
        parse(w);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

}  // namespace

TEST_CASE("stories260K: the config llama.cpp reports") {
    auto path = test::model_file("stories260K.gguf");
    if (!path) return;
    auto c = ModelConfig::from_gguf(GgufFile::open(*path));
    CHECK(c.arch == "llama");
    CHECK(c.n_layer == 5);
    CHECK(c.n_embd == 64);
    CHECK(c.n_head == 8);
    CHECK(c.n_head_kv == 4);
    CHECK(c.head_dim == 8);
    CHECK(c.n_rot == 8);
    CHECK(c.n_ff == 172);
    CHECK(c.n_vocab == 512);
    CHECK(c.n_ctx_train == 2048);
    CHECK(c.rms_eps == doctest::Approx(1e-5));
    CHECK(c.rope_freq_base == 10000.0f);
    CHECK(c.rope_type == ROPE_TYPE_NORM);
    CHECK(!c.tied_embeddings);
    CHECK(!c.qkv_bias);
}

TEST_CASE("llama-2-tiny-random: MHA, F16") {
    auto path = test::model_file("llama-2-tiny-random.gguf");
    if (!path) return;
    auto c = ModelConfig::from_gguf(GgufFile::open(*path));
    CHECK(c.n_head == 2);
    CHECK(c.n_head_kv == 2);
    CHECK(c.n_rot == 4);
    CHECK(c.n_vocab == 32000);
}

TEST_CASE("mistral and qwen2 read their own keys; qwen2 uses NeoX rope") {
    auto m = parse(base("mistral"));
    CHECK(m.arch == "mistral");
    CHECK(m.n_gqa() == 4);
    CHECK(m.head_dim == 128);
    CHECK(m.rope_type == ROPE_TYPE_NORM);
    auto q = base("qwen2");
    q.set("qwen2.rope.freq_base", 1000000.0f);
    auto qc = parse(q);
    CHECK(qc.rope_type == ROPE_TYPE_NEOX);
    CHECK(qc.rope_freq_base == 1000000.0f);
    CHECK(qc.tied_embeddings);  // no output.weight in this file
}

TEST_CASE("rope scaling type and factor") {
    auto w = base("llama");
    w.set("llama.rope.scaling.type", std::string("linear"));
    w.set("llama.rope.scaling.factor", 4.0f);
    auto c = parse(w);
    CHECK(c.rope_scaling == ROPE_SCALING_LINEAR);
    CHECK(c.rope_scaling_factor == 4.0f);
    auto y = base("llama");
    y.set("llama.rope.scaling.type", std::string("yarn"));
    y.set("llama.rope.scaling.factor", 8.0f);
    y.set("llama.rope.scaling.original_context_length", uint32_t(8192));
    auto yc = parse(y);
    CHECK(yc.rope_scaling == ROPE_SCALING_YARN);
    CHECK(yc.rope_orig_ctx == 8192);
    // YaRN's defaults (llama.cpp's): full extrapolation mix, attention factor 1, betas 32 / 1.
    CHECK(yc.rope_yarn_ext_factor == 1.0f);
    CHECK(yc.rope_yarn_attn_factor == 1.0f);
    CHECK(yc.rope_yarn_beta_fast == 32.0f);
    CHECK(yc.rope_yarn_beta_slow == 1.0f);
    CHECK(c.rope_yarn_ext_factor == 0.0f);  // linear: no mix
    y.set("llama.rope.scaling.yarn_beta_fast", 16.0f);
    y.set("llama.rope.scaling.attn_factor", 0.5f);
    auto yc2 = parse(y);
    CHECK(yc2.rope_yarn_beta_fast == 16.0f);
    CHECK(yc2.rope_yarn_attn_factor == 0.5f);
    y.set("llama.rope.scaling.yarn_ext_factor", 2.0f);
    CHECK(error_of(y).find("yarn_ext_factor") != std::string::npos);
    y.set("llama.rope.scaling.yarn_ext_factor", std::nanf(""));
    CHECK(error_of(y).find("yarn_ext_factor") != std::string::npos);
    auto bad = base("llama");
    bad.set("llama.rope.scaling.type", std::string("wobbly"));
    CHECK(error_of(bad).find("wobbly") != std::string::npos);
}

TEST_CASE("errors name the architecture or the key") {
    CHECK(error_of(base("gpt2")).find("unsupported architecture 'gpt2'") != std::string::npos);
    auto w = base("llama");
    w.set("llama.block_count", std::string("thirty-two"));
    CHECK(error_of(w).find("llama.block_count") != std::string::npos);
    GgufWriter missing;
    missing.set("general.architecture", std::string("llama"));
    CHECK(error_of(missing).find("llama.context_length") != std::string::npos);
    auto heads = base("llama");
    heads.set("llama.attention.head_count_kv", uint32_t(7));
    CHECK(error_of(heads).find("head_count_kv") != std::string::npos);
    auto zero = base("llama");
    zero.set("llama.embedding_length", uint32_t(0));
    CHECK(error_of(zero).find("embedding_length") != std::string::npos);
}
