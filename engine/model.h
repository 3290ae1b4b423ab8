#pragma once
// A loaded model: the mapped GGUF file, its config and tokenizer, and views of its weights.
// Weights stay in the file's format; nothing is inflated to F32 except the small norm vectors.
#include <memory>
#include <string>
#include <vector>

#include "../io/gguf.h"
#include "../io/model_config.h"
#include "../io/tokenizer.h"

namespace coinfer {

// A matrix of n_out rows of n_in elements in its file format (GGUF ne = [n_in, n_out]).
struct WeightView {
    GgmlType type = GGML_TYPE_F32;
    int64_t n_in = 0;
    int64_t n_out = 0;
    const uint8_t* data = nullptr;  // into the mapped file
    size_t row_bytes = 0;

    bool empty() const { return data == nullptr; }
    const uint8_t* row(int64_t i) const { return data + static_cast<size_t>(i) * row_bytes; }
};

struct LayerWeights {
    std::vector<float> attn_norm;    // [n_embd]
    WeightView wq;                   // [n_embd] -> [n_head * head_dim]
    WeightView wk;                   // [n_embd] -> [n_head_kv * head_dim]
    WeightView wv;                   // [n_embd] -> [n_head_kv * head_dim]
    std::vector<float> bq, bk, bv;   // qwen2 biases, empty otherwise
    WeightView wo;                   // [n_head * head_dim] -> [n_embd]
    std::vector<float> ffn_norm;     // [n_embd]
    WeightView w_gate;               // [n_embd] -> [n_ff]
    WeightView w_up;                 // [n_embd] -> [n_ff]
    WeightView w_down;               // [n_ff] -> [n_embd]
};

struct ModelWeights {
    WeightView token_embd;           // [n_embd] x n_vocab rows
    std::vector<LayerWeights> layers;
    std::vector<float> output_norm;  // [n_embd]
    WeightView output;               // [n_embd] -> [n_vocab]; token_embd when tied
    std::vector<float> rope_freqs;   // [n_rot / 2] llama3-style frequency factors, or empty
};

class Model {
public:
    // Opens, validates and maps a model. "synthetic:SHAPE[:TYPE]" builds random weights in
    // memory instead (engine/synthetic.h). Shapes, types and names are checked against the config;
    // any mismatch is an Error naming the tensor.
    static std::shared_ptr<const Model> load(const std::string& path);
    static std::shared_ptr<const Model> from_file(GgufFile file);

    const GgufFile& file() const { return file_; }
    const ModelConfig& config() const { return config_; }
    bool has_tokenizer() const { return tokenizer_ != nullptr; }
    const Tokenizer& tokenizer() const {
        if (!tokenizer_) throw_error("{}: the model has no tokenizer (no tokenizer.ggml.* keys)", file_.path());
        return *tokenizer_;
    }
    const ModelWeights& weights() const { return weights_; }

    explicit Model(GgufFile file);

private:
    GgufFile file_;
    ModelConfig config_;
    std::unique_ptr<Tokenizer> tokenizer_;
    ModelWeights weights_;
};

}  // namespace coinfer
