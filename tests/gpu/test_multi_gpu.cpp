// Several GPUs in one process: engines bound to cuda:0 and cuda:1 serve side by side, each
// allocating on its own card whatever device the constructing thread had current, and give the
// reference greedy ids; the all-reduce of tensor parallelism (peer kernel and NCCL) sums
// exactly, from graphs too, and gives up on a missing peer. Skips (exit 77) on a machine with
// fewer than two CUDA devices.
#include <doctest/doctest.h>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <random>

#include "engine/generate.h"
#include "kernels/allreduce.h"
#include "scheduler/engine.h"
#include "test_models.h"

using namespace coinfer;

namespace {

bool have_two_gpus() {
    static const bool ok = [] {
        const int32_t n = cuda_device_count();
        if (n < 2) {
            std::fprintf(stderr, "SKIP: %d CUDA device(s): the multi-GPU tests need two\n", n);
            test::mark_skipped("fewer than two CUDA devices");
        }
        return n >= 2;
    }();
    return ok;
}

std::shared_ptr<const Model> stories() {
    static std::shared_ptr<const Model> model = [] {
        auto path = test::model_file("stories260K.gguf");
        return path ? Model::load(*path) : nullptr;
    }();
    return model;
}

const char* const k_prompts[] = {"Once upon a time", "The little dog", "Lily wanted to", "One day, a", "Tom and"};

// Greedy ids of a prompt run alone on the CPU (the GPU's batch-invariant path gives the same).
const std::vector<TokenId>& reference(const std::vector<TokenId>& prompt_ids) {
    static std::map<std::vector<TokenId>, std::vector<TokenId>> cache;
    if (auto it = cache.find(prompt_ids); it != cache.end()) return it->second;
    auto model = stories();
    BackendOptions bo;
    bo.n_blocks = 16;
    auto backend = make_cpu_backend(model, bo);
    KvBlockPool pool(backend->n_blocks(), backend->block_size());
    GenerateOptions g;
    g.max_tokens = 48;
    g.sampling.temperature = 0;
    return cache.emplace(prompt_ids, generate(*backend, pool, *model, prompt_ids, g).ids).first->second;
}

EngineOptions options(const std::string& device, int32_t n_blocks) {
    EngineOptions o;
    o.loaded = stories();
    o.device = device;
    o.backend.n_blocks = n_blocks;
    o.backend.batch_invariant = true;  // compared with the request run alone
    return o;
}

size_t free_bytes(int dev) {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(dev);
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    cudaSetDevice(prev);
    return free_b;
}

}  // namespace

TEST_CASE("two engines on cuda:0 and cuda:1 serve side by side, each on its own card") {
    if (!have_two_gpus() || !stories()) return;
    // The thread that builds them has the other card current: each must bind its own.
    REQUIRE(cudaSetDevice(1) == cudaSuccess);
    asio::io_context io;
    Engine e0(io.get_executor(), options("cuda:0", 1024));
    const size_t free0 = free_bytes(0), free1 = free_bytes(1);
    REQUIRE(cudaSetDevice(0) == cudaSuccess);
    Engine e1(io.get_executor(), options("cuda:1", 0));  // pool sized from cuda:1's free memory
    const size_t free0_after = free_bytes(0), free1_after = free_bytes(1);
    MESSAGE("cuda:1 engine took " << (free1 - free1_after) / (1 << 20) << " MiB of cuda:1 and "
                                  << (free0 - std::min(free0, free0_after)) / (1 << 20) << " MiB of cuda:0");
    // stories260K's pool is capped by tokens, not memory: 0.31 GiB of KV on the card.
    CHECK(free1 - free1_after > (size_t(256) << 20));
    CHECK(free0 - std::min(free0, free0_after) < (size_t(64) << 20));

    std::mt19937 rng(7);
    int n_ok[2] = {0, 0}, n_done[2] = {0, 0};
    const int n = 200;
    for (int i = 0; i < n; ++i) {
        Request r;
        r.prompt = k_prompts[rng() % std::size(k_prompts)];
        r.max_tokens = std::uniform_int_distribution<int32_t>(8, 48)(rng);
        r.sampling.temperature = 0;
        for (int e = 0; e < 2; ++e) {
            (e == 0 ? e0 : e1).async_complete(r, [&, e, m = r.max_tokens](std::error_code ec, Completion c) {
                ++n_done[e];
                if (ec) return;
                const auto& ref = reference(c.prompt_ids);
                const std::vector<TokenId> want(ref.begin(), ref.begin() + std::min<size_t>(ref.size(), size_t(m)));
                n_ok[e] += c.ids == want;
            });
        }
    }
    io.run();
    for (int e = 0; e < 2; ++e) {
        CHECK(n_done[e] == n);
        CHECK(n_ok[e] == n);
    }
    const EngineStats s0 = e0.stats(), s1 = e1.stats();
    MESSAGE("peak batch: cuda:0 " << s0.peak_batch_seqs << ", cuda:1 " << s1.peak_batch_seqs);
    CHECK(s0.peak_batch_seqs > 8);
    CHECK(s1.peak_batch_seqs > 8);
    CHECK(s0.kv_blocks_free == s0.kv_blocks_total);
    CHECK(s1.kv_blocks_free == s1.kv_blocks_total);
}

TEST_CASE("a device ordinal past the last card is refused by name") {
    if (!have_two_gpus() || !stories()) return;
    asio::io_context io;
    const std::string bad = "cuda:" + std::to_string(cuda_device_count());
    CHECK_THROWS_WITH_AS(Engine(io.get_executor(), options(bad, 64)), doctest::Contains("is not present"), Error);
}

TEST_CASE("the peer all-reduce sums every rank's values in rank order, in place or not, eager and from graphs") {
    if (!have_two_gpus()) return;
    namespace kn = coinfer::kernels;
    const std::vector<int> devs = {0, 1};
    REQUIRE(kn::PeerAllReduce::unavailable(devs).empty());
    const int64_t n_max = int64_t(1) << 20;  // floats
    kn::PeerAllReduce ar(devs, size_t(n_max) * 4);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<std::vector<float>> host(2, std::vector<float>(size_t(n_max)));
    std::vector<void*> in(2), out(2);
    std::vector<cudaStream_t> streams(2);
    for (int r = 0; r < 2; ++r) {
        for (float& v : host[size_t(r)]) v = nd(rng);
        REQUIRE(cudaSetDevice(r) == cudaSuccess);
        REQUIRE(cudaStreamCreate(&streams[size_t(r)]) == cudaSuccess);
        REQUIRE(cudaMalloc(&in[size_t(r)], size_t(n_max) * 4) == cudaSuccess);
        REQUIRE(cudaMalloc(&out[size_t(r)], size_t(n_max) * 4) == cudaSuccess);
    }
    auto upload = [&] {
        for (int r = 0; r < 2; ++r) {
            REQUIRE(cudaSetDevice(r) == cudaSuccess);
            REQUIRE(cudaMemcpy(in[size_t(r)], host[size_t(r)].data(), size_t(n_max) * 4, cudaMemcpyHostToDevice) ==
                    cudaSuccess);
        }
    };
    // Every rank's first n sums, against 0 + x0 + x1 in F32 (the kernel's order: equal bits).
    auto check_f32 = [&](const std::vector<void*>& res, int64_t n) {
        int64_t bad = 0;
        for (int r = 0; r < 2; ++r) {
            std::vector<float> got(static_cast<size_t>(n));
            REQUIRE(cudaSetDevice(r) == cudaSuccess);
            REQUIRE(cudaMemcpy(got.data(), res[size_t(r)], size_t(n) * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
            for (int64_t i = 0; i < n; ++i) {
                float want = 0.0f;
                want += host[0][size_t(i)];
                want += host[1][size_t(i)];
                bad += got[size_t(i)] != want;
            }
        }
        return bad;
    };
    upload();
    for (int64_t n : {int64_t(4), int64_t(2048), int64_t(16384), int64_t(300000), n_max}) {
        ar.run(kn::ReduceType::f32, in.data(), out.data(), n, streams.data());
        for (int r = 0; r < 2; ++r) {
            REQUIRE(cudaSetDevice(r) == cudaSuccess);
            REQUIRE(cudaStreamSynchronize(streams[size_t(r)]) == cudaSuccess);
        }
        CHECK_MESSAGE(check_f32(out, n) == 0, "n = " << n);
    }
    // In place, three calls in a row (alternate stage halves), sizes changing between them.
    for (int k = 0; k < 3; ++k) {
        upload();
        const int64_t n = k == 1 ? 4096 : 65536;
        ar.run(kn::ReduceType::f32, in.data(), in.data(), n, streams.data());
        for (int r = 0; r < 2; ++r) {
            REQUIRE(cudaSetDevice(r) == cudaSuccess);
            REQUIRE(cudaStreamSynchronize(streams[size_t(r)]) == cudaSuccess);
        }
        CHECK(check_f32(in, n) == 0);
    }
    // F16: the F32 sum rounded once.
    upload();
    std::vector<std::vector<__half>> hh(2, std::vector<__half>(8192));
    for (int r = 0; r < 2; ++r) {
        for (size_t i = 0; i < hh[size_t(r)].size(); ++i) hh[size_t(r)][i] = __float2half(host[size_t(r)][i]);
        REQUIRE(cudaSetDevice(r) == cudaSuccess);
        REQUIRE(cudaMemcpy(in[size_t(r)], hh[size_t(r)].data(), 8192 * 2, cudaMemcpyHostToDevice) == cudaSuccess);
    }
    ar.run(kn::ReduceType::f16, in.data(), out.data(), 8192, streams.data());
    int64_t bad16 = 0;
    for (int r = 0; r < 2; ++r) {
        std::vector<__half> got(8192);
        REQUIRE(cudaSetDevice(r) == cudaSuccess);
        REQUIRE(cudaMemcpy(got.data(), out[size_t(r)], 8192 * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
        for (size_t i = 0; i < got.size(); ++i) {
            float want = 0.0f;
            want += __half2float(hh[0][i]);
            want += __half2float(hh[1][i]);
            bad16 += __half_as_ushort(got[i]) != __half_as_ushort(__float2half_rn(want));
        }
    }
    CHECK(bad16 == 0);
    // Graphs: 5 calls captured per device, replayed 3 times; the call count lives on the device.
    upload();
    std::vector<cudaGraphExec_t> execs(2);
    for (int r = 0; r < 2; ++r) {
        REQUIRE(cudaSetDevice(r) == cudaSuccess);
        REQUIRE(cudaStreamBeginCapture(streams[size_t(r)], cudaStreamCaptureModeRelaxed) == cudaSuccess);
    }
    for (int k = 0; k < 5; ++k) ar.run(kn::ReduceType::f32, in.data(), out.data(), 65536, streams.data());
    for (int r = 0; r < 2; ++r) {
        cudaGraph_t g{};
        REQUIRE(cudaSetDevice(r) == cudaSuccess);
        REQUIRE(cudaStreamEndCapture(streams[size_t(r)], &g) == cudaSuccess);
        REQUIRE(cudaGraphInstantiate(&execs[size_t(r)], g, 0) == cudaSuccess);
        cudaGraphDestroy(g);
    }
    for (int rep = 0; rep < 3; ++rep) {
        for (int r = 0; r < 2; ++r) {
            REQUIRE(cudaSetDevice(r) == cudaSuccess);
            REQUIRE(cudaMemsetAsync(out[size_t(r)], 0, 65536 * 4, streams[size_t(r)]) == cudaSuccess);
            REQUIRE(cudaGraphLaunch(execs[size_t(r)], streams[size_t(r)]) == cudaSuccess);
        }
        for (int r = 0; r < 2; ++r) {
            REQUIRE(cudaSetDevice(r) == cudaSuccess);
            REQUIRE(cudaStreamSynchronize(streams[size_t(r)]) == cudaSuccess);
        }
        CHECK_MESSAGE(check_f32(out, 65536) == 0, "replay " << rep);
    }
    CHECK(!ar.timed_out());
    if (kn::NcclAllReduce::available()) {
        kn::NcclAllReduce nccl(devs);
        MESSAGE("NCCL " << nccl.version());
        nccl.run(kn::ReduceType::f32, in.data(), out.data(), 65536, streams.data());
        for (int r = 0; r < 2; ++r) {
            REQUIRE(cudaSetDevice(r) == cudaSuccess);
            REQUIRE(cudaStreamSynchronize(streams[size_t(r)]) == cudaSuccess);
        }
        CHECK(check_f32(out, 65536) == 0);  // two terms: any order gives the same bits
    }
    for (int r = 0; r < 2; ++r) {
        REQUIRE(cudaSetDevice(r) == cudaSuccess);
        cudaGraphExecDestroy(execs[size_t(r)]);
        cudaFree(in[size_t(r)]);
        cudaFree(out[size_t(r)]);
        cudaStreamDestroy(streams[size_t(r)]);
    }
}

TEST_CASE("a peer that never arrives ends the wait with a timeout, not a hang") {
    if (!have_two_gpus()) return;
    namespace kn = coinfer::kernels;
    // Only rank 0 runs: its wait for rank 1 must give up after the timeout and say so.
    kn::PeerAllReduce ar({0, 1}, 1 << 16, 0.2);
    void* buf = nullptr;
    REQUIRE(cudaSetDevice(0) == cudaSuccess);
    REQUIRE(cudaMalloc(&buf, 1 << 16) == cudaSuccess);
    cudaStream_t s{};
    REQUIRE(cudaStreamCreate(&s) == cudaSuccess);
    const auto t0 = std::chrono::steady_clock::now();
    ar.run_rank(0, kn::ReduceType::f32, buf, buf, 4096, s);
    REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK(ar.timed_out());
    CHECK(secs < 5.0);
    cudaFree(buf);
    cudaStreamDestroy(s);
}
