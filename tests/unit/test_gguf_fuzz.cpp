// Hostile-file corpus for the GGUF reader: real files and writer-made files, truncated at every
// header field boundary and with seeded byte flips. Every case must parse or throw
// coinfer::Error; a crash or a sanitizer report is a failure.
//
// COINFER_GGUF_FUZZ_SCALE (default 1) multiplies the number of sampled cases.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "io/gguf.h"
#include "test_models.h"

using namespace coinfer;

namespace {

double fuzz_scale() {
    const char* s = std::getenv("COINFER_GGUF_FUZZ_SCALE");
    double v = s ? std::atof(s) : 1.0;
    return v > 0 ? v : 1.0;
}

// Structure of a valid file, found by walking it independently of the reader.
struct Layout {
    std::vector<uint64_t> cuts;    // field boundaries: truncating here must fail
    std::vector<uint64_t> fields;  // field starts, with each field's size
    std::vector<uint32_t> field_sizes;
    uint64_t header_end = 0;   // end of the tensor infos
    uint64_t data_offset = 0;  // aligned start of the data section
    uint64_t valid_end = 0;    // shortest prefix that is still a valid file
    uint64_t n_tensors = 0;
    uint64_t n_kv = 0;
};

class Walker {
public:
    // In long arrays, boundaries are kept for `n_edge` elements at each end and for about
    // `n_stride` elements spread through the middle.
    Walker(const std::vector<uint8_t>& b, uint64_t n_edge, uint64_t n_stride)
        : b_(b), n_edge_(n_edge), n_stride_(n_stride) {}

    Layout walk() {
        field(4);  // magic
        field(4);  // version
        lay_.n_tensors = u64_field();
        lay_.n_kv = u64_field();
        uint64_t alignment = 32;
        for (uint64_t i = 0; i < lay_.n_kv; ++i) {
            std::string key = string_field(true);
            uint32_t type = u32_field();
            uint64_t at = pos_;
            value(type, true);
            if (key == "general.alignment" && type == GGUF_TYPE_UINT32) alignment = read<uint32_t>(at);
        }
        uint64_t data_end = 0;
        std::vector<std::pair<uint64_t, uint64_t>> extents;
        for (uint64_t i = 0; i < lay_.n_tensors; ++i) {
            string_field(true);
            uint32_t n_dims = u32_field();
            REQUIRE(n_dims <= 4);
            int64_t ne[4] = {1, 1, 1, 1};
            for (uint32_t d = 0; d < n_dims; ++d) ne[d] = static_cast<int64_t>(u64_field());
            auto type = static_cast<GgmlType>(u32_field());
            uint64_t offset = u64_field();
            auto row = ggml_row_bytes(type, ne[0]);
            REQUIRE(row.has_value());
            uint64_t n_bytes = *row * static_cast<uint64_t>(ne[1] * ne[2] * ne[3]);
            data_end = std::max(data_end, offset + n_bytes);
        }
        lay_.header_end = pos_;
        lay_.data_offset = (pos_ + alignment - 1) / alignment * alignment;
        lay_.valid_end = lay_.n_tensors ? lay_.data_offset + data_end : lay_.header_end;
        REQUIRE(lay_.valid_end <= b_.size());
        return std::move(lay_);
    }

private:
    template <typename T>
    T read(uint64_t at) const {
        if (at + sizeof(T) > b_.size()) FAIL("walker: read past the end at " << at);
        T v;
        std::memcpy(&v, b_.data() + at, sizeof(T));
        return v;
    }

    void field(uint32_t n, bool record = true) {
        if (pos_ + n > b_.size()) FAIL("walker: field past the end at " << pos_);
        if (record) {
            lay_.fields.push_back(pos_);
            lay_.field_sizes.push_back(n);
            if (pos_ > 0) lay_.cuts.push_back(pos_);
            if (n > 1) lay_.cuts.push_back(pos_ + n / 2);  // inside the field, too
        }
        pos_ += n;
        if (record) lay_.cuts.push_back(pos_);
    }
    uint32_t u32_field(bool record = true) {
        auto v = read<uint32_t>(pos_);
        field(4, record);
        return v;
    }
    uint64_t u64_field(bool record = true) {
        auto v = read<uint64_t>(pos_);
        field(8, record);
        return v;
    }
    std::string string_field(bool record) {
        uint64_t n = u64_field(record);
        if (n > b_.size() - pos_) FAIL("walker: string past the end at " << pos_);
        std::string s(reinterpret_cast<const char*>(b_.data() + pos_), n);
        if (record && n > 0) {
            lay_.cuts.push_back(pos_ + n / 2);
            lay_.cuts.push_back(pos_ + n);
        }
        pos_ += n;
        return s;
    }

    void value(uint32_t type, bool record) {
        switch (type) {
            case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: field(1, record); break;
            case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: field(2, record); break;
            case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: field(4, record); break;
            case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: field(8, record); break;
            case GGUF_TYPE_STRING: string_field(record); break;
            case GGUF_TYPE_ARRAY: {
                uint32_t elem = u32_field(record);
                uint64_t n = u64_field(record);
                // Long arrays (vocabularies): boundaries of the first and last few elements and
                // of a stride through the middle. Each cut into a 32k-string array re-parses
                // most of it, which is slow under ASan.
                uint64_t stride = std::max<uint64_t>(1, n / n_stride_);
                for (uint64_t i = 0; i < n; ++i) {
                    bool keep = record && (i < n_edge_ || i + n_edge_ >= n || i % stride == 0);
                    value(elem, keep);
                }
                break;
            }
            default: FAIL("walker: unknown value type " << type);
        }
    }

    const std::vector<uint8_t>& b_;
    uint64_t n_edge_, n_stride_;
    uint64_t pos_ = 0;
    Layout lay_;
};

struct Stats {
    uint64_t truncations = 0, flips = 0, smashes = 0, parsed = 0, refused = 0;
};

// Touches everything a successful parse hands out, so the sanitizers see any bad pointer.
void check_parsed(const GgufFile& f) {
    CHECK(f.alignment() > 0);
    CHECK(f.data_offset() % f.alignment() == 0);
    uint64_t sum = 0;
    for (const auto& [k, v] : f.metadata()) {
        sum += k.size();
        std::visit(
            [&](const auto& x) {
                using T = std::decay_t<decltype(x)>;
                if constexpr (std::is_same_v<T, std::string>) sum += x.size() ? uint8_t(x.back()) : 0;
                else if constexpr (std::is_same_v<T, GgufArray>) sum += x.size();
            },
            v.data);
    }
    for (const auto& t : f.tensors()) {
        CHECK(t.offset % f.alignment() == 0);
        CHECK(f.data_offset() + t.offset + t.n_bytes <= f.file_size());
        auto row = ggml_row_bytes(t.type, t.ne[0]);
        REQUIRE(row.has_value());
        CHECK(t.n_bytes == *row * static_cast<uint64_t>(t.rows()));
        if (t.n_bytes) sum += t.data[0] + t.data[t.n_bytes - 1];
    }
    (void)sum;
}

// One case: must parse (then checked) or throw coinfer::Error naming the file. Returns whether
// it parsed; `what` describes the case for failure reports.
bool run_case(std::vector<uint8_t> bytes, const std::string& name, const std::string& what,
              Stats& st, bool need_offset) {
    try {
        auto f = GgufFile::from_bytes(std::move(bytes), name);
        check_parsed(f);
        ++st.parsed;
        return true;
    } catch (const Error& e) {
        ++st.refused;
        std::string msg = e.what();
        if (msg.find(name) == std::string::npos || (need_offset && msg.find("offset") == std::string::npos))
            FAIL_CHECK(what << ": message lacks the file name or offset: " << msg);
        return false;
    } catch (const std::exception& e) {
        FAIL_CHECK(what << ": threw something other than coinfer::Error: " << e.what());
        return false;
    }
}

// Runs every mutation on one valid file. `big_arrays`: the header holds arrays of 32k+ strings,
// so each parse is slow (under ASan); sample fewer cuts inside them.
void fuzz_file(const std::string& name, const std::vector<uint8_t>& bytes, uint32_t seed,
               uint64_t n_flips, Stats& st, bool every_length = false, bool big_arrays = false) {
    INFO("file " << name);
    Layout lay = (big_arrays ? Walker(bytes, 2, 4) : Walker(bytes, 6, 10)).walk();
    {
        auto f = GgufFile::from_bytes(bytes, name);
        REQUIRE(f.tensors().size() == lay.n_tensors);
        REQUIRE(f.metadata().size() == lay.n_kv);
        CHECK(f.data_offset() == lay.data_offset);
    }
    std::mt19937 rng(seed);

    // Truncations: every field boundary before the end of the valid file, a random sample of
    // other lengths (or every length, for small files), and a few that keep a valid file.
    std::vector<uint64_t> cuts = lay.cuts;
    cuts.push_back(0);
    if (every_length) {
        for (uint64_t n = 0; n < lay.valid_end; ++n) cuts.push_back(n);
    } else {
        for (int i = 0; i < 32; ++i) cuts.push_back(rng() % lay.valid_end);
    }
    if (lay.n_tensors) cuts.push_back(lay.valid_end - 1);
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    for (uint64_t n : cuts) {
        if (n >= lay.valid_end) continue;
        ++st.truncations;
        std::vector<uint8_t> part(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(n));
        if (run_case(std::move(part), name, fmt::format("truncated to {} bytes", n), st, true))
            FAIL_CHECK("truncated to " << n << " of " << lay.valid_end << " bytes and still parsed");
    }
    for (uint64_t n : {lay.valid_end, (lay.valid_end + bytes.size()) / 2}) {
        std::vector<uint8_t> part(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(n));
        CHECK_NOTHROW(GgufFile::from_bytes(std::move(part), name));
    }

    // Byte flips with random values: mostly in the header (what the reader validates), some in
    // the data section.
    std::vector<uint8_t> work = bytes;
    for (uint64_t i = 0; i < n_flips; ++i) {
        uint64_t at = (rng() % 10 != 0 || lay.header_end == bytes.size())
                          ? rng() % lay.header_end
                          : lay.header_end + rng() % (bytes.size() - lay.header_end);
        int n_bytes = 1 + static_cast<int>(rng() % 3 == 0) * static_cast<int>(rng() % 4);
        std::string what = fmt::format("flip at {}", at);
        for (int k = 0; k < n_bytes && at + k < work.size(); ++k)
            work[at + k] ^= static_cast<uint8_t>(1 + rng() % 255);
        ++st.flips;
        run_case(work, name, what, st, false);
        std::copy(bytes.begin() + static_cast<ptrdiff_t>(at),
                  bytes.begin() + static_cast<ptrdiff_t>(std::min<uint64_t>(at + 4, bytes.size())),
                  work.begin() + static_cast<ptrdiff_t>(at));
    }

    // Field smashes: whole counts, lengths, types and offsets set to extreme values.
    static constexpr uint64_t k_values[] = {0, 1, 2, 0x7F, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF,
                                            0x80000000, 0xFFFFFFFF, 0x100000000ull,
                                            0x7FFFFFFFFFFFFFFFull, 0x8000000000000000ull,
                                            0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFF0ull};
    uint64_t n_smash = std::min<uint64_t>(lay.fields.size() * 2, n_flips);
    for (uint64_t i = 0; i < n_smash; ++i) {
        // With budget for it, the first pass hits every field once; the rest are random.
        bool sweep = n_smash == lay.fields.size() * 2 && i < lay.fields.size();
        size_t k = sweep ? i : rng() % lay.fields.size();
        uint64_t at = lay.fields[k];
        uint32_t size = lay.field_sizes[k];
        uint64_t v = k_values[rng() % std::size(k_values)];
        std::memcpy(work.data() + at, &v, size);  // little-endian: low bytes of v
        ++st.smashes;
        run_case(work, name, fmt::format("field at {} (size {}) set to {:#x}", at, size, v), st, false);
        std::memcpy(work.data() + at, bytes.data() + at, size);
    }
    CHECK(work == bytes);
}

std::vector<uint8_t> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    REQUIRE(in);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

template <typename T>
GgufArray arr(std::vector<T> v) {
    return GgufArray{GgufArrayData(std::move(v))};
}

std::vector<uint8_t> seeded_bytes(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng());
    return v;
}

// Writer-made files, so the corpus has coverage without the shared models.
std::vector<std::pair<std::string, std::vector<uint8_t>>> writer_corpus() {
    std::vector<std::pair<std::string, std::vector<uint8_t>>> out;
    for (uint32_t align : {0u, 64u}) {
        GgufWriter w;
        w.set("general.architecture", std::string("llama"));
        if (align) w.set("general.alignment", align);
        w.set("llama.block_count", uint32_t{2});
        w.set("llama.rope.freq_base", 10000.0f);
        w.set("u8", uint8_t{7});
        w.set("i8", int8_t{-7});
        w.set("u16", uint16_t{7});
        w.set("i16", int16_t{-7});
        w.set("i32", int32_t{-7});
        w.set("flag", true);
        w.set("u64", uint64_t{1} << 40);
        w.set("i64", int64_t{-1});
        w.set("f64", 0.5);
        w.set("tokenizer.ggml.tokens", arr<std::string>({"<unk>", "<s>", "</s>", "a", "bc", ""}));
        w.set("tokenizer.ggml.scores", arr<float>({0, 0, 0, -1, -2, -3}));
        w.set("tokenizer.ggml.token_type", arr<int32_t>({2, 3, 3, 1, 1, 1}));
        w.set("bools", arr<bool>({true, false}));
        w.set("u64s", arr<uint64_t>({1, 2}));
        w.set("nested", arr<GgufArray>({arr<std::string>({"x", "yz"}), arr<GgufArray>({arr<uint8_t>({1})}),
                                        arr<double>({})}));
        w.add_tensor("token_embd.weight", GGML_TYPE_F32, {8, 6}, seeded_bytes(8 * 6 * 4, 1));
        w.add_tensor("blk.0.attn_q.weight", GGML_TYPE_Q8_0, {32, 4}, seeded_bytes(34 * 4, 2));
        w.add_tensor("blk.0.ffn_up.weight", GGML_TYPE_Q4_K, {256, 2, 1}, seeded_bytes(144 * 2, 3));
        w.add_tensor("blk.0.ffn_norm.weight", GGML_TYPE_F16, {3}, seeded_bytes(6, 4));
        w.add_tensor("blk.1.x", GGML_TYPE_Q6_K, {256, 1, 1, 2}, seeded_bytes(210 * 2, 5));
        out.emplace_back(fmt::format("writer-align{}.gguf", align), w.to_bytes());
    }
    GgufWriter meta_only;
    meta_only.set("general.name", std::string("metadata only"));
    meta_only.set("a", arr<GgufArray>({arr<GgufArray>({arr<int16_t>({1, 2, 3})})}));
    out.emplace_back("writer-meta.gguf", meta_only.to_bytes());
    return out;
}

void print_stats(const char* label, const Stats& st, double seconds) {
    fmt::print("gguf fuzz [{}]: {} truncations, {} byte flips, {} field smashes = {} cases "
               "({} parsed, {} refused) in {:.2f} s\n",
               label, st.truncations, st.flips, st.smashes, st.truncations + st.flips + st.smashes,
               st.parsed, st.refused, seconds);
}

}  // namespace

TEST_CASE("gguf fuzz: writer-made files") {
    auto t0 = std::chrono::steady_clock::now();
    Stats st;
    uint32_t seed = 1234;
    for (const auto& [name, bytes] : writer_corpus())
        fuzz_file(name, bytes, seed++, static_cast<uint64_t>(3000 * fuzz_scale()), st, true);
    CHECK(st.truncations > 1000);
    print_stats("writer", st, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

TEST_CASE("gguf fuzz: shared model files") {
    struct Entry {
        const char* rel;
        uint64_t n_flips;  // fewer for files whose header holds 32k+ strings (slow under ASan)
        bool big_arrays;
    };
    const Entry corpus[] = {
        {"stories260K.gguf", 400, false},
        {"llama-2-tiny-random.gguf", 50, true},
        {"vocab/ggml-vocab-llama-spm.gguf", 30, true},
        {"vocab/ggml-vocab-gpt-2.gguf", 25, true},
        {"quant/quant-base-Q4_K.gguf", 300, false},
        {"quant/quant-base-Q6_K.gguf", 200, false},
    };
    auto t0 = std::chrono::steady_clock::now();
    Stats st;
    int n_files = 0;
    uint32_t seed = 42;
    for (const auto& e : corpus) {
        auto path = coinfer::test::model_file(e.rel);
        ++seed;
        if (!path) continue;
        auto bytes = read_file(*path);
        auto t1 = std::chrono::steady_clock::now();
        Stats one;
        fuzz_file(e.rel, bytes, seed, static_cast<uint64_t>(e.n_flips * fuzz_scale()), one, false,
                  e.big_arrays);
        print_stats(e.rel, one, std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count());
        st.truncations += one.truncations;
        st.flips += one.flips;
        st.smashes += one.smashes;
        st.parsed += one.parsed;
        st.refused += one.refused;
        ++n_files;
    }
    if (n_files == 0) {
        MESSAGE("no shared models found; only the writer-made corpus ran");
        return;
    }
    print_stats(fmt::format("{} model files", n_files).c_str(), st,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}
