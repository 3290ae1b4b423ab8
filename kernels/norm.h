#pragma once
// RMSNorm with the residual add fused in front of it.
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

// For r < n_rows, with s = rows ? rows[r] : r:
//   if dx: x[s] += dx[s] (written back to x when write_x)
//   y[r] = x[s] / rms(x[s]) * w       (sum of squares in double, like the CPU reference)
// x, dx: [*, n]; y: [n_rows, n]; w: [n].
void rms_norm(float* x, const float* dx, const int32_t* rows, bool write_x, const float* w, float* y, int64_t n_rows,
              int64_t n, float eps, cudaStream_t stream);

}  // namespace coinfer::kernels
