#pragma once
// Storage formats of the KV cache rows (one token's K or V of one layer: [n_head_kv * head_dim]).
//   f32   4 bytes a value
//   f16   2 bytes a value
//   q8_0  llama.cpp's blocks of 32: an F16 scale, 32 int8 (its quantizer, bit for bit)
//   fp8   per KV head an F32 scale (largest |value| / 448), then head_dim OCP FP8 E4M3 codes,
//         rounded to nearest, ties to even
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace coinfer {

enum KvType {
    KV_TYPE_AUTO,  // the backend's default: f32 on the cpu, f16 on cuda
    KV_TYPE_F32,
    KV_TYPE_F16,
    KV_TYPE_Q8_0,
    KV_TYPE_FP8,
};

// "auto", "f32", "f16", "q8_0", "fp8" -> KvType; Error naming the bad value otherwise.
KvType kv_type_from_name(std::string_view name);
std::string kv_type_name(KvType t);

// Bytes of one row of n_kv = n_head_kv * head_dim values. Error where the type cannot hold such
// a row (q8_0 needs n_kv a multiple of 32).
size_t kv_row_bytes(KvType t, int64_t n_kv, int64_t head_dim);
void kv_row_encode(KvType t, const float* x, int64_t n_kv, int64_t head_dim, uint8_t* dst);
void kv_row_decode(KvType t, const uint8_t* src, int64_t n_kv, int64_t head_dim, float* y);

// OCP FP8 E4M3 (no infinities, max 448): nearest code, ties to even; |x| > 448 saturates;
// NaN gives the NaN code 0x7f (with the sign).
uint8_t fp8_e4m3_encode(float x);
float fp8_e4m3_decode(uint8_t code);

}  // namespace coinfer
