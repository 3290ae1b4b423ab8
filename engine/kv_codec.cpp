#include "kv_codec.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "io/error.h"
#include "quant.h"

namespace coinfer {

KvType kv_type_from_name(std::string_view name) {
    if (name == "auto") return KV_TYPE_AUTO;
    if (name == "f32") return KV_TYPE_F32;
    if (name == "f16") return KV_TYPE_F16;
    if (name == "q8_0") return KV_TYPE_Q8_0;
    if (name == "fp8") return KV_TYPE_FP8;
    throw_error("unknown KV cache type '{}' (known: auto, f32, f16, q8_0, fp8)", name);
}

std::string kv_type_name(KvType t) {
    switch (t) {
        case KV_TYPE_AUTO: return "auto";
        case KV_TYPE_F32: return "f32";
        case KV_TYPE_F16: return "f16";
        case KV_TYPE_Q8_0: return "q8_0";
        case KV_TYPE_FP8: return "fp8";
    }
    return "?";
}

namespace {

// The 127 non-negative finite E4M3 values, by code: exponent field e (bias 7), mantissa m;
// e = 0 is subnormal (m / 8 * 2^-6).
const std::array<float, 127>& fp8_values() {
    static const std::array<float, 127> v = [] {
        std::array<float, 127> a{};
        for (int c = 0; c < 127; ++c) {
            const int e = c >> 3, m = c & 7;
            a[size_t(c)] = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(1.0f + float(m) / 8.0f, e - 7);
        }
        return a;
    }();
    return v;
}

}  // namespace

uint8_t fp8_e4m3_encode(float x) {
    const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
    if (std::isnan(x)) return uint8_t(sign | 0x7f);
    const float a = std::fabs(x);
    const auto& v = fp8_values();
    if (a >= v[126]) return uint8_t(sign | 126);  // saturate at 448
    // First code whose value is >= a; then the nearer of it and the one below (ties: even code).
    const int hi = int(std::lower_bound(v.begin(), v.end(), a) - v.begin());
    if (hi == 0) return sign;
    const int lo = hi - 1;
    const float dl = a - v[size_t(lo)], dh = v[size_t(hi)] - a;
    const int c = dl < dh ? lo : dh < dl ? hi : (lo % 2 == 0 ? lo : hi);
    return uint8_t(sign | c);
}

float fp8_e4m3_decode(uint8_t code) {
    const int c = code & 0x7f;
    const float a = c == 0x7f ? std::nanf("") : fp8_values()[size_t(c)];
    return (code & 0x80) ? -a : a;
}

size_t kv_row_bytes(KvType t, int64_t n_kv, int64_t head_dim) {
    switch (t) {
        case KV_TYPE_AUTO:
        case KV_TYPE_F32: return size_t(n_kv) * 4;
        case KV_TYPE_F16: return size_t(n_kv) * 2;
        case KV_TYPE_Q8_0:
            if (n_kv % 32 != 0)
                throw_error("KV cache type q8_0 needs rows of a multiple of 32 values; this model's are {}", n_kv);
            return size_t(n_kv / 32) * 34;
        case KV_TYPE_FP8: return size_t(n_kv / head_dim) * size_t(4 + head_dim);
    }
    throw_error("kv_row_bytes: bad KV type {}", int(t));
}

void kv_row_encode(KvType t, const float* x, int64_t n_kv, int64_t head_dim, uint8_t* dst) {
    switch (t) {
        case KV_TYPE_AUTO:
        case KV_TYPE_F32: std::memcpy(dst, x, size_t(n_kv) * 4); return;
        case KV_TYPE_F16: quantize_row(GGML_TYPE_F16, x, dst, n_kv); return;
        case KV_TYPE_Q8_0: quantize_row(GGML_TYPE_Q8_0, x, dst, n_kv); return;
        case KV_TYPE_FP8:
            for (int64_t h = 0; h < n_kv / head_dim; ++h) {
                const float* xh = x + h * head_dim;
                uint8_t* d = dst + h * (4 + head_dim);
                float amax = 0.0f;
                for (int64_t i = 0; i < head_dim; ++i) amax = std::max(amax, std::fabs(xh[i]));
                const float scale = amax / 448.0f;
                const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
                std::memcpy(d, &scale, 4);
                for (int64_t i = 0; i < head_dim; ++i) d[4 + i] = fp8_e4m3_encode(xh[i] * inv);
            }
            return;
    }
}

void kv_row_decode(KvType t, const uint8_t* src, int64_t n_kv, int64_t head_dim, float* y) {
    switch (t) {
        case KV_TYPE_AUTO:
        case KV_TYPE_F32: std::memcpy(y, src, size_t(n_kv) * 4); return;
        case KV_TYPE_F16: dequantize_row(GGML_TYPE_F16, src, y, n_kv); return;
        case KV_TYPE_Q8_0: dequantize_row(GGML_TYPE_Q8_0, src, y, n_kv); return;
        case KV_TYPE_FP8:
            for (int64_t h = 0; h < n_kv / head_dim; ++h) {
                const uint8_t* s = src + h * (4 + head_dim);
                float scale;
                std::memcpy(&scale, s, 4);
                for (int64_t i = 0; i < head_dim; ++i) y[h * head_dim + i] = fp8_e4m3_decode(s[4 + i]) * scale;
            }
            return;
    }
}

}  // namespace coinfer
