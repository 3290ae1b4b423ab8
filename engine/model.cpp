#include "model.h"

#include "quant.h"
#include "synthetic.h"

namespace coinfer {

namespace {

class Loader {
public:
    Loader(const GgufFile& f, const ModelConfig& c) : f_(f), c_(c) {}

    const GgufTensorInfo& get(const std::string& name) const {
        const GgufTensorInfo* t = f_.find_tensor(name);
        if (!t) throw_error("{}: tensor '{}' is missing", f_.path(), name);
        return *t;
    }

    WeightView matrix(const std::string& name, int64_t n_in, int64_t n_out) const {
        return view(get(name), n_in, n_out);
    }

    WeightView view(const GgufTensorInfo& t, int64_t n_in, int64_t n_out) const {
        if (!quant_supported(t.type))
            throw_error("{}: tensor '{}' has type {}, which is not supported (supported: F32, F16, "
                        "BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                        f_.path(), t.name, ggml_type_name(t.type));
        if (t.n_dims != 2 || t.ne[0] != n_in || t.ne[1] != n_out)
            throw_error("{}: tensor '{}' has shape [{}, {}] ({} dims), expected [{}, {}]", f_.path(),
                        t.name, t.ne[0], t.ne[1], t.n_dims, n_in, n_out);
        WeightView w;
        w.type = t.type;
        w.n_in = n_in;
        w.n_out = n_out;
        w.data = t.data;
        w.row_bytes = quant_row_bytes(t.type, n_in);
        return w;
    }

    // A 1-D tensor of n values, converted to F32 (norms and biases are small).
    std::vector<float> vector(const std::string& name, int64_t n) const {
        const GgufTensorInfo& t = get(name);
        if (t.n_elements != static_cast<uint64_t>(n) || t.ne[0] != n)
            throw_error("{}: tensor '{}' has {} elements, expected {}", f_.path(), name, t.n_elements, n);
        if (!quant_supported(t.type) || quant_block_size(t.type) > n || n % quant_block_size(t.type) != 0)
            throw_error("{}: tensor '{}' has unsupported type {}", f_.path(), name, ggml_type_name(t.type));
        std::vector<float> v(static_cast<size_t>(n));
        dequantize_row(t.type, t.data, v.data(), n);
        return v;
    }

private:
    const GgufFile& f_;
    const ModelConfig& c_;
};

}  // namespace

std::shared_ptr<const Model> Model::load(const std::string& path) {
    if (is_synthetic_path(path)) return make_synthetic_model(parse_synthetic_path(path));
    return std::make_shared<const Model>(GgufFile::open(path));
}

std::shared_ptr<const Model> Model::from_file(GgufFile file) {
    return std::make_shared<const Model>(std::move(file));
}

Model::Model(GgufFile file) : file_(std::move(file)), config_(ModelConfig::from_gguf(file_)) {
    if (file_.has("tokenizer.ggml.model")) tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_gguf(file_));
    const ModelConfig& c = config_;
    if (tokenizer_ && tokenizer_->n_vocab() != c.n_vocab)
        throw_error("{}: the tokenizer has {} tokens but the model's vocabulary is {}", file_.path(),
                    tokenizer_->n_vocab(), c.n_vocab);

    Loader l(file_, c);
    const int64_t n_q = c.n_head * c.head_dim;
    const int64_t n_kv = c.n_embd_kv();
    ModelWeights& w = weights_;
    w.token_embd = l.matrix("token_embd.weight", c.n_embd, c.n_vocab);
    w.output_norm = l.vector("output_norm.weight", c.n_embd);
    w.output = c.tied_embeddings ? w.token_embd : l.matrix("output.weight", c.n_embd, c.n_vocab);
    if (file_.find_tensor("rope_freqs.weight")) w.rope_freqs = l.vector("rope_freqs.weight", c.n_rot / 2);
    w.layers.resize(static_cast<size_t>(c.n_layer));
    for (int64_t i = 0; i < c.n_layer; ++i) {
        const std::string p = "blk." + std::to_string(i) + ".";
        LayerWeights& L = w.layers[static_cast<size_t>(i)];
        L.attn_norm = l.vector(p + "attn_norm.weight", c.n_embd);
        L.wq = l.matrix(p + "attn_q.weight", c.n_embd, n_q);
        L.wk = l.matrix(p + "attn_k.weight", c.n_embd, n_kv);
        L.wv = l.matrix(p + "attn_v.weight", c.n_embd, n_kv);
        if (c.qkv_bias) {
            L.bq = l.vector(p + "attn_q.bias", n_q);
            L.bk = l.vector(p + "attn_k.bias", n_kv);
            L.bv = l.vector(p + "attn_v.bias", n_kv);
        }
        L.wo = l.matrix(p + "attn_output.weight", n_q, c.n_embd);
        L.ffn_norm = l.vector(p + "ffn_norm.weight", c.n_embd);
        L.w_gate = l.matrix(p + "ffn_gate.weight", c.n_embd, c.n_ff);
        L.w_up = l.matrix(p + "ffn_up.weight", c.n_embd, c.n_ff);
        L.w_down = l.matrix(p + "ffn_down.weight", c.n_ff, c.n_embd);
    }
}

}  // namespace coinfer
