#include "model_config.h"

#include <cmath>

namespace coinfer {

namespace {

int64_t positive(const GgufFile& f, const std::string& key, int64_t v, int64_t max = 1 << 24) {
    if (v <= 0 || v > max)
        throw_error("{}: metadata key '{}' = {} is out of range (1..{})", f.path(), key, v, max);
    return v;
}

}  // namespace

ModelConfig ModelConfig::from_gguf(const GgufFile& f) {
    ModelConfig c;
    c.arch = f.get<std::string>("general.architecture");
    if (c.arch != "llama" && c.arch != "mistral" && c.arch != "qwen2")
        throw_error("{}: unsupported architecture '{}' (supported: llama, mistral, qwen2)", f.path(), c.arch);
    c.name = f.get_opt<std::string>("general.name").value_or("");
    const std::string a = c.arch + ".";
    auto req = [&](const std::string& k, int64_t max = 1 << 24) {
        return positive(f, a + k, f.get_int(a + k), max);
    };
    c.n_ctx_train = req("context_length", int64_t(1) << 32);
    c.n_embd = req("embedding_length");
    c.n_layer = req("block_count", 4096);
    c.n_ff = req("feed_forward_length");
    c.n_head = req("attention.head_count", 4096);
    c.n_head_kv = f.has(a + "attention.head_count_kv") ? req("attention.head_count_kv", 4096) : c.n_head;
    if (c.n_head % c.n_head_kv != 0)
        throw_error("{}: head_count {} is not a multiple of head_count_kv {}", f.path(), c.n_head, c.n_head_kv);
    if (f.has(a + "attention.key_length")) {
        c.head_dim = req("attention.key_length", 4096);
        if (f.has(a + "attention.value_length") && req("attention.value_length", 4096) != c.head_dim)
            throw_error("{}: attention.value_length differs from key_length, which is not supported", f.path());
    } else {
        if (c.n_embd % c.n_head != 0)
            throw_error("{}: embedding_length {} is not a multiple of head_count {}", f.path(), c.n_embd, c.n_head);
        c.head_dim = c.n_embd / c.n_head;
    }
    if (c.head_dim % 2 != 0) throw_error("{}: head dimension {} is odd", f.path(), c.head_dim);
    c.n_rot = f.has(a + "rope.dimension_count") ? req("rope.dimension_count", 4096) : c.head_dim;
    if (c.n_rot > c.head_dim || c.n_rot % 2 != 0)
        throw_error("{}: rope.dimension_count {} must be even and at most the head dimension {}",
                    f.path(), c.n_rot, c.head_dim);
    if (auto eps = f.get_float_opt(a + "attention.layer_norm_rms_epsilon")) {
        if (!(*eps > 0 && *eps < 1)) throw_error("{}: rms epsilon {} is out of range", f.path(), *eps);
        c.rms_eps = static_cast<float>(*eps);
    }
    if (auto base = f.get_float_opt(a + "rope.freq_base")) {
        if (!(*base > 0 && std::isfinite(*base))) throw_error("{}: rope.freq_base {} is out of range", f.path(), *base);
        c.rope_freq_base = static_cast<float>(*base);
    }
    c.rope_type = c.arch == "qwen2" ? ROPE_TYPE_NEOX : ROPE_TYPE_NORM;

    // Rope scaling: {arch}.rope.scaling.type (string) + .factor, or the older .rope.scale_linear.
    std::string scaling = f.get_opt<std::string>(a + "rope.scaling.type").value_or("none");
    if (scaling == "none") c.rope_scaling = ROPE_SCALING_NONE;
    else if (scaling == "linear") c.rope_scaling = ROPE_SCALING_LINEAR;
    else if (scaling == "yarn") c.rope_scaling = ROPE_SCALING_YARN;
    else if (scaling == "llama3") c.rope_scaling = ROPE_SCALING_LLAMA3;
    else throw_error("{}: unsupported rope scaling type '{}'", f.path(), scaling);
    if (auto factor = f.get_float_opt(a + "rope.scaling.factor")) {
        c.rope_scaling_factor = static_cast<float>(*factor);
    } else if (auto lin = f.get_float_opt(a + "rope.scale_linear")) {
        c.rope_scaling = ROPE_SCALING_LINEAR;
        c.rope_scaling_factor = static_cast<float>(*lin);
    }
    if (!(c.rope_scaling_factor > 0 && std::isfinite(c.rope_scaling_factor)))
        throw_error("{}: rope scaling factor {} is out of range", f.path(), c.rope_scaling_factor);
    if (c.rope_scaling_factor == 1.0f && c.rope_scaling == ROPE_SCALING_LINEAR) c.rope_scaling = ROPE_SCALING_NONE;
    c.rope_orig_ctx = f.get_int_opt(a + "rope.scaling.original_context_length").value_or(0);
    if (c.rope_orig_ctx < 0 || c.rope_orig_ctx > (int64_t(1) << 32))
        throw_error("{}: rope.scaling.original_context_length {} is out of range", f.path(), c.rope_orig_ctx);
    auto yarn_param = [&](const std::string& key, float def, float lo, float hi) {
        auto v = f.get_float_opt(a + key);
        if (!v) return def;
        if (!(std::isfinite(*v) && *v >= lo && *v <= hi))
            throw_error("{}: {} {} is out of range [{}, {}]", f.path(), key, *v, lo, hi);
        return static_cast<float>(*v);
    };
    c.rope_yarn_ext_factor = yarn_param("rope.scaling.yarn_ext_factor", c.rope_scaling == ROPE_SCALING_YARN ? 1.0f : 0.0f,
                                        0.0f, 1.0f);
    c.rope_yarn_attn_factor = yarn_param("rope.scaling.attn_factor", 1.0f, 1e-3f, 1e3f);
    c.rope_yarn_attn_factor = yarn_param("rope.scaling.yarn_attn_factor", c.rope_yarn_attn_factor, 1e-3f, 1e3f);
    c.rope_yarn_beta_fast = yarn_param("rope.scaling.yarn_beta_fast", 32.0f, 1e-3f, 1e6f);
    c.rope_yarn_beta_slow = yarn_param("rope.scaling.yarn_beta_slow", 1.0f, 1e-3f, 1e6f);

    // Vocab size: the key if present, else the token list, else the embedding's second dim.
    const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
    if (auto n = f.get_int_opt(a + "vocab_size")) c.n_vocab = positive(f, a + "vocab_size", *n);
    else if (f.has("tokenizer.ggml.tokens")) c.n_vocab = static_cast<int64_t>(f.get<GgufArray>("tokenizer.ggml.tokens").size());
    else if (embd) c.n_vocab = embd->ne[1];
    if (c.n_vocab <= 0) throw_error("{}: cannot tell the vocabulary size", f.path());
    c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
    c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
    return c;
}

}  // namespace coinfer
