#pragma once
// Llama-family hyper-parameters read from a GGUF file's `{arch}.*` keys.
#include <cstdint>
#include <string>

#include "gguf.h"

namespace coinfer {

enum RopeType {
    ROPE_TYPE_NORM,  // adjacent pairs (x[2i], x[2i+1]): llama, mistral
    ROPE_TYPE_NEOX,  // halves (x[i], x[i + n_rot/2]): qwen2
};

enum RopeScaling {
    ROPE_SCALING_NONE,
    ROPE_SCALING_LINEAR,
    ROPE_SCALING_YARN,
    ROPE_SCALING_LLAMA3,
};

struct ModelConfig {
    std::string arch;  // "llama", "mistral" or "qwen2"
    std::string name;  // general.name, may be empty
    int64_t n_ctx_train = 0;
    int64_t n_embd = 0;
    int64_t n_layer = 0;
    int64_t n_ff = 0;
    int64_t n_head = 0;
    int64_t n_head_kv = 0;
    int64_t head_dim = 0;  // n_embd / n_head unless attention.key_length says otherwise
    int64_t n_rot = 0;     // rope dimension count
    float rms_eps = 1e-5f;
    float rope_freq_base = 10000.0f;
    RopeType rope_type = ROPE_TYPE_NORM;
    RopeScaling rope_scaling = ROPE_SCALING_NONE;
    float rope_scaling_factor = 1.0f;
    int64_t rope_orig_ctx = 0;  // rope.scaling.original_context_length, 0 when absent
    // YaRN (engine/rope_table.h): rope.scaling.yarn_ext_factor (1 for yarn when absent, else 0),
    // .yarn_attn_factor (or .attn_factor), .yarn_beta_fast, .yarn_beta_slow.
    float rope_yarn_ext_factor = 0.0f;
    float rope_yarn_attn_factor = 1.0f;
    float rope_yarn_beta_fast = 32.0f;
    float rope_yarn_beta_slow = 1.0f;
    int64_t n_vocab = 0;
    bool tied_embeddings = false;  // no output.weight: the LM head reuses token_embd.weight
    bool qkv_bias = false;         // qwen2's attn_{q,k,v}.bias

    int64_t n_embd_kv() const { return n_head_kv * head_dim; }
    int64_t n_gqa() const { return n_head / n_head_kv; }

    // Reads and checks the config. Unsupported architectures and inconsistent shapes are Errors
    // naming the key.
    static ModelConfig from_gguf(const GgufFile& file);
};

}  // namespace coinfer
