// The op-test table of the CUDA kernels (ggml test-backend-ops style): one case per op x type x
// shape, fresh random inputs every run, outputs poisoned with NaN before each launch, and the
// normalised mean squared error against a CPU reference checked against the case's bound.
//
//   test_gpu_ops [test|perf] [filter]
// test: every case once, PASS/FAIL per case, exit 1 on any failure. perf: times each case and
// prints GB/s against the device's peak. Exits 77 (meson's "skipped") without a CUDA device.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <memory>

#include <fmt/format.h>
#include <string>
#include <vector>

#include <cuda_fp16.h>

#include "engine/kv_codec.h"
#include "engine/qpack.h"
#include "engine/quant.h"
#include "engine/rope_table.h"
#include "kernels/attention.h"
#include "kernels/cuda_check.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/norm.h"
#include "kernels/qpack.h"
#include "kernels/rope.h"
#include "kernels/sample.h"

using namespace coinfer;
namespace kn = coinfer::kernels;

namespace {

std::mt19937_64 rng{std::random_device{}()};

std::vector<float> randn(size_t n, float sd = 1.0f) {
    std::normal_distribution<float> d(0.0f, sd);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

double nmse(const std::vector<float>& got, const std::vector<float>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double d = double(got[i]) - double(want[i]);
        num += d * d;
        den += double(want[i]) * double(want[i]);
    }
    if (!std::isfinite(num)) return INFINITY;
    return den > 0 ? num / den : num;
}

// Device buffer helpers.
template <typename T>
struct Dev {
    T* p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count) : n(count) { CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(1, n) * sizeof(T))); }
    Dev(const std::vector<T>& v) : Dev(v.size()) { CUDA_CHECK(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
    ~Dev() { cudaFree(p); }
    Dev(const Dev&) = delete;
    void poison() { CUDA_CHECK(cudaMemset(p, 0xff, n * sizeof(T))); }  // NaN for floats
    std::vector<T> get() const {
        std::vector<T> v(n);
        CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
        return v;
    }
};

struct Result {
    double err = 0;      // NMSE (or a count of mismatches for exact ops)
    double bytes = 0;    // bytes one launch must move
    double flops = 0;
};

struct Case {
    std::string name;
    double bound;  // NMSE pass mark
    // Builds inputs, runs the GPU op once (and `reps` more times under the timer when perf > 0),
    // returns the error against the CPU. `launch` is set to re-run the op for timing.
    std::function<Result(std::function<void()>& launch)> run;
};

// Random weights in `type`: quantized from N(0, 0.05) where a quantizer exists, else random
// blocks with sane scales.
std::vector<uint8_t> random_weights(GgmlType type, int64_t n_in, int64_t n_out) {
    const size_t rb = quant_row_bytes(type, n_in);
    std::vector<uint8_t> w(rb * size_t(n_out));
    if (quantize_supported(type)) {
        // Rows in parallel (each thread its own generator): the 7B shapes take seconds otherwise.
        const int n_thr = int(std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 16));
        std::vector<std::thread> pool;
        for (int t = 0; t < n_thr; ++t) {
            pool.emplace_back([&, t, seed = rng()] {
                std::mt19937_64 g(seed);
                std::normal_distribution<float> d(0.0f, 0.05f);
                std::vector<float> row(static_cast<size_t>(n_in));
                for (int64_t o = t; o < n_out; o += n_thr) {
                    for (auto& v : row) v = d(g);
                    quantize_row(type, row.data(), w.data() + size_t(o) * rb, n_in);
                }
            });
        }
        for (auto& th : pool) th.join();
        return w;
    }
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& b : w) b = uint8_t(byte(rng));
    // K-quant super-blocks: f16 scale fields set to small finite values.
    struct Fmt { GgmlType t; int bytes; int d_off[2]; };
    const Fmt fmts[] = {{GGML_TYPE_Q2_K, 84, {80, 82}}, {GGML_TYPE_Q3_K, 110, {108, -1}},
                        {GGML_TYPE_Q5_K, 176, {0, 2}}, {GGML_TYPE_Q6_K, 210, {208, -1}}};
    std::uniform_real_distribution<float> sc(0.0005f, 0.004f);
    for (const Fmt& f : fmts) {
        if (f.t != type) continue;
        for (size_t b = 0; b + size_t(f.bytes) <= w.size(); b += size_t(f.bytes))
            for (int k = 0; k < 2; ++k)
                if (f.d_off[k] >= 0) {
                    const uint16_t h = fp32_to_fp16(sc(rng));
                    std::memcpy(&w[b + size_t(f.d_off[k])], &h, 2);
                }
    }
    return w;
}

std::vector<Case> make_cases(int n_threads) {
    std::vector<Case> cases;
    const GgmlType all_types[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
                                  GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K,
                                  GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};
    auto make_mm = [](int64_t gemm_min_rows) {
        auto* c = new kn::MatmulContext;
        c->batch_invariant = gemm_min_rows >= (1 << 30);
        CUBLAS_CHECK(cublasCreate(&c->cublas));
        c->scratch_floats = size_t(64) << 20;
        CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&c->scratch), c->scratch_floats * sizeof(float)));
        c->gemm_min_rows = gemm_min_rows;
        return c;
    };
    static kn::MatmulContext* mm = make_mm(9);             // "matmul": the backend's routing
    static kn::MatmulContext* mm_gemv = make_mm(1 << 30);  // "matmul-invariant": --batch-invariant (dense: GEMV)
    static kn::MatmulContext* mm_mma = make_mm(1);         // "matmul-mma": tensor cores at every n_rows (crossover)

    // ---- matmul: type x (n_in, n_out) x n_rows ----
    // Dense GEMV (F32 activations): NMSE <= 1e-7. Tensor-core paths (F16 activations, BF16 for
    // BF16 weights, FP32 accumulate): the fused quantized product (every n_rows when
    // batch-invariant), cuBLAS for F16/BF16 and beyond: 1e-5. F32: SGEMM, 1e-7.
    const std::vector<GgmlType> bench_types = {GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
                                               GGML_TYPE_Q4_K};
    const std::vector<int64_t> all_rows = {1, 2, 3, 7, 8, 9, 16, 17, 64, 255, 256, 512};
    enum Path { PATH_DEFAULT, PATH_GEMV, PATH_MMA };
    struct Shape { int64_t n_in, n_out; std::vector<int64_t> rows; bool all_types; std::vector<GgmlType> only = {}; Path path = PATH_DEFAULT; };
    const Shape shapes[] = {
        {64, 172, {1, 3, 8, 64}, false},      // stories260K ffn_gate (F32 only: 64 is not a K-quant multiple)
        {172, 64, {1, 5}, false},             // stories260K ffn_down (tail chunk)
        {256, 768, {1, 8, 9, 64, 300}, true}, // quant-base ffn
        {768, 256, {1, 16, 17}, true},
        {2080, 328, {1, 9, 40, 512}, true},   // a tail K tile for the 32-element formats; n_out not a multiple of 64
        {2048, 5632, {1, 8, 64, 300}, true},  // TinyLlama ffn_gate
        {5632, 2048, {1, 256}, true},         // TinyLlama ffn_down
        {4096, 4096, all_rows, true},         // Llama-2-7B attn_q
        {4096, 11008, {1, 16}, true},         // Llama-2-7B ffn_gate
        {14336, 4096, {1, 16}, false, {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_K}},  // Mistral ffn_down
        {11008, 4096, {1, 8, 9, 64}, true},                       // Llama-2-7B ffn_down (Q6_K rows: 9030 bytes)
        {2048, 2560, {1, 9, 17, 64}, true},                       // TinyLlama fused q|k|v
        {2048, 2048, {1}, false, bench_types},                    // TinyLlama attn_output
        {2048, 11264, {1, 16, 64, 256}, true},                    // TinyLlama fused gate|up
        {4096, 12288, {1, 16, 64}, true},                         // Llama-2-7B fused q|k|v
        {4096, 22016, {16, 64}, false, bench_types},              // Llama-2-7B fused gate|up
        {256, 16400, {33, 64, 100}, true},                        // 64-row tiles (n_out >= 16384), every format
        {4096, 11008, {8}, false, bench_types},                   // decode batch of 8
        {2048, 5632, {512, 1024}, false, bench_types},            // prefill chunks (the largest: cuBLAS)
        {4096, 11008, {512}, false, bench_types},
        {4096, 11008, {16, 64, 128, 256}, false, {GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K}, PATH_GEMV},
        {4096, 4096, {2, 3, 8}, true, {}, PATH_GEMV},
        {4096, 4096, {1, 2, 4, 8}, false, bench_types, PATH_MMA},  // tensor cores below the crossover
        {4096, 11008, {2, 4, 8}, false, bench_types, PATH_MMA},
        {4096, 11008, {96, 128, 192, 256, 384}, false, bench_types},  // the tensor-core crossover
    };
    for (const Shape& s : shapes) {
        for (GgmlType type : all_types) {
            const bool k_quant = quant_block_size(type) == 256;
            if (!s.only.empty()) {
                if (std::find(s.only.begin(), s.only.end(), type) == s.only.end()) continue;
            } else if (!s.all_types && type != GGML_TYPE_F32) {
                continue;
            }
            if (k_quant && s.n_in % 256) continue;
            if (s.n_in % quant_block_size(type)) continue;
            for (int64_t rows : s.rows) {
                const kn::MatmulContext* ctx = s.path == PATH_GEMV ? mm_gemv : s.path == PATH_MMA ? mm_mma : mm;
                const bool f16_ops = qpack_supported(type) || (rows >= ctx->gemm_min_rows && type != GGML_TYPE_F32);
                const double bound = f16_ops ? 1e-5 : 1e-7;
                const char* tag = s.path == PATH_GEMV ? "-invariant" : s.path == PATH_MMA ? "-mma" : "";
                cases.push_back({fmt::format("matmul{} type={} n_in={} n_out={} rows={}", tag,
                                             ggml_type_name(type), s.n_in, s.n_out, rows),
                                 bound, [=](std::function<void()>& launch) {
                                     auto w = random_weights(type, s.n_in, s.n_out);
                                     auto x = randn(size_t(rows * s.n_in));
                                     std::vector<float> want(size_t(rows * s.n_out));
                                     matmul(type, w.data(), s.n_in, s.n_out, x.data(), rows, want.data(), n_threads);
                                     // Copies of W to rotate through when timing, so that repeats read
                                     // device memory rather than the 50 MB L2.
                                     // As the backend uploads them: quantized types packed, dense rows
                                     // padded to the device stride.
                                     const size_t rb_file = quant_row_bytes(type, s.n_in);
                                     const bool packed = qpack_supported(type);
                                     const size_t rb = packed ? 0 : kn::weight_row_stride(rb_file);
                                     const size_t w_bytes = packed ? qpack_size(type, s.n_in, s.n_out) : rb * size_t(s.n_out);
                                     std::vector<uint8_t> wp(w_bytes, 0);
                                     if (packed)
                                         qpack_tiles(type, s.n_in, s.n_out, [&](int64_t r) { return w.data() + size_t(r) * rb_file; },
                                                     0, kn::qpack_row_tiles(s.n_out), wp.data());
                                     else
                                         for (int64_t o = 0; o < s.n_out; ++o)
                                             std::memcpy(wp.data() + size_t(o) * rb, w.data() + size_t(o) * rb_file, rb_file);
                                     const size_t n_copies =
                                         w_bytes < (size_t(1) << 20) ? 1 : std::min<size_t>(16, (size_t(192) << 20) / w_bytes + 1);
                                     auto dw = std::make_shared<Dev<uint8_t>>(w_bytes * n_copies);
                                     CUDA_CHECK(cudaMemcpy(dw->p, wp.data(), w_bytes, cudaMemcpyHostToDevice));
                                     for (size_t i = 1; i < n_copies; ++i)
                                         CUDA_CHECK(cudaMemcpy(dw->p + i * w_bytes, dw->p, w_bytes, cudaMemcpyDeviceToDevice));
                                     auto dx = std::make_shared<Dev<float>>(x);
                                     auto dy = std::make_shared<Dev<float>>(want.size());
                                     dy->poison();
                                     auto next = std::make_shared<size_t>(0);
                                     launch = [=] {
                                         const uint8_t* wp = dw->p + (*next)++ % n_copies * w_bytes;
                                         kn::matmul(*ctx, int(type), wp, rb, s.n_in, s.n_out, dx->p, rows, dy->p, nullptr);
                                     };
                                     launch();
                                     CUDA_CHECK(cudaDeviceSynchronize());
                                     return Result{nmse(dy->get(), want), double(w.size() + 4 * (x.size() + want.size())),
                                                   2.0 * double(rows) * double(s.n_in) * double(s.n_out)};
                                 }});
            }
        }
    }

    // ---- get_rows: dequantization is bit-exact (bound 0) ----
    for (GgmlType type : all_types) {
        const int64_t n_in = 4096, n_vocab = 1024, n = 37;
        cases.push_back({fmt::format("get_rows type={} n_embd={} rows={}", ggml_type_name(type), n_in, n), 0.0,
                         [=](std::function<void()>& launch) {
                             auto w = random_weights(type, n_in, n_vocab);
                             const size_t rb = quant_row_bytes(type, n_in);
                             std::vector<int32_t> ids(n);
                             for (auto& i : ids) i = int32_t(rng() % n_vocab);
                             std::vector<float> want(size_t(n * n_in));
                             for (int64_t r = 0; r < n; ++r)
                                 dequantize_row(type, w.data() + size_t(ids[r]) * rb, &want[size_t(r * n_in)], n_in);
                             auto dw = std::make_shared<Dev<uint8_t>>(w);
                             auto di = std::make_shared<Dev<int32_t>>(ids);
                             auto dy = std::make_shared<Dev<float>>(want.size());
                             dy->poison();
                             launch = [=] { kn::dequantize_rows(int(type), dw->p, rb, n_in, di->p, n, dy->p, nullptr); };
                             launch();
                             auto got = dy->get();
                             double bad = 0;
                             for (size_t i = 0; i < got.size(); ++i) bad += std::memcmp(&got[i], &want[i], 4) != 0;
                             return Result{bad, double(n * rb + want.size() * 4), 0};
                         }});
    }

    // ---- rms_norm with the residual add ----
    for (int64_t d : {64, 256, 2048, 4096}) {
        for (int64_t n : {1, 7, 256}) {
            cases.push_back({fmt::format("add_rms_norm n_embd={} rows={}", d, n), 1e-7, [=](std::function<void()>& launch) {
                                 auto x = randn(size_t(n * d)), dx = randn(size_t(n * d)), w = randn(size_t(d));
                                 std::vector<float> want(x.size()), xs(x.size());
                                 for (int64_t r = 0; r < n; ++r) {
                                     double sum = 0;
                                     for (int64_t i = 0; i < d; ++i) {
                                         xs[r * d + i] = x[r * d + i] + dx[r * d + i];
                                         sum += double(xs[r * d + i] * xs[r * d + i]);
                                     }
                                     const float sc = 1.0f / std::sqrt(float(sum / double(d)) + 1e-5f);
                                     for (int64_t i = 0; i < d; ++i) want[r * d + i] = xs[r * d + i] * sc * w[i];
                                 }
                                 auto dxv = std::make_shared<Dev<float>>(x);
                                 auto ddx = std::make_shared<Dev<float>>(dx);
                                 auto dw = std::make_shared<Dev<float>>(w);
                                 auto dy = std::make_shared<Dev<float>>(want.size());
                                 dy->poison();
                                 // write_x off so that timing repeats see the same input.
                                 launch = [=] { kn::rms_norm(dxv->p, ddx->p, nullptr, false, dw->p, dy->p, n, d, 1e-5f, nullptr); };
                                 launch();
                                 return Result{nmse(dy->get(), want), double(12 * n * d), 0};
                             }});
        }
    }

    // ---- swiglu ----
    for (int64_t n : {172, 11008 * 64}) {
        cases.push_back({fmt::format("swiglu n={}", n), 1e-7, [=](std::function<void()>& launch) {
                             auto g = randn(size_t(n), 3.0f), u = randn(size_t(n));
                             std::vector<float> want(static_cast<size_t>(n));
                             for (int64_t i = 0; i < n; ++i) want[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
                             auto dg = std::make_shared<Dev<float>>(g);
                             auto du = std::make_shared<Dev<float>>(u);
                             launch = [=] { kn::swiglu(dg->p, du->p, n, nullptr); };
                             launch();
                             return Result{nmse(dg->get(), want), double(12 * n), 0};
                         }});
    }

    // ---- rope with YaRN scaling (engine/rope_table.h), positions up to 131,071 ----
    // q and the K written to the cache against the CPU backend's rotation: theta = pos * inv_freq
    // in F32, cos and sin times mscale.
    for (bool neox : {false, true}) {
        cases.push_back({fmt::format("rope_yarn {} hd=128 factor=4 pos<131072", neox ? "neox" : "norm"), 1e-7,
                         [=](std::function<void()>& launch) {
            ModelConfig c;
            c.n_rot = c.head_dim = 128;
            c.n_ctx_train = 131072;
            c.rope_freq_base = 1000000.0f;
            c.rope_scaling = ROPE_SCALING_YARN;
            c.rope_scaling_factor = 4.0f;
            c.rope_orig_ctx = 32768;
            c.rope_yarn_ext_factor = 1.0f;
            const RopeTable rt = make_rope_table(c, {});
            const int n_head = 8, n_kv = 2, hd = 128, n_tok = 64;
            std::vector<int32_t> pos(n_tok), slot(n_tok);
            for (int t = 0; t < n_tok; ++t) {
                pos[size_t(t)] = t == 0 ? 131071 : int32_t(rng() % 131072u);
                slot[size_t(t)] = t;
            }
            auto q = randn(size_t(n_tok * n_head * hd)), k = randn(size_t(n_tok * n_kv * hd)), v = randn(size_t(n_tok * n_kv * hd));
            std::vector<float> want_q = q, want_k = k;
            auto rope = [&](float* x, int nh, int p) {
                for (int h = 0; h < nh; ++h)
                    for (int i = 0; i < hd / 2; ++i) {
                        const float th = float(p) * rt.inv_freq[size_t(i)];
                        const float cs = std::cos(th) * rt.mscale, sn = std::sin(th) * rt.mscale;
                        float* hv = x + h * hd;
                        const int ia = neox ? i : 2 * i, ib = neox ? i + hd / 2 : 2 * i + 1;
                        const float x0 = hv[ia], x1 = hv[ib];
                        hv[ia] = x0 * cs - x1 * sn;
                        hv[ib] = x0 * sn + x1 * cs;
                    }
            };
            for (int t = 0; t < n_tok; ++t) {
                rope(&want_q[size_t(t * n_head * hd)], n_head, pos[size_t(t)]);
                rope(&want_k[size_t(t * n_kv * hd)], n_kv, pos[size_t(t)]);
            }
            auto dq = std::make_shared<Dev<float>>(q);
            auto dk = std::make_shared<Dev<float>>(k);
            auto dv = std::make_shared<Dev<float>>(v);
            auto dkc = std::make_shared<Dev<float>>(k.size());
            auto dvc = std::make_shared<Dev<float>>(v.size());
            auto dpos = std::make_shared<Dev<int32_t>>(pos);
            auto dslot = std::make_shared<Dev<int32_t>>(slot);
            auto dinv = std::make_shared<Dev<float>>(rt.inv_freq);
            dkc->poison();
            const kn::RopeParams rp{n_head, n_kv, hd, hd, neox, dinv->p, 0, rt.mscale};
            kn::rope_kv_write(rp, dq->p, dk->p, dv->p, nullptr, nullptr, nullptr, dpos->p, dslot->p, n_tok, dkc->p,
                              dvc->p, kn::KV_DEV_F32, nullptr);
            CUDA_CHECK(cudaDeviceSynchronize());
            std::vector<float> got = dq->get(), want = want_q;
            const std::vector<float> kc = dkc->get();
            got.insert(got.end(), kc.begin(), kc.end());
            want.insert(want.end(), want_k.begin(), want_k.end());
            launch = [=] {  // timing only: rotates q and k again
                kn::rope_kv_write(rp, dq->p, dk->p, dv->p, nullptr, nullptr, nullptr, dpos->p, dslot->p, n_tok, dkc->p,
                                  dvc->p, kn::KV_DEV_F32, nullptr);
            };
            return Result{nmse(got, want), double(4 * (q.size() + 2 * k.size())), 0};
        }});
    }

    // ---- rope + KV write, and paged attention over the written cache ----
    // Every KV type: the rows this batch writes must equal kv_codec.cpp's encoding of the
    // rotated K / V bit for bit (llama.cpp's q8_0 rounding); attention is checked against an F32
    // reference over the values the cache holds. Block tables are shuffled (no two neighbours
    // adjacent), entries past a sequence's last block are -1, and `shared` sequences share
    // their first blocks (a cached prefix).
    struct AttnShape {
        int n_head, n_kv, hd, n_rot;
        bool neox;
        std::vector<int> ctx;
        int n_tok;
        KvType kv;
        int run = 0;             // prompt runs of this many tokens, cut into items as the backend cuts them
        bool invariant = false;  // batch-invariant split counts
        bool shared = false;
    };
    const KvType F32 = KV_TYPE_F32, F16 = KV_TYPE_F16, Q8 = KV_TYPE_Q8_0, FP8 = KV_TYPE_FP8;
    const AttnShape attn_shapes[] = {
        {8, 4, 8, 8, false, {1, 5, 40}, 3, F16},                  // stories260K
        {8, 4, 8, 8, false, {1, 5, 40}, 3, F32},
        {8, 4, 8, 8, false, {1, 5, 40}, 3, Q8},                   // heads of under 32 values share a q8_0 block
        {8, 4, 8, 8, false, {1, 40}, 3, FP8},
        {4, 2, 16, 16, false, {1, 70}, 3, Q8},
        {4, 2, 64, 64, false, {1, 17, 300}, 4, F32},              // quant-base, F32 KV
        {32, 4, 64, 64, false, {1, 100, 1000, 32768}, 4, F16},    // TinyLlama (GQA 8)
        {32, 4, 64, 64, false, {1, 100, 4096}, 8, Q8},
        {32, 4, 64, 64, false, {1, 100, 4096}, 8, FP8},
        {32, 8, 128, 128, true, {1, 513, 4096}, 2, F16},          // Llama-3 (GQA 4), NEOX
        {32, 8, 128, 128, true, {1, 513, 16384}, 2, Q8},
        {32, 32, 128, 128, false, {1, 512}, 64, F16},             // Llama-2-7B (MHA), decode batch of 64
        {32, 32, 128, 128, false, {4096}, 8, F16, 0, false, true},
        {32, 32, 128, 128, false, {1, 512}, 16, Q8},
        {32, 32, 128, 128, false, {1, 512}, 16, FP8},
        {32, 32, 128, 128, false, {1, 512, 4096}, 8, F32},
        {16, 4, 80, 80, true, {1, 300}, 4, F16},                  // head sizes padded to the kernels' 96 / 256
        {16, 2, 96, 96, true, {1, 300}, 4, Q8},
        {8, 1, 256, 256, false, {1, 200}, 3, F16},
        {8, 1, 256, 256, false, {1, 200}, 3, FP8},
        {4, 4, 16, 16, false, {1, 70}, 3, F16},
        // Batch-invariant split counts.
        {32, 4, 64, 64, false, {1, 1000, 4096}, 4, F16, 0, true},
        {32, 32, 128, 128, false, {1, 4096}, 4, Q8, 0, true},
        // Prompt runs: sequences of `run` tokens at consecutive positions after a cached prefix.
        {32, 4, 64, 64, false, {20, 200, 1000}, 60, F16, 20},
        {32, 4, 64, 64, false, {513}, 512, F16, 512},
        {32, 4, 64, 64, false, {513, 2048}, 512, Q8, 512, false, true},
        {32, 4, 64, 64, false, {700}, 300, FP8, 100},
        {4, 2, 64, 64, false, {17, 300}, 40, F32, 13},
        {32, 8, 128, 128, true, {100, 700}, 90, F16, 45, false, true},
        {32, 32, 128, 128, false, {256, 1000}, 200, F16, 100},
        {32, 32, 128, 128, false, {1000}, 200, Q8, 100},
        {8, 4, 8, 8, false, {40}, 30, F16, 10},
        {8, 4, 8, 8, false, {40}, 30, Q8, 10},
    };
    // One row of n_kv values as the GPU stores it (kernels/kv_layout.h) from kv_codec's bytes.
    auto to_dev_row = [](KvType t, const uint8_t* cpu, int n_kvh, int hd, uint8_t* dev) {
        const int n_kv = n_kvh * hd;
        if (t == KV_TYPE_Q8_0) {
            for (int b = 0; b < n_kv / 32; ++b) {
                // Heads of under 32 values each hold a copy of their block's scale.
                for (int h = 32 * b / hd; h < std::max(32 * b / hd + 1, 32 * (b + 1) / hd); ++h) {
                    const int64_t sc = kn::kv_dev_scales_offset(kn::KV_DEV_Q8_0, n_kvh, hd, h) + (hd >= 32 ? 2 * (b % (hd / 32)) : 0);
                    std::memcpy(dev + sc, cpu + 34 * b, 2);
                }
                std::memcpy(dev + 32 * b, cpu + 34 * b + 2, 32);
            }
        } else if (t == KV_TYPE_FP8) {
            for (int h = 0; h < n_kvh; ++h) {
                std::memcpy(dev + n_kv + 4 * h, cpu + h * (4 + hd), 4);
                std::memcpy(dev + h * hd, cpu + h * (4 + hd) + 4, size_t(hd));
            }
        } else {
            std::memcpy(dev, cpu, kv_row_bytes(t, n_kv, hd));
        }
    };
    auto from_dev_row = [](KvType t, const uint8_t* dev, int n_kvh, int hd, uint8_t* cpu) {
        const int n_kv = n_kvh * hd;
        if (t == KV_TYPE_Q8_0) {
            for (int b = 0; b < n_kv / 32; ++b) {
                const int64_t sc = kn::kv_dev_scales_offset(kn::KV_DEV_Q8_0, n_kvh, hd, 32 * b / hd) + (hd >= 32 ? 2 * (b % (hd / 32)) : 0);
                std::memcpy(cpu + 34 * b, dev + sc, 2);
                std::memcpy(cpu + 34 * b + 2, dev + 32 * b, 32);
            }
        } else if (t == KV_TYPE_FP8) {
            for (int h = 0; h < n_kvh; ++h) {
                std::memcpy(cpu + h * (4 + hd), dev + n_kv + 4 * h, 4);
                std::memcpy(cpu + h * (4 + hd) + 4, dev + h * hd, size_t(hd));
            }
        } else {
            std::memcpy(cpu, dev, kv_row_bytes(t, n_kv, hd));
        }
    };
    auto dev_type = [](KvType t) {
        return t == KV_TYPE_F32 ? kn::KV_DEV_F32 : t == KV_TYPE_Q8_0 ? kn::KV_DEV_Q8_0 : t == KV_TYPE_FP8 ? kn::KV_DEV_FP8 : kn::KV_DEV_F16;
    };
    for (const AttnShape& a : attn_shapes) {
        for (int max_ctx : a.ctx) {
            // q8_0 and fp8 values reach the MMA as F16 of code x scale: one more rounding than F16 rows.
            const double bound = a.kv == KV_TYPE_F32 ? 1e-10 : a.kv == KV_TYPE_F16 ? 1e-7 : 4e-7;
            cases.push_back({fmt::format("rope_kv+attention{}{}{} heads={}/{} hd={} {} kv={} ctx<={} tokens={}{}",
                                         a.run ? "-prefill" : "", a.invariant ? "-invariant" : "", a.shared ? "-shared" : "",
                                         a.n_head, a.n_kv, a.hd, a.neox ? "neox" : "norm", kv_type_name(a.kv),
                                         max_ctx, a.n_tok, a.run ? fmt::format(" run={}", a.run) : ""),
                             bound, [=](std::function<void()>& launch) {
                const int bs = 16, n_tok = a.n_tok;
                const int64_t n_q = int64_t(a.n_head) * a.hd, n_kvd = int64_t(a.n_kv) * a.hd;
                const int n_seq = a.run ? (n_tok + a.run - 1) / a.run : n_tok;
                // Decode: token t is sequence t at position pos_t. Runs: token t is sequence
                // t / run, its run at consecutive positions after a prefix of random length.
                std::vector<int32_t> pos(static_cast<size_t>(n_tok)), seq(static_cast<size_t>(n_tok)), slot(static_cast<size_t>(n_tok));
                for (int t = 0; t < n_tok; ++t) {
                    if (a.run) {
                        seq[t] = t / a.run;
                        const int first = seq[t] * a.run;
                        if (t == first) {
                            const int span = std::max(1, max_ctx - a.run + 1);
                            pos[t] = seq[t] == 0 ? span - 1 : int32_t(rng() % uint64_t(span));
                        } else {
                            pos[t] = pos[t - 1] + 1;
                        }
                    } else {
                        pos[t] = t == 0 ? max_ctx - 1 : int32_t(rng() % uint64_t(max_ctx));
                        seq[t] = t;
                    }
                }
                std::vector<int32_t> seq_last(size_t(n_seq), 0);
                int min_first = max_ctx;
                for (int t = 0; t < n_tok; ++t) {
                    seq_last[size_t(seq[t])] = std::max(seq_last[size_t(seq[t])], pos[t]);
                    if (t == 0 || seq[t] != seq[t - 1]) min_first = std::min(min_first, int(pos[t]));
                }
                const int max_blocks = (max_ctx + bs - 1) / bs;
                const int n_shared = a.shared ? min_first / bs : 0;  // blocks below every written position
                std::vector<int32_t> perm(size_t(n_seq * max_blocks));
                for (size_t i = 0; i < perm.size(); ++i) perm[i] = int32_t(i);
                std::shuffle(perm.begin(), perm.end(), rng);
                std::vector<int32_t> tables(size_t(n_seq * max_blocks), -1);
                for (int sq = 0; sq < n_seq; ++sq)
                    for (int b = 0; b <= seq_last[size_t(sq)] / bs; ++b)
                        tables[size_t(sq * max_blocks + b)] = b < n_shared ? perm[size_t(b)] : perm[size_t(sq * max_blocks + b)];
                for (int t = 0; t < n_tok; ++t)
                    slot[t] = tables[size_t(seq[t] * max_blocks + pos[t] / bs)] * bs + pos[t] % bs;
                const int64_t n_slots = int64_t(perm.size()) * bs;
                const kn::AttentionParams ap{a.n_head, a.n_kv, a.hd, bs, 1.0f / std::sqrt(float(a.hd)), dev_type(a.kv), 0,
                                             a.invariant};
                const int64_t row = kn::kv_dev_row_bytes(ap.kv_type, a.n_kv, a.hd);
                const size_t cpu_row = kv_row_bytes(a.kv, n_kvd, a.hd);
                // The cache: random rows, encoded.
                std::vector<uint8_t> kc(size_t(n_slots * row), 0), vc(size_t(n_slots * row), 0);
                {
                    std::vector<uint8_t> enc(cpu_row);
                    const auto kr = randn(size_t(n_slots * n_kvd)), vr = randn(size_t(n_slots * n_kvd));
                    for (int64_t r = 0; r < n_slots; ++r) {
                        kv_row_encode(a.kv, &kr[size_t(r * n_kvd)], n_kvd, a.hd, enc.data());
                        to_dev_row(a.kv, enc.data(), a.n_kv, a.hd, &kc[size_t(r * row)]);
                        kv_row_encode(a.kv, &vr[size_t(r * n_kvd)], n_kvd, a.hd, enc.data());
                        to_dev_row(a.kv, enc.data(), a.n_kv, a.hd, &vc[size_t(r * row)]);
                    }
                }
                auto q = randn(size_t(n_tok * n_q)), k = randn(size_t(n_tok * n_kvd)), v = randn(size_t(n_tok * n_kvd));
                std::vector<float> inv(size_t(a.n_rot / 2));
                const float ts = std::pow(10000.0f, -2.0f / float(a.n_rot));
                float tt = 1.0f;
                for (auto& f : inv) { f = tt; tt *= ts; }
                auto rope = [&](float* x, int nh, int p) {
                    const int half = a.n_rot / 2;
                    for (int h = 0; h < nh; ++h)
                        for (int i = 0; i < half; ++i) {
                            const float th = float(p) * inv[size_t(i)], cs = std::cos(th), sn = std::sin(th);
                            float* hv = x + h * a.hd;
                            const int ia = a.neox ? i : 2 * i, ib = a.neox ? i + half : 2 * i + 1;
                            const float x0 = hv[ia], x1 = hv[ib];
                            hv[ia] = x0 * cs - x1 * sn;
                            hv[ib] = x0 * sn + x1 * cs;
                        }
                };
                std::vector<float> qr = q;
                for (int t = 0; t < n_tok; ++t) rope(&qr[size_t(t * n_q)], a.n_head, pos[t]);
                // GPU: rope + KV write, then attention.
                auto dq = std::make_shared<Dev<float>>(q);
                auto dk = std::make_shared<Dev<float>>(k);
                auto dv = std::make_shared<Dev<float>>(v);
                auto dkc = std::make_shared<Dev<uint8_t>>(kc), dvc = std::make_shared<Dev<uint8_t>>(vc);
                auto dpos = std::make_shared<Dev<int32_t>>(pos);
                auto dseq = std::make_shared<Dev<int32_t>>(seq);
                auto dslot = std::make_shared<Dev<int32_t>>(slot);
                auto dtab = std::make_shared<Dev<int32_t>>(tables);
                auto dinv = std::make_shared<Dev<float>>(inv);
                auto dpart = std::make_shared<Dev<float>>(kn::attention_scratch_floats(ap));
                const size_t part_n = dpart->n;
                auto dout = std::make_shared<Dev<float>>(size_t(n_tok * n_q));
                dout->poison();
                const kn::RopeParams rp{a.n_head, a.n_kv, a.hd, a.n_rot, a.neox, dinv->p};
                kn::rope_kv_write(rp, dq->p, dk->p, dv->p, nullptr, nullptr, nullptr, dpos->p, dslot->p, n_tok, dkc->p,
                                  dvc->p, ap.kv_type, nullptr);
                const auto qgot = dq->get(), kgot = dk->get(), vgot = dv->get();
                // Items as the backend cuts them: runs in tiles, other tokens alone.
                const int qt = kn::attention_item_tokens(ap);
                if (qt <= 0) throw std::runtime_error("no attention kernel for this head geometry");
                std::vector<int32_t> tiles, singles;
                for (int t = 0; t < n_tok;) {
                    int e = t + 1;
                    if (a.run && qt >= 2 && !a.invariant)
                        while (e < n_tok && seq[e] == seq[t] && pos[e] == pos[e - 1] + 1) ++e;
                    if (e - t >= 2) {
                        for (int s0 = t; s0 < e; s0 += qt) {
                            tiles.push_back(s0);
                            tiles.push_back(std::min(qt, e - s0));
                        }
                    } else {
                        singles.push_back(t);
                        singles.push_back(1);
                    }
                    t = e;
                }
                auto dtiles = std::make_shared<Dev<int32_t>>(tiles.empty() ? std::vector<int32_t>{0, 1} : tiles);
                auto dsingles = std::make_shared<Dev<int32_t>>(singles.empty() ? std::vector<int32_t>{0, 1} : singles);
                const int64_t n_tiles = int64_t(tiles.size() / 2), n_singles = int64_t(singles.size() / 2);
                const bool plain = !a.run;  // decode batches as the graphs run them: items = tokens
                launch = [=] {
                    const void *pk = dkc->p, *pv = dvc->p;
                    if (plain) {
                        kn::paged_attention(ap, dq->p, pk, pv, dpos->p, dseq->p, dtab->p, max_blocks, nullptr, n_tok, 1,
                                            max_ctx, dpart->p, part_n, dout->p, nullptr);
                        return;
                    }
                    kn::paged_attention(ap, dq->p, pk, pv, dpos->p, dseq->p, dtab->p, max_blocks, dtiles->p, n_tiles,
                                        std::max(qt, 1), max_ctx, dpart->p, part_n, dout->p, nullptr);
                    kn::paged_attention(ap, dq->p, pk, pv, dpos->p, dseq->p, dtab->p, max_blocks, dsingles->p, n_singles,
                                        1, max_ctx, dpart->p, part_n, dout->p, nullptr);
                };
                launch();
                const auto got = dout->get();
                const auto kc_got = dkc->get(), vc_got = dvc->get();
                // The rows written: kv_codec's encoding of the rotated K and V, byte for byte.
                int64_t bad_rows = 0;
                {
                    std::vector<uint8_t> enc(cpu_row), want_row(size_t(row), 0);
                    for (int t = 0; t < n_tok; ++t)
                        for (int which = 0; which < 2; ++which) {
                            const auto& src = which == 0 ? kgot : vgot;
                            const auto& cache = which == 0 ? kc_got : vc_got;
                            kv_row_encode(a.kv, &src[size_t(t * n_kvd)], n_kvd, a.hd, enc.data());
                            std::fill(want_row.begin(), want_row.end(), 0);
                            to_dev_row(a.kv, enc.data(), a.n_kv, a.hd, want_row.data());
                            if (std::memcmp(want_row.data(), &cache[size_t(slot[t] * row)], size_t(row)) != 0) ++bad_rows;
                        }
                }
                // Reference attention in F32 over the values the cache holds.
                auto decode_slot = [&](const std::vector<uint8_t>& cache, int64_t s, float* out) {
                    std::vector<uint8_t> cpu(cpu_row);
                    from_dev_row(a.kv, &cache[size_t(s * row)], a.n_kv, a.hd, cpu.data());
                    kv_row_decode(a.kv, cpu.data(), n_kvd, a.hd, out);
                };
                std::vector<float> want(static_cast<size_t>(n_tok * n_q));
                const float scale = ap.scale;
                for (int t = 0; t < n_tok; ++t) {
                    const int n_ctx = pos[t] + 1;
                    std::vector<float> ks(size_t(n_ctx) * size_t(n_kvd)), vs(size_t(n_ctx) * size_t(n_kvd));
                    for (int p = 0; p < n_ctx; ++p) {
                        const int64_t s = int64_t(tables[size_t(seq[t] * max_blocks + p / bs)]) * bs + p % bs;
                        decode_slot(kc_got, s, &ks[size_t(p) * size_t(n_kvd)]);
                        decode_slot(vc_got, s, &vs[size_t(p) * size_t(n_kvd)]);
                    }
                    std::vector<double> sc(static_cast<size_t>(n_ctx));
                    for (int h = 0; h < a.n_head; ++h) {
                        const int kvh = h / (a.n_head / a.n_kv);
                        double mx = -INFINITY;
                        for (int p = 0; p < n_ctx; ++p) {
                            double dot = 0;
                            for (int i = 0; i < a.hd; ++i)
                                dot += double(qgot[size_t(t * n_q + h * a.hd + i)]) * ks[size_t(p * n_kvd + kvh * a.hd + i)];
                            sc[size_t(p)] = dot * scale;
                            mx = std::max(mx, sc[size_t(p)]);
                        }
                        double sum = 0;
                        for (auto& e : sc) { e = std::exp(e - mx); sum += e; }
                        for (int i = 0; i < a.hd; ++i) {
                            double o = 0;
                            for (int p = 0; p < n_ctx; ++p) o += sc[size_t(p)] * vs[size_t(p * n_kvd + kvh * a.hd + i)];
                            want[size_t(t * n_q + h * a.hd + i)] = float(o / sum);
                        }
                    }
                }
                double e = std::max(nmse(qgot, qr) > 1e-10 ? 1.0 : 0.0, nmse(got, want));
                if (bad_rows > 0) {
                    std::printf("  %lld cache rows differ from kv_codec's encoding\n", (long long)bad_rows);
                    e = INFINITY;
                }
                double ctx_sum = 0;
                for (int t = 0; t < n_tok; ++t) ctx_sum += pos[t] + 1;
                return Result{e, ctx_sum * double(row) * 2, 4 * ctx_sum * double(n_q)};
            }});
        }
    }

    // ---- greedy sampling: exact ids (bound 0 mismatches) ----
    for (int64_t n_vocab : {512, 32000, 128256}) {
        cases.push_back({fmt::format("sample_greedy n_vocab={} rows=64", n_vocab), 0.0, [=](std::function<void()>& launch) {
                             const int64_t rows = 64;
                             auto l = randn(size_t(rows * n_vocab));
                             // Ties and NaN: row 1 has a tie at the max, row 2 a NaN at 0.
                             l[size_t(1 * n_vocab + 10)] = 50.0f;
                             l[size_t(1 * n_vocab + 3)] = 50.0f;
                             l[size_t(2 * n_vocab)] = NAN;
                             std::vector<int32_t> want(static_cast<size_t>(rows));
                             for (int64_t r = 0; r < rows; ++r) {
                                 int32_t b = -1;
                                 for (int64_t i = 0; i < n_vocab; ++i) {
                                     const float v = l[size_t(r * n_vocab + i)];
                                     if (v == v && (b < 0 || v > l[size_t(r * n_vocab + b)])) b = int32_t(i);
                                 }
                                 want[size_t(r)] = b;
                             }
                             auto dl = std::make_shared<Dev<float>>(l);
                             auto dids = std::make_shared<Dev<int32_t>>(size_t(rows));
                             dids->poison();
                             launch = [=] {
                                 kn::sample_greedy(dl->p, rows, n_vocab, nullptr, {}, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                   nullptr, dids->p, nullptr);
                             };
                             launch();
                             auto got = dids->get();
                             double bad = 0;
                             for (int64_t r = 0; r < rows; ++r) bad += got[size_t(r)] != want[size_t(r)];
                             return Result{bad, double(rows * n_vocab * 4), 0};
                         }});
    }
    return cases;
}

}  // namespace

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // line by line, so a killed run still shows its progress
    const std::string mode = argc > 1 ? argv[1] : "test";
    const std::string filter = argc > 2 ? argv[2] : "";
    if (mode != "test" && mode != "perf") {
        std::fprintf(stderr, "usage: test_gpu_ops [test|perf] [filter]\n");
        return 2;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        std::printf("SKIP: no CUDA device: GPU op tests not run\n");
        return 77;
    }
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    int mem_clock_khz = 0, bus_bits = 0;
    cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, 0);
    cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0);
    const double peak_gbs = 2.0 * mem_clock_khz * 1e3 * (bus_bits / 8) / 1e9;
    std::printf("device: %s, %d SMs, peak memory bandwidth %.0f GB/s\n", prop.name, prop.multiProcessorCount, peak_gbs);

    const int n_threads = std::max(1u, std::thread::hardware_concurrency());
    auto cases = make_cases(n_threads);
    int n_pass = 0, n_fail = 0, n_run = 0;
    for (auto& c : cases) {
        if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
        ++n_run;
        std::function<void()> launch;
        Result r;
        try {
            r = c.run(launch);
            CUDA_CHECK(cudaDeviceSynchronize());
        } catch (const std::exception& e) {
            std::printf("FAIL  %-70s  error: %s\n", c.name.c_str(), e.what());
            ++n_fail;
            continue;
        }
        const bool ok = r.err <= c.bound;
        (ok ? n_pass : n_fail)++;
        if (mode == "test") {
            std::printf("%s  %-70s  nmse=%.3g (bound %.0g)\n", ok ? "PASS" : "FAIL", c.name.c_str(), r.err, c.bound);
        } else {
            cudaEvent_t a, b;
            CUDA_CHECK(cudaEventCreate(&a));
            CUDA_CHECK(cudaEventCreate(&b));
            for (int i = 0; i < 3; ++i) launch();
            const int reps = 20;
            CUDA_CHECK(cudaEventRecord(a));
            for (int i = 0; i < reps; ++i) launch();
            CUDA_CHECK(cudaEventRecord(b));
            CUDA_CHECK(cudaEventSynchronize(b));
            float ms = 0;
            CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
            const double us = ms * 1e3 / reps;
            // Against the measured ceilings of issue 6: 3.0 TB/s copy, ~800 TFLOP/s F16 GEMM.
            const double gbs = r.bytes / us / 1e3, tflops = r.flops / us / 1e6;
            std::printf("%s  %-70s  %9.1f us  %7.1f GB/s (%4.1f%% of peak, %4.1f%% of 3.0 TB/s)  %8.2f TFLOP/s (%4.1f%% of 800)\n",
                        ok ? "ok  " : "FAIL", c.name.c_str(), us, gbs, 100.0 * gbs / peak_gbs, 100.0 * gbs / 3000.0,
                        tflops, 100.0 * tflops / 800.0);
            cudaEventDestroy(a);
            cudaEventDestroy(b);
        }
    }
    std::printf("%d/%d cases passed\n", n_pass, n_run);
    return n_fail ? 1 : 0;
}
