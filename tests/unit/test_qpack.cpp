// The packed GPU layout of quantized weights (kernels/qpack.h): every format packed and read
// back equals dequantize_row bit for bit, row and K tails included; packing in tile ranges
// gives the same bytes; scales beyond F16 are refused.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <vector>

#include "engine/qpack.h"
#include "engine/quant.h"
#include "io/error.h"
#include "kernels/qpack.h"

using namespace coinfer;

namespace {

// Random blocks with every F16 scale field set to a small finite value.
std::vector<uint8_t> random_rows(GgmlType type, int64_t n_in, int64_t n_out, std::mt19937_64& rng) {
    const size_t rb = quant_row_bytes(type, n_in);
    std::vector<uint8_t> w(rb * size_t(n_out));
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& b : w) b = uint8_t(byte(rng));
    struct Fmt { GgmlType t; int bytes; int f16[2]; };
    const Fmt fmts[] = {{GGML_TYPE_Q4_0, 18, {0, -1}}, {GGML_TYPE_Q4_1, 20, {0, 2}},  {GGML_TYPE_Q5_0, 22, {0, -1}},
                        {GGML_TYPE_Q5_1, 24, {0, 2}},  {GGML_TYPE_Q8_0, 34, {0, -1}}, {GGML_TYPE_Q2_K, 84, {80, 82}},
                        {GGML_TYPE_Q3_K, 110, {108, -1}}, {GGML_TYPE_Q4_K, 144, {0, 2}}, {GGML_TYPE_Q5_K, 176, {0, 2}},
                        {GGML_TYPE_Q6_K, 210, {208, -1}}};
    std::uniform_real_distribution<float> sc(-0.004f, 0.004f);
    for (const Fmt& f : fmts) {
        if (f.t != type) continue;
        for (int64_t o = 0; o < n_out; ++o)
            for (size_t b = 0; b + size_t(f.bytes) <= rb; b += size_t(f.bytes))
                for (int k : f.f16)
                    if (k >= 0) {
                        const uint16_t h = fp32_to_fp16(sc(rng));
                        std::memcpy(&w[size_t(o) * rb + b + size_t(k)], &h, 2);
                    }
    }
    return w;
}

const GgmlType k_types[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0,
                            GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K};

}  // namespace

TEST_CASE("qpack: packed and read back equals dequantize_row, every format and tail") {
    std::mt19937_64 rng(7);
    struct Shape { int64_t n_in, n_out; };
    const Shape shapes[] = {{256, 16}, {512, 37}, {2080, 20}, {96, 5}, {4096, 33}};
    for (GgmlType type : k_types) {
        for (const Shape& s : shapes) {
            if (s.n_in % quant_block_size(type) != 0) continue;
            CAPTURE(ggml_type_name(type));
            CAPTURE(s.n_in);
            CAPTURE(s.n_out);
            const auto w = random_rows(type, s.n_in, s.n_out, rng);
            const size_t rb = quant_row_bytes(type, s.n_in);
            std::vector<uint8_t> packed(qpack_size(type, s.n_in, s.n_out), 0xcd);
            auto row = [&](int64_t r) { return w.data() + size_t(r) * rb; };
            const int64_t tiles = kernels::qpack_row_tiles(s.n_out);
            qpack_tiles(type, s.n_in, s.n_out, row, 0, tiles, packed.data());
            // In two ranges: the same bytes.
            std::vector<uint8_t> two(packed.size(), 0x11);
            qpack_tiles(type, s.n_in, s.n_out, row, 0, tiles / 2, two.data());
            qpack_tiles(type, s.n_in, s.n_out, row, tiles / 2, tiles, two.data());
            CHECK(two == packed);
            std::vector<float> want(size_t(s.n_in)), got(size_t(s.n_in));
            int64_t bad = 0;
            for (int64_t r = 0; r < s.n_out; ++r) {
                dequantize_row(type, row(r), want.data(), s.n_in);
                qpack_dequantize_row(type, packed.data(), s.n_in, s.n_out, r, got.data());
                bad += std::memcmp(want.data(), got.data(), want.size() * 4) != 0;
            }
            CHECK(bad == 0);
        }
    }
}

TEST_CASE("qpack: sizes, and a scale beyond the F16 range is refused") {
    // Q4_0 keeps its 4.5 bits a weight, Q8_0 its 8.5; Q4_K grows by its unpacked 6-bit scales.
    CHECK(qpack_size(GGML_TYPE_Q4_0, 4096, 4096) == quant_row_bytes(GGML_TYPE_Q4_0, 4096) * 4096);
    CHECK(qpack_size(GGML_TYPE_Q8_0, 4096, 4096) == quant_row_bytes(GGML_TYPE_Q8_0, 4096) * 4096);
    CHECK(qpack_size(GGML_TYPE_Q2_K, 4096, 4096) == quant_row_bytes(GGML_TYPE_Q2_K, 4096) * 4096);
    CHECK(qpack_size(GGML_TYPE_Q4_K, 4096, 4096) == 4096 / 16 * 16 * 2368);
    CHECK_FALSE(qpack_supported(GGML_TYPE_F16));
    std::mt19937_64 rng(3);
    auto w = random_rows(GGML_TYPE_Q8_0, 32, 1, rng);
    const uint16_t big = fp32_to_fp16(1000.0f);  // x 128 (the code offset) overflows F16
    std::memcpy(w.data(), &big, 2);
    std::vector<uint8_t> packed(qpack_size(GGML_TYPE_Q8_0, 32, 1));
    CHECK_THROWS_AS(qpack_tiles(GGML_TYPE_Q8_0, 32, 1, [&](int64_t) { return w.data(); }, 0, 1, packed.data()), Error);
}
