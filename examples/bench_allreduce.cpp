// coinfer bench --mode allreduce: the all-reduce that tensor parallelism would run twice a layer,
// timed on the GPUs of this host for the message sizes a step produces (8-64 KiB: one decode
// token's hidden state, up to tens of MiB: a prompt chunk), with the in-process peer kernel and
// with NCCL, each launched eagerly and replayed from a CUDA graph (as a step's graph would).
#include <chrono>
#include <cmath>
#include <functional>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "engine/backend.h"

#if COINFER_HAVE_CUDA
#include <cuda_fp16.h>

#include "kernels/allreduce.h"
#include "kernels/cuda_check.h"
#endif

namespace coinfer::cli {

#if COINFER_HAVE_CUDA

namespace {

namespace kn = coinfer::kernels;

struct Rig {
    std::vector<int> devices;
    std::vector<cudaStream_t> streams;
    std::vector<void*> in, out;

    void sync() const {
        for (size_t r = 0; r < devices.size(); ++r) {
            CUDA_CHECK(cudaSetDevice(devices[r]));
            CUDA_CHECK(cudaStreamSynchronize(streams[r]));
        }
    }
};

// Microseconds per call of op(), over `iters` calls after a warm-up; graph: the calls are
// captured once per device and the graphs replayed. Negative when capture is refused.
double time_calls(const Rig& rig, const std::function<void()>& op, int iters, bool graph) {
    using Clock = std::chrono::steady_clock;
    for (int i = 0; i < 10; ++i) op();
    rig.sync();
    if (!graph) {
        const auto t0 = Clock::now();
        for (int i = 0; i < iters; ++i) op();
        rig.sync();
        return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters;
    }
    const size_t n = rig.devices.size();
    std::vector<cudaGraph_t> graphs(n, nullptr);
    std::vector<cudaGraphExec_t> execs(n, nullptr);
    const int per_graph = std::min(iters, 100);
    bool ok = true;
    for (size_t r = 0; r < n && ok; ++r) {
        CUDA_CHECK(cudaSetDevice(rig.devices[r]));
        ok = cudaStreamBeginCapture(rig.streams[r], cudaStreamCaptureModeRelaxed) == cudaSuccess;
    }
    if (ok) {
        try {
            for (int i = 0; i < per_graph; ++i) op();
        } catch (const std::exception&) {
            ok = false;
        }
    }
    for (size_t r = 0; r < n; ++r) {
        CUDA_CHECK(cudaSetDevice(rig.devices[r]));
        cudaStreamCaptureStatus st{};
        if (cudaStreamIsCapturing(rig.streams[r], &st) == cudaSuccess && st != cudaStreamCaptureStatusNone) {
            if (cudaStreamEndCapture(rig.streams[r], &graphs[r]) != cudaSuccess) ok = false;
        }
        if (ok && (!graphs[r] || cudaGraphInstantiate(&execs[r], graphs[r], 0) != cudaSuccess)) ok = false;
    }
    (void)cudaGetLastError();
    double us = -1;
    if (ok) {
        const int reps = std::max(1, iters / per_graph);
        auto launch = [&] {
            for (size_t r = 0; r < n; ++r) {
                CUDA_CHECK(cudaSetDevice(rig.devices[r]));
                CUDA_CHECK(cudaGraphLaunch(execs[r], rig.streams[r]));
            }
        };
        launch();
        rig.sync();
        const auto t0 = Clock::now();
        for (int i = 0; i < reps; ++i) launch();
        rig.sync();
        us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / (reps * per_graph);
    }
    for (size_t r = 0; r < n; ++r) {
        if (execs[r]) cudaGraphExecDestroy(execs[r]);
        if (graphs[r]) cudaGraphDestroy(graphs[r]);
    }
    return us;
}

}  // namespace

nlohmann::json bench_allreduce(Args& args, FILE* out) {
    const int32_t n_dev = cuda_device_count();
    const int64_t tp = args.int_value("--tp").value_or(n_dev);
    if (auto pos = args.positionals(); !pos.empty()) throw UsageError(fmt::format("unexpected argument '{}'", pos[0]));
    if (n_dev < 2) throw Error(fmt::format("--mode allreduce needs two CUDA devices or more; this machine has {}", n_dev));
    if (tp < 2 || tp > kn::PeerAllReduce::k_max_ranks || tp > n_dev)
        throw UsageError(fmt::format("--tp {} is out of range (2..{} on this machine)", tp, std::min(8, n_dev)));
    std::vector<int64_t> sizes = {8 << 10, 16 << 10, 32 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20};
    const size_t max_bytes = size_t(sizes.back());
    Rig rig;
    for (int r = 0; r < tp; ++r) rig.devices.push_back(r);
    for (int d : rig.devices) {
        CUDA_CHECK(cudaSetDevice(d));
        cudaStream_t s{};
        CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        rig.streams.push_back(s);
        void *a = nullptr, *b = nullptr;
        CUDA_CHECK(cudaMalloc(&a, max_bytes));
        CUDA_CHECK(cudaMalloc(&b, max_bytes));
        // Rank r holds (r + 1) / 64 everywhere: the sums are exact in F16, and checked.
        std::vector<__half> h(max_bytes / 2, __float2half(float(d + 1) / 64.0f));
        CUDA_CHECK(cudaMemcpy(a, h.data(), max_bytes, cudaMemcpyHostToDevice));
        rig.in.push_back(a);
        rig.out.push_back(b);
    }
    const float want = float(tp * (tp + 1) / 2) / 64.0f;
    kn::PeerAllReduce peer(rig.devices, max_bytes);
    std::unique_ptr<kn::NcclAllReduce> nccl;
    std::string nccl_note = "not in this build";
    if (kn::NcclAllReduce::available()) {
        nccl = std::make_unique<kn::NcclAllReduce>(rig.devices);
        nccl_note = "NCCL " + nccl->version();
    }
    fmt::print(out, "all-reduce (sum, F16) over {} GPUs (cuda:0..cuda:{}); {}; us per call, bus GB/s = 2 (n-1)/n x bytes / time\n",
               tp, tp - 1, nccl_note);
    fmt::print(out, "| bytes | peer eager | peer graph | NCCL eager | NCCL graph | peer graph bus GB/s |\n");
    fmt::print(out, "| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    nlohmann::json rows = nlohmann::json::array();
    auto cell = [](double us) { return us < 0 ? std::string("n/a") : fmt::format("{:.1f}", us); };
    for (int64_t bytes : sizes) {
        const int64_t n = bytes / 2;
        const int iters = bytes <= (1 << 20) ? 1000 : 100;
        auto run_peer = [&] { peer.run(kn::ReduceType::f16, rig.in.data(), rig.out.data(), n, rig.streams.data()); };
        const double pe = time_calls(rig, run_peer, iters, false);
        const double pg = time_calls(rig, run_peer, iters, true);
        // Every rank's sum, checked at both ends of the message.
        for (size_t r = 0; r < rig.devices.size(); ++r) {
            CUDA_CHECK(cudaSetDevice(rig.devices[r]));
            __half h[2];
            CUDA_CHECK(cudaMemcpy(&h[0], rig.out[r], 2, cudaMemcpyDeviceToHost));
            CUDA_CHECK(cudaMemcpy(&h[1], static_cast<char*>(rig.out[r]) + bytes - 2, 2, cudaMemcpyDeviceToHost));
            for (__half v : h)
                if (std::abs(__half2float(v) - want) > 1e-6f)
                    throw Error(fmt::format("peer all-reduce: rank {} summed {} where {} was due", r, __half2float(v), want));
        }
        if (peer.timed_out()) throw Error("peer all-reduce: a wait timed out");
        double ne = -1, ng = -1;
        if (nccl) {
            auto run_nccl = [&] { nccl->run(kn::ReduceType::f16, rig.in.data(), rig.out.data(), n, rig.streams.data()); };
            ne = time_calls(rig, run_nccl, iters, false);
            ng = time_calls(rig, run_nccl, iters, true);
        }
        const double busbw = pg > 0 ? 2.0 * double(tp - 1) / double(tp) * double(bytes) / (pg * 1e3) : 0;
        fmt::print(out, "| {} | {} | {} | {} | {} | {:.0f} |\n", bytes, cell(pe), cell(pg), cell(ne), cell(ng), busbw);
        rows.push_back({{"bytes", bytes}, {"peer_eager_us", pe}, {"peer_graph_us", pg}, {"nccl_eager_us", ne},
                        {"nccl_graph_us", ng}});
    }
    for (size_t r = 0; r < rig.devices.size(); ++r) {
        CUDA_CHECK(cudaSetDevice(rig.devices[r]));
        cudaFree(rig.in[r]);
        cudaFree(rig.out[r]);
        cudaStreamDestroy(rig.streams[r]);
    }
    return {{"mode", "allreduce"}, {"tp", tp}, {"nccl", nccl_note}, {"results", rows}};
}

#else

nlohmann::json bench_allreduce(Args&, FILE*) { throw Error("--mode allreduce needs the CUDA backend (this build has none)"); }

#endif

}  // namespace coinfer::cli
