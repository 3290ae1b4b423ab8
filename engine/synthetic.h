#pragma once
// Synthetic models: random Llama weights of a named shape, built in memory
// (Model::load("synthetic:SHAPE[:TYPE][:ctx=N]"), ctx= overriding the shape's context length) or streamed to a GGUF file (`coinfer synth`), so any
// shape can be benchmarked on any machine and the very same file can be loaded by another engine.
//
// Weights are normal with std 0.02 from a counter-based generator keyed by (seed, tensor name,
// element index): every element is a pure function of those, so the in-memory model and the file
// hold the same bits whatever the thread count. Norms are 1. Every matrix, token_embd and output
// included, is stored in TYPE (like llama-quantize --pure), quantized row by row with our own
// quantize_row; nothing model-sized is ever held in F32.
//
// The tokenizer is a small built-in SentencePiece vocabulary (<unk>, <s>, </s>, 256 byte tokens,
// printable ASCII, then filler pieces) unless the tokenizer.* keys of a vocab GGUF are given.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "io/gguf.h"
#include "model.h"

namespace coinfer {

struct SyntheticShape {
    std::string name;
    int64_t n_embd = 0;
    int64_t n_layer = 0;
    int64_t n_head = 0;
    int64_t n_head_kv = 0;
    int64_t n_ff = 0;
    int64_t n_vocab = 0;
    int64_t n_ctx = 0;
    float rope_freq_base = 10000.0f;
    // Llama 3.1's long-context RoPE: rope_freqs.weight from (factor, low / high frequency
    // factors, original context); 0 = none.
    float llama31_rope_factor = 0.0f;
};

// tiny, tinyllama-1.1b, llama2-7b, llama3-8b, llama3.1-8b (131,072-token context), llama2-70b,
// llama3-70b.
const std::vector<SyntheticShape>& synthetic_shapes();
// The shape of that name; Error listing the known ones otherwise.
const SyntheticShape& synthetic_shape(std::string_view name);
// The weight types of a synthetic model: one type, or llama-quantize's _M mix of it.
struct SyntheticWeights {
    GgmlType type = GGML_TYPE_F16;
    // llama.cpp's Q4_K_M / Q5_K_M choices: Q6_K for output.weight, and for attn_v and ffn_down
    // in the layers its use_more_bits picks (the first and last eighth, every third between).
    bool mix_m = false;
};
// "f16", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m"; Error otherwise.
SyntheticWeights synthetic_type(std::string_view name);

struct SyntheticSpec {
    SyntheticShape shape;
    GgmlType type = GGML_TYPE_F16;
    bool mix_m = false;  // see SyntheticWeights
    uint64_t seed = 0x5EEDC0F1u;
    int32_t n_threads = 0;  // 0: std::thread::hardware_concurrency()
};

// True when `path` names a synthetic model ("synthetic:...").
bool is_synthetic_path(std::string_view path);
// "synthetic:SHAPE[:TYPE]" -> spec; Error naming the bad part.
SyntheticSpec parse_synthetic_path(std::string_view path);

// Builds the model in memory (one GGUF image, tensors generated in place in parallel).
std::shared_ptr<const Model> make_synthetic_model(const SyntheticSpec& spec);

// Writes the model as a GGUF file, tensor by tensor (memory use: one tensor). With `vocab`,
// its tokenizer.* keys replace the built-in tokenizer; the tiny shape adopts the vocab's size,
// the others must match it (Error otherwise). on_tensor(i, n) reports progress.
void write_synthetic_gguf(const SyntheticSpec& spec, const std::string& path, const GgufFile* vocab = nullptr,
                          const std::function<void(size_t, size_t)>& on_tensor = {});

}  // namespace coinfer
