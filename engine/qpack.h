#pragma once
// Packing of quantized weight matrices into the CUDA backend's layout (kernels/qpack.h), on the
// host at upload time, and the reference that reads a packed matrix back (for tests).
#include <cstddef>
#include <cstdint>
#include <functional>

#include "io/ggml_types.h"

namespace coinfer {

// Whether `type` has a packed layout (the block-quantized formats the GPU products take).
bool qpack_supported(GgmlType type);

// Bytes of the packed matrix.
size_t qpack_size(GgmlType type, int64_t n_in, int64_t n_out);

// Packs row tiles [tile0, tile1) (16 rows each) of a matrix of n_out rows of n_in values; row(r)
// gives the file bytes of row r (r < n_out). dst: the whole packed matrix (qpack_size bytes);
// only those tiles' bytes are written. n_in must be a multiple of the block size. Throws
// coinfer::Error where a group's scale (times the code offset) leaves the F16 range, which the
// GPU arithmetic needs.
void qpack_tiles(GgmlType type, int64_t n_in, int64_t n_out, const std::function<const uint8_t*(int64_t)>& row,
                 int64_t tile0, int64_t tile1, uint8_t* dst);

// Row r of a packed matrix as F32: codes and scales read back from the layout and combined with
// the format's own F32 arithmetic, so the values equal dequantize_row's bit for bit.
void qpack_dequantize_row(GgmlType type, const uint8_t* packed, int64_t n_in, int64_t n_out, int64_t r, float* out);

}  // namespace coinfer
