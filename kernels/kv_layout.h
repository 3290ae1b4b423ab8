#pragma once
// How the CUDA backend lays out one KV cache row (one token's K or V of one layer, n_head_kv *
// head_dim values). The values are those of engine/kv_codec.h, bit for bit; only the byte order
// differs, so that a head's codes are 16-byte vectors:
//   f32, f16  the values in order (row stride n_kv values)
//   q8_0      n_kv int8 codes, then per KV head its F16 scales, one per 32 values (llama.cpp's
//             blocks of 32, its rounding), padded to an even count so that every head's group
//             is whole 4-byte words (heads of under 32 values, 32 % head_dim == 0, each hold a
//             copy of their block's scale); the row padded to 16 bytes
//   fp8       n_kv E4M3 codes, then one F32 scale per KV head, the row padded to 16 bytes
#include <cstdint>

#if defined(__CUDACC__)
#define COINFER_KV_HD __host__ __device__
#else
#define COINFER_KV_HD
#endif

namespace coinfer::kernels {

enum KvDevType : int32_t { KV_DEV_F32 = 0, KV_DEV_F16 = 1, KV_DEV_Q8_0 = 2, KV_DEV_FP8 = 3 };

// Bytes of one KV head's scales (q8_0, fp8), a multiple of 4.
COINFER_KV_HD inline int64_t kv_dev_scale_group_bytes(int32_t type, int64_t head_dim) {
    // q8_0 heads under 32 values share their block's scale: each head keeps a copy.
    const int64_t n_scales = head_dim >= 32 ? head_dim / 32 : 1;
    return type == KV_DEV_Q8_0 ? (n_scales + 1) / 2 * 4 : type == KV_DEV_FP8 ? 4 : 0;
}

// Bytes from one row to the next.
COINFER_KV_HD inline int64_t kv_dev_row_bytes(int32_t type, int64_t n_head_kv, int64_t head_dim) {
    const int64_t n_kv = n_head_kv * head_dim;
    switch (type) {
        case KV_DEV_F32: return 4 * n_kv;
        case KV_DEV_F16: return 2 * n_kv;
        case KV_DEV_Q8_0: return (n_kv + n_head_kv * kv_dev_scale_group_bytes(type, head_dim) + 15) / 16 * 16;
        case KV_DEV_FP8: return (n_kv + 4 * n_head_kv + 15) / 16 * 16;
        default: return 0;
    }
}

// Offset of KV head h's scales within a quantized row.
COINFER_KV_HD inline int64_t kv_dev_scales_offset(int32_t type, int64_t n_head_kv, int64_t head_dim, int64_t h) {
    return n_head_kv * head_dim + h * kv_dev_scale_group_bytes(type, head_dim);
}

}  // namespace coinfer::kernels
