// The CUDA backend: weights uploaded once in their file format, F32 activations, K/V in a paged
// F16 (or F32) cache on the device, the whole forward pass on one stream. It mirrors
// cpu_backend.cpp op for op; tests/gpu compares the two.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "backend.h"

#if COINFER_HAVE_CUDA
#include "kernels/attention.h"
#include "kernels/cuda_check.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/norm.h"
#include "kernels/rope.h"
#include "kernels/sample.h"
#endif

namespace coinfer {

void Backend::forward_greedy(const Batch&, std::span<const DeviceGreedyRow>, std::span<int32_t>) {
    throw_error("backend '{}' does not sample on the device", name());
}

#if COINFER_HAVE_CUDA

namespace {

namespace kn = coinfer::kernels;

constexpr double k_mib = 1024.0 * 1024.0;

// Device memory for start-up allocations: an out-of-memory failure names what was being
// allocated, how much it needed and how much was free.
void* device_alloc(size_t bytes, const char* what) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        throw_error("cuda: out of device memory allocating {}: needed {:.1f} MiB, {:.1f} MiB free of {:.1f} MiB",
                    what, double(bytes) / k_mib, double(free_b) / k_mib, double(total_b) / k_mib);
    }
    CUDA_CHECK(e);
    return p;
}

struct DevWeight {
    int type = 0;
    int64_t n_in = 0, n_out = 0;
    size_t row_bytes = 0;
    void* data = nullptr;  // [n_out rows of row_bytes]
};

struct DevLayer {
    float* attn_norm = nullptr;  // [n_embd]
    float* ffn_norm = nullptr;   // [n_embd]
    float *bq = nullptr, *bk = nullptr, *bv = nullptr;
    DevWeight wq, wk, wv, wo, w_gate, w_up, w_down;
};

// A device buffer that grows (never shrinks) to the largest request.
template <typename T>
struct Scratch {
    T* p = nullptr;
    size_t n = 0;
    T* get(size_t want, const char* what) {
        if (want > n) {
            if (p) CUDA_CHECK(cudaFree(p));
            p = nullptr;
            n = 0;
            p = static_cast<T*>(device_alloc(want * sizeof(T), what));
            n = want;
        }
        return p;
    }
    void release() {
        if (p) cudaFree(p);
        p = nullptr;
        n = 0;
    }
};

int64_t env_int(const char* name, int64_t def) {
    const char* v = std::getenv(name);
    return v && *v ? std::strtoll(v, nullptr, 10) : def;
}

class CudaBackend final : public Backend {
public:
    CudaBackend(std::shared_ptr<const Model> model, const BackendOptions& opt);
    ~CudaBackend() override;

    std::string name() const override { return "cuda"; }
    int32_t n_blocks() const override { return opt_.n_blocks; }
    int32_t block_size() const override { return opt_.block_size; }
    void forward(const Batch& b, std::span<float> logits) override;
    bool samples_on_device() const override { return true; }
    void forward_greedy(const Batch& b, std::span<const DeviceGreedyRow> rows, std::span<int32_t> ids) override;

private:
    void run(const Batch& b);  // leaves logits of b.logit_rows in d_logits_
    DevWeight upload(const WeightView& w, const char* what);
    float* upload_floats(const std::vector<float>& v, const char* what);

    std::shared_ptr<const Model> model_;
    const ModelConfig& c_;
    BackendOptions opt_;
    bool kv_f16_ = true;
    cudaStream_t stream_ = nullptr;
    cublasHandle_t cublas_ = nullptr;
    kn::MatmulContext mm_;
    std::vector<void*> allocs_;  // weights, norms, KV: freed at the end

    DevWeight token_embd_, output_;
    std::vector<DevLayer> layers_;
    float* output_norm_ = nullptr;
    float* inv_freq_ = nullptr;                // [n_rot / 2]
    std::vector<void*> k_cache_, v_cache_;     // [n_layer][n_blocks * block_size, n_embd_kv]

    Scratch<float> x_, h_, q_, k_, v_, attn_, g_, u_, tmp_, logits_, attn_part_, mm_scratch_;
    Scratch<int32_t> ints_;
    Scratch<kn::GreedyRowParams> row_params_;
    Scratch<float> bias_vals_;
    std::vector<int32_t> h_ints_;  // host staging for ints_
    int32_t* d_logit_rows_ = nullptr;
};

CudaBackend::CudaBackend(std::shared_ptr<const Model> model, const BackendOptions& opt)
    : model_(std::move(model)), c_(model_->config()), opt_(opt) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        (void)cudaGetLastError();
        throw_error("cuda: no CUDA device is available (use --device cpu)");
    }
    if (const char* kv = std::getenv("COINFER_KV_TYPE")) kv_f16_ = std::string(kv) != "f32";
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&cublas_));
    CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));  // FP32 accumulate, no TF32

    const ModelWeights& w = model_->weights();
    token_embd_ = upload(w.token_embd, "token_embd");
    output_ = w.output.data == w.token_embd.data ? token_embd_ : upload(w.output, "output");
    output_norm_ = upload_floats(w.output_norm, "output_norm");
    for (size_t l = 0; l < w.layers.size(); ++l) {
        const LayerWeights& L = w.layers[l];
        DevLayer d;
        d.attn_norm = upload_floats(L.attn_norm, "attn_norm");
        d.ffn_norm = upload_floats(L.ffn_norm, "ffn_norm");
        if (!L.bq.empty()) {
            d.bq = upload_floats(L.bq, "bq");
            d.bk = upload_floats(L.bk, "bk");
            d.bv = upload_floats(L.bv, "bv");
        }
        d.wq = upload(L.wq, "attn_q");
        d.wk = upload(L.wk, "attn_k");
        d.wv = upload(L.wv, "attn_v");
        d.wo = upload(L.wo, "attn_output");
        d.w_gate = upload(L.w_gate, "ffn_gate");
        d.w_up = upload(L.w_up, "ffn_up");
        d.w_down = upload(L.w_down, "ffn_down");
        layers_.push_back(d);
    }
    // RoPE frequencies exactly as the CPU backend builds them.
    {
        const int64_t half = c_.n_rot / 2;
        std::vector<float> inv(static_cast<size_t>(half));
        const float theta_scale = std::pow(c_.rope_freq_base, -2.0f / static_cast<float>(c_.n_rot));
        const float freq_scale = c_.rope_scaling == ROPE_SCALING_LINEAR ? 1.0f / c_.rope_scaling_factor : 1.0f;
        float t = 1.0f;
        for (int64_t i = 0; i < half; ++i) {
            float f = t * freq_scale;
            if (!w.rope_freqs.empty()) f /= w.rope_freqs[static_cast<size_t>(i)];
            inv[static_cast<size_t>(i)] = f;
            t *= theta_scale;
        }
        inv_freq_ = upload_floats(inv, "rope inv_freq");
    }

    // Dequantize-to-F32 tile for the cuBLAS path: up to 64 Mi floats (256 MiB).
    mm_.cublas = cublas_;
    mm_.gemm_min_rows = env_int("COINFER_CUDA_GEMM_MIN_ROWS", 257);
    int64_t max_w = 0;
    for (const DevLayer& d : layers_)
        for (const DevWeight* dw : {&d.wq, &d.wk, &d.wv, &d.wo, &d.w_gate, &d.w_up, &d.w_down})
            max_w = std::max(max_w, dw->n_in * dw->n_out);
    max_w = std::max(max_w, output_.n_in * output_.n_out);
    mm_.scratch_floats = static_cast<size_t>(std::min<int64_t>(max_w, int64_t(64) << 20));
    mm_.scratch = mm_scratch_.get(mm_.scratch_floats, "matmul dequantization tile");

    // KV pool: free memory x gpu_memory_fraction, less a reserve for activations.
    const size_t kv_elem = kv_f16_ ? 2 : 4;
    const int64_t per_block = 2 * c_.n_layer * int64_t(opt_.block_size) * c_.n_embd_kv() * int64_t(kv_elem);
    if (opt_.n_blocks <= 0) {
        size_t free_b = 0, total_b = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        const double reserve = std::min(2048.0 * k_mib, 0.1 * double(free_b));
        const double budget = double(free_b) * double(opt_.gpu_memory_fraction) - reserve;
        // Never more than 256 sequences of the training context (a tiny model would take it all).
        const int64_t cap = (std::min<int64_t>(c_.n_ctx_train, 32768) * 256 + opt_.block_size - 1) / opt_.block_size;
        const int64_t n = std::min<int64_t>(cap, static_cast<int64_t>(budget / double(per_block)));
        if (n < 1)
            throw_error("cuda: too little device memory for the KV cache: one block needs {:.2f} MiB, {:.1f} MiB free",
                        double(per_block) / k_mib, double(free_b) / k_mib);
        opt_.n_blocks = static_cast<int32_t>(std::min<int64_t>(n, 1 << 30));
    }
    const size_t layer_bytes = size_t(opt_.n_blocks) * size_t(opt_.block_size) * size_t(c_.n_embd_kv()) * kv_elem;
    for (int64_t l = 0; l < c_.n_layer; ++l) {
        k_cache_.push_back(device_alloc(layer_bytes, "KV cache (K)"));
        allocs_.push_back(k_cache_.back());
        v_cache_.push_back(device_alloc(layer_bytes, "KV cache (V)"));
        allocs_.push_back(v_cache_.back());
    }
}

CudaBackend::~CudaBackend() {
    if (stream_) cudaStreamSynchronize(stream_);
    for (void* p : allocs_) cudaFree(p);
    for (auto* s : {&x_, &h_, &q_, &k_, &v_, &attn_, &g_, &u_, &tmp_, &logits_, &attn_part_, &mm_scratch_, &bias_vals_})
        s->release();
    ints_.release();
    row_params_.release();
    if (cublas_) cublasDestroy(cublas_);
    if (stream_) cudaStreamDestroy(stream_);
}

DevWeight CudaBackend::upload(const WeightView& w, const char* what) {
    if (!kn::weight_type_is_supported(static_cast<int>(w.type)))
        throw_error("cuda: weight {} has type {}, which the CUDA backend does not support", what,
                    static_cast<int>(w.type));
    DevWeight d;
    d.type = static_cast<int>(w.type);
    d.n_in = w.n_in;
    d.n_out = w.n_out;
    d.row_bytes = w.row_bytes;
    const size_t bytes = static_cast<size_t>(w.n_out) * w.row_bytes;
    d.data = device_alloc(bytes, what);
    allocs_.push_back(d.data);
    CUDA_CHECK(cudaMemcpy(d.data, w.data, bytes, cudaMemcpyHostToDevice));
    return d;
}

float* CudaBackend::upload_floats(const std::vector<float>& v, const char* what) {
    if (v.empty()) return nullptr;
    auto* p = static_cast<float*>(device_alloc(v.size() * sizeof(float), what));
    allocs_.push_back(p);
    CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
    return p;
}

void CudaBackend::run(const Batch& b) {
    validate_batch(b, c_, opt_.n_blocks, opt_.block_size);
    const int64_t n = b.n_tokens(), d = c_.n_embd, hd = c_.head_dim;
    const int64_t n_q = c_.n_head * hd, n_kv = c_.n_embd_kv(), n_ff = c_.n_ff, n_vocab = c_.n_vocab;
    const int64_t n_out = static_cast<int64_t>(b.logit_rows.size());
    const int32_t bs = opt_.block_size;

    // Ints, packed for one copy: tokens, positions, slots, seq, logit_rows, block tables.
    int32_t stride = 1;
    for (const auto& t : b.block_tables) stride = std::max<int32_t>(stride, static_cast<int32_t>(t.size()));
    const size_t n_ints = size_t(4 * n + n_out) + size_t(b.n_seqs()) * size_t(stride);
    h_ints_.assign(n_ints, 0);
    int32_t* hi = h_ints_.data();
    int32_t max_pos = 0;
    for (int64_t t = 0; t < n; ++t) {
        const auto& table = b.block_tables[static_cast<size_t>(b.seq[t])];
        const int32_t pos = b.positions[t];
        hi[t] = b.tokens[t];
        hi[n + t] = pos;
        hi[2 * n + t] = table[static_cast<size_t>(pos / bs)] * bs + pos % bs;
        hi[3 * n + t] = b.seq[t];
        max_pos = std::max(max_pos, pos);
    }
    for (int64_t r = 0; r < n_out; ++r) hi[4 * n + r] = b.logit_rows[static_cast<size_t>(r)];
    for (int32_t s = 0; s < b.n_seqs(); ++s)
        std::copy(b.block_tables[s].begin(), b.block_tables[s].end(), hi + 4 * n + n_out + int64_t(s) * stride);
    int32_t* di = ints_.get(n_ints, "batch indices");
    CUDA_CHECK(cudaMemcpyAsync(di, hi, n_ints * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    const int32_t *d_tok = di, *d_pos = di + n, *d_slot = di + 2 * n, *d_seq = di + 3 * n;
    d_logit_rows_ = di + 4 * n;
    const int32_t* d_tables = di + 4 * n + n_out;

    float* x = x_.get(size_t(n * d), "activations");  // [n, n_embd] residual stream
    float* h = h_.get(size_t(n * std::max(d, n_q)), "activations");
    float* q = q_.get(size_t(n * n_q), "activations");  // [n, n_head * head_dim]
    float* k = k_.get(size_t(n * n_kv), "activations");
    float* v = v_.get(size_t(n * n_kv), "activations");
    float* attn = attn_.get(size_t(n * n_q), "activations");
    float* g = g_.get(size_t(n * n_ff), "activations");  // [n, n_ff]
    float* u = u_.get(size_t(n * n_ff), "activations");
    float* tmp = tmp_.get(size_t(n * d), "activations");
    float* lg = logits_.get(size_t(std::max<int64_t>(n_out, 1) * n_vocab), "logits");
    const int64_t max_ctx = int64_t(max_pos) + 1;
    kn::AttentionParams ap{static_cast<int32_t>(c_.n_head), static_cast<int32_t>(c_.n_head_kv),
                           static_cast<int32_t>(hd), bs, 1.0f / std::sqrt(static_cast<float>(hd)), kv_f16_};
    float* part = attn_part_.get(kn::attention_scratch_floats(ap, n, max_ctx), "attention scratch");
    const kn::RopeParams rp{static_cast<int32_t>(c_.n_head), static_cast<int32_t>(c_.n_head_kv),
                            static_cast<int32_t>(hd), static_cast<int32_t>(c_.n_rot), c_.rope_type == ROPE_TYPE_NEOX,
                            inv_freq_};
    auto mm = [&](const DevWeight& w, const float* in, int64_t rows, float* out) {
        kn::matmul(mm_, w.type, w.data, w.row_bytes, w.n_in, w.n_out, in, rows, out, stream_);
    };

    kn::dequantize_rows(token_embd_.type, token_embd_.data, token_embd_.row_bytes, d, d_tok, n, x, stream_);
    for (size_t l = 0; l < layers_.size(); ++l) {
        const DevLayer& L = layers_[l];
        kn::rms_norm(x, l == 0 ? nullptr : tmp, nullptr, true, L.attn_norm, h, n, d, c_.rms_eps, stream_);
        mm(L.wq, h, n, q);
        mm(L.wk, h, n, k);
        mm(L.wv, h, n, v);
        kn::rope_kv_write(rp, q, k, v, L.bq, L.bk, L.bv, d_pos, d_slot, n, k_cache_[l], v_cache_[l], kv_f16_, stream_);
        kn::paged_attention(ap, q, k_cache_[l], v_cache_[l], d_pos, d_seq, d_tables, stride, n, max_ctx, part, attn,
                            stream_);
        mm(L.wo, attn, n, tmp);
        kn::rms_norm(x, tmp, nullptr, true, L.ffn_norm, h, n, d, c_.rms_eps, stream_);
        mm(L.w_gate, h, n, g);
        mm(L.w_up, h, n, u);
        kn::swiglu(g, u, n * n_ff, stream_);
        mm(L.w_down, g, n, tmp);
    }
    if (n_out == 0) return;
    kn::rms_norm(x, layers_.empty() ? nullptr : tmp, d_logit_rows_, false, output_norm_, h, n_out, d, c_.rms_eps,
                 stream_);
    mm(output_, h, n_out, lg);
}

void CudaBackend::forward(const Batch& b, std::span<float> logits) {
    const int64_t n_vocab = c_.n_vocab;
    if (logits.size() != b.logit_rows.size() * static_cast<size_t>(n_vocab))
        throw_error("forward: logits buffer holds {} floats, {} needed", logits.size(), b.logit_rows.size() * n_vocab);
    if (b.n_tokens() == 0) return;
    run(b);
    if (!logits.empty())
        CUDA_CHECK(cudaMemcpyAsync(logits.data(), logits_.p, logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                   stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::forward_greedy(const Batch& b, std::span<const DeviceGreedyRow> rows, std::span<int32_t> ids) {
    const size_t n_out = b.logit_rows.size();
    if (rows.size() != n_out || ids.size() != n_out)
        throw_error("forward_greedy: {} logit rows, {} sampling rows, {} ids", n_out, rows.size(), ids.size());
    if (b.n_tokens() == 0) return;
    run(b);
    if (n_out == 0) {
        CUDA_CHECK(cudaStreamSynchronize(stream_));
        return;
    }
    // Per-row params, bias and penalty lists, packed: [offsets | ids | counts] ints and bias floats.
    std::vector<kn::GreedyRowParams> params(n_out);
    std::vector<int32_t> bias_off{0}, bias_ids, pen_off{0}, pen_ids, pen_counts;
    std::vector<float> bias_vals;
    for (size_t r = 0; r < n_out; ++r) {
        const DeviceGreedyRow& row = rows[r];
        params[r] = {row.repeat_penalty, row.frequency_penalty, row.presence_penalty};
        for (const auto& [id, bias] : row.logit_bias) {
            if (id < 0 || id >= c_.n_vocab) throw_error("sampling: logit_bias token id {} is outside the vocabulary", id);
            bias_ids.push_back(id);
            bias_vals.push_back(bias);
        }
        bias_off.push_back(static_cast<int32_t>(bias_ids.size()));
        for (const auto& [id, count] : row.penalty_counts) {
            pen_ids.push_back(id);
            pen_counts.push_back(count);
        }
        pen_off.push_back(static_cast<int32_t>(pen_ids.size()));
    }
    const size_t n_i = bias_off.size() + bias_ids.size() + pen_off.size() + pen_ids.size() + pen_counts.size() + n_out;
    std::vector<int32_t> hi;
    hi.reserve(n_i);
    for (auto* v : {&bias_off, &bias_ids, &pen_off, &pen_ids, &pen_counts}) hi.insert(hi.end(), v->begin(), v->end());
    // The batch's ints stay in ints_ until the kernels finish: stage these in their own buffer.
    static_assert(sizeof(kn::GreedyRowParams) % sizeof(float) == 0);
    const size_t n_pf = n_out * sizeof(kn::GreedyRowParams) / sizeof(float);
    float* dvals = bias_vals_.get(std::max<size_t>(1, bias_vals.size()) + n_pf + n_i + 1, "sampling inputs");
    auto* dparams = reinterpret_cast<kn::GreedyRowParams*>(dvals);
    float* dbias = dvals + n_pf;
    auto* dints = reinterpret_cast<int32_t*>(dbias + std::max<size_t>(1, bias_vals.size()));
    CUDA_CHECK(cudaMemcpyAsync(dparams, params.data(), n_out * sizeof(kn::GreedyRowParams), cudaMemcpyHostToDevice, stream_));
    if (!bias_vals.empty())
        CUDA_CHECK(cudaMemcpyAsync(dbias, bias_vals.data(), bias_vals.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    CUDA_CHECK(cudaMemcpyAsync(dints, hi.data(), hi.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    const int32_t* p = dints;
    const int32_t* d_bias_off = p; p += bias_off.size();
    const int32_t* d_bias_ids = p; p += bias_ids.size();
    const int32_t* d_pen_off = p; p += pen_off.size();
    const int32_t* d_pen_ids = p; p += pen_ids.size();
    const int32_t* d_pen_counts = p; p += pen_counts.size();
    int32_t* d_out = dints + hi.size();
    kn::sample_greedy(logits_.p, static_cast<int64_t>(n_out), c_.n_vocab, dparams, bias_ids.empty() ? nullptr : d_bias_off,
                      d_bias_ids, dbias, pen_ids.empty() ? nullptr : d_pen_off, d_pen_ids, d_pen_counts, d_out, stream_);
    CUDA_CHECK(cudaMemcpyAsync(ids.data(), d_out, n_out * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace

bool cuda_device_available() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return n > 0;
}

std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model> model, const BackendOptions& opt) {
    try {
        return std::make_unique<CudaBackend>(std::move(model), opt);
    } catch (const Error&) {
        throw;
    } catch (const std::exception& e) {
        throw Error(fmt::format("cuda backend: {}", e.what()));
    }
}

#else  // no CUDA in this build

bool cuda_device_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model>, const BackendOptions&) {
    throw_error("device 'cuda' is not available: this build has no CUDA backend (use --device cpu)");
}

#endif

}  // namespace coinfer
