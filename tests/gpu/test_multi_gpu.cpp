// Several GPUs in one process: engines bound to cuda:0 and cuda:1 serve side by side, each
// allocating on its own card whatever device the constructing thread had current, and give the
// reference greedy ids. Skips (exit 77) on a machine with fewer than two CUDA devices.
#include <doctest/doctest.h>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <map>
#include <random>

#include "engine/generate.h"
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
    Engine e1(io.get_executor(), options("cuda:1", 0));  // its pool takes most of cuda:1
    const size_t free0_after = free_bytes(0), free1_after = free_bytes(1);
    MESSAGE("cuda:1 engine took " << (free1 - free1_after) / (1 << 20) << " MiB of cuda:1 and "
                                  << (free0 - std::min(free0, free0_after)) / (1 << 20) << " MiB of cuda:0");
    CHECK(free1 - free1_after > (size_t(8) << 30));
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
