// CPU reference for ggml weight formats. Layouts and formulas follow ggml's block formats
// (QK_K = 256 for the K-quants). Every block struct holds bytes only, so rows from a file need no
// particular alignment; 16-bit fields are read with memcpy (little-endian host assumed).
#include "quant.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "io/error.h"

static_assert(std::endian::native == std::endian::little, "GGUF data is little-endian");

namespace coinfer {

// ---------------------------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------------------------

namespace {

// Internal-linkage copies of the conversions: with -fPIC the exported ones could be interposed,
// so GCC would not inline them into the row loops.
inline float half_to_float(uint16_t h) {
    // Branch-free so that row conversions vectorize. Normal numbers rebias the exponent
    // (+112); inf/NaN (exponent 31) get a second +112 to reach 255 and keep the NaN payload;
    // zero/subnormals are mant * 2^-24, exact in float.
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    const uint32_t normal = (em << 13) + (112u << 23);
    const uint32_t sub = std::bit_cast<uint32_t>(float(int32_t(em)) * 0x1p-24f);
    const uint32_t is_sub = 0u - uint32_t(em < 0x400u);     // all ones or zero
    const uint32_t is_inf = 0u - uint32_t(em >= 0x7c00u);
    const uint32_t bits = (sub & is_sub) | (~is_sub & (normal + (is_inf & (112u << 23))));
    return std::bit_cast<float>(sign | bits);
}

inline uint16_t float_to_half(float f) {
    const uint32_t u_all = std::bit_cast<uint32_t>(f);
    const uint16_t sign = uint16_t((u_all >> 16) & 0x8000u);
    const uint32_t u = u_all & 0x7fffffffu;
    if (u >= 0x7f800000u) {
        if (u == 0x7f800000u) return sign | 0x7c00u;
        return uint16_t(sign | 0x7e00u | ((u >> 13) & 0x3ffu));  // quiet NaN, keeps payload top
    }
    if (u >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
    if (u >= 0x38800000u) {
        // Normal half: rebias the exponent, round the 13 dropped bits to nearest even. A carry
        // out of the mantissa correctly bumps the exponent.
        uint32_t h = (u - (112u << 23)) >> 13;
        const uint32_t rem = u & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
        return uint16_t(sign | h);
    }
    if (u <= 0x33000000u) return sign;  // <= 2^-25 (a tie with 0) rounds to zero
    // Subnormal half: value / 2^-24 = mant24 * 2^(e + 1), e = unbiased exponent in [-25, -15].
    const int e = int(u >> 23) - 127;
    const uint32_t mant = (u & 0x7fffffu) | 0x800000u;
    const int r = -(e + 1);  // 14..24
    uint32_t q = mant >> r;
    const uint32_t rem = mant & ((1u << r) - 1);
    const uint32_t half = 1u << (r - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;  // q may become 0x400: smallest normal
    return uint16_t(sign | q);
}

inline float bfloat_to_float(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }

inline uint16_t float_to_bfloat(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

float fp16_to_fp32(uint16_t h) { return half_to_float(h); }
uint16_t fp32_to_fp16(float f) { return float_to_half(f); }
float bf16_to_fp32(uint16_t b) { return bfloat_to_float(b); }
uint16_t fp32_to_bf16(float f) { return float_to_bfloat(f); }

namespace {

inline float load_f16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return half_to_float(h);
}
inline void store_f16(uint8_t* p, float f) {
    const uint16_t h = float_to_half(f);
    std::memcpy(p, &h, 2);
}

// ---------------------------------------------------------------------------------------------
// Block layouts (byte-exact ggml formats)
// ---------------------------------------------------------------------------------------------

constexpr int QK_K = 256;

struct BlockQ4_0 {
    uint8_t d[2];    // f16 scale
    uint8_t qs[16];  // element j in low nibble of qs[j], element j+16 in the high nibble
};
struct BlockQ4_1 {
    uint8_t d[2], m[2];  // f16 scale and min
    uint8_t qs[16];
};
struct BlockQ5_0 {
    uint8_t d[2];
    uint8_t qh[4];  // bit j = 5th bit of element j (u32 little-endian)
    uint8_t qs[16];
};
struct BlockQ5_1 {
    uint8_t d[2], m[2];
    uint8_t qh[4];
    uint8_t qs[16];
};
struct BlockQ8_0 {
    uint8_t d[2];
    int8_t qs[32];
};
struct BlockQ2_K {
    uint8_t scales[16];  // per 16 elements: low nibble scale, high nibble min
    uint8_t qs[64];      // 2-bit quants
    uint8_t d[2], dmin[2];
};
struct BlockQ3_K {
    uint8_t hmask[32];   // high bit of each 3-bit quant
    uint8_t qs[64];      // low 2 bits
    uint8_t scales[12];  // 16 6-bit scales, packed
    uint8_t d[2];
};
struct BlockQ4_K {
    uint8_t d[2], dmin[2];
    uint8_t scales[12];  // 8 6-bit scales and 8 6-bit mins, packed
    uint8_t qs[128];
};
struct BlockQ5_K {
    uint8_t d[2], dmin[2];
    uint8_t scales[12];
    uint8_t qh[32];
    uint8_t qs[128];
};
struct BlockQ6_K {
    uint8_t ql[128];    // low 4 bits
    uint8_t qh[64];     // high 2 bits
    int8_t scales[16];  // per 16 elements
    uint8_t d[2];
};
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 &&
              sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

// ---------------------------------------------------------------------------------------------
// Per-block dequantizers. The arithmetic order matches ggml's exactly (it decides the bits).
// ---------------------------------------------------------------------------------------------

void dequant_block(const BlockQ4_0& b, float* y) {
    const float d = load_f16(b.d);
    for (int j = 0; j < 16; ++j) {
        y[j] = float(int(b.qs[j] & 0xf) - 8) * d;
        y[j + 16] = float(int(b.qs[j] >> 4) - 8) * d;
    }
}

void dequant_block(const BlockQ4_1& b, float* y) {
    const float d = load_f16(b.d), m = load_f16(b.m);
    for (int j = 0; j < 16; ++j) {
        y[j] = float(b.qs[j] & 0xf) * d + m;
        y[j + 16] = float(b.qs[j] >> 4) * d + m;
    }
}

void dequant_block(const BlockQ5_0& b, float* y) {
    const float d = load_f16(b.d);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < 16; ++j) {
        const int hi0 = int((qh >> j) << 4) & 0x10;
        const int hi1 = int(qh >> (j + 12)) & 0x10;
        y[j] = float(((b.qs[j] & 0xf) | hi0) - 16) * d;
        y[j + 16] = float(((b.qs[j] >> 4) | hi1) - 16) * d;
    }
}

void dequant_block(const BlockQ5_1& b, float* y) {
    const float d = load_f16(b.d), m = load_f16(b.m);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < 16; ++j) {
        const int hi0 = int((qh >> j) << 4) & 0x10;
        const int hi1 = int(qh >> (j + 12)) & 0x10;
        y[j] = float((b.qs[j] & 0xf) | hi0) * d + m;
        y[j + 16] = float((b.qs[j] >> 4) | hi1) * d + m;
    }
}

void dequant_block(const BlockQ8_0& b, float* y) {
    const float d = load_f16(b.d);
    for (int j = 0; j < 32; ++j) y[j] = float(b.qs[j]) * d;
}

void dequant_block(const BlockQ2_K& b, float* y) {
    const float d = load_f16(b.d), dmin = load_f16(b.dmin);
    // Two halves of 128; each holds 4 shifts x 2 groups of 16 over 32 bytes of qs.
    int is = 0;
    for (int half = 0; half < 2; ++half) {
        const uint8_t* q = b.qs + 32 * half;
        for (int shift = 0; shift < 8; shift += 2) {
            for (int g = 0; g < 2; ++g) {
                const uint8_t sc = b.scales[is++];
                const float dl = d * float(sc & 0xf);
                const float ml = dmin * float(sc >> 4);
                for (int l = 0; l < 16; ++l) *y++ = dl * float((q[16 * g + l] >> shift) & 3) - ml;
            }
        }
    }
}

// Unpacks Q3_K's 16 6-bit scales (stored biased by 32) from 12 bytes:
// bytes 0..7 hold the low nibbles (scales 0..7 low, 8..15 high), bytes 8..11 the high 2 bits.
void q3k_scales(const uint8_t* s, int* out) {
    for (int i = 0; i < 16; ++i) {
        const int lo = i < 8 ? (s[i] & 0xf) : (s[i - 8] >> 4);
        const int hi = (s[8 + (i & 3)] >> (2 * (i / 4))) & 3;
        out[i] = (lo | (hi << 4)) - 32;
    }
}

void dequant_block(const BlockQ3_K& b, float* y) {
    const float d_all = load_f16(b.d);
    int sc[16];
    q3k_scales(b.scales, sc);
    int is = 0;
    uint8_t m = 1;
    for (int half = 0; half < 2; ++half) {
        const uint8_t* q = b.qs + 32 * half;
        for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
            for (int g = 0; g < 2; ++g) {
                const float dl = d_all * float(sc[is++]);
                for (int l = 0; l < 16; ++l) {
                    const int i = 16 * g + l;
                    const int v = int((q[i] >> shift) & 3) - ((b.hmask[i] & m) ? 0 : 4);
                    *y++ = dl * float(v);
                }
            }
        }
    }
}

void dequant_block(const BlockQ4_K& b, float* y) {
    const float d = load_f16(b.d), dmin = load_f16(b.dmin);
    const uint8_t* q = b.qs;
    for (int j = 0; j < 8; j += 2, q += 32) {
        int sc, mn;
        k4_scale_min(j, b.scales, sc, mn);
        const float d1 = d * float(sc), m1 = dmin * float(mn);
        k4_scale_min(j + 1, b.scales, sc, mn);
        const float d2 = d * float(sc), m2 = dmin * float(mn);
        for (int l = 0; l < 32; ++l) *y++ = d1 * float(q[l] & 0xf) - m1;
        for (int l = 0; l < 32; ++l) *y++ = d2 * float(q[l] >> 4) - m2;
    }
}

void dequant_block(const BlockQ5_K& b, float* y) {
    const float d = load_f16(b.d), dmin = load_f16(b.dmin);
    const uint8_t* q = b.qs;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < 8; j += 2, q += 32, u1 <<= 2, u2 <<= 2) {
        int sc, mn;
        k4_scale_min(j, b.scales, sc, mn);
        const float d1 = d * float(sc), m1 = dmin * float(mn);
        k4_scale_min(j + 1, b.scales, sc, mn);
        const float d2 = d * float(sc), m2 = dmin * float(mn);
        for (int l = 0; l < 32; ++l)
            *y++ = d1 * float((q[l] & 0xf) + ((b.qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; ++l)
            *y++ = d2 * float((q[l] >> 4) + ((b.qh[l] & u2) ? 16 : 0)) - m2;
    }
}

void dequant_block(const BlockQ6_K& b, float* y) {
    const float d = load_f16(b.d);
    // Two halves of 128 elements, each from 64 bytes of ql, 32 of qh and 8 scales.
    for (int half = 0; half < 2; ++half) {
        const uint8_t* ql = b.ql + 64 * half;
        const uint8_t* qh = b.qh + 32 * half;
        const int8_t* sc = b.scales + 8 * half;
        float* yy = y + 128 * half;
        for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = int((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = int((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            yy[l] = d * float(sc[is + 0]) * float(q1);
            yy[l + 32] = d * float(sc[is + 2]) * float(q2);
            yy[l + 64] = d * float(sc[is + 4]) * float(q3);
            yy[l + 96] = d * float(sc[is + 6]) * float(q4);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reference quantizers
// ---------------------------------------------------------------------------------------------

// Value of largest magnitude, keeping its sign (the first one wins ties).
inline float signed_absmax(const float* x, int n) {
    float amax = 0.0f, vmax = 0.0f;
    for (int j = 0; j < n; ++j) {
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            vmax = x[j];
        }
    }
    return vmax;
}

inline void min_max(const float* x, int n, float& mn, float& mx) {
    mn = 3.402823466e+38f;
    mx = -3.402823466e+38f;
    for (int j = 0; j < n; ++j) {
        mn = std::min(mn, x[j]);
        mx = std::max(mx, x[j]);
    }
}

void quant_block(const float* x, BlockQ8_0& b) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(b.d, d);
    for (int j = 0; j < 32; ++j) b.qs[j] = int8_t(std::round(x[j] * id));
}

void quant_block(const float* x, BlockQ4_0& b) {
    const float d = signed_absmax(x, 32) / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(b.d, d);
    for (int j = 0; j < 16; ++j) {
        const int q0 = std::min(15, int(int8_t(x[j] * id + 8.5f)));
        const int q1 = std::min(15, int(int8_t(x[j + 16] * id + 8.5f)));
        b.qs[j] = uint8_t(q0 | (q1 << 4));
    }
}

void quant_block(const float* x, BlockQ4_1& b) {
    float mn, mx;
    min_max(x, 32, mn, mx);
    const float d = (mx - mn) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(b.d, d);
    store_f16(b.m, mn);
    for (int j = 0; j < 16; ++j) {
        const int q0 = std::min(15, int(int8_t((x[j] - mn) * id + 0.5f)));
        const int q1 = std::min(15, int(int8_t((x[j + 16] - mn) * id + 0.5f)));
        b.qs[j] = uint8_t(q0 | (q1 << 4));
    }
}

inline void pack5(const int* q, uint8_t* qs, uint8_t* qh_bytes) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
        qs[j] = uint8_t((q[j] & 0xf) | ((q[j + 16] & 0xf) << 4));
        qh |= uint32_t((q[j] & 0x10) >> 4) << j;
        qh |= uint32_t((q[j + 16] & 0x10) >> 4) << (j + 16);
    }
    std::memcpy(qh_bytes, &qh, 4);
}

void quant_block(const float* x, BlockQ5_0& b) {
    const float d = signed_absmax(x, 32) / -16.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(b.d, d);
    int q[32];
    for (int j = 0; j < 32; ++j) q[j] = std::min(31, int(int8_t(x[j] * id + 16.5f)));
    pack5(q, b.qs, b.qh);
}

void quant_block(const float* x, BlockQ5_1& b) {
    float mn, mx;
    min_max(x, 32, mn, mx);
    const float d = (mx - mn) / 31.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_f16(b.d, d);
    store_f16(b.m, mn);
    int q[32];
    for (int j = 0; j < 32; ++j) q[j] = std::min(31, int(uint8_t((x[j] - mn) * id + 0.5f)));
    pack5(q, b.qs, b.qh);
}

// Q4_K and Q5_K, a simple scheme: per 32-element sub-block, min m_s = -min(0, min x) (rounded up
// on the 6-bit grid so it never cuts off the low end) and scale covering [-m_s, max x] in
// n_steps steps (15 or 31). Super-block scales d, dmin put the largest 6-bit scale/min at 63.
// Writes d, dmin and the 12 packed scale bytes; q[256] gets the values 0..n_steps.
void kquant_sub_blocks(const float* x, int n_steps, uint8_t* d_out, uint8_t* dmin_out, uint8_t* packed, int* q) {
    float sub_scale[8], sub_min[8];
    float max_scale = 0.0f, max_min = 0.0f;
    for (int s = 0; s < 8; ++s) {
        float mn, mx;
        min_max(x + 32 * s, 32, mn, mx);
        mn = std::min(mn, 0.0f);
        sub_min[s] = -mn;
        sub_scale[s] = (mx - mn) / float(n_steps);
        max_scale = std::max(max_scale, sub_scale[s]);
        max_min = std::max(max_min, sub_min[s]);
    }
    constexpr float kHalfMax = 65504.0f;
    store_f16(d_out, std::min(max_scale / 63.0f, kHalfMax));
    store_f16(dmin_out, std::min(max_min / 63.0f, kHalfMax));
    const float d = load_f16(d_out), dmin = load_f16(dmin_out);

    int sc[8], mq[8];
    for (int s = 0; s < 8; ++s) {
        mq[s] = dmin > 0.0f ? std::clamp(int(std::ceil(sub_min[s] / dmin)), 0, 63) : 0;
        const float lo = dmin * float(mq[s]);
        float mx = 0.0f;
        for (int l = 0; l < 32; ++l) mx = std::max(mx, x[32 * s + l]);
        sc[s] = d > 0.0f ? std::clamp(int(std::lround((mx + lo) / float(n_steps) / d)), 0, 63) : 0;
    }
    // Pack: bytes 0..3 scales 0..3 (+ top bits of scales 4..7), 4..7 mins 0..3 (+ top bits of
    // mins 4..7), 8..11 low nibbles of scale (low) and min (high) 4..7.
    for (int j = 0; j < 4; ++j) {
        packed[j] = uint8_t((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        packed[j + 4] = uint8_t((mq[j] & 63) | ((mq[j + 4] >> 4) << 6));
        packed[j + 8] = uint8_t((sc[j + 4] & 0xf) | ((mq[j + 4] & 0xf) << 4));
    }
    for (int s = 0; s < 8; ++s) {
        const float step = d * float(sc[s]);
        const float lo = dmin * float(mq[s]);
        const float inv = step > 0.0f ? 1.0f / step : 0.0f;
        for (int l = 0; l < 32; ++l)
            q[32 * s + l] = std::clamp(int(std::lround((x[32 * s + l] + lo) * inv)), 0, n_steps);
    }
}

// Sub-blocks 2k and 2k+1 share qs[32k..32k+32): low and high nibbles.
void pack_k_nibbles(const int* q, uint8_t* qs) {
    for (int k = 0; k < 4; ++k)
        for (int l = 0; l < 32; ++l)
            qs[32 * k + l] = uint8_t((q[64 * k + l] & 0xf) | ((q[64 * k + 32 + l] & 0xf) << 4));
}

void quant_block(const float* x, BlockQ4_K& b) {
    int q[QK_K];
    kquant_sub_blocks(x, 15, b.d, b.dmin, b.scales, q);
    pack_k_nibbles(q, b.qs);
}

// Q5_K: the 5th bit of element l of sub-block s is bit s of qh[l].
void quant_block(const float* x, BlockQ5_K& b) {
    int q[QK_K];
    kquant_sub_blocks(x, 31, b.d, b.dmin, b.scales, q);
    pack_k_nibbles(q, b.qs);
    for (int l = 0; l < 32; ++l) {
        uint8_t h = 0;
        for (int s = 0; s < 8; ++s) h = uint8_t(h | ((q[32 * s + l] >> 4) << s));
        b.qh[l] = h;
    }
}

// Q6_K: per 16 elements a signed scale (the value of largest magnitude maps to -32, as Q4_0
// does with -8), stored as int8 steps of d = largest |scale| / 127; values in [-32, 31] + 32.
// Element e of half h (e = 0..127) lives in ql[64h + e % 64] (low nibble for e < 64, else high)
// and bits 2 * (e / 32) of qh[32h + e % 32], with scale 8h + e / 16.
void quant_block(const float* x, BlockQ6_K& b) {
    float sub[16];
    float amax = 0.0f;
    for (int s = 0; s < 16; ++s) {
        sub[s] = signed_absmax(x + 16 * s, 16) / -32.0f;
        amax = std::max(amax, std::fabs(sub[s]));
    }
    store_f16(b.d, std::min(amax / 127.0f, 65504.0f));
    const float d = load_f16(b.d);
    int sc[16];
    for (int s = 0; s < 16; ++s) {
        sc[s] = d > 0.0f ? std::clamp(int(std::lround(sub[s] / d)), -128, 127) : 0;
        b.scales[s] = int8_t(sc[s]);
    }
    std::memset(b.ql, 0, sizeof b.ql);
    std::memset(b.qh, 0, sizeof b.qh);
    for (int h = 0; h < 2; ++h) {
        for (int e = 0; e < 128; ++e) {
            const int s = 8 * h + e / 16;
            const float step = d * float(sc[s]);
            const float inv = step != 0.0f ? 1.0f / step : 0.0f;
            const int v = std::clamp(int(std::lround(x[128 * h + e] * inv)), -32, 31) + 32;
            uint8_t& l = b.ql[64 * h + e % 64];
            l = uint8_t(l | ((v & 0xf) << (e < 64 ? 0 : 4)));
            uint8_t& q = b.qh[32 * h + e % 32];
            q = uint8_t(q | ((v >> 4) << (2 * (e / 32))));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products. One canonical order: 16 strided partial sums (lane k takes elements i with
// i % 16 == k, in increasing i), then a fixed pairwise tree. Callers feed chunks whose sizes are
// multiples of 16 (all block sizes are), except possibly the last, so chunking never changes it.
// ---------------------------------------------------------------------------------------------

constexpr int kLanes = 16;

// 4 x 4-float vectors = the 16 lanes; lane k of the sum is element k % 4 of vector k / 4.
// GCC/Clang vector extensions: element-wise IEEE ops, so the order is exactly the scalar one.
typedef float V4 __attribute__((vector_size(16)));

inline V4 load4(const float* p) {
    V4 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

struct DotAcc {
    V4 v[4] = {};

    void add16(const float* __restrict w, const float* __restrict x) {
        v[0] += load4(w) * load4(x);
        v[1] += load4(w + 4) * load4(x + 4);
        v[2] += load4(w + 8) * load4(x + 8);
        v[3] += load4(w + 12) * load4(x + 12);
    }
    // Fewer than 16 trailing elements go to lanes 0.. in order.
    void add_tail(const float* w, const float* x, int64_t n) {
        for (int64_t k = 0; k < n; ++k) v[k / 4][k % 4] += w[k] * x[k];
    }
    // Fixed pairwise tree over the lanes.
    float reduce() const {
        const V4 s = (v[0] + v[2]) + (v[1] + v[3]);  // lane k += lane k+8, then k += k+4
        return (s[0] + s[2]) + (s[1] + s[3]);
    }
};

inline void dot_accum(DotAcc& acc, const float* w, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) acc.add16(w + i, x + i);
    if (i < n) acc.add_tail(w + i, x + i, n - i);
}

inline float dot_f32(const float* w, const float* x, int64_t n) {
    DotAcc acc;
    dot_accum(acc, w, x, n);
    return acc.reduce();
}

// Two weight rows against one x row, sharing the x loads. Each result has exactly the bits of
// dot_f32 (same per-lane operation order).
inline void dot2_f32(const float* __restrict w0, const float* __restrict w1,
                     const float* __restrict x, int64_t n, float& out0, float& out1) {
    DotAcc a0, a1;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (int k = 0; k < 4; ++k) {
            const V4 xv = load4(x + i + 4 * k);
            a0.v[k] += load4(w0 + i + 4 * k) * xv;
            a1.v[k] += load4(w1 + i + 4 * k) * xv;
        }
    }
    if (i < n) {
        a0.add_tail(w0 + i, x + i, n - i);
        a1.add_tail(w1 + i, x + i, n - i);
    }
    out0 = a0.reduce();
    out1 = a1.reduce();
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

template <typename Block>
struct BlockFmt {
    static constexpr int qk = 32;
};
template <> struct BlockFmt<BlockQ2_K> { static constexpr int qk = QK_K; };
template <> struct BlockFmt<BlockQ3_K> { static constexpr int qk = QK_K; };
template <> struct BlockFmt<BlockQ4_K> { static constexpr int qk = QK_K; };
template <> struct BlockFmt<BlockQ5_K> { static constexpr int qk = QK_K; };
template <> struct BlockFmt<BlockQ6_K> { static constexpr int qk = QK_K; };

template <typename Block>
void dequant_row_t(const void* src, float* dst, int64_t n) {
    constexpr int qk = BlockFmt<Block>::qk;
    const auto* p = static_cast<const uint8_t*>(src);
    Block b;
    for (int64_t i = 0; i < n / qk; ++i) {
        std::memcpy(&b, p + i * int64_t(sizeof(Block)), sizeof(Block));
        dequant_block(b, dst + i * qk);
    }
}

template <typename Block>
float vec_dot_t(const void* src, const float* x, int64_t n) {
    constexpr int qk = BlockFmt<Block>::qk;
    const auto* p = static_cast<const uint8_t*>(src);
    Block b;
    alignas(64) float buf[qk];
    DotAcc acc;
    for (int64_t i = 0; i < n / qk; ++i) {
        std::memcpy(&b, p + i * int64_t(sizeof(Block)), sizeof(Block));
        dequant_block(b, buf);
        dot_accum(acc, buf, x + i * qk, qk);
    }
    return acc.reduce();
}

template <typename Block>
void quant_row_t(const float* src, void* dst, int64_t n) {
    constexpr int qk = BlockFmt<Block>::qk;
    auto* p = static_cast<uint8_t*>(dst);
    Block b;
    for (int64_t i = 0; i < n / qk; ++i) {
        std::memset(&b, 0, sizeof b);
        quant_block(src + i * qk, b);
        std::memcpy(p + i * int64_t(sizeof(Block)), &b, sizeof(Block));
    }
}

// F16 / BF16 rows: convert in chunks (a multiple of kLanes) so the dot order is the canonical one.
constexpr int64_t kHalfChunk = 256;

template <float (*Conv)(uint16_t)>
void dequant_half_row(const void* src, float* dst, int64_t n) {
    const auto* p = static_cast<const uint8_t*>(src);
    uint16_t h[kHalfChunk];
    for (int64_t i0 = 0; i0 < n; i0 += kHalfChunk) {
        const int64_t len = std::min(kHalfChunk, n - i0);
        std::memcpy(h, p + 2 * i0, size_t(len) * 2);
        for (int64_t i = 0; i < len; ++i) dst[i0 + i] = Conv(h[i]);
    }
}

template <float (*Conv)(uint16_t)>
float vec_dot_half(const void* src, const float* x, int64_t n) {
    const auto* p = static_cast<const uint8_t*>(src);
    alignas(64) float buf[kHalfChunk];
    DotAcc acc;
    for (int64_t i0 = 0; i0 < n; i0 += kHalfChunk) {
        const int64_t len = std::min(kHalfChunk, n - i0);
        dequant_half_row<Conv>(p + 2 * i0, buf, len);
        dot_accum(acc, buf, x + i0, len);
    }
    return acc.reduce();
}

void check_row(GgmlType type, int64_t n, const char* what) {
    if (!quant_supported(type))
        throw_error("{}: weight type {} is not supported", what, ggml_type_name(type));
    const int64_t qk = quant_block_size(type);
    if (n < 0 || n % qk != 0)
        throw_error("{}: row length {} is not a multiple of the {} block size {}", what, n,
                    ggml_type_name(type), qk);
}

}  // namespace

bool quant_supported(GgmlType type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q2_K:
        case GGML_TYPE_Q3_K:
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K: return true;
        default: return false;
    }
}

bool quantize_supported(GgmlType type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K: return true;
        default: return false;
    }
}

int64_t quant_block_size(GgmlType type) {
    if (!quant_supported(type))
        throw_error("weight type {} is not supported", ggml_type_name(type));
    return ggml_type_info(type)->block_size;
}

size_t quant_row_bytes(GgmlType type, int64_t n) {
    check_row(type, n, "quant_row_bytes");
    const auto bytes = ggml_row_bytes(type, n);
    if (!bytes) throw_error("quant_row_bytes: bad row length {} for {}", n, ggml_type_name(type));
    return *bytes;
}

void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n) {
    check_row(type, n, "dequantize_row");
    switch (type) {
        case GGML_TYPE_F32: std::memcpy(dst, src, size_t(n) * sizeof(float)); return;
        case GGML_TYPE_F16: return dequant_half_row<half_to_float>(src, dst, n);
        case GGML_TYPE_BF16: return dequant_half_row<bfloat_to_float>(src, dst, n);
        case GGML_TYPE_Q8_0: return dequant_row_t<BlockQ8_0>(src, dst, n);
        case GGML_TYPE_Q4_0: return dequant_row_t<BlockQ4_0>(src, dst, n);
        case GGML_TYPE_Q4_1: return dequant_row_t<BlockQ4_1>(src, dst, n);
        case GGML_TYPE_Q5_0: return dequant_row_t<BlockQ5_0>(src, dst, n);
        case GGML_TYPE_Q5_1: return dequant_row_t<BlockQ5_1>(src, dst, n);
        case GGML_TYPE_Q2_K: return dequant_row_t<BlockQ2_K>(src, dst, n);
        case GGML_TYPE_Q3_K: return dequant_row_t<BlockQ3_K>(src, dst, n);
        case GGML_TYPE_Q4_K: return dequant_row_t<BlockQ4_K>(src, dst, n);
        case GGML_TYPE_Q5_K: return dequant_row_t<BlockQ5_K>(src, dst, n);
        case GGML_TYPE_Q6_K: return dequant_row_t<BlockQ6_K>(src, dst, n);
        default: break;
    }
    throw_error("dequantize_row: weight type {} is not supported", ggml_type_name(type));
}

void quantize_row(GgmlType type, const float* src, void* dst, int64_t n) {
    if (!quantize_supported(type))
        throw_error("quantize_row: no quantizer for type {}", ggml_type_name(type));
    check_row(type, n, "quantize_row");
    auto* p = static_cast<uint8_t*>(dst);
    switch (type) {
        case GGML_TYPE_F32: std::memcpy(dst, src, size_t(n) * sizeof(float)); return;
        case GGML_TYPE_F16:
            for (int64_t i = 0; i < n; ++i) store_f16(p + 2 * i, src[i]);
            return;
        case GGML_TYPE_BF16:
            for (int64_t i = 0; i < n; ++i) {
                const uint16_t b = float_to_bfloat(src[i]);
                std::memcpy(p + 2 * i, &b, 2);
            }
            return;
        case GGML_TYPE_Q8_0: return quant_row_t<BlockQ8_0>(src, dst, n);
        case GGML_TYPE_Q4_0: return quant_row_t<BlockQ4_0>(src, dst, n);
        case GGML_TYPE_Q4_1: return quant_row_t<BlockQ4_1>(src, dst, n);
        case GGML_TYPE_Q5_0: return quant_row_t<BlockQ5_0>(src, dst, n);
        case GGML_TYPE_Q5_1: return quant_row_t<BlockQ5_1>(src, dst, n);
        case GGML_TYPE_Q4_K: return quant_row_t<BlockQ4_K>(src, dst, n);
        case GGML_TYPE_Q5_K: return quant_row_t<BlockQ5_K>(src, dst, n);
        case GGML_TYPE_Q6_K: return quant_row_t<BlockQ6_K>(src, dst, n);
        default: break;
    }
    throw_error("quantize_row: no quantizer for type {}", ggml_type_name(type));
}

float vec_dot_row(GgmlType type, const void* row, const float* x, int64_t n) {
    check_row(type, n, "vec_dot_row");
    switch (type) {
        case GGML_TYPE_F32: return dot_f32(static_cast<const float*>(row), x, n);
        case GGML_TYPE_F16: return vec_dot_half<half_to_float>(row, x, n);
        case GGML_TYPE_BF16: return vec_dot_half<bfloat_to_float>(row, x, n);
        case GGML_TYPE_Q8_0: return vec_dot_t<BlockQ8_0>(row, x, n);
        case GGML_TYPE_Q4_0: return vec_dot_t<BlockQ4_0>(row, x, n);
        case GGML_TYPE_Q4_1: return vec_dot_t<BlockQ4_1>(row, x, n);
        case GGML_TYPE_Q5_0: return vec_dot_t<BlockQ5_0>(row, x, n);
        case GGML_TYPE_Q5_1: return vec_dot_t<BlockQ5_1>(row, x, n);
        case GGML_TYPE_Q2_K: return vec_dot_t<BlockQ2_K>(row, x, n);
        case GGML_TYPE_Q3_K: return vec_dot_t<BlockQ3_K>(row, x, n);
        case GGML_TYPE_Q4_K: return vec_dot_t<BlockQ4_K>(row, x, n);
        case GGML_TYPE_Q5_K: return vec_dot_t<BlockQ5_K>(row, x, n);
        case GGML_TYPE_Q6_K: return vec_dot_t<BlockQ6_K>(row, x, n);
        default: break;
    }
    throw_error("vec_dot_row: weight type {} is not supported", ggml_type_name(type));
}

namespace {

// Output rows [o_begin, o_end), two at a time: each weight row is dequantized once (F32 rows are
// used in place) and then dotted with every x row.
void matmul_range(GgmlType type, const uint8_t* w, size_t row_bytes, int64_t n_in, int64_t n_out,
                  const float* x, int64_t n_rows_x, float* y, int64_t o_begin, int64_t o_end) {
    thread_local std::vector<float> buf;  // [2, n_in]
    if (type != GGML_TYPE_F32 && int64_t(buf.size()) < 2 * n_in) buf.resize(size_t(2 * n_in));
    auto weight_row = [&](int64_t o, float* dst) -> const float* {
        const uint8_t* src = w + size_t(o) * row_bytes;
        if (type == GGML_TYPE_F32) return reinterpret_cast<const float*>(src);
        dequantize_row(type, src, dst, n_in);
        return dst;
    };
    int64_t o = o_begin;
    for (; o + 2 <= o_end; o += 2) {
        const float* w0 = weight_row(o, buf.data());
        const float* w1 = weight_row(o + 1, buf.data() + n_in);
        for (int64_t r = 0; r < n_rows_x; ++r)
            dot2_f32(w0, w1, x + r * n_in, n_in, y[r * n_out + o], y[r * n_out + o + 1]);
    }
    if (o < o_end) {
        const float* w0 = weight_row(o, buf.data());
        for (int64_t r = 0; r < n_rows_x; ++r) y[r * n_out + o] = dot_f32(w0, x + r * n_in, n_in);
    }
}

}  // namespace

void matmul(GgmlType type, const void* w, int64_t n_in, int64_t n_out, const float* x,
            int64_t n_rows_x, float* y, int n_threads) {
    check_row(type, n_in, "matmul");
    if (n_out < 0 || n_rows_x < 0) throw_error("matmul: negative size ({} x {})", n_out, n_rows_x);
    const size_t row_bytes = quant_row_bytes(type, n_in);
    const auto* wb = static_cast<const uint8_t*>(w);
    // Splitting is by output rows only; each y value is computed the same way on any thread.
    const int64_t n_work = std::min<int64_t>(std::max(n_threads, 1), std::max<int64_t>(n_out / 16, 1));
    if (n_work <= 1) {
        matmul_range(type, wb, row_bytes, n_in, n_out, x, n_rows_x, y, 0, n_out);
        return;
    }
    std::vector<std::thread> threads;
    threads.reserve(size_t(n_work - 1));
    const int64_t per = (n_out + n_work - 1) / n_work;
    for (int64_t t = 1; t < n_work; ++t) {
        const int64_t b = std::min(n_out, t * per), e = std::min(n_out, (t + 1) * per);
        threads.emplace_back(matmul_range, type, wb, row_bytes, n_in, n_out, x, n_rows_x, y, b, e);
    }
    matmul_range(type, wb, row_bytes, n_in, n_out, x, n_rows_x, y, 0, std::min(n_out, per));
    for (auto& th : threads) th.join();
}

void k4_scale_min(int j, const uint8_t* s, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

}  // namespace coinfer
