#pragma once
// Counter-based randomness and the few float routines the samplers share, written so that the
// CPU sampler (engine/sampler.cpp) and a CUDA sampler can produce bit-identical choices.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// stateless bijection of a 128-bit counter under a 64-bit key. We key it by the request's seed
// and count with the index of the generated token, so a request's n-th draw depends only on
// (seed, n): not on batch company, on the order requests are stepped, or on preemption.
//
// Everything here is header-only, constexpr where the language allows, and uses only IEEE
// operations that CPU and GPU round identically (+, -, *, explicit fma, floor, bit casts).
// CUDA code must not let the compiler contract the plain `*` here into an fma on its own; the
// only products that feed a sum already use fma explicitly, so default nvcc flags are fine.
#include <cstdint>

#include <bit>
#include <cmath>

#if defined(__CUDACC__)
#define COINFER_HD __host__ __device__
#else
#define COINFER_HD
#endif

namespace coinfer {

struct PhiloxCounter {
    uint32_t v[4];
};

struct PhiloxKey {
    uint32_t v[2];
};

// Multipliers and Weyl key increments of Philox4x32 (from the paper).
inline constexpr uint32_t k_philox_m0 = 0xD2511F53u;
inline constexpr uint32_t k_philox_m1 = 0xCD9E8D57u;
inline constexpr uint32_t k_philox_w0 = 0x9E3779B9u;
inline constexpr uint32_t k_philox_w1 = 0xBB67AE85u;

COINFER_HD constexpr PhiloxCounter philox4x32_round(PhiloxCounter c, PhiloxKey k) {
    const uint64_t p0 = uint64_t(k_philox_m0) * c.v[0];
    const uint64_t p1 = uint64_t(k_philox_m1) * c.v[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    return PhiloxCounter{{hi1 ^ c.v[1] ^ k.v[0], lo1, hi0 ^ c.v[3] ^ k.v[1], lo0}};
}

// Ten rounds; the key is bumped between rounds (not before the first).
COINFER_HD constexpr PhiloxCounter philox4x32_10(PhiloxCounter c, PhiloxKey k) {
    c = philox4x32_round(c, k);
    for (int i = 1; i < 10; ++i) {
        k.v[0] += k_philox_w0;
        k.v[1] += k_philox_w1;
        c = philox4x32_round(c, k);
    }
    return c;
}

// Uniform float in [0, 1) for draw number `counter` of stream `seed`.
// key = {seed lo, seed hi}, counter = {counter lo, counter hi, 0, 0}; the top 24 bits of the
// first output word are scaled by 2^-24, which is exact in float, so every device gets the same
// value and 1.0 can never come out.
COINFER_HD constexpr float philox_uniform(uint64_t seed, uint64_t counter) {
    const PhiloxKey key{{uint32_t(seed), uint32_t(seed >> 32)}};
    const PhiloxCounter ctr{{uint32_t(counter), uint32_t(counter >> 32), 0u, 0u}};
    const PhiloxCounter out = philox4x32_10(ctr, key);
    return float(out.v[0] >> 8) * (1.0f / 16777216.0f);
}

namespace detail {
COINFER_HD inline float det_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}
COINFER_HD inline float det_floor(float x) {
#if defined(__CUDA_ARCH__)
    return floorf(x);
#else
    return std::floor(x);
#endif
}
COINFER_HD inline float det_pow2(int32_t k) {  // 2^k for k in [-126, 127]
#if defined(__CUDA_ARCH__)
    return __int_as_float((k + 127) << 23);
#else
    return std::bit_cast<float>(uint32_t(k + 127) << 23);
#endif
}
}  // namespace detail

// exp(x) evaluated the same way on every device (libm and CUDA expf differ in the last ulp,
// which would move sampling boundaries). Cody-Waite reduction x = k*ln2 + r, |r| <= ln2/2, then a
// degree-7 Taylor polynomial in Horner form with fma: error about 2 ulp. Results that would be
// below FLT_MIN (x < -87) are flushed to 0; NaN gives NaN; x > 88 gives +inf.
COINFER_HD inline float det_expf(float x) {
    if (x != x) return x;
    if (x < -87.0f) return 0.0f;
    if (x > 88.0f) return HUGE_VALF;
    const float k = detail::det_floor(detail::det_fma(x, 1.44269504f, 0.5f));  // round(x/ln2)
    float r = detail::det_fma(-k, 0.693145751953125f, x);    // ln2 hi: k*hi is exact
    r = detail::det_fma(-k, 1.42860677e-06f, r);              // ln2 lo
    float p = 1.0f / 5040.0f;
    p = detail::det_fma(p, r, 1.0f / 720.0f);
    p = detail::det_fma(p, r, 1.0f / 120.0f);
    p = detail::det_fma(p, r, 1.0f / 24.0f);
    p = detail::det_fma(p, r, 1.0f / 6.0f);
    p = detail::det_fma(p, r, 0.5f);
    p = detail::det_fma(p, r, 1.0f);
    p = detail::det_fma(p, r, 1.0f);
    return p * detail::det_pow2(int32_t(k));
}

// The sampler's sums (engine/sampler.h, "Sums") run over chunks of this many weights: a chunk
// left to right, then the chunk sums left to right, so a device sums its chunks in parallel.
inline constexpr int k_sample_sum_chunk = 32;

}  // namespace coinfer
