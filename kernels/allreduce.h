#pragma once
// All-reduce (sum) across the GPUs one process drives, the collective of tensor parallelism.
// Two implementations behind one call:
//   PeerAllReduce - one kernel per GPU over peer memory (NVLink or PCIe P2P): each rank stages
//                   its input, signals every peer, and sums every rank's stage in rank order.
//                   One launch and one flag exchange, no protocol: a few microseconds for the
//                   8-64 KiB a decode step's hidden states take, where a ring pays a hop per rank.
//   NcclAllReduce - NCCL (where the build found it), for large messages and across hosts.
// Both are stream-ordered and can be captured in CUDA graphs.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

enum class ReduceType { f32, f16 };

class PeerAllReduce {
public:
    static constexpr int k_max_ranks = 8;
    static constexpr int k_max_blocks = 64;
    // Empty when every pair of `devices` can map each other's memory; else why not.
    static std::string unavailable(const std::vector<int>& devices);
    // Enables peer access between every pair and allocates each rank's stage (2 x max_bytes)
    // and flags. Throws std::runtime_error when peer access is impossible.
    PeerAllReduce(std::vector<int> devices, size_t max_bytes, double timeout_s = 10.0);
    ~PeerAllReduce();
    PeerAllReduce(const PeerAllReduce&) = delete;
    PeerAllReduce& operator=(const PeerAllReduce&) = delete;

    int size() const { return int(devices_.size()); }
    size_t max_bytes() const { return max_bytes_; }
    // out[r] = in[0] + ... + in[N-1] on every rank r (n values of `type`, summed in F32 in rank
    // order, so every rank gets the same bits), each on streams[r] of devices[r]. in[r] and out[r]
    // may be the same buffer. n * size <= max_bytes, a multiple of 16 bytes.
    void run(ReduceType type, const void* const* in, void* const* out, int64_t n, const cudaStream_t* streams);
    // Rank r's part alone (a driver with a thread per GPU calls it on each): every rank must make
    // the same sequence of calls.
    void run_rank(int r, ReduceType type, const void* in, void* out, int64_t n, cudaStream_t stream);
    // True once a wait ran past the timeout (a rank that never arrived): the sums since are
    // wrong, and the caller fails the step. Reads the device flags (synchronizes).
    bool timed_out() const;

private:
    void release() noexcept;
    std::vector<int> devices_;
    size_t max_bytes_;
    uint64_t timeout_ns_;
    std::vector<void*> stage_;       // per rank: 2 x max_bytes (alternate calls use alternate halves)
    std::vector<uint32_t*> calls_;   // per rank: calls so far (the flags' values), blocks done
    std::vector<uint32_t*> flags_;   // per rank: [k_max_ranks][k_max_blocks], written by the peers
    std::vector<uint32_t*> error_;   // per rank: nonzero after a timeout
};

class NcclAllReduce {
public:
    static bool available();  // the build has NCCL
    explicit NcclAllReduce(std::vector<int> devices);  // one communicator per device, this process
    ~NcclAllReduce();
    NcclAllReduce(const NcclAllReduce&) = delete;
    NcclAllReduce& operator=(const NcclAllReduce&) = delete;
    void run(ReduceType type, const void* const* in, void* const* out, int64_t n, const cudaStream_t* streams);
    std::string version() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace coinfer::kernels
