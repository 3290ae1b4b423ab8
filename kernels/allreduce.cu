#include "allreduce.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <stdexcept>

#include "cuda_check.h"

#if COINFER_HAVE_NCCL
#include <nccl.h>
#endif

namespace coinfer::kernels {

namespace {

constexpr int k_threads = 256;

struct PeerArgs {
    const uint4* stage[PeerAllReduce::k_max_ranks];  // each rank's stage: two halves of half_vec
    uint32_t* flags[PeerAllReduce::k_max_ranks];
    const uint4* in;
    uint4* out;
    uint32_t* calls;  // this rank's: [0] calls so far, [1] blocks of this call finished
    uint32_t* error;
    int64_t n_vec;    // 16-byte vectors
    int64_t half_vec;
    uint64_t timeout_ns;
    int rank, n_ranks;
};

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// A peer's stage, written during this kernel: never from a cache line read before the flag.
__device__ __forceinline__ uint4 load_volatile(const uint4* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

template <ReduceType T>
__device__ __forceinline__ void accumulate(float (&acc)[8], uint4 v) {
    if constexpr (T == ReduceType::f32) {
        acc[0] += __uint_as_float(v.x);
        acc[1] += __uint_as_float(v.y);
        acc[2] += __uint_as_float(v.z);
        acc[3] += __uint_as_float(v.w);
    } else {
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
            acc[2 * k] += f.x;
            acc[2 * k + 1] += f.y;
        }
    }
}

template <ReduceType T>
__device__ __forceinline__ uint4 pack(const float (&acc)[8]) {
    if constexpr (T == ReduceType::f32) {
        return make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]),
                          __float_as_uint(acc[3]));
    } else {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const __half2 h = __floats2half2_rn(acc[2 * k], acc[2 * k + 1]);
            w[k] = *reinterpret_cast<const uint32_t*>(&h);
        }
        return make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// Block b of every rank handles the same slice of vectors: it stages its input slice, tells
// block b of every rank (thread q signals rank q) with its call number, waits for theirs, then
// sums the slice from every rank's stage in rank order. Calls are counted on the device (the
// last block to finish counts one), so a CUDA graph replaying the kernel counts on.
template <ReduceType T>
__global__ void __launch_bounds__(k_threads) peer_allreduce_kernel(PeerArgs a) {
    __shared__ uint32_t s_epoch;
    if (threadIdx.x == 0) {
        uint32_t e = *reinterpret_cast<volatile uint32_t*>(a.calls) + 1;
        s_epoch = e == 0 ? 1 : e;  // 0 is the flags' initial value
    }
    __syncthreads();
    const uint32_t epoch = s_epoch;
    // Alternate halves: a rank starting call k+1 may still find a slower peer reading call k's
    // stage, but never call k-1's (that peer signalled k only after its call k-1 had ended).
    const int64_t half = (epoch & 1) * a.half_vec;
    const int64_t per = (a.n_vec + gridDim.x - 1) / gridDim.x;
    const int64_t v0 = int64_t(blockIdx.x) * per, v1 = min(a.n_vec, v0 + per);
    uint4* mine = const_cast<uint4*>(a.stage[a.rank]) + half;
    for (int64_t i = v0 + threadIdx.x; i < v1; i += k_threads) mine[i] = a.in[i];
    __syncthreads();
    const int q = int(threadIdx.x);
    if (q < a.n_ranks) {
        __threadfence_system();  // the block's staged slice, before the word that announces it
        store_release_sys(a.flags[q] + a.rank * PeerAllReduce::k_max_blocks + blockIdx.x, epoch);
        const uint32_t* f = a.flags[a.rank] + q * PeerAllReduce::k_max_blocks + blockIdx.x;
        const uint64_t t0 = global_ns();
        while (int32_t(load_acquire_sys(f) - epoch) < 0) {
            if (global_ns() - t0 > a.timeout_ns) {  // a rank that never came: say so, do not hang
                atomicExch(a.error, 1u);
                break;
            }
        }
    }
    __syncthreads();
    for (int64_t i = v0 + threadIdx.x; i < v1; i += k_threads) {
        float acc[8] = {};
        for (int r = 0; r < a.n_ranks; ++r) accumulate<T>(acc, load_volatile(a.stage[r] + half + i));
        a.out[i] = pack<T>(acc);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(&a.calls[1], 1u) == gridDim.x - 1) {  // every block has read the count
            a.calls[1] = 0;
            a.calls[0] = epoch;
        }
    }
}

struct DeviceRestore {
    int prev = 0;
    DeviceRestore() { CUDA_CHECK(cudaGetDevice(&prev)); }
    ~DeviceRestore() { (void)cudaSetDevice(prev); }
};

size_t type_size(ReduceType t) { return t == ReduceType::f32 ? 4 : 2; }

}  // namespace

std::string PeerAllReduce::unavailable(const std::vector<int>& devices) {
    if (devices.size() < 2) return "an all-reduce needs at least two devices";
    if (devices.size() > size_t(k_max_ranks)) return "more than 8 devices";
    for (int i : devices)
        for (int j : devices) {
            if (i == j) continue;
            int ok = 0;
            if (cudaDeviceCanAccessPeer(&ok, i, j) != cudaSuccess) {
                (void)cudaGetLastError();
                ok = 0;
            }
            if (!ok) return "cuda:" + std::to_string(i) + " cannot map the memory of cuda:" + std::to_string(j);
        }
    return {};
}

PeerAllReduce::PeerAllReduce(std::vector<int> devices, size_t max_bytes, double timeout_s)
    : devices_(std::move(devices)), max_bytes_((max_bytes + 15) / 16 * 16), timeout_ns_(uint64_t(timeout_s * 1e9)) {
    if (std::string why = unavailable(devices_); !why.empty()) throw std::runtime_error("peer all-reduce: " + why);
    DeviceRestore restore;
    try {
        for (int i : devices_) {
            CUDA_CHECK(cudaSetDevice(i));
            for (int j : devices_) {
                if (i == j) continue;
                const cudaError_t e = cudaDeviceEnablePeerAccess(j, 0);
                if (e == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError();
                else CUDA_CHECK(e);
            }
            void* s = nullptr;
            uint32_t *f = nullptr, *err = nullptr, *calls = nullptr;
            CUDA_CHECK(cudaMalloc(&s, 2 * max_bytes_));
            stage_.push_back(s);
            CUDA_CHECK(cudaMalloc(&f, sizeof(uint32_t) * k_max_ranks * k_max_blocks));
            flags_.push_back(f);
            CUDA_CHECK(cudaMalloc(&err, sizeof(uint32_t)));
            error_.push_back(err);
            CUDA_CHECK(cudaMalloc(&calls, 2 * sizeof(uint32_t)));
            calls_.push_back(calls);
            CUDA_CHECK(cudaMemset(calls, 0, 2 * sizeof(uint32_t)));
            CUDA_CHECK(cudaMemset(f, 0, sizeof(uint32_t) * k_max_ranks * k_max_blocks));
            CUDA_CHECK(cudaMemset(err, 0, sizeof(uint32_t)));
            CUDA_CHECK(cudaDeviceSynchronize());
        }
    } catch (...) {
        release();
        throw;
    }
}

PeerAllReduce::~PeerAllReduce() { release(); }

void PeerAllReduce::release() noexcept {
    for (size_t r = 0; r < stage_.size(); ++r) {
        (void)cudaSetDevice(devices_[r]);
        (void)cudaDeviceSynchronize();
        cudaFree(stage_[r]);
        if (r < flags_.size()) cudaFree(flags_[r]);
        if (r < error_.size()) cudaFree(error_[r]);
        if (r < calls_.size()) cudaFree(calls_[r]);
    }
    stage_.clear();
    calls_.clear();
    flags_.clear();
    error_.clear();
}

void PeerAllReduce::run(ReduceType type, const void* const* in, void* const* out, int64_t n, const cudaStream_t* streams) {
    for (int r = 0; r < size(); ++r) run_rank(r, type, in[r], out[r], n, streams[r]);
}

void PeerAllReduce::run_rank(int r, ReduceType type, const void* in, void* out, int64_t n, cudaStream_t stream) {
    const size_t bytes = size_t(n) * type_size(type);
    if (n < 0 || bytes > max_bytes_ || bytes % 16 != 0)
        throw std::runtime_error("peer all-reduce: " + std::to_string(bytes) + " bytes (at most " +
                                 std::to_string(max_bytes_) + ", a multiple of 16)");
    if (r < 0 || r >= size()) throw std::runtime_error("peer all-reduce: no rank " + std::to_string(r));
    if (bytes == 0) return;
    PeerArgs a{};
    for (int q = 0; q < size(); ++q) {
        a.stage[q] = static_cast<const uint4*>(stage_[size_t(q)]);
        a.flags[q] = flags_[size_t(q)];
    }
    a.n_vec = int64_t(bytes / 16);
    a.half_vec = int64_t(max_bytes_ / 16);
    a.timeout_ns = timeout_ns_;
    a.n_ranks = size();
    a.rank = r;
    a.in = static_cast<const uint4*>(in);
    a.out = static_cast<uint4*>(out);
    a.error = error_[size_t(r)];
    a.calls = calls_[size_t(r)];
    const unsigned blocks = unsigned(std::clamp<int64_t>((a.n_vec + k_threads - 1) / k_threads, 1, k_max_blocks));
    DeviceRestore restore;
    CUDA_CHECK(cudaSetDevice(devices_[size_t(r)]));
    if (type == ReduceType::f32) peer_allreduce_kernel<ReduceType::f32><<<blocks, k_threads, 0, stream>>>(a);
    else peer_allreduce_kernel<ReduceType::f16><<<blocks, k_threads, 0, stream>>>(a);
    CUDA_CHECK_LAUNCH();
}

bool PeerAllReduce::timed_out() const {
    DeviceRestore restore;
    for (size_t r = 0; r < error_.size(); ++r) {
        CUDA_CHECK(cudaSetDevice(devices_[r]));
        uint32_t e = 0;
        CUDA_CHECK(cudaMemcpy(&e, error_[r], sizeof e, cudaMemcpyDeviceToHost));
        if (e) return true;
    }
    return false;
}

#if COINFER_HAVE_NCCL

namespace {
void nccl_check(ncclResult_t r, const char* what) {
    if (r != ncclSuccess) throw std::runtime_error(std::string(what) + " failed: " + ncclGetErrorString(r));
}
}  // namespace

struct NcclAllReduce::Impl {
    std::vector<int> devices;
    std::vector<ncclComm_t> comms;
};

bool NcclAllReduce::available() { return true; }

NcclAllReduce::NcclAllReduce(std::vector<int> devices) : impl_(std::make_unique<Impl>()) {
    impl_->devices = std::move(devices);
    impl_->comms.resize(impl_->devices.size());
    DeviceRestore restore;
    nccl_check(ncclCommInitAll(impl_->comms.data(), int(impl_->devices.size()), impl_->devices.data()),
               "ncclCommInitAll");
}

NcclAllReduce::~NcclAllReduce() {
    for (ncclComm_t c : impl_->comms) ncclCommDestroy(c);
}

void NcclAllReduce::run(ReduceType type, const void* const* in, void* const* out, int64_t n, const cudaStream_t* streams) {
    DeviceRestore restore;
    nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (size_t r = 0; r < impl_->comms.size(); ++r)
        nccl_check(ncclAllReduce(in[r], out[r], size_t(n), type == ReduceType::f32 ? ncclFloat32 : ncclFloat16, ncclSum,
                                 impl_->comms[r], streams[r]),
                   "ncclAllReduce");
    nccl_check(ncclGroupEnd(), "ncclGroupEnd");
}

std::string NcclAllReduce::version() const {
    int v = 0;
    ncclGetVersion(&v);
    return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

#else  // no NCCL in this build

struct NcclAllReduce::Impl {};
bool NcclAllReduce::available() { return false; }
NcclAllReduce::NcclAllReduce(std::vector<int>) { throw std::runtime_error("this build has no NCCL (-Dnccl)"); }
NcclAllReduce::~NcclAllReduce() = default;
void NcclAllReduce::run(ReduceType, const void* const*, void* const*, int64_t, const cudaStream_t*) {}
std::string NcclAllReduce::version() const { return {}; }

#endif

}  // namespace coinfer::kernels
