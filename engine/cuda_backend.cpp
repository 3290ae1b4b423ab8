// The CUDA backend: weights uploaded once in their file format, F32 activations, K/V in a paged
// F16 (or F32) cache on the device, the whole forward pass on one stream. It mirrors
// cpu_backend.cpp op for op; tests/gpu compares the two.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <thread>
#include <unordered_map>

#include <unistd.h>

#include "backend.h"
#include "qpack.h"
#include "rope_table.h"

#if COINFER_HAVE_CUDA
#include "kernels/attention.h"
#include "kernels/cuda_check.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/norm.h"
#include "kernels/qpack.h"
#include "kernels/rope.h"
#include "kernels/sample.h"
#endif

namespace coinfer {

void Backend::forward_greedy(const Batch&, std::span<const DeviceGreedyRow>, std::span<int32_t>) {
    throw_error("backend '{}' does not sample on the device", name());
}

void Backend::forward_sample(const Batch&, std::span<const DeviceSampleRow>, std::span<DeviceSampleOut>) {
    throw_error("backend '{}' does not sample on the device", name());
}

void Backend::launch_sample(const Batch& b, std::span<const DeviceSampleRow> rows) {
    pending_batch_ = &b;
    pending_rows_ = rows;
}

void Backend::wait_sample(std::span<DeviceSampleOut> out) {
    if (!pending_batch_) throw_error("wait_sample: no step was launched");
    const Batch* b = pending_batch_;
    pending_batch_ = nullptr;
    forward_sample(*b, pending_rows_, out);
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
    size_t row_bytes = 0;  // dense: row stride on the device, the file's row size padded to 16 bytes
    void* data = nullptr;  // dense: [n_out rows, row_bytes apart]; quantized: packed (engine/qpack.h)
    size_t bytes = 0;      // of the matrix on the device
};

struct DevLayer {
    float* attn_norm = nullptr;  // [n_embd]
    float* ffn_norm = nullptr;   // [n_embd]
    float *bq = nullptr, *bk = nullptr, *bv = nullptr;
    DevWeight wq, wk, wv, wo, w_gate, w_up, w_down;
    // When the parts share a type, wq|wk|wv and w_gate|w_up sit back to back in one buffer (the
    // parts point into it), so a one-token pass reads each group with one launch:
    // wqkv [n_q + 2 n_kv rows], w_gate_up [2 n_ff rows]. type -1: not fused.
    DevWeight wqkv{-1}, w_gate_up{-1};
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

// Pinned host memory that grows to the largest request: async copies from and to it need no
// driver staging (pageable copies cost several microseconds per decode step).
struct PinnedScratch {
    char* p = nullptr;
    size_t n = 0;
    char* get(size_t want) {
        if (want > n) {
            if (p) CUDA_CHECK(cudaFreeHost(p));
            p = nullptr;
            n = 0;
            CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&p), want));
            n = want;
        }
        return p;
    }
    void release() {
        if (p) cudaFreeHost(p);
        p = nullptr;
        n = 0;
    }
};

// COINFER_CUDA_PROFILE=1: per-op device time from events between launches (eager launches only,
// graphs off), printed to stderr with the achieved GB/s of the matmuls when the backend closes.
struct OpProfile {
    struct Acc {
        int64_t calls = 0;
        double ms = 0.0, bytes = 0.0;
    };
    std::vector<std::pair<std::string, Acc>> ops;  // first-seen order
    std::vector<cudaEvent_t> events;
    std::vector<std::pair<size_t, double>> marks;  // op index and bytes of event i + 1
    int64_t n_passes = 0;

    size_t op_index(const char* name) {
        for (size_t i = 0; i < ops.size(); ++i)
            if (ops[i].first == name) return i;
        ops.push_back({name, {}});
        return ops.size() - 1;
    }
    void record(cudaStream_t s) {
        if (marks.size() + 1 >= events.size()) {
            cudaEvent_t e;
            CUDA_CHECK(cudaEventCreate(&e));
            events.push_back(e);
        }
        CUDA_CHECK(cudaEventRecord(events[marks.size()], s));
    }
    void begin(cudaStream_t s) {
        marks.clear();
        record(s);
    }
    void mark(const char* name, double bytes, cudaStream_t s) {
        marks.push_back({op_index(name), bytes});
        record(s);
    }
    void end(cudaStream_t s) {
        CUDA_CHECK(cudaStreamSynchronize(s));
        for (size_t i = 0; i < marks.size(); ++i) {
            float ms = 0.0f;
            CUDA_CHECK(cudaEventElapsedTime(&ms, events[i], events[i + 1]));
            Acc& a = ops[marks[i].first].second;
            ++a.calls;
            a.ms += ms;
            a.bytes += marks[i].second;
        }
        ++n_passes;
    }
    void print() const {
        double total = 0.0;
        for (const auto& [name, a] : ops) total += a.ms;
        std::fprintf(stderr, "cuda profile: %lld passes, %.3f ms of device time per pass\n", (long long)n_passes,
                     n_passes ? total / double(n_passes) : 0.0);
        std::fprintf(stderr, "  %-16s %8s %10s %8s %10s\n", "op", "calls", "us/call", "share", "GB/s");
        for (const auto& [name, a] : ops) {
            const double gbs = a.bytes > 0 && a.ms > 0 ? a.bytes / (a.ms * 1e-3) / 1e9 : 0.0;
            std::fprintf(stderr, "  %-16s %8lld %10.2f %7.1f%% %10.0f\n", name.c_str(), (long long)a.calls,
                         a.calls ? 1e3 * a.ms / double(a.calls) : 0.0, total > 0 ? 100.0 * a.ms / total : 0.0, gbs);
        }
    }
    ~OpProfile() {
        for (cudaEvent_t e : events) cudaEventDestroy(e);
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
    CudaBackend(const CudaBackend&) = delete;
    CudaBackend& operator=(const CudaBackend&) = delete;

    std::string name() const override { return "cuda"; }
    int32_t n_blocks() const override { return opt_.n_blocks; }
    int32_t block_size() const override { return opt_.block_size; }
    void forward(const Batch& b, std::span<float> logits) override;
    bool samples_on_device() const override { return true; }
    void forward_greedy(const Batch& b, std::span<const DeviceGreedyRow> rows, std::span<int32_t> ids) override;
    void forward_sample(const Batch& b, std::span<const DeviceSampleRow> rows, std::span<DeviceSampleOut> out) override;
    void launch_sample(const Batch& b, std::span<const DeviceSampleRow> rows) override;
    void wait_sample(std::span<DeviceSampleOut> out) override;
    void launch_forward(const Batch& b) override;
    void abandon_forward() override { forward_queued_ = nullptr; }

private:
    struct Bufs {
        float *x, *h, *q, *k, *v, *attn, *g, *u, *tmp, *lg, *part;
    };
    // Attention items (kernels/attention.h): prompt runs in tiles [n_tiles, 2] of up to
    // tile_tokens tokens, the other tokens as items of one in singles [n_singles, 2]. Neither
    // given (graphs): every token is an item of its own.
    struct AttnSplit {
        const int32_t* tiles = nullptr;
        int64_t n_tiles = 0;
        int32_t tile_tokens = 1;
        const int32_t* singles = nullptr;
        int64_t n_singles = 0;
    };
    static constexpr int32_t k_graph_max = 256;  // largest graph bucket
    static constexpr int32_t k_graph_buckets = 9;  // 1, 2, 4, ..., 256

    // The calling thread's current device becomes this backend's: every entry point binds it,
    // since the engine constructs on one thread and steps on another.
    void bind() const noexcept { (void)cudaSetDevice(opt_.cuda_device); }
    void init();               // the constructor's work; release() undoes what it got done
    void release() noexcept;   // every device resource, whatever was acquired
    void run(const Batch& b);  // leaves logits of b.logit_rows in cur_logits_
    bool run_graph(const Batch& b);
    void capture_graph(int32_t bucket);  // graph_ints_ and graph_bufs_ must exist
    int32_t pack_ints(const Batch& b, int32_t stride, int32_t* hi) const;
    Bufs scratch_bufs(int64_t n, int64_t n_out);
    kn::AttentionParams attn_params() const;
    void encode(int64_t n, int64_t n_out, int64_t max_ctx, int32_t stride, const int32_t* di, const Bufs& B,
                const AttnSplit& as);
    DevWeight upload(const WeightView& w, const char* what);
    DevWeight upload_rows(const WeightView& w, const char* what);
    DevWeight upload_packed(const std::vector<const WeightView*>& parts, const char* what);
    static void copy_rows(void* dst, size_t stride, const WeightView& w);
    DevWeight upload_fused(std::initializer_list<std::pair<const WeightView*, DevWeight*>> parts, const char* what);
    float* upload_floats(const std::vector<float>& v, const char* what);

    std::shared_ptr<const Model> model_;
    const ModelConfig& c_;
    BackendOptions opt_;
    int32_t kv_dev_ = kn::KV_DEV_F16;  // kernels/kv_layout.h
    int64_t kv_row_bytes_ = 0;
    float* attn_scratch_ = nullptr;     // split partials, reserved before the KV pool
    double attn_bytes_ = 0;             // K/V bytes one layer's attention reads (profile only)
    size_t attn_scratch_floats_ = 0;
    cudaStream_t stream_ = nullptr;
    cublasHandle_t cublas_ = nullptr;
    kn::MatmulContext mm_;
    std::vector<void*> allocs_;  // weights, norms, KV: freed at the end

    DevWeight token_embd_, output_;
    std::vector<DevLayer> layers_;
    float* output_norm_ = nullptr;
    float* inv_freq_ = nullptr;                // [n_rot / 2]
    float rope_mscale_ = 1.0f;                 // YaRN's cos/sin factor
    std::vector<void*> k_cache_, v_cache_;     // [n_layer][n_blocks * block_size, n_embd_kv]

    Scratch<float> x_, h_, q_, k_, v_, attn_, g_, u_, tmp_, logits_, mm_scratch_;
    Scratch<int32_t> ints_;
    Scratch<char> sample_io_, sample_ws_;
    std::vector<int32_t> h_ints_;  // host staging for ints_
    std::vector<DeviceSampleOut> sample_out_;
    PinnedScratch sample_host_;  // host mirror of sample_io_
    // Requests' logit_bias lists on the device (DeviceSampleRow::bias_key): uploaded the first
    // step a request samples, read in place after. Lists without a key go after bias_top_ each
    // step. No step is in flight at a launch, so a full arena is rebuilt from that step's rows.
    struct BiasSlot {
        int32_t begin, count;
        bool repeats;
    };
    std::unordered_map<uint64_t, BiasSlot> bias_slots_;
    Scratch<int32_t> bias_ids_dev_;
    Scratch<float> bias_vals_dev_;
    int32_t bias_top_ = 0;
    PinnedScratch pack_stage_;   // packed weights on their way up (freed after the upload)
    float* cur_logits_ = nullptr;  // [n_out, n_vocab] of the last run

    // CUDA graphs for decode-only batches, one per bucket.
    bool graphs_enabled_ = true;
    int32_t graph_stride_ = 0;          // block-table row length baked into the graphs
    int32_t* graph_ints_ = nullptr;     // [5 * bucket + bucket * graph_stride_] inputs
    int32_t* graph_host_ints_ = nullptr;  // pinned staging for graph_ints_
    Bufs graph_bufs_{};                 // activations for k_graph_max tokens
    cudaGraphExec_t graph_exec_[k_graph_buckets] = {};
    std::unique_ptr<OpProfile> prof_;  // COINFER_CUDA_PROFILE=1

    // The step between launch_sample and wait_sample.
    const Batch* forward_queued_ = nullptr;  // launch_forward's batch, until its launch_sample
    struct Pending {
        bool active = false;
        size_t n_out = 0;
        std::vector<int32_t> lp_rows;  // rows that asked for logprobs, in LogprobOut order
        size_t lp_offset = 0;          // of the LogprobOuts after the ids in the staging buffer
        const char* back = nullptr;    // ids then LogprobOuts, in pinned memory
    } pending_;
};

CudaBackend::CudaBackend(std::shared_ptr<const Model> model, const BackendOptions& opt)
    : model_(std::move(model)), c_(model_->config()), opt_(opt) {
    // A throwing constructor runs no destructor: free what init() got before rethrowing, so a
    // caller that retries (less memory, another KV type) does not leak the device.
    try {
        init();
    } catch (...) {
        release();
        throw;
    }
}

void CudaBackend::init() {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        (void)cudaGetLastError();
        throw_error("cuda: no CUDA device is available (use --device cpu)");
    }
    if (opt_.cuda_device < 0 || opt_.cuda_device >= n_dev)
        throw_error("cuda: device cuda:{} is not present (this machine has {} CUDA device{}: cuda:0{})", opt_.cuda_device,
                    n_dev, n_dev == 1 ? "" : "s", n_dev == 1 ? "" : fmt::format("..cuda:{}", n_dev - 1));
    CUDA_CHECK(cudaSetDevice(opt_.cuda_device));
    {
        KvType kt = opt_.kv_type;
        if (kt == KV_TYPE_AUTO) {
            const char* env = std::getenv("COINFER_KV_TYPE");
            kt = env && *env ? kv_type_from_name(env) : KV_TYPE_F16;
            if (kt == KV_TYPE_AUTO) kt = KV_TYPE_F16;
        }
        kv_dev_ = kt == KV_TYPE_F32    ? kn::KV_DEV_F32
                  : kt == KV_TYPE_Q8_0 ? kn::KV_DEV_Q8_0
                  : kt == KV_TYPE_FP8  ? kn::KV_DEV_FP8
                                       : kn::KV_DEV_F16;
        if (const char* why = kn::attention_unsupported(attn_params()))
            throw_error("cuda: this model cannot use a {} KV cache: the attention kernels need {}", kv_type_name(kt),
                        why);
        if (kv_dev_ == kn::KV_DEV_Q8_0 && c_.n_embd_kv() % 32 != 0)
            throw_error("cuda: a q8_0 KV cache needs rows of a multiple of 32 values; this model's are {}",
                        c_.n_embd_kv());
        kv_row_bytes_ = kn::kv_dev_row_bytes(kv_dev_, c_.n_head_kv, c_.head_dim);
    }
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&cublas_));
    CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));  // FP32 accumulate, no TF32
    {
        // A workspace of our own, so that cuBLAS allocates nothing while a graph is captured.
        const size_t ws_bytes = size_t(32) << 20;
        void* ws = device_alloc(ws_bytes, "cuBLAS workspace");
        allocs_.push_back(ws);
        CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
        CUBLAS_CHECK(cublasSetWorkspace(cublas_, ws, ws_bytes));
    }

    const ModelWeights& w = model_->weights();
    // A progress line for models big enough to take a moment (rewritten in place on a terminal).
    uint64_t total_bytes = 0;
    for (const auto& t : model_->file().tensors()) total_bytes += t.n_bytes;
    const bool show_progress = total_bytes >= (uint64_t(1) << 30);
    const bool tty = show_progress && isatty(fileno(stderr));
    auto progress = [&](size_t done) {
        if (!show_progress || (!tty && done != w.layers.size())) return;
        std::fprintf(stderr, "%scuda: uploading weights, layer %zu/%zu (%.1f GiB)%s", tty ? "\r" : "", done,
                     w.layers.size(), double(total_bytes) / double(uint64_t(1) << 30),
                     done == w.layers.size() || !tty ? "\n" : "");
        std::fflush(stderr);
    };
    // The embedding table stays in the file's layout (rows are gathered, not multiplied); a tied
    // output matrix of a packed type gets a packed copy of its own.
    token_embd_ = upload_rows(w.token_embd, "token_embd");
    output_ = w.output.data == w.token_embd.data && !kn::weight_type_is_packed(token_embd_.type)
                  ? token_embd_
                  : upload(w.output, "output");
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
        d.wqkv = upload_fused({{&L.wq, &d.wq}, {&L.wk, &d.wk}, {&L.wv, &d.wv}}, "attn_qkv");
        if (d.wqkv.type < 0) {
            d.wq = upload(L.wq, "attn_q");
            d.wk = upload(L.wk, "attn_k");
            d.wv = upload(L.wv, "attn_v");
        }
        d.wo = upload(L.wo, "attn_output");
        d.w_gate_up = upload_fused({{&L.w_gate, &d.w_gate}, {&L.w_up, &d.w_up}}, "ffn_gate_up");
        if (d.w_gate_up.type < 0) {
            d.w_gate = upload(L.w_gate, "ffn_gate");
            d.w_up = upload(L.w_up, "ffn_up");
        }
        d.w_down = upload(L.w_down, "ffn_down");
        layers_.push_back(d);
        progress(l + 1);
    }
    pack_stage_.release();
    // RoPE frequencies: the CPU backend's table.
    {
        const RopeTable rt = make_rope_table(c_, w.rope_freqs);
        inv_freq_ = upload_floats(rt.inv_freq, "rope inv_freq");
        rope_mscale_ = rt.mscale;
    }

    // Dequantize-to-F32 tile for the cuBLAS path: up to 64 Mi floats (256 MiB).
    mm_.cublas = cublas_;
    // GEMV for one row, tensor cores from 2 (H100, 4096x11008: Q4_0 at 8 rows 103.5 us as GEMV,
    // 25.8 us fused; F16 104.5 vs 39.9 us through cuBLAS); never tensor cores when batch-invariant.
    mm_.gemm_min_rows = env_int("COINFER_CUDA_GEMM_MIN_ROWS", opt_.batch_invariant ? (1 << 30) : 2);
    mm_.batch_invariant = opt_.batch_invariant;
    int64_t max_w = 0;
    for (const DevLayer& d : layers_)
        for (const DevWeight* dw : {&d.wq, &d.wk, &d.wv, &d.wqkv, &d.wo, &d.w_gate, &d.w_up, &d.w_gate_up, &d.w_down})
            max_w = std::max(max_w, dw->n_in * dw->n_out);
    max_w = std::max(max_w, output_.n_in * output_.n_out);
    mm_.scratch_floats = static_cast<size_t>(std::min<int64_t>(max_w, int64_t(64) << 20));
    mm_.scratch = mm_scratch_.get(mm_.scratch_floats, "matmul dequantization tile");

    // Everything a step needs, reserved before the KV pool takes the rest: activations for
    // max_step_tokens tokens (logits for up to 256 of them), the attention partials (a fixed
    // bound, kernels/attention.h). Larger steps still run, growing the activations then.
    size_t free_before = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_before, &total_b));
    const int64_t step_tokens = std::max<int32_t>(opt_.max_step_tokens, 1);
    attn_scratch_floats_ = kn::attention_scratch_floats(attn_params());
    attn_scratch_ = static_cast<float*>(device_alloc(attn_scratch_floats_ * sizeof(float), "attention scratch"));
    allocs_.push_back(attn_scratch_);
    (void)scratch_bufs(step_tokens, std::min<int64_t>(step_tokens, 256));
    size_t free_after = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_after, &total_b));
    const double reserved = double(free_before - std::min(free_before, free_after));

    // KV pool: free memory x gpu_memory_fraction, less a margin for cuBLAS, graphs and the
    // sampling buffers.
    const int64_t per_block = 2 * c_.n_layer * int64_t(opt_.block_size) * kv_row_bytes_;
    if (opt_.n_blocks <= 0) {
        const size_t free_b = free_after;
        const double reserve = std::min(512.0 * k_mib, 0.1 * double(free_b));
        const double budget = double(free_b) * double(opt_.gpu_memory_fraction) - reserve;
        // Never more than 256 sequences of the training context (a tiny model would take it all).
        const int64_t cap = (std::min<int64_t>(c_.n_ctx_train, 32768) * 256 + opt_.block_size - 1) / opt_.block_size;
        const int64_t n = std::min<int64_t>(cap, static_cast<int64_t>(budget / double(per_block)));
        if (n < 1)
            throw_error("cuda: too little device memory for the KV cache: one block needs {:.2f} MiB, {:.1f} MiB free",
                        double(per_block) / k_mib, double(free_b) / k_mib);
        opt_.n_blocks = static_cast<int32_t>(std::min<int64_t>(n, 1 << 30));
    }
    // One spare block past the pool: padding tokens of graph replays write there.
    const size_t layer_bytes = size_t(opt_.n_blocks + 1) * size_t(opt_.block_size) * size_t(kv_row_bytes_);
    graphs_enabled_ = env_int("COINFER_CUDA_GRAPHS", 1) != 0;
    if (env_int("COINFER_CUDA_PROFILE", 0) != 0) {
        prof_ = std::make_unique<OpProfile>();
        graphs_enabled_ = false;
    }
    graph_stride_ = static_cast<int32_t>((std::min<int64_t>(c_.n_ctx_train, 32768) + opt_.block_size - 1) / opt_.block_size);
    for (int64_t l = 0; l < c_.n_layer; ++l) {
        k_cache_.push_back(device_alloc(layer_bytes, "KV cache (K)"));
        allocs_.push_back(k_cache_.back());
        v_cache_.push_back(device_alloc(layer_bytes, "KV cache (V)"));
        allocs_.push_back(v_cache_.back());
    }
    std::fprintf(stderr,
                 "cuda:%d: KV cache %s, %lld tokens (%d blocks of %d, %.2f GiB); reserved %.0f MiB for steps of %lld "
                 "tokens (activations, attention scratch)\n",
                 opt_.cuda_device, kv_type_name(kv_dev_ == kn::KV_DEV_F32    ? KV_TYPE_F32
                              : kv_dev_ == kn::KV_DEV_Q8_0 ? KV_TYPE_Q8_0
                              : kv_dev_ == kn::KV_DEV_FP8  ? KV_TYPE_FP8
                                                           : KV_TYPE_F16)
                     .c_str(),
                 (long long)opt_.n_blocks * opt_.block_size, opt_.n_blocks, opt_.block_size,
                 double(per_block) * double(opt_.n_blocks) / double(uint64_t(1) << 30), reserved / k_mib,
                 (long long)step_tokens);
}

CudaBackend::~CudaBackend() {
    bind();
    if (stream_) cudaStreamSynchronize(stream_);
    if (prof_) prof_->print();
    release();
}

void CudaBackend::release() noexcept {
    bind();
    if (stream_) cudaStreamSynchronize(stream_);
    for (void* p : allocs_) cudaFree(p);
    allocs_.clear();
    for (cudaGraphExec_t& e : graph_exec_)
        if (e) cudaGraphExecDestroy(e);
    if (graph_host_ints_) cudaFreeHost(graph_host_ints_);
    for (auto* s : {&x_, &h_, &q_, &k_, &v_, &attn_, &g_, &u_, &tmp_, &logits_, &mm_scratch_})
        s->release();
    ints_.release();
    sample_io_.release();
    sample_ws_.release();
    sample_host_.release();
    bias_ids_dev_.release();
    bias_vals_dev_.release();
    bias_slots_.clear();
    pack_stage_.release();
    if (cublas_) cublasDestroy(cublas_);
    if (stream_) cudaStreamDestroy(stream_);
    cublas_ = nullptr;
    stream_ = nullptr;
    graph_host_ints_ = nullptr;
    for (cudaGraphExec_t& e : graph_exec_) e = nullptr;
    (void)cudaGetLastError();
}

DevWeight CudaBackend::upload(const WeightView& w, const char* what) {
    if (kn::weight_type_is_packed(static_cast<int>(w.type))) return upload_packed({&w}, what);
    return upload_rows(w, what);
}

DevWeight CudaBackend::upload_rows(const WeightView& w, const char* what) {
    if (!kn::weight_type_is_supported(static_cast<int>(w.type)))
        throw_error("cuda: weight {} has type {}, which the CUDA backend does not support", what,
                    static_cast<int>(w.type));
    DevWeight d;
    d.type = static_cast<int>(w.type);
    d.n_in = w.n_in;
    d.n_out = w.n_out;
    d.row_bytes = kn::weight_row_stride(w.row_bytes);
    d.bytes = static_cast<size_t>(w.n_out) * d.row_bytes;
    d.data = device_alloc(d.bytes, what);
    allocs_.push_back(d.data);
    copy_rows(d.data, d.row_bytes, w);
    return d;
}

// The rows of parts, one after another, packed (engine/qpack.h) through a bounded pinned staging
// buffer: row tiles are packed on the host by a few threads, a staging-full at a time.
DevWeight CudaBackend::upload_packed(const std::vector<const WeightView*>& parts, const char* what) {
    const WeightView& first = *parts.front();
    const GgmlType type = first.type;
    DevWeight d;
    d.type = static_cast<int>(type);
    d.n_in = first.n_in;
    for (const WeightView* p : parts) d.n_out += p->n_out;
    d.bytes = qpack_size(type, d.n_in, d.n_out);
    d.data = device_alloc(d.bytes, what);
    allocs_.push_back(d.data);
    auto row = [&](int64_t r) {
        for (const WeightView* p : parts) {
            if (r < p->n_out) return static_cast<const uint8_t*>(p->data) + size_t(r) * p->row_bytes;
            r -= p->n_out;
        }
        return static_cast<const uint8_t*>(nullptr);
    };
    const int64_t n_rt = kn::qpack_row_tiles(d.n_out);
    const size_t tile_row_bytes = d.bytes / size_t(n_rt);  // one row tile, all K tiles
    const int64_t per_chunk = std::max<int64_t>(1, int64_t((size_t(64) << 20) / tile_row_bytes));
    char* stage = pack_stage_.get(size_t(std::min(per_chunk, n_rt)) * tile_row_bytes);
    const int n_thr = int(std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 8));
    for (int64_t t0 = 0; t0 < n_rt; t0 += per_chunk) {
        const int64_t t1 = std::min(n_rt, t0 + per_chunk);
        // Tiles [t0, t1) land at stage[0..): qpack_tiles writes tile t at t * tile_row_bytes.
        auto* base = reinterpret_cast<uint8_t*>(stage) - size_t(t0) * tile_row_bytes;
        std::vector<std::thread> pool;
        std::vector<std::exception_ptr> errs(static_cast<size_t>(n_thr));
        const int64_t per_thr = (t1 - t0 + n_thr - 1) / n_thr;
        for (int i = 0; i < n_thr; ++i) {
            const int64_t a = t0 + i * per_thr, b = std::min(t1, a + per_thr);
            if (a >= b) break;
            pool.emplace_back([&, a, b, i] {
                try {
                    qpack_tiles(type, d.n_in, d.n_out, row, a, b, base);
                } catch (...) {
                    errs[size_t(i)] = std::current_exception();
                }
            });
        }
        for (auto& th : pool) th.join();
        for (auto& e : errs)
            if (e) {
                try {
                    std::rethrow_exception(e);
                } catch (const std::exception& ex) {
                    throw_error("cuda: {}: {}", what, ex.what());
                }
            }
        CUDA_CHECK(cudaMemcpy(static_cast<char*>(d.data) + size_t(t0) * tile_row_bytes, stage,
                              size_t(t1 - t0) * tile_row_bytes, cudaMemcpyHostToDevice));
    }
    return d;
}

DevWeight CudaBackend::upload_fused(std::initializer_list<std::pair<const WeightView*, DevWeight*>> parts,
                                     const char* what) {
    const WeightView& first = *parts.begin()->first;
    int64_t n_out = 0;
    for (const auto& [w, dev] : parts) {
        if (w->type != first.type || w->n_in != first.n_in || w->row_bytes != first.row_bytes ||
            !kn::weight_type_is_supported(static_cast<int>(w->type)))
            return DevWeight{-1};
        n_out += w->n_out;
    }
    if (env_int("COINFER_CUDA_FUSE", 1) == 0) return DevWeight{-1};
    if (kn::weight_type_is_packed(static_cast<int>(first.type))) {
        // The parts' views stay empty: the fused matrix is the only one multiplied.
        std::vector<const WeightView*> views;
        for (const auto& [w, dev] : parts) views.push_back(w);
        return upload_packed(views, what);
    }
    DevWeight f;
    f.type = static_cast<int>(first.type);
    f.n_in = first.n_in;
    f.n_out = n_out;
    f.row_bytes = kn::weight_row_stride(first.row_bytes);
    f.bytes = size_t(n_out) * f.row_bytes;
    f.data = device_alloc(f.bytes, what);
    allocs_.push_back(f.data);
    size_t off = 0;
    for (const auto& [w, dev] : parts) {
        copy_rows(static_cast<char*>(f.data) + off, f.row_bytes, *w);
        *dev = DevWeight{f.type, w->n_in, w->n_out, f.row_bytes, static_cast<char*>(f.data) + off,
                         size_t(w->n_out) * f.row_bytes};
        off += size_t(w->n_out) * f.row_bytes;
    }
    return f;
}

// Rows of w into dst, `stride` bytes apart (the padding past each row is zeroed).
void CudaBackend::copy_rows(void* dst, size_t stride, const WeightView& w) {
    if (stride == w.row_bytes) {
        CUDA_CHECK(cudaMemcpy(dst, w.data, size_t(w.n_out) * w.row_bytes, cudaMemcpyHostToDevice));
        return;
    }
    CUDA_CHECK(cudaMemset(dst, 0, size_t(w.n_out) * stride));
    CUDA_CHECK(cudaMemcpy2D(dst, stride, w.data, w.row_bytes, w.row_bytes, size_t(w.n_out), cudaMemcpyHostToDevice));
}

float* CudaBackend::upload_floats(const std::vector<float>& v, const char* what) {
    if (v.empty()) return nullptr;
    auto* p = static_cast<float*>(device_alloc(v.size() * sizeof(float), what));
    allocs_.push_back(p);
    CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
    return p;
}

// Fills the packed ints for the batch: tokens, positions, slots, seq, logit_rows [n_out], then
// block tables [n_seqs, stride]. Returns the largest position.
int32_t CudaBackend::pack_ints(const Batch& b, int32_t stride, int32_t* hi) const {
    const int64_t n = b.n_tokens(), n_out = static_cast<int64_t>(b.logit_rows.size());
    const int32_t bs = opt_.block_size;
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
    return max_pos;
}

CudaBackend::Bufs CudaBackend::scratch_bufs(int64_t n, int64_t n_out) {
    const int64_t d = c_.n_embd, n_q = c_.n_head * c_.head_dim, n_kv = c_.n_embd_kv(), n_ff = c_.n_ff;
    Bufs B;
    B.x = x_.get(size_t(n * d), "activations");
    B.h = h_.get(size_t(n * std::max(d, n_q)), "activations");
    B.q = q_.get(size_t(n * (n_q + 2 * n_kv)), "activations");  // room for fused [q | k | v] rows
    B.k = k_.get(size_t(n * n_kv), "activations");
    B.v = v_.get(size_t(n * n_kv), "activations");
    B.attn = attn_.get(size_t(n * n_q), "activations");
    B.g = g_.get(size_t(n * 2 * n_ff), "activations");  // room for fused [gate | up] rows
    B.u = u_.get(size_t(n * n_ff), "activations");
    B.tmp = tmp_.get(size_t(n * d), "activations");
    B.lg = logits_.get(size_t(std::max<int64_t>(n_out, 1) * c_.n_vocab), "logits");
    B.part = attn_scratch_;
    return B;
}

kn::AttentionParams CudaBackend::attn_params() const {
    return kn::AttentionParams{static_cast<int32_t>(c_.n_head), static_cast<int32_t>(c_.n_head_kv),
                               static_cast<int32_t>(c_.head_dim), opt_.block_size,
                               1.0f / std::sqrt(static_cast<float>(c_.head_dim)), kv_dev_, 0, opt_.batch_invariant};
}

// The forward pass as a sequence of launches on stream_ (no host sync, no allocation, so it can
// be captured into a graph). di: the packed ints of pack_ints.
void CudaBackend::encode(int64_t n, int64_t n_out, int64_t max_ctx, int32_t stride, const int32_t* di,
                         const Bufs& B, const AttnSplit& as) {
    const int64_t d = c_.n_embd, hd = c_.head_dim;
    const int64_t n_ff = c_.n_ff;
    const int32_t *d_tok = di, *d_pos = di + n, *d_slot = di + 2 * n, *d_seq = di + 3 * n;
    const int32_t* d_rows = di + 4 * n;
    const int32_t* d_tables = di + 4 * n + n_out;
    kn::AttentionParams ap = attn_params();
    kn::RopeParams rp{static_cast<int32_t>(c_.n_head), static_cast<int32_t>(c_.n_head_kv),
                            static_cast<int32_t>(hd), static_cast<int32_t>(c_.n_rot), c_.rope_type == ROPE_TYPE_NEOX,
                            inv_freq_, 0, rope_mscale_};
    OpProfile* pr = prof_.get();
    auto mark = [&](const char* name, double bytes = 0.0) {
        if (pr) pr->mark(name, bytes, stream_);
    };
    auto mm = [&](const DevWeight& w, const float* in, int64_t rows, float* out, const char* name) {
        kn::matmul(mm_, w.type, w.data, w.row_bytes, w.n_in, w.n_out, in, rows, out, stream_);
        mark(name, double(w.bytes) + 4.0 * double(rows) * double(w.n_in + w.n_out));
    };
    float *x = B.x, *h = B.h, *q = B.q, *k = B.k, *v = B.v, *attn = B.attn, *g = B.g, *u = B.u, *tmp = B.tmp;
    if (pr) pr->begin(stream_);
    kn::dequantize_rows(token_embd_.type, token_embd_.data, token_embd_.row_bytes, d, d_tok, n, x, stream_);
    mark("embed");
    for (size_t l = 0; l < layers_.size(); ++l) {
        const DevLayer& L = layers_[l];
        kn::rms_norm(x, l == 0 ? nullptr : tmp, nullptr, true, L.attn_norm, h, n, d, c_.rms_eps, stream_);
        mark("add_rms_norm");
        if (L.wqkv.type >= 0) {
            // One product; each row of q's buffer is [q | k | v].
            mm(L.wqkv, h, n, q, "matmul qkv");
            k = q + c_.n_head * hd;
            v = k + c_.n_embd_kv();
            rp.row_stride = ap.q_stride = static_cast<int32_t>(L.wqkv.n_out);
        } else {
            k = B.k;
            v = B.v;
            mm(L.wq, h, n, q, "matmul q");
            mm(L.wk, h, n, k, "matmul k");
            mm(L.wv, h, n, v, "matmul v");
            rp.row_stride = ap.q_stride = 0;
        }
        kn::rope_kv_write(rp, q, k, v, L.bq, L.bk, L.bv, d_pos, d_slot, n, k_cache_[l], v_cache_[l], kv_dev_, stream_);
        mark("rope_kv_write");
        if (as.tiles || as.singles) {
            kn::paged_attention(ap, q, k_cache_[l], v_cache_[l], d_pos, d_seq, d_tables, stride, as.tiles, as.n_tiles,
                                as.tile_tokens, max_ctx, B.part, attn_scratch_floats_, attn, stream_);
            kn::paged_attention(ap, q, k_cache_[l], v_cache_[l], d_pos, d_seq, d_tables, stride, as.singles,
                                as.n_singles, 1, max_ctx, B.part, attn_scratch_floats_, attn, stream_);
        } else {
            kn::paged_attention(ap, q, k_cache_[l], v_cache_[l], d_pos, d_seq, d_tables, stride, nullptr, n, 1,
                                max_ctx, B.part, attn_scratch_floats_, attn, stream_);
        }
        mark("attention", attn_bytes_);
        mm(L.wo, attn, n, tmp, "matmul o");
        kn::rms_norm(x, tmp, nullptr, true, L.ffn_norm, h, n, d, c_.rms_eps, stream_);
        mark("add_rms_norm");
        const float* act = g;  // [n, n_ff] input of the down projection
        if (L.w_gate_up.type >= 0) {
            mm(L.w_gate_up, h, n, g, "matmul gate_up");  // rows of g are [gate | up]
            kn::swiglu_rows(g, g + n_ff, n, n_ff, 2 * n_ff, B.u, stream_);
            act = B.u;
        } else {
            u = B.u;
            mm(L.w_gate, h, n, g, "matmul gate");
            mm(L.w_up, h, n, u, "matmul up");
            kn::swiglu(g, u, n * n_ff, stream_);
        }
        mark("swiglu");
        mm(L.w_down, act, n, tmp, "matmul down");
    }
    if (n_out > 0) {
        kn::rms_norm(x, layers_.empty() ? nullptr : tmp, d_rows, false, output_norm_, h, n_out, d, c_.rms_eps, stream_);
        mark("add_rms_norm");
        mm(output_, h, n_out, B.lg, "matmul output");
    }
    if (pr) pr->end(stream_);
}

// Decode-only batches (one token per sequence, every token a logit row, in order) of up to 256
// tokens replay a graph captured once per size bucket (1, 2, 4, ..., 256; cuBLAS products
// included). The batch is padded to the bucket with
// tokens that write into a spare KV block (index n_blocks) and whose rows are ignored; the
// graph's inputs live at fixed device addresses, refreshed by one copy before each replay.
bool CudaBackend::run_graph(const Batch& b) {
    const int64_t n = b.n_tokens();
    if (!graphs_enabled_ || n > k_graph_max || n != b.n_seqs() || b.logit_rows.size() != size_t(n)) return false;
    for (int64_t i = 0; i < n; ++i)
        if (b.logit_rows[size_t(i)] != i) return false;
    for (const auto& t : b.block_tables)
        if (int64_t(t.size()) > graph_stride_) return false;
    int32_t bucket = 1;
    while (bucket < n) bucket *= 2;
    const int32_t stride = graph_stride_, bs = opt_.block_size;
    if (!graph_ints_) {
        const size_t n_ints = size_t(5 * k_graph_max) + size_t(k_graph_max) * size_t(stride);
        graph_ints_ = static_cast<int32_t*>(device_alloc(n_ints * sizeof(int32_t), "graph inputs"));
        allocs_.push_back(graph_ints_);
        CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&graph_host_ints_), n_ints * sizeof(int32_t)));
        const int64_t d = c_.n_embd, n_q = c_.n_head * c_.head_dim, n_kv = c_.n_embd_kv(), n_ff = c_.n_ff;
        const int64_t N = k_graph_max;
        auto f = [&](int64_t count) {
            auto* p = static_cast<float*>(device_alloc(size_t(count) * sizeof(float), "graph activations"));
            allocs_.push_back(p);
            return p;
        };
        graph_bufs_ = Bufs{f(N * d), f(N * std::max(d, n_q)), f(N * (n_q + 2 * n_kv)), f(N * n_kv), f(N * n_kv),
                           f(N * n_q), f(N * 2 * n_ff), f(N * n_ff), f(N * d), f(N * c_.n_vocab),
                           attn_scratch_};
    }
    // Packed as pack_ints with n = n_out = bucket and the graph's fixed stride.
    int32_t* hi = graph_host_ints_;
    const int64_t B = bucket;
    const int32_t sink = opt_.n_blocks;  // the spare block
    for (int64_t t = 0; t < B; ++t) {
        const bool real = t < n;
        const int32_t pos = real ? b.positions[size_t(t)] : 0;
        const auto* table = real ? &b.block_tables[static_cast<size_t>(b.seq[size_t(t)])] : nullptr;
        hi[t] = real ? b.tokens[size_t(t)] : 0;
        hi[B + t] = pos;
        hi[2 * B + t] = real ? (*table)[static_cast<size_t>(pos / bs)] * bs + pos % bs : sink * bs;
        hi[3 * B + t] = real ? b.seq[size_t(t)] : int32_t(t);
        hi[4 * B + t] = int32_t(t);
        int32_t* row = hi + 5 * B + t * stride;
        if (t < b.n_seqs()) {
            const auto& bt = b.block_tables[size_t(t)];
            std::copy(bt.begin(), bt.end(), row);
            std::fill(row + bt.size(), row + stride, sink);
        } else {
            std::fill(row, row + stride, sink);
        }
    }
    CUDA_CHECK(cudaMemcpyAsync(graph_ints_, hi, size_t(5 * B + B * stride) * sizeof(int32_t), cudaMemcpyHostToDevice,
                               stream_));
    auto& exec = graph_exec_[size_t(std::countr_zero(uint32_t(bucket)))];
    if (!exec) {
        // Every bucket at once: a capture costs tens of milliseconds, which in the middle of
        // serving would stall all running streams (inter-token latency spikes).
        try {
            for (int32_t b = 1; b <= k_graph_max; b *= 2) capture_graph(b);
        } catch (const std::exception& e) {
            // Eager launches from now on; this step too (the input copy above is harmless).
            std::fprintf(stderr, "cuda: CUDA graph capture failed (%s); running without graphs\n", e.what());
            for (cudaGraphExec_t& g : graph_exec_)
                if (g) {
                    cudaGraphExecDestroy(g);
                    g = nullptr;
                }
            graphs_enabled_ = false;
            (void)cudaGetLastError();
            return false;
        }
    }
    CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    cur_logits_ = graph_bufs_.lg;
    return true;
}

void CudaBackend::capture_graph(int32_t bucket) {
    auto& exec = graph_exec_[size_t(std::countr_zero(uint32_t(bucket)))];
    if (exec) return;
    cudaGraph_t graph = nullptr;
    CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
        // Test hook: a capture that fails part-way, to exercise the fallback.
        if (env_int("COINFER_TEST_FAIL_GRAPH_CAPTURE", 0) != 0) throw_error("injected graph capture failure");
        encode(bucket, bucket, int64_t(graph_stride_) * opt_.block_size, graph_stride_, graph_ints_, graph_bufs_,
               AttnSplit{});
    } catch (...) {
        cudaStreamEndCapture(stream_, &graph);
        if (graph) cudaGraphDestroy(graph);
        (void)cudaGetLastError();
        graphs_enabled_ = false;  // fall back to eager launches for good
        throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    CUDA_CHECK(e);
}

void CudaBackend::run(const Batch& b) {
    validate_batch(b, c_, opt_.n_blocks, opt_.block_size);
    if (run_graph(b)) return;
    const int64_t n = b.n_tokens();
    const int64_t n_out = static_cast<int64_t>(b.logit_rows.size());
    int32_t stride = 1;
    for (const auto& t : b.block_tables) stride = std::max<int32_t>(stride, static_cast<int32_t>(t.size()));
    const size_t n_base = size_t(4 * n + n_out) + size_t(b.n_seqs()) * size_t(stride);
    h_ints_.assign(n_base, 0);
    const int32_t max_pos = pack_ints(b, stride, h_ints_.data());
    // Prompt runs (2+ tokens of a sequence at consecutive positions) go to attention in tiles
    // that share each K/V read; their rows then sit in other MMA tiles than alone, so never when
    // batch-invariant. Every other token is an item of its own.
    const int32_t qt = opt_.batch_invariant ? 1 : kn::attention_item_tokens(attn_params());
    std::vector<int32_t> tiles, singles;
    for (int64_t t = 0; t < n;) {
        int64_t e = t + 1;
        if (qt >= 2)
            while (e < n && b.seq[e] == b.seq[t] && b.positions[e] == b.positions[e - 1] + 1) ++e;
        if (e - t >= 2) {
            for (int64_t s0 = t; s0 < e; s0 += qt) {
                tiles.push_back(int32_t(s0));
                tiles.push_back(int32_t(std::min<int64_t>(qt, e - s0)));
            }
        } else {
            singles.push_back(int32_t(t));
            singles.push_back(1);
        }
        t = e;
    }
    h_ints_.insert(h_ints_.end(), tiles.begin(), tiles.end());
    h_ints_.insert(h_ints_.end(), singles.begin(), singles.end());
    const size_t n_ints = h_ints_.size();
    int32_t* di = ints_.get(n_ints, "batch indices");
    CUDA_CHECK(cudaMemcpyAsync(di, h_ints_.data(), n_ints * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    AttnSplit as;
    as.tiles = di + n_base;
    as.n_tiles = int64_t(tiles.size() / 2);
    as.tile_tokens = std::max<int32_t>(qt, 1);
    as.singles = di + n_base + tiles.size();
    as.n_singles = int64_t(singles.size() / 2);
    if (prof_) {
        // Each item reads its sequence's K and V rows up to its last position once.
        double rows = 0;
        for (size_t i = 0; i < tiles.size(); i += 2) rows += double(b.positions[size_t(tiles[i] + tiles[i + 1] - 1)]) + 1;
        for (size_t i = 0; i < singles.size(); i += 2) rows += double(b.positions[size_t(singles[i])]) + 1;
        attn_bytes_ = 2.0 * rows * double(kv_row_bytes_);
    }
    const Bufs B = scratch_bufs(n, n_out);
    encode(n, n_out, int64_t(max_pos) + 1, stride, di, B, as);
    cur_logits_ = B.lg;
}

void CudaBackend::forward(const Batch& b, std::span<float> logits) {
    const int64_t n_vocab = c_.n_vocab;
    if (logits.size() != b.logit_rows.size() * static_cast<size_t>(n_vocab))
        throw_error("forward: logits buffer holds {} floats, {} needed", logits.size(), b.logit_rows.size() * n_vocab);
    if (b.n_tokens() == 0) return;
    bind();
    run(b);
    if (!logits.empty())
        CUDA_CHECK(cudaMemcpyAsync(logits.data(), cur_logits_, logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                   stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::forward_greedy(const Batch& b, std::span<const DeviceGreedyRow> rows, std::span<int32_t> ids) {
    const size_t n_out = b.logit_rows.size();
    if (rows.size() != n_out || ids.size() != n_out)
        throw_error("forward_greedy: {} logit rows, {} sampling rows, {} ids", n_out, rows.size(), ids.size());
    sample_out_.resize(n_out);
    forward_sample(b, rows, sample_out_);
    for (size_t i = 0; i < n_out; ++i) ids[i] = sample_out_[i].id;
}

void CudaBackend::forward_sample(const Batch& b, std::span<const DeviceSampleRow> rows, std::span<DeviceSampleOut> out) {
    const size_t n_out = b.logit_rows.size();
    if (rows.size() != n_out || out.size() != n_out)
        throw_error("forward_sample: {} logit rows, {} sampling rows, {} outputs", n_out, rows.size(), out.size());
    launch_sample(b, rows);
    wait_sample(out);
}

void CudaBackend::launch_forward(const Batch& b) {
    if (pending_.active || forward_queued_) throw_error("launch_forward: the previous step was not waited for");
    bind();
    if (b.n_tokens() == 0) return;
    run(b);
    forward_queued_ = &b;
}

void CudaBackend::launch_sample(const Batch& b, std::span<const DeviceSampleRow> rows) {
    if (pending_.active) throw_error("launch_sample: the previous step was not waited for");
    const bool queued = forward_queued_ == &b;
    if (forward_queued_ && !queued) throw_error("launch_sample: another batch's pass is queued");
    forward_queued_ = nullptr;
    bind();
    const size_t n_out = b.logit_rows.size();
    if (rows.size() != n_out)
        throw_error("launch_sample: {} logit rows, {} sampling rows", n_out, rows.size());
    pending_ = Pending{};
    if (b.n_tokens() == 0) return;
    // Check the rows before running anything, so a bad row leaves the cache untouched (after
    // launch_forward the pass has run: the engine then fails the step as any failed pass).
    auto bias_cached = [&](const DeviceSampleRow& row) {
        if (!row.bias_key) return false;
        const auto it = bias_slots_.find(row.bias_key);
        return it != bias_slots_.end() && it->second.count == static_cast<int32_t>(row.logit_bias.size());
    };
    for (const DeviceSampleRow& row : rows) {
        if (!bias_cached(row))  // a kept list was checked when it was uploaded
            for (const auto& [id, bias] : row.logit_bias)
                if (id < 0 || id >= c_.n_vocab) throw_error("sampling: logit_bias token id {} is outside the vocabulary", id);
        if (row.n_logprobs < 0 || row.n_logprobs > kn::k_max_device_logprobs)
            throw_error("sampling: n_logprobs {} is outside 0..{}", row.n_logprobs, kn::k_max_device_logprobs);
        if (!row.allowed.empty() && row.allowed.size() != static_cast<size_t>((c_.n_vocab + 31) / 32))
            throw_error("sampling: a token mask of {} words, {} needed", row.allowed.size(), (c_.n_vocab + 31) / 32);
    }
    if (!queued) run(b);
    if (n_out == 0) {
        pending_.active = true;  // wait_sample still waits for the pass
        return;
    }
    // Per-row params and penalty lists, packed: [bias ranges | offsets | ids | counts] ints.
    std::vector<kn::GreedyRowParams> params(n_out);
    std::vector<int32_t> bias_pair(2 * n_out, 0), pen_off{0}, pen_ids, pen_counts;
    std::vector<kn::DistRowParams> dist;
    std::vector<kn::LogprobRowParams> lp;
    std::vector<int32_t> mask_row;  // [n_out] when any row is masked
    std::vector<uint32_t> mask_words;
    // Bias lists: kept ones in place; new keyed ones appended at bias_top_ (kept); keyless ones
    // after those (this step only). A full arena starts over with this step's lists.
    std::vector<int32_t> up_ids;  // uploaded this step, to the arena from bias_top_
    std::vector<float> up_vals;
    bool any_bias = false;
    {
        size_t n_new = 0, n_all = 0;
        for (const DeviceSampleRow& row : rows) {
            n_all += row.logit_bias.size();
            if (!row.logit_bias.empty() && !bias_cached(row)) n_new += row.logit_bias.size();
        }
        if (static_cast<size_t>(bias_top_) + n_new > bias_ids_dev_.n) {
            bias_slots_.clear();
            bias_top_ = 0;
            const size_t want = std::max<size_t>({n_all, 2 * bias_ids_dev_.n, 65536});
            if (n_all > bias_ids_dev_.n) {
                bias_ids_dev_.get(want, "logit_bias ids");
                bias_vals_dev_.get(want, "logit_bias values");
            }
        }
    }
    // A throw before the uploads are queued leaves slots naming entries never written: forget them.
    struct ForgetOnThrow {
        CudaBackend& b;
        bool queued = false;
        ~ForgetOnThrow() {
            if (!queued) b.bias_slots_.clear(), b.bias_top_ = 0;
        }
    } forget{*this};
    auto place_bias = [&](size_t r, bool keyed) {
        const DeviceSampleRow& row = rows[r];
        std::vector<int32_t> ids;
        for (const auto& [id, bias] : row.logit_bias) ids.push_back(id);
        // Repeated ids apply serially (GreedyRowParams::bias_repeats); a sorted list needs no sort.
        if (!std::is_sorted(ids.begin(), ids.end())) std::sort(ids.begin(), ids.end());
        const bool repeats = std::adjacent_find(ids.begin(), ids.end()) != ids.end();
        const auto begin = static_cast<int32_t>(bias_top_ + up_ids.size());
        for (const auto& [id, bias] : row.logit_bias) {
            up_ids.push_back(id);
            up_vals.push_back(bias);
        }
        const auto count = static_cast<int32_t>(row.logit_bias.size());
        if (keyed) bias_slots_[row.bias_key] = {begin, count, repeats};
        bias_pair[2 * r] = begin;
        bias_pair[2 * r + 1] = begin + count;
        params[r].bias_repeats = repeats ? 1 : 0;
    };
    for (size_t r = 0; r < n_out; ++r) {  // kept and new keyed lists first: they stay
        const DeviceSampleRow& row = rows[r];
        params[r] = {row.repeat_penalty, row.frequency_penalty, row.presence_penalty, 0};
        if (row.logit_bias.empty()) continue;
        any_bias = true;
        if (bias_cached(row)) {
            const BiasSlot& sl = bias_slots_.at(row.bias_key);
            bias_pair[2 * r] = sl.begin;
            bias_pair[2 * r + 1] = sl.begin + sl.count;
            params[r].bias_repeats = sl.repeats ? 1 : 0;
        } else if (row.bias_key) {
            place_bias(r, true);
        }
    }
    const size_t n_kept_new = up_ids.size();
    for (size_t r = 0; r < n_out; ++r)
        if (!rows[r].logit_bias.empty() && !rows[r].bias_key) place_bias(r, false);
    for (size_t r = 0; r < n_out; ++r) {
        const DeviceSampleRow& row = rows[r];
        if (!row.allowed.empty()) {
            mask_row.resize(n_out, -1);
            mask_row[r] = static_cast<int32_t>(mask_words.size() / row.allowed.size());
            mask_words.insert(mask_words.end(), row.allowed.begin(), row.allowed.end());
        }
        for (const auto& [id, count] : row.penalty_counts) {
            if (id < 0 || id >= c_.n_vocab) continue;  // as the CPU's penalty stage
            pen_ids.push_back(id);
            pen_counts.push_back(count);
        }
        pen_off.push_back(static_cast<int32_t>(pen_ids.size()));
        if (row.temperature >= SamplingParams::k_greedy_temperature) {
            kn::DistRowParams dp{};
            dp.row = static_cast<int32_t>(r);
            dp.top_k = row.top_k;
            dp.inv_temperature = 1.0f / row.temperature;  // as TemperatureStage
            dp.top_p = row.top_p;
            dp.min_p = row.min_p;
            dp.seed = row.seed;
            dp.token_index = row.token_index;
            dist.push_back(dp);
        }
        if (row.n_logprobs > 0) lp.push_back({static_cast<int32_t>(r), row.n_logprobs});
    }
    // The rows that need the sort first (sample_rows' contract).
    std::stable_sort(dist.begin(), dist.end(), [](const auto& a, const auto& b) { return kn::dist_path(a) < kn::dist_path(b); });
    const auto n_sort = std::count_if(dist.begin(), dist.end(), [](const auto& d) { return kn::dist_path(d) == kn::DistPath::sort; });
    const auto n_select = std::count_if(dist.begin(), dist.end(), [](const auto& d) { return kn::dist_path(d) == kn::DistPath::select; });
    std::vector<int32_t> hi;
    for (auto* v : {&bias_pair, &pen_off, &pen_ids, &pen_counts, &mask_row}) hi.insert(hi.end(), v->begin(), v->end());
    // One staging buffer: params | dist | lp | mask words | ints | out ids | out logprobs, then
    // the bias lists uploaded to the arena this step.
    auto al = [](size_t v) { return (v + 15) & ~size_t(15); };
    const size_t o_params = 0;
    const size_t o_dist = al(o_params + n_out * sizeof(kn::GreedyRowParams));
    const size_t o_lp = al(o_dist + dist.size() * sizeof(kn::DistRowParams));
    const size_t o_masks = al(o_lp + lp.size() * sizeof(kn::LogprobRowParams));
    const size_t o_ints = al(o_masks + mask_words.size() * sizeof(uint32_t));
    const size_t o_ids = al(o_ints + hi.size() * sizeof(int32_t));
    const size_t o_lpout = al(o_ids + n_out * sizeof(int32_t));
    const size_t n_bytes = al(o_lpout + lp.size() * sizeof(kn::LogprobOut));
    const size_t o_up_ids = n_bytes;
    const size_t o_up_vals = al(o_up_ids + up_ids.size() * sizeof(int32_t));
    char* stage = sample_host_.get(al(o_up_vals + up_vals.size() * sizeof(float)));  // [inputs | outputs | uploads]
    std::memcpy(stage + o_params, params.data(), n_out * sizeof(kn::GreedyRowParams));
    if (!dist.empty()) std::memcpy(stage + o_dist, dist.data(), dist.size() * sizeof(kn::DistRowParams));
    if (!lp.empty()) std::memcpy(stage + o_lp, lp.data(), lp.size() * sizeof(kn::LogprobRowParams));
    if (!mask_words.empty())
        std::memcpy(stage + o_masks, mask_words.data(), mask_words.size() * sizeof(uint32_t));
    if (!hi.empty()) std::memcpy(stage + o_ints, hi.data(), hi.size() * sizeof(int32_t));
    char* dbuf = sample_io_.get(n_bytes, "sampling inputs");
    CUDA_CHECK(cudaMemcpyAsync(dbuf, stage, o_ids, cudaMemcpyHostToDevice, stream_));
    if (!up_ids.empty()) {
        std::memcpy(stage + o_up_ids, up_ids.data(), up_ids.size() * sizeof(int32_t));
        std::memcpy(stage + o_up_vals, up_vals.data(), up_vals.size() * sizeof(float));
        CUDA_CHECK(cudaMemcpyAsync(bias_ids_dev_.p + bias_top_, stage + o_up_ids, up_ids.size() * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream_));
        CUDA_CHECK(cudaMemcpyAsync(bias_vals_dev_.p + bias_top_, stage + o_up_vals, up_vals.size() * sizeof(float),
                                   cudaMemcpyHostToDevice, stream_));
    }
    bias_top_ += static_cast<int32_t>(n_kept_new);  // keyless lists after them are this step's only
    forget.queued = true;
    const size_t ws_bytes =
        kn::sample_workspace_bytes(c_.n_vocab, int64_t(dist.size()), int64_t(n_sort), int64_t(lp.size()));
    char* ws = ws_bytes ? sample_ws_.get(ws_bytes, "sampling workspace") : nullptr;
    const auto* dints = reinterpret_cast<const int32_t*>(dbuf + o_ints);
    const int32_t* d_bias_pair = dints;
    const int32_t* d_pen_off = d_bias_pair + bias_pair.size();
    const int32_t* d_pen_ids = d_pen_off + pen_off.size();
    const int32_t* d_pen_counts = d_pen_ids + pen_ids.size();
    const int32_t* d_mask_row = d_pen_counts + pen_counts.size();
    const kn::SampleMasks masks{mask_row.empty() ? nullptr : d_mask_row,
                                reinterpret_cast<const uint32_t*>(dbuf + o_masks)};
    auto* d_ids = reinterpret_cast<int32_t*>(dbuf + o_ids);
    auto* d_lpout = reinterpret_cast<kn::LogprobOut*>(dbuf + o_lpout);
    if (prof_) prof_->begin(stream_);
    kn::sample_rows(cur_logits_, static_cast<int64_t>(n_out), c_.n_vocab,
                    reinterpret_cast<const kn::GreedyRowParams*>(dbuf + o_params), masks,
                    any_bias ? d_bias_pair : nullptr, bias_ids_dev_.p, bias_vals_dev_.p,
                    pen_ids.empty() ? nullptr : d_pen_off, d_pen_ids, d_pen_counts,
                    reinterpret_cast<const kn::DistRowParams*>(dbuf + o_dist), int64_t(dist.size()), int64_t(n_sort), int64_t(n_select),
                    reinterpret_cast<const kn::LogprobRowParams*>(dbuf + o_lp), int64_t(lp.size()), ws, ws_bytes, d_ids,
                    d_lpout, stream_);
    if (prof_) {
        prof_->mark(dist.empty() ? "sample greedy" : "sample chain", 0.0, stream_);
        prof_->end(stream_);
    }
    CUDA_CHECK(cudaMemcpyAsync(stage + o_ids, dbuf + o_ids, n_bytes - o_ids, cudaMemcpyDeviceToHost, stream_));
    pending_.n_out = n_out;
    pending_.back = stage + o_ids;
    pending_.lp_offset = o_lpout - o_ids;
    for (const kn::LogprobRowParams& p : lp) pending_.lp_rows.push_back(p.row);
    pending_.active = true;
}

void CudaBackend::wait_sample(std::span<DeviceSampleOut> out) {
    if (!pending_.active) {
        if (out.empty()) return;  // an empty batch launches nothing
        throw_error("wait_sample: no step was launched");
    }
    pending_.active = false;
    bind();
    // A kernel fault surfaces here; a sticky one leaves the device unable to run anything more.
    if (const cudaError_t e = cudaStreamSynchronize(stream_); e != cudaSuccess) {
        if (kn::cuda_error_is_sticky(e))
            throw FatalBackendError(fmt::format("cuda: the device can run nothing more: {} ({})", cudaGetErrorName(e),
                                                cudaGetErrorString(e)));
        CUDA_CHECK(e);
    }
    const size_t n_out = pending_.n_out;
    if (out.size() != n_out) throw_error("wait_sample: {} outputs for {} logit rows", out.size(), n_out);
    const char* back = pending_.back;
    for (size_t r = 0; r < n_out; ++r) {
        int32_t id;
        std::memcpy(&id, back + r * sizeof(int32_t), sizeof id);
        out[r].id = id;
        out[r].logprob = 0.0f;
        out[r].top_logprobs.clear();
    }
    for (size_t j = 0; j < pending_.lp_rows.size(); ++j) {
        kn::LogprobOut o;
        std::memcpy(&o, back + pending_.lp_offset + j * sizeof(kn::LogprobOut), sizeof o);
        DeviceSampleOut& d = out[size_t(pending_.lp_rows[j])];
        d.logprob = o.chosen;
        for (int32_t t = 0; t < o.n; ++t) d.top_logprobs.push_back({o.ids[t], o.logprobs[t]});
    }
}

}  // namespace

int32_t cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
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

int32_t cuda_device_count() { return 0; }

std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model>, const BackendOptions&) {
    throw_error("device 'cuda' is not available: this build has no CUDA backend (use --device cpu)");
}

#endif

bool cuda_device_available() { return cuda_device_count() > 0; }

std::string DeviceSpec::name() const { return cuda ? fmt::format("cuda:{}", index) : "cpu"; }

DeviceSpec parse_device(std::string_view name) {
    if (name == "cpu") return {};
    if (name == "auto") return {cuda_device_available(), 0};
    if (name == "cuda") return {true, 0};
    if (name.starts_with("cuda:") && name.size() > 5 && name.size() <= 8) {
        int32_t n = 0;
        for (char ch : name.substr(5)) {
            if (ch < '0' || ch > '9') n = -1;
            if (n >= 0) n = n * 10 + (ch - '0');
        }
        if (n >= 0) return {true, n};
    }
    throw_error("device '{}' is not one of cpu, cuda, cuda:N (N = 0, 1, ...) or auto", name);
}

std::unique_ptr<Backend> make_backend(std::shared_ptr<const Model> model, std::string_view device, BackendOptions opt) {
    const DeviceSpec d = parse_device(device);
    if (!d.cuda) return make_cpu_backend(std::move(model), opt);
    opt.cuda_device = d.index;
    return make_cuda_backend(std::move(model), opt);
}

}  // namespace coinfer
