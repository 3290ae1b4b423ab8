#pragma once
// CUDA_CHECK / CUBLAS_CHECK: every runtime and cuBLAS call goes through these. A failure throws
// std::runtime_error naming file:line, the call and the error name, so the engine can fail the
// step (or start-up) with a message a person can act on.
#include <atomic>
#include <stdexcept>
#include <string>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

namespace coinfer::kernels {

[[noreturn]] inline void cuda_fail(const char* what, const char* name, const char* msg, const char* file, int line) {
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + " failed: " + name +
                             (msg ? std::string(" (") + msg + ")" : std::string()));
}

inline void cuda_check(cudaError_t e, const char* what, const char* file, int line) {
    if (e != cudaSuccess) cuda_fail(what, cudaGetErrorName(e), cudaGetErrorString(e), file, line);
}

// Errors after which the CUDA context is unusable: every later call returns them again.
inline bool cuda_error_is_sticky(cudaError_t e) {
    switch (e) {
        case cudaErrorIllegalAddress:
        case cudaErrorLaunchFailure:
        case cudaErrorHardwareStackError:
        case cudaErrorIllegalInstruction:
        case cudaErrorMisalignedAddress:
        case cudaErrorInvalidAddressSpace:
        case cudaErrorInvalidPc:
        case cudaErrorECCUncorrectable:
        case cudaErrorLaunchTimeout:
            return true;
        default:
            return false;
    }
}

// Streaming multiprocessors of the calling thread's current device (grids are sized by it;
// cached per device, since one process may drive several different cards).
inline int sm_count() {
    static std::atomic<int> cache[64] = {};  // 0: not read yet (racing readers store the same)
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        (void)cudaGetLastError();
        return 132;
    }
    if (dev >= 0 && dev < 64 && cache[dev].load(std::memory_order_relaxed) > 0)
        return cache[dev].load(std::memory_order_relaxed);
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
        (void)cudaGetLastError();
        n = 132;
    }
    if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
    return n;
}

inline void cublas_check(cublasStatus_t s, const char* what, const char* file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) cuda_fail(what, cublasGetStatusName(s), cublasGetStatusString(s), file, line);
}

}  // namespace coinfer::kernels

#define CUDA_CHECK(call) ::coinfer::kernels::cuda_check((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) ::coinfer::kernels::cublas_check((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here.
#define CUDA_CHECK_LAUNCH() ::coinfer::kernels::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
