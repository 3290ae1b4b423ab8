// KV cache row formats: FP8 E4M3 rounding on every code and midpoint, q8_0 rows equal to the
// ggml quantizer's blocks, round-trip errors, bad names and shapes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "engine/kv_codec.h"
#include "engine/quant.h"
#include "io/error.h"

using namespace coinfer;

TEST_CASE("fp8 e4m3: decode table, round trip, ties to even, saturation") {
    // Known values: min subnormal 2^-9, min normal 2^-6, 1.0 = code 0x38, max 448 = code 0x7e.
    CHECK(fp8_e4m3_decode(0x01) == std::ldexp(1.0f, -9));
    CHECK(fp8_e4m3_decode(0x08) == std::ldexp(1.0f, -6));
    CHECK(fp8_e4m3_decode(0x38) == 1.0f);
    CHECK(fp8_e4m3_decode(0x7e) == 448.0f);
    CHECK(fp8_e4m3_decode(0xb8) == -1.0f);
    CHECK(std::isnan(fp8_e4m3_decode(0x7f)));
    for (int c = 0; c < 256; ++c) {
        if ((c & 0x7f) == 0x7f) continue;
        CAPTURE(c);
        CHECK(fp8_e4m3_encode(fp8_e4m3_decode(uint8_t(c))) == (c == 0x80 ? 0x80 : c));
    }
    // Midpoints between neighbours go to the even code; just off them, to the nearer one.
    for (int c = 0; c < 126; ++c) {
        const float a = fp8_e4m3_decode(uint8_t(c)), b = fp8_e4m3_decode(uint8_t(c + 1));
        const float mid = 0.5f * (a + b);
        CAPTURE(c);
        CHECK(fp8_e4m3_encode(mid) == (c % 2 == 0 ? c : c + 1));
        CHECK(fp8_e4m3_encode(std::nextafter(mid, 0.0f)) == c);
        CHECK(fp8_e4m3_encode(std::nextafter(mid, 1e9f)) == c + 1);
        CHECK(fp8_e4m3_encode(-mid) == (0x80 | (c % 2 == 0 ? c : c + 1)));
    }
    CHECK(fp8_e4m3_encode(1e6f) == 0x7e);
    CHECK(fp8_e4m3_encode(-INFINITY) == 0xfe);
    CHECK(fp8_e4m3_encode(NAN) == 0x7f);
    CHECK(fp8_e4m3_encode(1e-30f) == 0x00);
}

TEST_CASE("kv rows: q8_0 is llama.cpp's block rounding, errors stay small") {
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int64_t head_dim = 64, n_kv = 4 * head_dim;
    std::vector<float> x(n_kv), y(n_kv);
    for (auto& v : x) v = nd(rng);
    for (int i = 64; i < 128; ++i) x[size_t(i)] = 0.0f;  // an all-zero head
    struct Case { KvType t; size_t bytes; double max_rel_rms; };
    const Case cases[] = {{KV_TYPE_F32, 1024, 0.0}, {KV_TYPE_F16, 512, 1e-3}, {KV_TYPE_Q8_0, 272, 0.01},
                          {KV_TYPE_FP8, 4 * 68, 0.04}};
    for (const Case& c : cases) {
        CAPTURE(kv_type_name(c.t));
        REQUIRE(kv_row_bytes(c.t, n_kv, head_dim) == c.bytes);
        std::vector<uint8_t> row(c.bytes);
        kv_row_encode(c.t, x.data(), n_kv, head_dim, row.data());
        kv_row_decode(c.t, row.data(), n_kv, head_dim, y.data());
        double se = 0, so = 0;
        for (int64_t i = 0; i < n_kv; ++i) {
            se += double(y[size_t(i)] - x[size_t(i)]) * double(y[size_t(i)] - x[size_t(i)]);
            so += double(x[size_t(i)]) * double(x[size_t(i)]);
        }
        CHECK(std::sqrt(se / so) <= c.max_rel_rms);
        for (int i = 64; i < 128; ++i) CHECK(y[size_t(i)] == 0.0f);
        if (c.t == KV_TYPE_Q8_0) {
            std::vector<uint8_t> ref(quant_row_bytes(GGML_TYPE_Q8_0, n_kv));
            quantize_row(GGML_TYPE_Q8_0, x.data(), ref.data(), n_kv);
            CHECK(std::memcmp(ref.data(), row.data(), ref.size()) == 0);
        }
    }
    // fp8: each head's largest value lands on 448 exactly, so it comes back exactly.
    std::vector<uint8_t> row(kv_row_bytes(KV_TYPE_FP8, n_kv, head_dim));
    kv_row_encode(KV_TYPE_FP8, x.data(), n_kv, head_dim, row.data());
    kv_row_decode(KV_TYPE_FP8, row.data(), n_kv, head_dim, y.data());
    size_t imax = 0;
    for (size_t i = 0; i < 64; ++i)
        if (std::fabs(x[i]) > std::fabs(x[imax])) imax = i;
    CHECK(std::fabs(y[imax] - x[imax]) <= 1e-6f * std::fabs(x[imax]));
}

TEST_CASE("kv types: names and shapes") {
    CHECK(kv_type_from_name("q8_0") == KV_TYPE_Q8_0);
    CHECK(kv_type_from_name("auto") == KV_TYPE_AUTO);
    for (KvType t : {KV_TYPE_AUTO, KV_TYPE_F32, KV_TYPE_F16, KV_TYPE_Q8_0, KV_TYPE_FP8})
        CHECK(kv_type_from_name(kv_type_name(t)) == t);
    CHECK_THROWS_WITH_AS(kv_type_from_name("q4_0"), doctest::Contains("q4_0"), Error);
    CHECK_THROWS_WITH_AS(kv_row_bytes(KV_TYPE_Q8_0, 40, 8), doctest::Contains("multiple of 32"), Error);
}
