// engine/quant: dequantization against llama.cpp's reference values (shared/models/quant),
// quantizers against llama-quantize's bytes, dot products / matmul against a plain reference,
// batch invariance, and the half/bfloat16 conversions.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine/quant.h"
#include "io/gguf.h"
#include "test_models.h"

using namespace coinfer;

namespace {

const GgmlType kAllTypes[] = {GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q8_0,
                              GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1,
                              GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K,
                              GGML_TYPE_Q6_K};

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }

// Distance in units in the last place between two finite floats (same sign assumed close).
int64_t ulp_diff(float a, float b) {
    auto key = [](float f) {
        const int32_t i = std::bit_cast<int32_t>(f);
        return i < 0 ? int64_t(INT32_MIN) - int64_t(i) : int64_t(i);
    };
    return std::llabs(key(a) - key(b));
}

std::vector<float> read_f32_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    REQUIRE(f.good());
    const auto size = size_t(f.tellg());
    std::vector<float> v(size / 4);
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), std::streamsize(size));
    return v;
}

// Whole tensor dequantized, [rows, ne0].
std::vector<float> dequant_tensor(const GgufTensorInfo& t) {
    const int64_t ne0 = t.ne[0], n_rows = t.rows();
    const size_t rb = quant_row_bytes(t.type, ne0);
    std::vector<float> out(size_t(ne0 * n_rows));
    for (int64_t r = 0; r < n_rows; ++r)
        dequantize_row(t.type, t.data + r * rb, out.data() + r * ne0, ne0);
    return out;
}

// Independent half -> float by the definition.
double half_value(uint16_t h) {
    const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(1024 + m), e - 25);
    return s ? -v : v;
}

// Random row of `type` holding n elements, with sane f16 scales (random bytes elsewhere).
std::vector<uint8_t> random_row(GgmlType type, int64_t n, std::mt19937& rng) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const size_t rb = quant_row_bytes(type, n);
    std::vector<uint8_t> row(rb);
    if (type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16) {
        std::vector<float> v(static_cast<size_t>(n));
        for (auto& f : v) f = nd(rng);
        quantize_row(type, v.data(), row.data(), n);
        return row;
    }
    for (auto& b : row) b = uint8_t(rng());
    // f16 fields (byte offsets inside each block) that must hold finite, moderate values.
    std::vector<int> half_fields;
    switch (type) {
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q8_0: half_fields = {0}; break;
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: half_fields = {0, 2}; break;
        case GGML_TYPE_Q2_K: half_fields = {80, 82}; break;
        case GGML_TYPE_Q3_K: half_fields = {108}; break;
        case GGML_TYPE_Q6_K: half_fields = {208}; break;
        default: FAIL("no random generator for type"); break;
    }
    const int64_t qk = quant_block_size(type);
    const size_t block_bytes = rb / size_t(n / qk);
    for (size_t b = 0; b < size_t(n / qk); ++b) {
        for (int off : half_fields) {
            const uint16_t h = fp32_to_fp16(nd(rng) * 0.01f);
            std::memcpy(row.data() + b * block_bytes + size_t(off), &h, 2);
        }
    }
    return row;
}

}  // namespace

TEST_CASE("fp16 conversion: all 65536 values") {
    int n_nan = 0;
    for (uint32_t h = 0; h < 65536; ++h) {
        const float f = fp16_to_fp32(uint16_t(h));
        const bool is_nan = ((h >> 10) & 31) == 31 && (h & 1023) != 0;
        if (is_nan) {
            ++n_nan;
            CHECK(std::isnan(f));
            CHECK(std::isnan(fp16_to_fp32(fp32_to_fp16(f))));
            CHECK(std::signbit(f) == bool(h & 0x8000));
            continue;
        }
        if (((h >> 10) & 31) == 31) {
            CHECK(std::isinf(f));
            CHECK(std::signbit(f) == bool(h & 0x8000));
        } else {
            CHECK(double(f) == half_value(uint16_t(h)));
            CHECK(std::signbit(f) == bool(h & 0x8000));  // -0 stays -0
        }
        CHECK(fp32_to_fp16(f) == h);
    }
    CHECK(n_nan == 2 * 1023);
}

TEST_CASE("fp16 conversion: round to nearest even") {
    // Midpoints between neighbouring halves (exactly representable in float) round to the even one.
    for (uint32_t h = 0; h < 0x7bff; ++h) {
        const double lo = half_value(uint16_t(h)), hi = half_value(uint16_t(h + 1));
        const float mid = float((lo + hi) / 2);
        REQUIRE(double(mid) == (lo + hi) / 2);
        const uint16_t want = (h & 1) ? uint16_t(h + 1) : uint16_t(h);
        CHECK(fp32_to_fp16(mid) == want);
        CHECK(fp32_to_fp16(std::nextafter(mid, 0.0f)) == h);
        CHECK(fp32_to_fp16(std::nextafter(mid, 1e9f)) == h + 1);
        CHECK(fp32_to_fp16(-mid) == (want | 0x8000));
    }
    CHECK(fp32_to_fp16(65504.0f) == 0x7bff);
    CHECK(fp32_to_fp16(65519.996f) == 0x7bff);
    CHECK(fp32_to_fp16(65520.0f) == 0x7c00);  // tie with 65536 rounds to even: inf
    CHECK(fp32_to_fp16(1e30f) == 0x7c00);
    CHECK(fp32_to_fp16(-INFINITY) == 0xfc00);
    CHECK(fp32_to_fp16(0x1p-25f) == 0x0000);  // tie between 0 and the smallest subnormal
    CHECK(fp32_to_fp16(std::nextafter(0x1p-25f, 1.0f)) == 0x0001);
    CHECK(fp32_to_fp16(1e-30f) == 0x0000);
    CHECK(fp32_to_fp16(-0.0f) == 0x8000);
#ifdef __FLT16_MAX__
    // Cross-check against the compiler's own conversion on random bit patterns.
    std::mt19937 rng(7);
    for (int i = 0; i < 1000000; ++i) {
        const float f = std::bit_cast<float>(uint32_t(rng()));
        if (std::isnan(f)) continue;
        CHECK(fp32_to_fp16(f) == std::bit_cast<uint16_t>(_Float16(f)));
    }
#endif
}

TEST_CASE("bf16 conversion") {
    for (uint32_t b = 0; b < 65536; ++b) {
        const float f = bf16_to_fp32(uint16_t(b));
        CHECK(bits_of(f) == b << 16);
        if (std::isnan(f)) CHECK(std::isnan(bf16_to_fp32(fp32_to_bf16(f))));
        else CHECK(fp32_to_bf16(f) == b);
    }
    CHECK(fp32_to_bf16(std::bit_cast<float>(0x3f808000u)) == 0x3f80);  // tie, even stays
    CHECK(fp32_to_bf16(std::bit_cast<float>(0x3f818000u)) == 0x3f82);  // tie, odd rounds up
    CHECK(fp32_to_bf16(std::bit_cast<float>(0x3f808001u)) == 0x3f81);
    CHECK(std::isnan(bf16_to_fp32(fp32_to_bf16(std::bit_cast<float>(0x7f800001u)))));
}

TEST_CASE("hand-built blocks") {
    SUBCASE("Q4_0") {
        uint8_t blk[18];
        const uint16_t d = fp32_to_fp16(0.5f);
        std::memcpy(blk, &d, 2);
        for (int j = 0; j < 16; ++j) blk[2 + j] = uint8_t(j | ((15 - j) << 4));
        float y[32];
        dequantize_row(GGML_TYPE_Q4_0, blk, y, 32);
        for (int j = 0; j < 16; ++j) {
            CHECK(y[j] == float(j - 8) * 0.5f);
            CHECK(y[j + 16] == float(7 - j) * 0.5f);
        }
    }
    SUBCASE("Q5_0: the 5th bits come from qh") {
        uint8_t blk[22] = {};
        const uint16_t d = fp32_to_fp16(1.0f);
        std::memcpy(blk, &d, 2);
        const uint32_t qh = 0x80000001u;  // element 0 and element 31 get +16
        std::memcpy(blk + 2, &qh, 4);
        float y[32];
        dequantize_row(GGML_TYPE_Q5_0, blk, y, 32);
        CHECK(y[0] == 0.0f);
        CHECK(y[1] == -16.0f);
        CHECK(y[31] == 0.0f);
        CHECK(y[30] == -16.0f);
    }
    SUBCASE("Q8_0 quantize packing") {
        float x[32];
        for (int j = 0; j < 32; ++j) x[j] = float(j - 16) * 0.5f;  // amax 8 at j = 0
        uint8_t blk[34];
        quantize_row(GGML_TYPE_Q8_0, x, blk, 32);
        uint16_t d;
        std::memcpy(&d, blk, 2);
        CHECK(d == fp32_to_fp16(8.0f / 127.0f));
        for (int j = 0; j < 32; ++j) {
            const float id = 1.0f / (8.0f / 127.0f);
            CHECK(int8_t(blk[2 + j]) == int(std::round(x[j] * id)));
        }
        CHECK(int8_t(blk[2]) == -127);
    }
    SUBCASE("Q4_0 quantize packing") {
        float x[32];
        for (int j = 0; j < 32; ++j) x[j] = float(j % 16 - 8);  // max |x| = 8 at -8 -> d = 1
        uint8_t blk[18];
        quantize_row(GGML_TYPE_Q4_0, x, blk, 32);
        uint16_t d;
        std::memcpy(&d, blk, 2);
        CHECK(d == fp32_to_fp16(1.0f));
        // q = x / d + 8 -> j % 16: element j in the low nibble, element j+16 in the high one.
        for (int j = 0; j < 16; ++j) CHECK(blk[2 + j] == uint8_t(j | (j << 4)));
    }
    SUBCASE("Q4_K: 6-bit scales and mins, all sub-blocks distinct") {
        uint8_t blk[144] = {};
        const uint16_t d = fp32_to_fp16(0.25f), dmin = fp32_to_fp16(0.125f);
        std::memcpy(blk, &d, 2);
        std::memcpy(blk + 2, &dmin, 2);
        const int sc[8] = {1, 63, 17, 32, 48, 5, 60, 33}, mn[8] = {62, 0, 31, 16, 49, 63, 2, 47};
        uint8_t* s = blk + 4;
        for (int j = 0; j < 4; ++j) {
            s[j] = uint8_t(sc[j] | ((sc[j + 4] >> 4) << 6));
            s[j + 4] = uint8_t(mn[j] | ((mn[j + 4] >> 4) << 6));
            s[j + 8] = uint8_t((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
        }
        for (int i = 0; i < 128; ++i) blk[16 + i] = uint8_t((i * 7 + 3) & 0xff);
        float y[256];
        dequantize_row(GGML_TYPE_Q4_K, blk, y, 256);
        for (int i = 0; i < 256; ++i) {
            const int sub = i / 32, l = i % 32;
            const uint8_t byte = blk[16 + 32 * (sub / 2) + l];
            const int q = sub % 2 ? byte >> 4 : byte & 15;
            CHECK(y[i] == 0.25f * float(sc[sub]) * float(q) - 0.125f * float(mn[sub]));
        }
        // The quantizer's packing is read back the same way.
        std::vector<float> x(256);
        std::mt19937 rng(3);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (auto& v : x) v = nd(rng);
        for (int i = 0; i < 32; ++i) x[size_t(i)] = std::fabs(x[size_t(i)]) + 2.0f;  // min > 0
        uint8_t q[144];
        quantize_row(GGML_TYPE_Q4_K, x.data(), q, 256);
        dequantize_row(GGML_TYPE_Q4_K, q, y, 256);
        for (int i = 0; i < 256; ++i) CHECK(std::fabs(y[i] - x[size_t(i)]) < 0.3f);
    }
}

TEST_CASE("errors") {
    float y[32];
    uint8_t b[64] = {};
    CHECK_THROWS_AS(dequantize_row(GGML_TYPE_IQ2_XS, b, y, 256), Error);
    CHECK_THROWS_AS(dequantize_row(GGML_TYPE_Q4_0, b, y, 31), Error);
    CHECK_THROWS_AS(vec_dot_row(GGML_TYPE_Q4_K, b, y, 32), Error);
    CHECK_THROWS_AS(quantize_row(GGML_TYPE_Q3_K, y, b, 256), Error);
    CHECK_THROWS_AS(quant_row_bytes(GGML_TYPE_Q2_K, 100), Error);
    CHECK(quant_row_bytes(GGML_TYPE_Q4_K, 512) == 288);
    for (GgmlType t : kAllTypes) CHECK(quant_supported(t));
    CHECK(!quant_supported(GGML_TYPE_Q8_K));
}

TEST_CASE("dequantization matches llama.cpp bit for bit (quant-base dequant/)") {
    const char* types[] = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                           "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"};
    const char* tensors[] = {"blk.0.ffn_down", "blk.1.attn_k"};
    for (const char* type : types) {
        auto gguf_path = test::model_file(fmt::format("quant/quant-base-{}.gguf", type));
        if (!gguf_path) return;
        const GgufFile f = GgufFile::open(*gguf_path);
        for (const char* name : tensors) {
            auto ref_path = test::model_file(fmt::format("quant/dequant/{}.{}.f32", type, name));
            if (!ref_path) return;
            CAPTURE(type);
            CAPTURE(name);
            const std::vector<float> ref = read_f32_file(*ref_path);
            const GgufTensorInfo& t = f.tensor(fmt::format("{}.weight", name));
            const std::vector<float> got = dequant_tensor(t);
            REQUIRE(got.size() == ref.size());
            size_t n_diff = 0;
            int64_t max_ulp = 0;
            for (size_t i = 0; i < got.size(); ++i) {
                if (bits_of(got[i]) != bits_of(ref[i])) {
                    ++n_diff;
                    max_ulp = std::max(max_ulp, ulp_diff(got[i], ref[i]));
                }
            }
            if (n_diff) MESSAGE(fmt::format("{} {}: {} values differ, max {} ulp", type, name, n_diff, max_ulp));
            CHECK(max_ulp <= 1);
            CHECK(n_diff == 0);  // none needed the 1-ulp allowance so far
        }
    }
}

TEST_CASE("every tensor of every quant-base file") {
    auto f32_path = test::model_file("quant/quant-base-F32.gguf");
    if (!f32_path) return;
    const GgufFile base = GgufFile::open(*f32_path);
    struct Case {
        const char* file;
        double max_rel_rms;  // rms(dequant - original) / rms(original), per tensor
    };
    const Case cases[] = {{"F32", 0.0},    {"F16", 5e-4},   {"BF16", 4e-3},  {"Q8_0", 1e-2},
                          {"Q4_0", 0.12},  {"Q4_1", 0.11},  {"Q5_0", 0.06},  {"Q5_1", 0.05},
                          {"Q2_K", 0.4},   {"Q3_K", 0.2},   {"Q4_K", 0.1},   {"Q5_K", 0.05},
                          {"Q6_K", 0.025}, {"Q4_K_M", 0.1}};
    for (const Case& c : cases) {
        auto path = test::model_file(fmt::format("quant/quant-base-{}.gguf", c.file));
        if (!path) return;
        const GgufFile f = GgufFile::open(*path);
        REQUIRE(f.tensors().size() == 21);
        for (const GgufTensorInfo& t : f.tensors()) {
            CAPTURE(c.file);
            CAPTURE(t.name);
            const GgufTensorInfo& orig_t = base.tensor(t.name);
            REQUIRE(orig_t.type == GGML_TYPE_F32);
            REQUIRE(orig_t.ne == t.ne);
            const std::vector<float> orig = dequant_tensor(orig_t);
            const std::vector<float> got = dequant_tensor(t);
            double se = 0, so = 0;
            for (size_t i = 0; i < got.size(); ++i) {
                se += double(got[i] - orig[i]) * double(got[i] - orig[i]);
                so += double(orig[i]) * double(orig[i]);
            }
            CHECK(std::sqrt(se / so) <= c.max_rel_rms);
            if (t.type == GGML_TYPE_F16) {
                bool same = true;
                for (size_t i = 0; i < got.size(); ++i)
                    same = same && bits_of(got[i]) == bits_of(fp16_to_fp32(fp32_to_fp16(orig[i])));
                CHECK(same);
            }
            // gguf-py's quantizers, which reproduce llama-quantize, are ggml's reference ones; ours
            // must give the same bytes.
            if (t.type != GGML_TYPE_F32 && quantize_supported(t.type) && t.type != GGML_TYPE_Q4_K &&
                t.type != GGML_TYPE_Q5_K && t.type != GGML_TYPE_Q6_K) {
                std::vector<uint8_t> q(t.n_bytes);
                const int64_t ne0 = t.ne[0];
                const size_t rb = quant_row_bytes(t.type, ne0);
                for (int64_t r = 0; r < t.rows(); ++r)
                    quantize_row(t.type, orig.data() + r * ne0, q.data() + r * rb, ne0);
                CHECK(std::memcmp(q.data(), t.data, t.n_bytes) == 0);
            }
        }
    }
}

TEST_CASE("quantizers: dequantize(quantize(x)) error") {
    struct Case {
        GgmlType type;
        double max_rel_rms;
    };
    const Case cases[] = {{GGML_TYPE_F32, 0.0},   {GGML_TYPE_F16, 5e-4},  {GGML_TYPE_BF16, 4e-3},
                          {GGML_TYPE_Q8_0, 1e-2}, {GGML_TYPE_Q4_0, 0.12}, {GGML_TYPE_Q4_1, 0.11},
                          {GGML_TYPE_Q5_0, 0.06}, {GGML_TYPE_Q5_1, 0.05}, {GGML_TYPE_Q4_K, 0.11},
                          {GGML_TYPE_Q5_K, 0.02}, {GGML_TYPE_Q6_K, 0.018}};
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int64_t n = 4096;
    std::vector<float> x(n), y(n);
    for (auto& v : x) v = nd(rng) * 0.05f;
    x[5] = 0.0f;
    for (int i = 256; i < 512; ++i) x[size_t(i)] = 0.0f;  // an all-zero super-block
    for (int i = 512; i < 768; ++i) x[size_t(i)] = 3.0f + nd(rng);  // all positive
    for (const Case& c : cases) {
        CAPTURE(ggml_type_name(c.type));
        std::vector<uint8_t> q(quant_row_bytes(c.type, n));
        quantize_row(c.type, x.data(), q.data(), n);
        dequantize_row(c.type, q.data(), y.data(), n);
        double se = 0, so = 0;
        for (int64_t i = 0; i < n; ++i) {
            se += double(y[i] - x[i]) * double(y[i] - x[i]);
            so += double(x[i]) * double(x[i]);
        }
        CHECK(std::sqrt(se / so) <= c.max_rel_rms);
        for (int i = 256; i < 512; ++i) CHECK(y[size_t(i)] == 0.0f);
    }
}

TEST_CASE("vec_dot_row and matmul against dequantize-then-dot, batch invariance") {
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (GgmlType type : kAllTypes) {
        for (int64_t n_in : {int64_t(512), int64_t(768), int64_t(100)}) {
            if (n_in % quant_block_size(type) != 0) continue;
            CAPTURE(ggml_type_name(type));
            CAPTURE(n_in);
            const int64_t n_out = 37, n_rows_x = 7;
            const size_t rb = quant_row_bytes(type, n_in);
            std::vector<uint8_t> w;  // [n_out, rb]
            for (int64_t o = 0; o < n_out; ++o) {
                auto row = random_row(type, n_in, rng);
                w.insert(w.end(), row.begin(), row.end());
            }
            std::vector<float> x(size_t(n_rows_x * n_in));  // [n_rows_x, n_in]
            for (auto& v : x) v = nd(rng);
            std::vector<float> y(size_t(n_rows_x * n_out));  // [n_rows_x, n_out]
            matmul(type, w.data(), n_in, n_out, x.data(), n_rows_x, y.data());

            std::vector<float> wf(static_cast<size_t>(n_in));
            bool all_same = true, all_close = true;
            for (int64_t o = 0; o < n_out; ++o) {
                dequantize_row(type, w.data() + o * rb, wf.data(), n_in);
                for (int64_t r = 0; r < n_rows_x; ++r) {
                    const float* xr = x.data() + r * n_in;
                    double ref = 0, mag = 0;
                    for (int64_t i = 0; i < n_in; ++i) {
                        ref += double(wf[size_t(i)]) * double(xr[i]);
                        mag += std::fabs(double(wf[size_t(i)]) * double(xr[i]));
                    }
                    const float got = y[size_t(r * n_out + o)];
                    all_close = all_close && std::fabs(double(got) - ref) <= 1e-5 * mag + 1e-30;
                    const float vd = vec_dot_row(type, w.data() + o * rb, xr, n_in);
                    all_same = all_same && bits_of(vd) == bits_of(got);
                }
            }
            CHECK(all_close);
            CHECK(all_same);  // matmul and vec_dot_row give the same bits

            // Row 3 alone, and the batch on 2 threads: same bits.
            std::vector<float> y1(static_cast<size_t>(n_out)), y2(y.size());
            matmul(type, w.data(), n_in, n_out, x.data() + 3 * n_in, 1, y1.data());
            CHECK(std::memcmp(y1.data(), y.data() + 3 * n_out, size_t(n_out) * 4) == 0);
            matmul(type, w.data(), n_in, n_out, x.data(), n_rows_x, y2.data(), 2);
            CHECK(std::memcmp(y2.data(), y.data(), y.size() * 4) == 0);
        }
    }
}
