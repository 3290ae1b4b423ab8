// The CPU reference backend: F32 activations, weights read in their file format row by row,
// K/V in host memory shaped by the block tables, F32 by default or any kv_codec.h type. Every row is computed the same way
// whatever else is in the batch, so results are batch-invariant bit for bit.
#include <algorithm>
#include <cmath>
#include <limits>

#include "backend.h"
#include "kv_codec.h"
#include "quant.h"
#include "rope_table.h"

namespace coinfer {

void validate_batch(const Batch& b, const ModelConfig& c, int32_t n_blocks, int32_t block_size) {
    const size_t n = b.tokens.size();
    if (b.positions.size() != n || b.seq.size() != n)
        throw_error("batch: tokens, positions and seq have different lengths");
    for (size_t i = 0; i < n; ++i) {
        if (b.tokens[i] < 0 || b.tokens[i] >= c.n_vocab)
            throw_error("batch: token id {} at row {} is outside the vocabulary (0..{})", b.tokens[i], i, c.n_vocab - 1);
        if (b.seq[i] < 0 || b.seq[i] >= b.n_seqs())
            throw_error("batch: row {} names sequence {} of {}", i, b.seq[i], b.n_seqs());
        const auto& table = b.block_tables[static_cast<size_t>(b.seq[i])];
        int64_t pos = b.positions[i];
        if (pos < 0 || pos / block_size >= static_cast<int64_t>(table.size()))
            throw_error("batch: position {} at row {} is outside its block table ({} blocks)", pos, i, table.size());
    }
    for (const auto& table : b.block_tables)
        for (int32_t id : table)
            if (id < 0 || id >= n_blocks) throw_error("batch: block id {} is outside the pool (0..{})", id, n_blocks - 1);
    for (int32_t r : b.logit_rows)
        if (r < 0 || static_cast<size_t>(r) >= n) throw_error("batch: logit row {} is outside the batch", r);
}

namespace {

// y = x / rms(x) * w, summing squares in double as ggml does.
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
    const float scale = 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(n)) + eps);
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale * w[i];
}

class CpuBackend final : public Backend {
public:
    CpuBackend(std::shared_ptr<const Model> model, const BackendOptions& opt)
        : model_(std::move(model)), c_(model_->config()), opt_(opt) {
        kv_type_ = opt_.kv_type == KV_TYPE_AUTO ? KV_TYPE_F32 : opt_.kv_type;
        kv_row_ = kv_row_bytes(kv_type_, c_.n_embd_kv(), c_.head_dim);
        if (opt_.n_blocks <= 0) {
            // Enough for the training context of a few sequences, capped at ~1 GiB of K/V.
            int64_t per_block = 2 * c_.n_layer * opt_.block_size * int64_t(kv_row_);
            int64_t want = (std::min<int64_t>(c_.n_ctx_train, 8192) * 4 + opt_.block_size - 1) / opt_.block_size;
            opt_.n_blocks = static_cast<int32_t>(std::max<int64_t>(1, std::min(want, (int64_t(1) << 30) / per_block)));
        }
        const size_t slots = static_cast<size_t>(opt_.n_blocks) * opt_.block_size;
        k_.assign(static_cast<size_t>(c_.n_layer), std::vector<uint8_t>(slots * kv_row_));
        v_.assign(static_cast<size_t>(c_.n_layer), std::vector<uint8_t>(slots * kv_row_));
        rope_ = make_rope_table(c_, model_->weights().rope_freqs);
    }

    std::string name() const override { return "cpu"; }
    int32_t n_blocks() const override { return opt_.n_blocks; }
    int32_t block_size() const override { return opt_.block_size; }

    void forward(const Batch& b, std::span<float> logits) override;

private:
    void rope(float* x, int64_t n_heads, int32_t pos) const;
    void matmul_w(const WeightView& w, const float* x, int64_t n_rows, float* y) const {
        matmul(w.type, w.data, w.n_in, w.n_out, x, n_rows, y, opt_.n_threads);
    }

    std::shared_ptr<const Model> model_;
    const ModelConfig& c_;
    BackendOptions opt_;
    KvType kv_type_ = KV_TYPE_F32;
    size_t kv_row_ = 0;                        // bytes of one slot's K (or V) row
    std::vector<std::vector<uint8_t>> k_, v_;  // [n_layer][n_blocks * block_size][kv_row_]
    RopeTable rope_;                         // inv_freq [n_rot / 2], mscale
    // Scratch, reused across steps.
    std::vector<float> x_, h_, q_, k_new_, v_new_, attn_, ff_g_, ff_u_, tmp_, scores_;
    std::vector<float> k_rows_, v_rows_;  // [n_ctx, n_embd_kv]: one token's context, decoded
};

void CpuBackend::rope(float* x, int64_t n_heads, int32_t pos) const {
    const int64_t hd = c_.head_dim, half = c_.n_rot / 2;
    for (int64_t h = 0; h < n_heads; ++h) {
        float* v = x + h * hd;
        for (int64_t i = 0; i < half; ++i) {
            const float theta = static_cast<float>(pos) * rope_.inv_freq[static_cast<size_t>(i)];
            const float cs = std::cos(theta) * rope_.mscale, sn = std::sin(theta) * rope_.mscale;
            // NORM rotates adjacent pairs, NEOX rotates element i with element i + n_rot/2.
            const int64_t a = c_.rope_type == ROPE_TYPE_NEOX ? i : 2 * i;
            const int64_t b = c_.rope_type == ROPE_TYPE_NEOX ? i + half : 2 * i + 1;
            const float x0 = v[a], x1 = v[b];
            v[a] = x0 * cs - x1 * sn;
            v[b] = x0 * sn + x1 * cs;
        }
    }
}

void CpuBackend::forward(const Batch& b, std::span<float> logits) {
    validate_batch(b, c_, opt_.n_blocks, opt_.block_size);
    const int64_t n_vocab = c_.n_vocab;
    if (logits.size() != b.logit_rows.size() * static_cast<size_t>(n_vocab))
        throw_error("forward: logits buffer holds {} floats, {} needed", logits.size(), b.logit_rows.size() * n_vocab);
    const ModelWeights& w = model_->weights();
    const int64_t n = b.n_tokens(), d = c_.n_embd, hd = c_.head_dim;
    const int64_t n_q = c_.n_head * hd, n_kv = c_.n_embd_kv(), n_ff = c_.n_ff;
    const int32_t bs = opt_.block_size;
    if (n == 0) return;

    x_.resize(n * d);        // [n, n_embd] residual stream
    h_.resize(n * std::max(d, n_q));
    q_.resize(n * n_q);      // [n, n_head * head_dim]
    k_new_.resize(n * n_kv); // [n, n_kv_heads * head_dim]
    v_new_.resize(n * n_kv);
    attn_.resize(n * n_q);
    ff_g_.resize(n * n_ff);  // [n, n_ff]
    ff_u_.resize(n * n_ff);
    tmp_.resize(n * d);

    for (int64_t t = 0; t < n; ++t)
        dequantize_row(w.token_embd.type, w.token_embd.row(b.tokens[t]), &x_[t * d], d);

    auto slot = [&](int64_t t, int64_t pos) {
        const auto& table = b.block_tables[static_cast<size_t>(b.seq[t])];
        return static_cast<int64_t>(table[static_cast<size_t>(pos / bs)]) * bs + pos % bs;
    };
    const float kq_scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const int64_t gqa = c_.n_gqa();

    for (int64_t l = 0; l < c_.n_layer; ++l) {
        const LayerWeights& L = w.layers[static_cast<size_t>(l)];
        for (int64_t t = 0; t < n; ++t) rms_norm(&x_[t * d], L.attn_norm.data(), &h_[t * d], d, c_.rms_eps);
        matmul_w(L.wq, h_.data(), n, q_.data());
        matmul_w(L.wk, h_.data(), n, k_new_.data());
        matmul_w(L.wv, h_.data(), n, v_new_.data());
        uint8_t* kc = k_[static_cast<size_t>(l)].data();
        uint8_t* vc = v_[static_cast<size_t>(l)].data();
        for (int64_t t = 0; t < n; ++t) {
            if (!L.bq.empty()) {
                for (int64_t i = 0; i < n_q; ++i) q_[t * n_q + i] += L.bq[i];
                for (int64_t i = 0; i < n_kv; ++i) k_new_[t * n_kv + i] += L.bk[i];
                for (int64_t i = 0; i < n_kv; ++i) v_new_[t * n_kv + i] += L.bv[i];
            }
            rope(&q_[t * n_q], c_.n_head, b.positions[t]);
            rope(&k_new_[t * n_kv], c_.n_head_kv, b.positions[t]);
            const int64_t s = slot(t, b.positions[t]);
            kv_row_encode(kv_type_, &k_new_[t * n_kv], n_kv, hd, kc + s * int64_t(kv_row_));
            kv_row_encode(kv_type_, &v_new_[t * n_kv], n_kv, hd, vc + s * int64_t(kv_row_));
        }
        // Attention: each token over positions 0..pos of its own sequence.
        for (int64_t t = 0; t < n; ++t) {
            const int64_t n_ctx = b.positions[t] + 1;
            scores_.resize(static_cast<size_t>(n_ctx));
            // K/V rows of positions 0..n_ctx-1: read in place when F32, else decoded once for
            // all heads of this token.
            const bool in_place = kv_type_ == KV_TYPE_F32;
            if (!in_place) {
                k_rows_.resize(static_cast<size_t>(n_ctx * n_kv));
                v_rows_.resize(static_cast<size_t>(n_ctx * n_kv));
                for (int64_t p = 0; p < n_ctx; ++p) {
                    const int64_t s = slot(t, p) * int64_t(kv_row_);
                    kv_row_decode(kv_type_, kc + s, n_kv, hd, &k_rows_[size_t(p * n_kv)]);
                    kv_row_decode(kv_type_, vc + s, n_kv, hd, &v_rows_[size_t(p * n_kv)]);
                }
            }
            auto k_row = [&](int64_t p) {
                return in_place ? reinterpret_cast<const float*>(kc) + slot(t, p) * n_kv : &k_rows_[size_t(p * n_kv)];
            };
            auto v_row = [&](int64_t p) {
                return in_place ? reinterpret_cast<const float*>(vc) + slot(t, p) * n_kv : &v_rows_[size_t(p * n_kv)];
            };
            for (int64_t h = 0; h < c_.n_head; ++h) {
                const float* qh = &q_[t * n_q + h * hd];
                const int64_t kvh = h / gqa;
                float mx = -std::numeric_limits<float>::infinity();
                for (int64_t p = 0; p < n_ctx; ++p) {
                    const float* kp = k_row(p) + kvh * hd;
                    float dot = 0;
                    for (int64_t i = 0; i < hd; ++i) dot += qh[i] * kp[i];
                    scores_[p] = dot * kq_scale;
                    mx = std::max(mx, scores_[p]);
                }
                double sum = 0;
                for (int64_t p = 0; p < n_ctx; ++p) {
                    scores_[p] = std::exp(scores_[p] - mx);
                    sum += scores_[p];
                }
                const float inv = static_cast<float>(1.0 / sum);
                float* out = &attn_[t * n_q + h * hd];
                std::fill_n(out, hd, 0.0f);
                for (int64_t p = 0; p < n_ctx; ++p) {
                    const float* vp = v_row(p) + kvh * hd;
                    const float pw = scores_[p] * inv;
                    for (int64_t i = 0; i < hd; ++i) out[i] += pw * vp[i];
                }
            }
        }
        matmul_w(L.wo, attn_.data(), n, tmp_.data());
        for (int64_t i = 0; i < n * d; ++i) x_[i] += tmp_[i];

        for (int64_t t = 0; t < n; ++t) rms_norm(&x_[t * d], L.ffn_norm.data(), &h_[t * d], d, c_.rms_eps);
        matmul_w(L.w_gate, h_.data(), n, ff_g_.data());
        matmul_w(L.w_up, h_.data(), n, ff_u_.data());
        for (int64_t i = 0; i < n * n_ff; ++i) {
            const float g = ff_g_[i];
            ff_g_[i] = g / (1.0f + std::exp(-g)) * ff_u_[i];  // SwiGLU: silu(gate) * up
        }
        matmul_w(L.w_down, ff_g_.data(), n, tmp_.data());
        for (int64_t i = 0; i < n * d; ++i) x_[i] += tmp_[i];
    }

    const int64_t n_out = static_cast<int64_t>(b.logit_rows.size());
    for (int64_t r = 0; r < n_out; ++r)
        rms_norm(&x_[b.logit_rows[r] * d], w.output_norm.data(), &h_[r * d], d, c_.rms_eps);
    matmul_w(w.output, h_.data(), n_out, logits.data());
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, const BackendOptions& opt) {
    return std::make_unique<CpuBackend>(std::move(model), opt);
}

}  // namespace coinfer
