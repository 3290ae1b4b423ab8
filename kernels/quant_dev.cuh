#pragma once
// Device-side dequantization of ggml weight formats in their file layout, 32 elements at a time
// (the embedding gather and the F32 tiles of the dense SGEMM fallback; products read the packed
// layout of qpack.h).
//
// Every format is read in "chunks" of 32 consecutive elements of a row: chunk c holds elements
// [32c, 32c + 32). For the 32-element block formats a chunk is one block; for the K-quants
// (256-element super-blocks) chunk c is sub-chunk c % 8 of super-block c / 8. The arithmetic
// mirrors engine/quant.cpp operation for operation with explicit round-to-nearest intrinsics, so
// no fused multiply-add creeps in and the values are bit-identical with the CPU (and ggml).
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace coinfer::kernels {

// ggml type ids (io/ggml_types.h); kernels take the id as a plain int.
enum WeightType : int {
    WT_F32 = 0, WT_F16 = 1, WT_Q4_0 = 2, WT_Q4_1 = 3, WT_Q5_0 = 6, WT_Q5_1 = 7, WT_Q8_0 = 8,
    WT_Q2_K = 10, WT_Q3_K = 11, WT_Q4_K = 12, WT_Q5_K = 13, WT_Q6_K = 14, WT_BF16 = 30,
};

__device__ __forceinline__ float ld_f16(const uint8_t* p) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}
// Exact int -> float for |v| < 2^22 with an integer add and one FADD: I2F runs at a sixteenth of
// the FMA rate and bounds the dequantizing kernels otherwise.
__device__ __forceinline__ float i2f(int v) { return __fsub_rn(__int_as_float(0x4B400000 + v), 12582912.0f); }
__device__ __forceinline__ float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float fsub(float a, float b) { return __fsub_rn(a, b); }

// Q4_K / Q5_K packed 6-bit scale and min of sub-block j.
__device__ __forceinline__ void k4_scale_min(int j, const uint8_t* s, int& sc, int& mn) {
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

__device__ __forceinline__ int q3k_scale(const uint8_t* s, int i) {
    const int lo = i < 8 ? (s[i] & 0xf) : (s[i - 8] >> 4);
    const int hi = (s[8 + (i & 3)] >> (2 * (i / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

// y[0..32) = elements [32c, 32c+32) of `row` (n elements). For F32/F16/BF16 a tail chunk past n
// is zero-filled; `vec` allows 16-byte loads (chunk fully inside the row and 16-byte aligned).
template <int T>
__device__ __forceinline__ void dq32(const uint8_t* __restrict__ row, int64_t c, int64_t n, bool vec, float* y) {
    if constexpr (T == WT_F32) {
        const float* p = reinterpret_cast<const float*>(row) + 32 * c;
        if (vec) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float4 v = reinterpret_cast<const float4*>(p)[i];
                y[4 * i] = v.x; y[4 * i + 1] = v.y; y[4 * i + 2] = v.z; y[4 * i + 3] = v.w;
            }
        } else {
            for (int i = 0; i < 32; ++i) y[i] = 32 * c + i < n ? p[i] : 0.0f;
        }
    } else if constexpr (T == WT_F16 || T == WT_BF16) {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + 32 * c;
        auto cvt = [](uint16_t h) {
            if constexpr (T == WT_F16) return __half2float(__ushort_as_half(h));
            else return __uint_as_float(uint32_t(h) << 16);
        };
        if (vec) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint4 v = reinterpret_cast<const uint4*>(p)[i];
                const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    y[8 * i + 2 * j] = cvt(uint16_t(w[j] & 0xffff));
                    y[8 * i + 2 * j + 1] = cvt(uint16_t(w[j] >> 16));
                }
            }
        } else {
            for (int i = 0; i < 32; ++i) y[i] = 32 * c + i < n ? cvt(p[i]) : 0.0f;
        }
    } else if constexpr (T == WT_Q4_0) {
        const uint8_t* b = row + 18 * c;
        const float d = ld_f16(b);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const uint8_t q = b[2 + j];
            y[j] = fmul(i2f(int(q & 0xf) - 8), d);
            y[j + 16] = fmul(i2f(int(q >> 4) - 8), d);
        }
    } else if constexpr (T == WT_Q4_1) {
        const uint8_t* b = row + 20 * c;
        const float d = ld_f16(b), m = ld_f16(b + 2);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const uint8_t q = b[4 + j];
            y[j] = fadd(fmul(i2f(q & 0xf), d), m);
            y[j + 16] = fadd(fmul(i2f(q >> 4), d), m);
        }
    } else if constexpr (T == WT_Q5_0 || T == WT_Q5_1) {
        constexpr int bytes = T == WT_Q5_0 ? 22 : 24, off = T == WT_Q5_0 ? 2 : 4;
        const uint8_t* b = row + bytes * c;
        const float d = ld_f16(b);
        const float m = T == WT_Q5_1 ? ld_f16(b + 2) : 0.0f;
        const uint32_t qh = uint32_t(b[off]) | (uint32_t(b[off + 1]) << 8) | (uint32_t(b[off + 2]) << 16) |
                            (uint32_t(b[off + 3]) << 24);
        const uint8_t* qs = b + off + 4;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int hi0 = int((qh >> j) << 4) & 0x10;
            const int hi1 = int(qh >> (j + 12)) & 0x10;
            if constexpr (T == WT_Q5_0) {
                y[j] = fmul(i2f(((qs[j] & 0xf) | hi0) - 16), d);
                y[j + 16] = fmul(i2f(((qs[j] >> 4) | hi1) - 16), d);
            } else {
                y[j] = fadd(fmul(i2f((qs[j] & 0xf) | hi0), d), m);
                y[j + 16] = fadd(fmul(i2f((qs[j] >> 4) | hi1), d), m);
            }
        }
    } else if constexpr (T == WT_Q8_0) {
        const uint8_t* b = row + 34 * c;
        const float d = ld_f16(b);
#pragma unroll
        for (int j = 0; j < 32; ++j) y[j] = fmul(i2f(int8_t(b[2 + j])), d);
    } else if constexpr (T == WT_Q2_K) {
        const uint8_t* b = row + 84 * (c >> 3);
        const int k = int(c & 7), half = k >> 2, s4 = k & 3, shift = 2 * s4;
        const float d = ld_f16(b + 80), dmin = ld_f16(b + 82);
        const uint8_t* q = b + 16 + 32 * half;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            const uint8_t sc = b[half * 8 + s4 * 2 + g];
            const float dl = fmul(d, i2f(sc & 0xf)), ml = fmul(dmin, i2f(sc >> 4));
#pragma unroll
            for (int l = 0; l < 16; ++l) y[16 * g + l] = fsub(fmul(dl, i2f((q[16 * g + l] >> shift) & 3)), ml);
        }
    } else if constexpr (T == WT_Q3_K) {
        const uint8_t* b = row + 110 * (c >> 3);
        const int k = int(c & 7), half = k >> 2, s4 = k & 3, shift = 2 * s4;
        const float d_all = ld_f16(b + 108);
        const uint8_t m = uint8_t(1u << (half * 4 + s4));
        const uint8_t* hmask = b;
        const uint8_t* q = b + 32 + 32 * half;
#pragma unroll
        for (int g = 0; g < 2; ++g) {
            const float dl = fmul(d_all, i2f(q3k_scale(b + 96, half * 8 + s4 * 2 + g)));
#pragma unroll
            for (int l = 0; l < 16; ++l) {
                const int i = 16 * g + l;
                const int v = int((q[i] >> shift) & 3) - ((hmask[i] & m) ? 0 : 4);
                y[i] = fmul(dl, i2f(v));
            }
        }
    } else if constexpr (T == WT_Q4_K || T == WT_Q5_K) {
        constexpr int bytes = T == WT_Q4_K ? 144 : 176, qs_off = T == WT_Q4_K ? 16 : 48;
        const uint8_t* b = row + bytes * (c >> 3);
        const int k = int(c & 7);
        const float d = ld_f16(b), dmin = ld_f16(b + 2);
        int sc, mn;
        k4_scale_min(k, b + 4, sc, mn);
        const float d1 = fmul(d, i2f(sc)), m1 = fmul(dmin, i2f(mn));
        const uint8_t* q = b + qs_off + 32 * (k >> 1);
        const int sh = (k & 1) * 4;
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            int v = (q[l] >> sh) & 0xf;
            if constexpr (T == WT_Q5_K) v += (b[16 + l] & (1u << k)) ? 16 : 0;
            y[l] = fsub(fmul(d1, i2f(v)), m1);
        }
    } else if constexpr (T == WT_Q6_K) {
        const uint8_t* b = row + 210 * (c >> 3);
        const int k = int(c & 7), half = k >> 2, r = k & 3;
        const float d = ld_f16(b + 208);
        const uint8_t* ql = b + 64 * half + ((r & 1) ? 32 : 0);
        const uint8_t* qh = b + 128 + 32 * half;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half;
        const int lsh = (r & 2) ? 4 : 0;
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            const int q = int(((ql[l] >> lsh) & 0xf) | (((qh[l] >> (2 * r)) & 3) << 4)) - 32;
            y[l] = fmul(fmul(d, i2f(sc[(l >> 4) + 2 * r])), i2f(q));
        }
    }
}

// Whether the CUDA kernels handle ggml type id t.
__host__ __device__ constexpr bool weight_type_supported(int t) {
    return t == WT_F32 || t == WT_F16 || t == WT_BF16 || t == WT_Q4_0 || t == WT_Q4_1 || t == WT_Q5_0 ||
           t == WT_Q5_1 || t == WT_Q8_0 || t == WT_Q2_K || t == WT_Q3_K || t == WT_Q4_K || t == WT_Q5_K ||
           t == WT_Q6_K;
}

// Calls f(std::integral_constant<int, T>{}) for the runtime type id t.
template <typename F>
void dispatch_weight_type(int t, F&& f);

}  // namespace coinfer::kernels

#include <type_traits>

template <typename F>
void coinfer::kernels::dispatch_weight_type(int t, F&& f) {
    switch (t) {
        case WT_F32: return f(std::integral_constant<int, WT_F32>{});
        case WT_F16: return f(std::integral_constant<int, WT_F16>{});
        case WT_BF16: return f(std::integral_constant<int, WT_BF16>{});
        case WT_Q4_0: return f(std::integral_constant<int, WT_Q4_0>{});
        case WT_Q4_1: return f(std::integral_constant<int, WT_Q4_1>{});
        case WT_Q5_0: return f(std::integral_constant<int, WT_Q5_0>{});
        case WT_Q5_1: return f(std::integral_constant<int, WT_Q5_1>{});
        case WT_Q8_0: return f(std::integral_constant<int, WT_Q8_0>{});
        case WT_Q2_K: return f(std::integral_constant<int, WT_Q2_K>{});
        case WT_Q3_K: return f(std::integral_constant<int, WT_Q3_K>{});
        case WT_Q4_K: return f(std::integral_constant<int, WT_Q4_K>{});
        case WT_Q5_K: return f(std::integral_constant<int, WT_Q5_K>{});
        case WT_Q6_K: return f(std::integral_constant<int, WT_Q6_K>{});
        default: throw std::runtime_error("kernels: unsupported weight type id " + std::to_string(t));
    }
}
