// GGUF reader/writer: round trips through GgufWriter, typed accessors, hand-built hostile files,
// and (when present) the shared stories260K model.
#include <doctest/doctest.h>

#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "test_models.h"

using namespace coinfer;

namespace {

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(rng());
    return v;
}

template <typename T>
GgufArray arr(std::vector<T> v) {
    return GgufArray{GgufArrayData(std::move(v))};
}

// Little-endian byte builder for hand-made files.
struct Bytes {
    std::vector<uint8_t> b;

    Bytes& u8(uint8_t v) { b.push_back(v); return *this; }
    Bytes& u32(uint32_t v) { return raw(&v, 4); }
    Bytes& u64(uint64_t v) { return raw(&v, 8); }
    // Out of line: inlined, gcc 12 reports false -Wstringop-overflow on the vector growth.
    [[gnu::noinline]] Bytes& raw(const void* p, size_t n) {
        size_t at = b.size();
        b.resize(at + n);
        if (n) std::memcpy(b.data() + at, p, n);
        return *this;
    }
    Bytes& str(std::string_view s) { u64(s.size()); return raw(s.data(), s.size()); }
    Bytes& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
        return u32(0x46554747).u32(version).u64(n_tensors).u64(n_kv);
    }
    // key + type id (the value follows)
    Bytes& key(std::string_view k, uint32_t type) { return str(k).u32(type); }
    Bytes& tensor(std::string_view name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
        str(name).u32(static_cast<uint32_t>(ne.size()));
        for (auto d : ne) u64(d);
        return u32(type).u64(offset);
    }
    Bytes& pad_to(size_t a) { return zeros((a - b.size() % a) % a); }
    [[gnu::noinline]] Bytes& zeros(size_t n) { b.resize(b.size() + n); return *this; }
};

// Parses `bytes` as "hostile.gguf"; returns the Error message, or "" when it parsed.
std::string parse_error(std::vector<uint8_t> bytes) {
    try {
        GgufFile::from_bytes(std::move(bytes), "hostile.gguf");
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// The file must be refused with an Error naming the file (and the offset, where one applies)
// and containing each of `parts`.
void check_refused(const Bytes& bytes, std::vector<std::string> parts, bool has_offset = true) {
    std::string msg;
    try {
        msg = parse_error(bytes.b);
    } catch (const std::exception& e) {
        FAIL_CHECK("not a coinfer::Error: " << e.what());
        return;
    }
    INFO("message: " << msg);
    REQUIRE_FALSE(msg.empty());
    CHECK(msg.find("hostile.gguf") != std::string::npos);
    if (has_offset) CHECK(msg.find("offset") != std::string::npos);
    for (const auto& p : parts) CHECK(msg.find(p) != std::string::npos);
}

bool same_bits(float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); }
bool same_bits(double a, double b) { return std::bit_cast<uint64_t>(a) == std::bit_cast<uint64_t>(b); }

const float k_nan_f = std::bit_cast<float>(uint32_t{0x7fc12345});
const float k_nan_f_neg = std::bit_cast<float>(uint32_t{0xffa00001});
const double k_nan_d = std::bit_cast<double>(uint64_t{0x7ff8deadbeef0001});

// A writer holding every value type, arrays of every element type and nested arrays.
GgufWriter writer_with_all_values() {
    GgufWriter w;
    w.set("general.architecture", std::string("llama"));
    w.set("u8", uint8_t{255});
    w.set("i8", int8_t{-128});
    w.set("u16", uint16_t{65535});
    w.set("i16", int16_t{-32768});
    w.set("u32", uint32_t{0xFFFFFFFFu});
    w.set("i32", std::numeric_limits<int32_t>::min());
    w.set("f32", 1.5f);
    w.set("f32.nan", k_nan_f);
    w.set("f32.negzero", -0.0f);
    w.set("f32.inf", -std::numeric_limits<float>::infinity());
    w.set("bool.true", true);
    w.set("bool.false", false);
    w.set("str", std::string("h\xC3\xA9llo\0world", 12));
    w.set("str.empty", std::string());
    w.set("u64", std::numeric_limits<uint64_t>::max());
    w.set("i64", std::numeric_limits<int64_t>::min());
    w.set("i64.max", std::numeric_limits<int64_t>::max());
    w.set("f64", -2.25e300);
    w.set("f64.nan", k_nan_d);
    w.set("f64.denorm", std::numeric_limits<double>::denorm_min());

    w.set("a.u8", arr<uint8_t>({0, 1, 255}));
    w.set("a.i8", arr<int8_t>({-128, 0, 127}));
    w.set("a.u16", arr<uint16_t>({0, 65535}));
    w.set("a.i16", arr<int16_t>({-32768, 32767}));
    w.set("a.u32", arr<uint32_t>({0, 0xFFFFFFFFu}));
    w.set("a.i32", arr<int32_t>({std::numeric_limits<int32_t>::min(), -1, 0, 7}));
    w.set("a.f32", arr<float>({0.5f, -1e30f, k_nan_f, k_nan_f_neg}));
    w.set("a.bool", arr<bool>({true, false, true, true, false}));
    w.set("a.str", arr<std::string>({"", "a", std::string("\0\xff", 2), "<0x0A>"}));
    w.set("a.u64", arr<uint64_t>({0, std::numeric_limits<uint64_t>::max()}));
    w.set("a.i64", arr<int64_t>({std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()}));
    w.set("a.f64", arr<double>({1.0, k_nan_d, -0.0}));
    // Empty arrays keep their element type.
    w.set("a.empty.u8", arr<uint8_t>({}));
    w.set("a.empty.bool", arr<bool>({}));
    w.set("a.empty.str", arr<std::string>({}));
    w.set("a.empty.arr", arr<GgufArray>({}));
    w.set("a.empty.f64", arr<double>({}));
    // Nested: array of arrays of strings (ragged, with an empty one), arrays of mixed element
    // types, and three levels.
    w.set("a.nested.str", arr<GgufArray>({arr<std::string>({"x", "yy"}), arr<std::string>({}),
                                          arr<std::string>({"zzz"})}));
    w.set("a.nested.mixed", arr<GgufArray>({arr<int32_t>({1, 2}), arr<bool>({true}),
                                            arr<double>({3.5}), arr<GgufArray>({})}));
    w.set("a.nested.3", arr<GgufArray>({arr<GgufArray>({arr<int64_t>({-1}), arr<uint8_t>({})}),
                                        arr<GgufArray>({arr<std::string>({"deep"})})}));
    return w;
}

// Compares a parsed metadata list with what the writer was given: same keys, same order,
// same values (floats compared bit for bit so NaN payloads count).
bool same_array(const GgufArray& a, const GgufArray& b);

bool same_value(const GgufValue& a, const GgufValue& b) {
    if (a.type() != b.type()) return false;
    if (auto* x = std::get_if<float>(&a.data)) return same_bits(*x, std::get<float>(b.data));
    if (auto* x = std::get_if<double>(&a.data)) return same_bits(*x, std::get<double>(b.data));
    if (auto* x = std::get_if<GgufArray>(&a.data)) return same_array(*x, std::get<GgufArray>(b.data));
    return a == b;
}

bool same_array(const GgufArray& a, const GgufArray& b) {
    if (a.elem_type() != b.elem_type() || a.size() != b.size()) return false;
    if (auto* x = std::get_if<std::vector<float>>(&a.data)) {
        auto& y = std::get<std::vector<float>>(b.data);
        for (size_t i = 0; i < x->size(); ++i)
            if (!same_bits((*x)[i], y[i])) return false;
        return true;
    }
    if (auto* x = std::get_if<std::vector<double>>(&a.data)) {
        auto& y = std::get<std::vector<double>>(b.data);
        for (size_t i = 0; i < x->size(); ++i)
            if (!same_bits((*x)[i], y[i])) return false;
        return true;
    }
    if (auto* x = std::get_if<std::vector<GgufArray>>(&a.data)) {
        auto& y = std::get<std::vector<GgufArray>>(b.data);
        for (size_t i = 0; i < x->size(); ++i)
            if (!same_array((*x)[i], y[i])) return false;
        return true;
    }
    return a == b;
}

struct TensorSpec {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    std::vector<uint8_t> data;
};

std::vector<TensorSpec> tensor_specs() {
    std::vector<TensorSpec> specs = {
        {"t.f32.1d", GGML_TYPE_F32, {7}, {}},
        {"t.f16.2d", GGML_TYPE_F16, {3, 5}, {}},
        {"t.q8_0.3d", GGML_TYPE_Q8_0, {64, 2, 3}, {}},
        {"t.q4_k.4d", GGML_TYPE_Q4_K, {256, 1, 2, 2}, {}},
        {"t.i32.ones", GGML_TYPE_I32, {1, 1, 1, 1}, {}},
        {"t.bf16", GGML_TYPE_BF16, {1}, {}},
        {"t.q6_k", GGML_TYPE_Q6_K, {512, 3}, {}},
        {"t.q4_0", GGML_TYPE_Q4_0, {32}, {}},
    };
    uint32_t seed = 1;
    for (auto& s : specs) {
        size_t rows = 1;
        for (size_t i = 1; i < s.ne.size(); ++i) rows *= static_cast<size_t>(s.ne[i]);
        s.data = random_bytes(*ggml_row_bytes(s.type, s.ne[0]) * rows, seed++);
    }
    return specs;
}

void check_tensors(const GgufFile& f, const std::vector<uint8_t>& image,
                   const std::vector<TensorSpec>& specs, uint64_t align) {
    REQUIRE(f.tensors().size() == specs.size());
    CHECK(f.alignment() == align);
    CHECK(f.data_offset() % align == 0);
    for (size_t i = 0; i < specs.size(); ++i) {
        const auto& s = specs[i];
        const auto& t = f.tensors()[i];
        INFO("tensor " << s.name);
        CHECK(t.name == s.name);
        CHECK(t.type == s.type);
        CHECK(t.n_dims == s.ne.size());
        int64_t n = 1;
        for (size_t d = 0; d < 4; ++d) {
            int64_t want = d < s.ne.size() ? s.ne[d] : 1;
            CHECK(t.ne[d] == want);
            n *= want;
        }
        CHECK(t.n_elements == static_cast<uint64_t>(n));
        CHECK(t.rows() == n / t.ne[0]);
        CHECK(t.n_bytes == s.data.size());
        CHECK(t.offset % align == 0);
        // Data pointers are laid out like the file: base + data_offset + offset.
        const uint8_t* base = f.tensors()[0].data - f.data_offset() - f.tensors()[0].offset;
        CHECK(t.data == base + f.data_offset() + t.offset);
        REQUIRE(f.data_offset() + t.offset + t.n_bytes <= image.size());
        CHECK(std::memcmp(t.data, s.data.data(), s.data.size()) == 0);
        CHECK(std::memcmp(image.data() + f.data_offset() + t.offset, s.data.data(), s.data.size()) == 0);
        CHECK(f.find_tensor(s.name) == &t);
        CHECK(&f.tensor(s.name) == &t);
    }
    // Tensors do not overlap and come in file order.
    for (size_t i = 1; i < specs.size(); ++i)
        CHECK(f.tensors()[i - 1].offset + f.tensors()[i - 1].n_bytes <= f.tensors()[i].offset);
}

struct TempFile {
    std::string path;
    explicit TempFile(const std::string& stem) {
        path = (std::filesystem::temp_directory_path() /
                (stem + "-" + std::to_string(::getpid()) + ".gguf")).string();
    }
    ~TempFile() { std::error_code ec; std::filesystem::remove(path, ec); }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_CASE("gguf: every value type round-trips through the writer") {
    GgufWriter w = writer_with_all_values();
    auto image = w.to_bytes();
    auto f = GgufFile::from_bytes(image, "values.gguf");
    CHECK(f.version() == 3);
    CHECK(f.path() == "values.gguf");
    CHECK(f.file_size() == image.size());
    CHECK(f.tensors().empty());
    CHECK(f.alignment() == 32);
    CHECK(f.data_offset() % 32 == 0);
    CHECK(f.data_offset() == image.size());  // the writer pads the header to the alignment

    // Rebuild the expected list from a second writer call (the writer keeps insertion order).
    GgufWriter w2 = writer_with_all_values();
    auto f2 = GgufFile::from_bytes(w2.to_bytes());
    REQUIRE(f.metadata().size() == f2.metadata().size());
    for (size_t i = 0; i < f.metadata().size(); ++i) {
        INFO("key " << f.metadata()[i].first);
        CHECK(f.metadata()[i].first == f2.metadata()[i].first);
        CHECK(same_value(f.metadata()[i].second, f2.metadata()[i].second));
    }
    CHECK(f.metadata()[0].first == "general.architecture");
    CHECK(f.metadata()[1].first == "u8");

    // Every one of the 13 types appears as a scalar or array element.
    std::vector<bool> seen_scalar(GGUF_TYPE_COUNT), seen_elem(GGUF_TYPE_COUNT);
    for (const auto& [k, v] : f.metadata()) {
        seen_scalar[v.type()] = true;
        if (auto* a = std::get_if<GgufArray>(&v.data)) seen_elem[a->elem_type()] = true;
    }
    for (uint32_t t = 0; t < GGUF_TYPE_COUNT; ++t) {
        INFO("type " << gguf_type_name(t));
        CHECK(seen_elem[t]);
        if (t != GGUF_TYPE_ARRAY) CHECK(seen_scalar[t]);
    }

    // Exact values.
    CHECK(f.get<uint8_t>("u8") == 255);
    CHECK(f.get<int8_t>("i8") == -128);
    CHECK(f.get<uint16_t>("u16") == 65535);
    CHECK(f.get<int16_t>("i16") == -32768);
    CHECK(f.get<uint32_t>("u32") == 0xFFFFFFFFu);
    CHECK(f.get<int32_t>("i32") == std::numeric_limits<int32_t>::min());
    CHECK(f.get<float>("f32") == 1.5f);
    CHECK(std::bit_cast<uint32_t>(f.get<float>("f32.nan")) == 0x7fc12345u);
    CHECK(std::bit_cast<uint32_t>(f.get<float>("f32.negzero")) == 0x80000000u);
    CHECK(std::isinf(f.get<float>("f32.inf")));
    CHECK(f.get<bool>("bool.true") == true);
    CHECK(f.get<bool>("bool.false") == false);
    CHECK(f.get<std::string>("str") == std::string("h\xC3\xA9llo\0world", 12));
    CHECK(f.get<std::string>("str").size() == 12);
    CHECK(f.get<std::string>("str.empty").empty());
    CHECK(f.get<uint64_t>("u64") == std::numeric_limits<uint64_t>::max());
    CHECK(f.get<int64_t>("i64") == std::numeric_limits<int64_t>::min());
    CHECK(f.get<double>("f64") == -2.25e300);
    CHECK(std::bit_cast<uint64_t>(f.get<double>("f64.nan")) == 0x7ff8deadbeef0001ull);
    CHECK(f.get<double>("f64.denorm") == std::numeric_limits<double>::denorm_min());

    CHECK(f.get_array<uint8_t>("a.u8") == std::vector<uint8_t>{0, 1, 255});
    CHECK(f.get_array<int8_t>("a.i8") == std::vector<int8_t>{-128, 0, 127});
    CHECK(f.get_array<uint16_t>("a.u16") == std::vector<uint16_t>{0, 65535});
    CHECK(f.get_array<int16_t>("a.i16") == std::vector<int16_t>{-32768, 32767});
    CHECK(f.get_array<uint32_t>("a.u32") == std::vector<uint32_t>{0, 0xFFFFFFFFu});
    CHECK(f.get_array<int32_t>("a.i32") ==
          std::vector<int32_t>{std::numeric_limits<int32_t>::min(), -1, 0, 7});
    const auto& af = f.get_array<float>("a.f32");
    REQUIRE(af.size() == 4);
    CHECK(af[0] == 0.5f);
    CHECK(af[1] == -1e30f);
    CHECK(std::bit_cast<uint32_t>(af[2]) == 0x7fc12345u);
    CHECK(std::bit_cast<uint32_t>(af[3]) == 0xffa00001u);
    CHECK(f.get_array<bool>("a.bool") == std::vector<bool>{true, false, true, true, false});
    CHECK(f.get_array<std::string>("a.str") ==
          std::vector<std::string>{"", "a", std::string("\0\xff", 2), "<0x0A>"});
    CHECK(f.get_array<uint64_t>("a.u64") ==
          std::vector<uint64_t>{0, std::numeric_limits<uint64_t>::max()});
    CHECK(f.get_array<int64_t>("a.i64") == std::vector<int64_t>{std::numeric_limits<int64_t>::min(),
                                                                std::numeric_limits<int64_t>::max()});
    const auto& ad = f.get_array<double>("a.f64");
    REQUIRE(ad.size() == 3);
    CHECK(std::bit_cast<uint64_t>(ad[1]) == 0x7ff8deadbeef0001ull);
    CHECK(std::bit_cast<uint64_t>(ad[2]) == 0x8000000000000000ull);

    CHECK(f.get<GgufArray>("a.empty.u8").elem_type() == GGUF_TYPE_UINT8);
    CHECK(f.get<GgufArray>("a.empty.bool").elem_type() == GGUF_TYPE_BOOL);
    CHECK(f.get<GgufArray>("a.empty.str").elem_type() == GGUF_TYPE_STRING);
    CHECK(f.get<GgufArray>("a.empty.arr").elem_type() == GGUF_TYPE_ARRAY);
    CHECK(f.get<GgufArray>("a.empty.f64").elem_type() == GGUF_TYPE_FLOAT64);
    CHECK(f.get_array<std::string>("a.empty.str").empty());

    const auto& nested = f.get_array<GgufArray>("a.nested.str");
    REQUIRE(nested.size() == 3);
    CHECK(std::get<std::vector<std::string>>(nested[0].data) == std::vector<std::string>{"x", "yy"});
    CHECK(nested[1].size() == 0);
    CHECK(nested[1].elem_type() == GGUF_TYPE_STRING);
    CHECK(std::get<std::vector<std::string>>(nested[2].data) == std::vector<std::string>{"zzz"});
    const auto& mixed = f.get_array<GgufArray>("a.nested.mixed");
    REQUIRE(mixed.size() == 4);
    CHECK(mixed[0].elem_type() == GGUF_TYPE_INT32);
    CHECK(mixed[1].elem_type() == GGUF_TYPE_BOOL);
    CHECK(mixed[2].elem_type() == GGUF_TYPE_FLOAT64);
    CHECK(mixed[3].elem_type() == GGUF_TYPE_ARRAY);
    const auto& three = f.get_array<GgufArray>("a.nested.3");
    REQUIRE(three.size() == 2);
    const auto& deep = std::get<std::vector<GgufArray>>(three[1].data);
    REQUIRE(deep.size() == 1);
    CHECK(std::get<std::vector<std::string>>(deep[0].data) == std::vector<std::string>{"deep"});
    CHECK(std::get<std::vector<int64_t>>(std::get<std::vector<GgufArray>>(three[0].data)[0].data) ==
          std::vector<int64_t>{-1});

    // Writing the parsed metadata back out gives the same bytes.
    GgufWriter w3;
    for (const auto& [k, v] : f.metadata()) w3.set(k, v);
    CHECK(w3.to_bytes() == image);
}

TEST_CASE("gguf: writer set() replaces an existing key in place") {
    GgufWriter w;
    w.set("a", uint32_t{1});
    w.set("b", uint32_t{2});
    w.set("a", std::string("x"));
    auto f = GgufFile::from_bytes(w.to_bytes());
    REQUIRE(f.metadata().size() == 2);
    CHECK(f.metadata()[0].first == "a");
    CHECK(f.get<std::string>("a") == "x");
}

TEST_CASE("gguf: tensors round-trip with default and custom alignment") {
    for (uint32_t align : {0u, 1u, 32u, 64u, 4096u}) {  // 0: no general.alignment key
        INFO("alignment " << align);
        GgufWriter w;
        w.set("general.name", std::string("t"));
        if (align) w.set("general.alignment", align);
        auto specs = tensor_specs();
        for (const auto& s : specs) w.add_tensor(s.name, s.type, s.ne, s.data);
        auto image = w.to_bytes();
        auto f = GgufFile::from_bytes(image, "tensors.gguf");
        uint64_t a = align ? align : 32;
        check_tensors(f, image, specs, a);
        CHECK(f.data_offset() >= 24);
        if (align) CHECK(f.get<uint32_t>("general.alignment") == align);
        CHECK(f.file_size() == image.size());
        CHECK(image.size() % a == 0);
    }
}

TEST_CASE("gguf: zero tensors, zero metadata") {
    GgufWriter w;
    auto image = w.to_bytes();
    CHECK(image.size() == 32);  // 24-byte header padded to 32
    auto f = GgufFile::from_bytes(image);
    CHECK(f.metadata().empty());
    CHECK(f.tensors().empty());
    CHECK(f.data_offset() == 32);
    CHECK(f.find_tensor("x") == nullptr);

    // The bare 24-byte header with no padding is also a valid file.
    image.resize(24);
    auto g = GgufFile::from_bytes(image);
    CHECK(g.tensors().empty());
}

TEST_CASE("gguf: zero-element tensors") {
    GgufWriter w;
    w.add_tensor("empty", GGML_TYPE_F32, {0, 4}, {});
    w.add_tensor("after", GGML_TYPE_F32, {2}, random_bytes(8, 9));
    w.add_tensor("empty2", GGML_TYPE_Q4_K, {256, 0}, {});
    auto f = GgufFile::from_bytes(w.to_bytes());
    REQUIRE(f.tensors().size() == 3);
    CHECK(f.tensor("empty").n_elements == 0);
    CHECK(f.tensor("empty").n_bytes == 0);
    CHECK(f.tensor("after").n_bytes == 8);
    CHECK(f.tensor("empty2").n_bytes == 0);
}

TEST_CASE("gguf: writer refuses malformed tensors") {
    GgufWriter w;
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_F32, {}, {})), Error);
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_F32, {1, 1, 1, 1, 1}, std::vector<uint8_t>(4))), Error);
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_F32, {4}, std::vector<uint8_t>(15))), Error);
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_Q4_0, {31}, std::vector<uint8_t>(18))), Error);
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_F32, {-4}, {})), Error);
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_F32, {4, -1}, {})), Error);
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_F32, {1 << 20, 1 << 20, 1 << 20, 1 << 20}, {})), Error);
    CHECK_THROWS_AS((w.add_tensor("a", static_cast<GgmlType>(4), {32}, {})), Error);
    w.add_tensor("a", GGML_TYPE_F32, {1}, std::vector<uint8_t>(4));
    CHECK_THROWS_AS((w.add_tensor("a", GGML_TYPE_F32, {1}, std::vector<uint8_t>(4))), Error);
}

TEST_CASE("gguf: writer refuses an alignment that is not a power of two") {
    for (uint32_t align : {0u, 3u, 48u}) {
        GgufWriter w;
        w.set("general.alignment", align);
        w.add_tensor("a", GGML_TYPE_F32, {1}, std::vector<uint8_t>(4));
        CHECK_THROWS_AS(w.to_bytes(), Error);
    }
}

TEST_CASE("gguf: write() and open() through a real file") {
    GgufWriter w = writer_with_all_values();
    w.set("general.alignment", uint32_t{64});
    auto specs = tensor_specs();
    for (const auto& s : specs) w.add_tensor(s.name, s.type, s.ne, s.data);
    TempFile tmp("coinfer-test-gguf");
    w.write(tmp.path);
    auto image = w.to_bytes();
    CHECK(std::filesystem::file_size(tmp.path) == image.size());
    auto f = GgufFile::open(tmp.path);
    CHECK(f.path() == tmp.path);
    check_tensors(f, image, specs, 64);
    CHECK(f.get<std::string>("general.architecture") == "llama");

    // Moving keeps the mapping and the tensor pointers valid.
    const uint8_t* p = f.tensors()[0].data;
    GgufFile g = std::move(f);
    CHECK(g.tensors()[0].data == p);
    CHECK(std::memcmp(g.tensors()[0].data, specs[0].data.data(), specs[0].data.size()) == 0);
    auto h = GgufFile::from_bytes(image);
    const uint8_t* q = h.tensors()[1].data;
    g = std::move(h);
    CHECK(g.tensors()[1].data == q);
    CHECK(std::memcmp(g.tensors()[1].data, specs[1].data.data(), specs[1].data.size()) == 0);
}

TEST_CASE("gguf: open() errors name the path") {
    auto missing = (std::filesystem::temp_directory_path() / "coinfer-no-such-file.gguf").string();
    try {
        GgufFile::open(missing);
        FAIL("opened a missing file");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find(missing) != std::string::npos);
    }
    auto dir = std::filesystem::temp_directory_path().string();
    CHECK_THROWS_AS(GgufFile::open(dir), Error);

    TempFile empty("coinfer-test-empty");
    { std::FILE* fp = std::fopen(empty.path.c_str(), "wb"); REQUIRE(fp); std::fclose(fp); }
    try {
        GgufFile::open(empty.path);
        FAIL("opened an empty file");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find(empty.path) != std::string::npos);
        CHECK(std::string(e.what()).find("offset") != std::string::npos);
    }
}

// ---------------------------------------------------------------------------------------------
// Typed accessors

TEST_CASE("gguf: typed accessors") {
    GgufWriter w;
    w.set("u8", uint8_t{200});
    w.set("i8", int8_t{-5});
    w.set("u16", uint16_t{60000});
    w.set("i16", int16_t{-30000});
    w.set("u32", uint32_t{4000000000u});
    w.set("i32", int32_t{-2000000000});
    w.set("u64", uint64_t{1} << 62);
    w.set("u64.big", std::numeric_limits<uint64_t>::max());
    w.set("i64", std::numeric_limits<int64_t>::min());
    w.set("f32", 0.25f);
    w.set("f64", 0.125);
    w.set("flag", true);
    w.set("name", std::string("tiny"));
    w.set("ints", arr<int32_t>({1, 2, 3}));
    auto f = GgufFile::from_bytes(w.to_bytes(), "acc.gguf");

    // get_int accepts every integer type.
    CHECK(f.get_int("u8") == 200);
    CHECK(f.get_int("i8") == -5);
    CHECK(f.get_int("u16") == 60000);
    CHECK(f.get_int("i16") == -30000);
    CHECK(f.get_int("u32") == 4000000000LL);
    CHECK(f.get_int("i32") == -2000000000LL);
    CHECK(f.get_int("u64") == (int64_t{1} << 62));
    CHECK(f.get_int("i64") == std::numeric_limits<int64_t>::min());
    CHECK(f.get_int_opt("nope") == std::nullopt);
    CHECK(f.get_int_opt("u8") == 200);

    CHECK(f.get_float_opt("f32") == 0.25);
    CHECK(f.get_float_opt("f64") == 0.125);
    CHECK(f.get_float_opt("nope") == std::nullopt);

    CHECK(f.get_opt<std::string>("name") == "tiny");
    CHECK(f.get_opt<std::string>("nope") == std::nullopt);
    CHECK(f.has("flag"));
    CHECK_FALSE(f.has("nope"));
    REQUIRE(f.find("name") != nullptr);
    CHECK(f.find("name")->type() == GGUF_TYPE_STRING);
    CHECK(f.find("nope") == nullptr);

    // Every failure is an Error naming the key (and the file).
    auto check_key_error = [&](auto&& fn, const std::string& key) {
        try {
            fn();
            FAIL_CHECK("no error for key " << key);
        } catch (const Error& e) {
            std::string msg = e.what();
            INFO("message: " << msg);
            CHECK(msg.find(key) != std::string::npos);
            CHECK(msg.find("acc.gguf") != std::string::npos);
        }
    };
    check_key_error([&] { (void)f.get<uint32_t>("i32"); }, "i32");
    check_key_error([&] { (void)f.get<int64_t>("u64"); }, "u64");
    check_key_error([&] { (void)f.get<float>("f64"); }, "f64");
    check_key_error([&] { (void)f.get<std::string>("flag"); }, "flag");
    check_key_error([&] { (void)f.get<bool>("missing.key"); }, "missing.key");
    check_key_error([&] { (void)f.get_opt<uint8_t>("name"); }, "name");
    check_key_error([&] { (void)f.get_int("missing.int"); }, "missing.int");
    check_key_error([&] { (void)f.get_int("f32"); }, "f32");
    check_key_error([&] { (void)f.get_int("flag"); }, "flag");
    check_key_error([&] { (void)f.get_int("name"); }, "name");
    check_key_error([&] { (void)f.get_int("u64.big"); }, "u64.big");
    check_key_error([&] { (void)f.get_int_opt("ints"); }, "ints");
    check_key_error([&] { (void)f.get_float_opt("u32"); }, "u32");
    check_key_error([&] { (void)f.get_array<uint32_t>("ints"); }, "ints");
    check_key_error([&] { (void)f.get_array<int32_t>("name"); }, "name");
    check_key_error([&] { (void)f.get_array<int32_t>("missing.arr"); }, "missing.arr");
    check_key_error([&] { (void)f.tensor("missing.tensor"); }, "missing.tensor");
    CHECK(f.get_array<int32_t>("ints") == std::vector<int32_t>{1, 2, 3});
}

// ---------------------------------------------------------------------------------------------
// Hostile files, built byte by byte

namespace {

// One valid key/value and one F32 tensor [8] at offset 0, padded, with data.
Bytes valid_file() {
    Bytes b;
    b.header(1, 1).key("general.architecture", GGUF_TYPE_STRING).str("llama");
    b.tensor("w", {8}, GGML_TYPE_F32, 0).pad_to(32).zeros(32);
    return b;
}

}  // namespace

TEST_CASE("gguf hostile: the baseline file parses") {
    auto f = GgufFile::from_bytes(valid_file().b, "hostile.gguf");
    CHECK(f.tensors().size() == 1);
    CHECK(f.tensor("w").n_bytes == 32);
}

TEST_CASE("gguf hostile: header") {
    SUBCASE("empty") { check_refused(Bytes{}, {"magic"}); }
    SUBCASE("3 bytes") { check_refused(Bytes{}.u8('G').u8('G').u8('U'), {"magic"}); }
    SUBCASE("bad magic") {
        Bytes b = valid_file();
        b.b[3] = 'X';
        check_refused(b, {"magic", "offset 0"});
    }
    SUBCASE("version 1") { check_refused(Bytes{}.header(0, 0, 1), {"version", "offset 4"}); }
    SUBCASE("version 4") { check_refused(Bytes{}.header(0, 0, 4), {"version", "offset 4"}); }
    SUBCASE("version 0") { check_refused(Bytes{}.header(0, 0, 0), {"version"}); }
    SUBCASE("byte-swapped version 3") {
        check_refused(Bytes{}.header(0, 0, 0x03000000), {"version", "byte-swapped"});
    }
    SUBCASE("big-endian file") {
        // A big-endian file also has its counts swapped; the version alone gives it away.
        Bytes b;
        b.u32(0x46554747).u32(0x03000000).u64(0x0100000000000000ull).u64(0);
        check_refused(b, {"version"});
    }
    SUBCASE("version 2 is accepted") {
        Bytes b = valid_file();
        b.b[4] = 2;
        CHECK(GgufFile::from_bytes(b.b).version() == 2);
    }
    SUBCASE("truncated counts") { check_refused(Bytes{}.u32(0x46554747).u32(3).u64(0), {"metadata count"}); }
    SUBCASE("huge n_tensors") {
        check_refused(Bytes{}.header(std::numeric_limits<uint64_t>::max(), 0), {"tensor count", "offset 8"});
        check_refused(Bytes{}.header(uint64_t{1} << 40, 0).zeros(64), {"tensor count"});
        check_refused(Bytes{}.header(2, 0).zeros(40), {"tensor count"});  // 2 infos need 48 bytes
    }
    SUBCASE("huge n_kv") {
        check_refused(Bytes{}.header(0, std::numeric_limits<uint64_t>::max()), {"metadata count", "offset 16"});
        check_refused(Bytes{}.header(0, uint64_t{1} << 61).zeros(100), {"metadata count"});
    }
    SUBCASE("n_kv larger than what follows") {
        Bytes b;
        b.header(0, 2).key("a", GGUF_TYPE_UINT8).u8(1).zeros(12);
        check_refused(b, {});
    }
}

TEST_CASE("gguf hostile: metadata") {
    SUBCASE("huge key length") {
        Bytes b;
        b.header(0, 1).u64(std::numeric_limits<uint64_t>::max()).zeros(16);
        check_refused(b, {"metadata key #0", "offset 24"});
    }
    SUBCASE("key length just past the end") {
        Bytes b;
        b.header(0, 1).u64(12).raw("abcdefghijk", 11).u8(0);  // 12 bytes left after the length
        b.b.pop_back();
        check_refused(b, {"metadata key #0"});
    }
    SUBCASE("huge string value length") {
        Bytes b;
        b.header(0, 1).key("general.name", GGUF_TYPE_STRING).u64(uint64_t{1} << 63).zeros(8);
        check_refused(b, {"general.name", "offset 48"});
    }
    SUBCASE("unknown value type") {
        for (uint32_t t : {13u, 255u, 0xFFFFFFFFu}) {
            Bytes b;
            b.header(0, 1).key("k", t).zeros(16);
            check_refused(b, {"'k'", "unknown value type", "offset 33"});
        }
    }
    SUBCASE("unknown array element type") {
        Bytes b;
        b.header(0, 1).key("k", GGUF_TYPE_ARRAY).u32(13).u64(0).zeros(8);
        check_refused(b, {"'k'", "unknown array element type", "offset 37"});
    }
    SUBCASE("huge array counts") {
        for (uint32_t t = 0; t < GGUF_TYPE_COUNT; ++t) {
            INFO("element type " << gguf_type_name(t));
            for (uint64_t n : {std::numeric_limits<uint64_t>::max(), uint64_t{1} << 62, uint64_t{1} << 32,
                               uint64_t{1000}}) {
                Bytes b;
                b.header(0, 1).key("tokenizer.ggml.tokens", GGUF_TYPE_ARRAY).u32(t).u64(n).zeros(64);
                check_refused(b, {"tokenizer.ggml.tokens"});
            }
        }
    }
    SUBCASE("array count just one too many") {
        Bytes b;
        b.header(0, 1).key("k", GGUF_TYPE_ARRAY).u32(GGUF_TYPE_UINT32).u64(5).zeros(16);
        check_refused(b, {"'k'"});
        Bytes s;  // strings: lengths say 0, but the last one is cut off
        s.header(0, 1).key("k", GGUF_TYPE_ARRAY).u32(GGUF_TYPE_STRING).u64(3).u64(0).u64(0).u32(0);
        check_refused(s, {"'k'"});
    }
    SUBCASE("string element longer than the file") {
        Bytes b;
        b.header(0, 1).key("k", GGUF_TYPE_ARRAY).u32(GGUF_TYPE_STRING).u64(2).str("ok");
        b.u64(std::numeric_limits<uint64_t>::max() - 3).zeros(8);
        check_refused(b, {"'k'"});
    }
    SUBCASE("duplicate keys") {
        Bytes b;
        b.header(0, 2).key("general.name", GGUF_TYPE_UINT8).u8(1).key("general.name", GGUF_TYPE_UINT8).u8(2);
        check_refused(b, {"general.name", "duplicate", "offset 49"});
    }
    SUBCASE("bool byte 2") {
        Bytes b;
        b.header(0, 1).key("flag", GGUF_TYPE_BOOL).u8(2);
        check_refused(b, {"flag", "bool", "offset 40"});
        Bytes a;
        a.header(0, 1).key("flags", GGUF_TYPE_ARRAY).u32(GGUF_TYPE_BOOL).u64(3).u8(1).u8(0).u8(0xFF);
        check_refused(a, {"flags", "bool", "offset 55"});
    }
    SUBCASE("general.alignment") {
        auto with_alignment = [](uint32_t type, auto value) {
            Bytes b;
            b.header(1, 1).key("general.alignment", type);
            b.raw(&value, sizeof(value));
            b.tensor("w", {8}, GGML_TYPE_F32, 0).pad_to(64).zeros(64);
            return b;
        };
        check_refused(with_alignment(GGUF_TYPE_UINT32, uint32_t{0}), {"general.alignment"}, false);
        check_refused(with_alignment(GGUF_TYPE_UINT32, uint32_t{48}), {"general.alignment"}, false);
        check_refused(with_alignment(GGUF_TYPE_UINT64, uint64_t{32}), {"general.alignment"}, false);
        check_refused(with_alignment(GGUF_TYPE_INT32, int32_t{32}), {"general.alignment"}, false);
        // Alignment 2^31: the data section would start past the end.
        check_refused(with_alignment(GGUF_TYPE_UINT32, uint32_t{0x80000000u}), {"data section"});
        CHECK(GgufFile::from_bytes(with_alignment(GGUF_TYPE_UINT32, uint32_t{64}).b).alignment() == 64);
    }
}

namespace {

// Builds deeply nested arrays: `depth` levels of "array of 1 array", ending in an empty u8 array.
Bytes nested_arrays(size_t depth) {
    Bytes b;
    b.header(0, 1).key("deep", GGUF_TYPE_ARRAY);
    b.b.reserve(b.b.size() + depth * 12 + 12);
    for (size_t i = 1; i < depth; ++i) b.u32(GGUF_TYPE_ARRAY).u64(1);
    b.u32(GGUF_TYPE_UINT8).u64(0);
    return b;
}

}  // namespace

TEST_CASE("gguf hostile: deeply nested arrays are refused, not a stack overflow") {
    for (size_t depth : {1, 2, 8}) {
        INFO("depth " << depth);
        auto f = GgufFile::from_bytes(nested_arrays(depth).b);
        const GgufArray* a = &f.get<GgufArray>("deep");
        for (size_t i = 1; i < depth; ++i) {
            REQUIRE(a->size() == 1);
            a = &std::get<std::vector<GgufArray>>(a->data)[0];
        }
        CHECK(a->elem_type() == GGUF_TYPE_UINT8);
    }
    for (size_t depth : {1000, 100000}) {
        INFO("depth " << depth);
        check_refused(nested_arrays(depth), {"deep", "nested"});
    }
    // Nesting through the elements of a wide array, too.
    Bytes b;
    b.header(0, 1).key("wide", GGUF_TYPE_ARRAY).u32(GGUF_TYPE_ARRAY).u64(2);
    b.u32(GGUF_TYPE_UINT8).u64(0);  // first element fine
    for (int i = 0; i < 50000; ++i) b.u32(GGUF_TYPE_ARRAY).u64(1);
    b.u32(GGUF_TYPE_UINT8).u64(0);
    check_refused(b, {"wide", "nested"});
}

TEST_CASE("gguf hostile: tensor infos") {
    auto one_tensor = [](std::vector<uint64_t> ne, uint32_t type, uint64_t offset, size_t n_data) {
        Bytes b;
        b.header(1, 0).tensor("blk.0.w", std::move(ne), type, offset).pad_to(32).zeros(n_data);
        return b;
    };
    SUBCASE("baseline") { CHECK_NOTHROW(GgufFile::from_bytes(one_tensor({8}, GGML_TYPE_F32, 0, 32).b)); }
    SUBCASE("huge name length") {
        Bytes b;
        b.header(1, 0).u64(std::numeric_limits<uint64_t>::max()).zeros(40);
        check_refused(b, {"tensor #0 name", "offset 24"});
    }
    SUBCASE("n_dims 5") {
        check_refused(one_tensor({1, 1, 1, 1, 1}, GGML_TYPE_F32, 0, 32), {"blk.0.w", "n_dims", "offset 39"});
    }
    SUBCASE("n_dims huge") {
        Bytes b;
        b.header(1, 0).str("w").u32(0xFFFFFFFFu).zeros(64);
        check_refused(b, {"n_dims"});
    }
    SUBCASE("dims product overflows 64 bits") {
        check_refused(one_tensor({uint64_t{1} << 32, uint64_t{1} << 32}, GGML_TYPE_F32, 0, 32),
                      {"blk.0.w", "overflow", "offset 51"});
        check_refused(one_tensor({3, uint64_t{1} << 62, 1, 1}, GGML_TYPE_F32, 0, 32), {"overflow"});
        check_refused(one_tensor({uint64_t{1} << 63}, GGML_TYPE_I8, 0, 32), {"overflow", "offset 43"});
        check_refused(one_tensor({std::numeric_limits<uint64_t>::max()}, GGML_TYPE_I8, 0, 32), {"overflow"});
    }
    SUBCASE("byte size overflows 64 bits") {
        check_refused(one_tensor({uint64_t{1} << 62, 1}, GGML_TYPE_F32, 0, 32), {"blk.0.w"});
        check_refused(one_tensor({uint64_t{1} << 62}, GGML_TYPE_F64, 0, 32), {"blk.0.w"});
    }
    SUBCASE("unknown tensor type") {
        for (uint32_t t : {4u, 5u, 31u, 40u, 1000u, 0xFFFFFFFFu})
            check_refused(one_tensor({32}, t, 0, 32), {"blk.0.w", "type", "offset 51"});
    }
    SUBCASE("row length not a multiple of the block size") {
        check_refused(one_tensor({33, 2}, GGML_TYPE_Q4_0, 0, 64), {"blk.0.w", "block size", "offset 59"});
        check_refused(one_tensor({128}, GGML_TYPE_Q4_K, 0, 256), {"blk.0.w", "block size"});
        // The element count is a multiple of 32, the row is not.
        check_refused(one_tensor({16, 2}, GGML_TYPE_Q8_0, 0, 64), {"blk.0.w", "block size"});
    }
    SUBCASE("tensor data past the end") {
        check_refused(one_tensor({8}, GGML_TYPE_F32, 0, 31), {"blk.0.w", "past the end", "offset 55"});
        check_refused(one_tensor({8}, GGML_TYPE_F32, 32, 32), {"blk.0.w", "past the end"});
        check_refused(one_tensor({8}, GGML_TYPE_F32, uint64_t{1} << 63, 32), {"blk.0.w", "past the end"});
        check_refused(one_tensor({8}, GGML_TYPE_F32, std::numeric_limits<uint64_t>::max() - 31, 64),
                      {"blk.0.w"});
        check_refused(one_tensor({uint64_t{1} << 40, 1 << 20}, GGML_TYPE_I8, 0, 32), {"blk.0.w", "past the end"});
        CHECK_NOTHROW(GgufFile::from_bytes(one_tensor({8}, GGML_TYPE_F32, 32, 64).b));
    }
    SUBCASE("no room for the data section") {
        Bytes b;
        b.header(1, 0).tensor("w", {0}, GGML_TYPE_F32, 0);  // ends unaligned at 57 bytes
        check_refused(b, {"data section"});
    }
    SUBCASE("unaligned tensor offset") {
        check_refused(one_tensor({1}, GGML_TYPE_F32, 4, 64), {"blk.0.w", "alignment", "offset 55"});
        Bytes b;
        b.header(1, 1).key("general.alignment", GGUF_TYPE_UINT32).u32(64);
        b.tensor("w", {8}, GGML_TYPE_F32, 32).pad_to(64).zeros(128);
        check_refused(b, {"'w'", "alignment"});
    }
    SUBCASE("overlapping tensors") {
        Bytes b;
        b.header(2, 0).tensor("a", {16}, GGML_TYPE_F32, 0).tensor("b", {8}, GGML_TYPE_F32, 32);
        b.pad_to(32).zeros(128);
        check_refused(b, {"overlaps", "'a'", "'b'"});
        Bytes same;  // same offset, listed in reverse
        same.header(2, 0).tensor("b", {8}, GGML_TYPE_F32, 64).tensor("a", {8}, GGML_TYPE_F32, 64);
        same.pad_to(32).zeros(128);
        check_refused(same, {"overlaps"});
    }
    SUBCASE("adjacent tensors in any order are fine") {
        Bytes b;
        b.header(3, 0).tensor("c", {8}, GGML_TYPE_F32, 64).tensor("a", {8}, GGML_TYPE_F32, 0);
        b.tensor("b", {8}, GGML_TYPE_F32, 32).pad_to(32).zeros(96);
        auto f = GgufFile::from_bytes(b.b);
        CHECK(f.tensor("c").offset == 64);
        CHECK(f.tensors()[0].name == "c");
    }
    SUBCASE("duplicate tensor names") {
        Bytes b;
        b.header(2, 0).tensor("w", {8}, GGML_TYPE_F32, 0).tensor("w", {8}, GGML_TYPE_F32, 32);
        b.pad_to(32).zeros(64);
        check_refused(b, {"'w'", "duplicate", "offset 57"});
    }
    SUBCASE("n_dims 0 is a scalar") {
        Bytes b;
        b.header(1, 0).tensor("s", {}, GGML_TYPE_F32, 0).pad_to(32).zeros(32);
        auto f = GgufFile::from_bytes(b.b);
        CHECK(f.tensor("s").n_elements == 1);
        CHECK(f.tensor("s").n_bytes == 4);
    }
}

// ---------------------------------------------------------------------------------------------
// The real model

TEST_CASE("gguf: stories260K.gguf") {
    auto path = coinfer::test::model_file("stories260K.gguf");
    if (!path) return;
    auto f = GgufFile::open(*path);
    CHECK(f.version() == 3);
    CHECK(f.tensors().size() == 48);
    CHECK(f.metadata().size() == 19);
    CHECK(f.data_offset() == 14176);
    CHECK(f.alignment() == 32);
    CHECK(f.file_size() == 1185376);
    CHECK(f.get<std::string>("general.architecture") == "llama");
    CHECK(f.get_array<std::string>("tokenizer.ggml.tokens").size() == 512);
    const auto& t = f.tensor("token_embd.weight");
    CHECK(t.type == GGML_TYPE_F32);
    CHECK(t.n_dims == 2);
    CHECK(t.ne == std::array<int64_t, 4>{64, 512, 1, 1});
    CHECK(t.n_bytes == 64 * 512 * 4);
    uint64_t total = 0;
    for (const auto& x : f.tensors()) {
        CHECK(x.type == GGML_TYPE_F32);
        CHECK(f.data_offset() + x.offset + x.n_bytes <= f.file_size());
        total += x.n_elements;
    }
    CHECK(total > 250000);
    CHECK(total < 300000);
    float v;
    std::memcpy(&v, t.data, 4);
    CHECK(std::isfinite(v));

    // The same bytes through from_bytes give the same structure.
    std::vector<uint8_t> image(f.file_size());
    std::FILE* fp = std::fopen(path->c_str(), "rb");
    REQUIRE(fp);
    REQUIRE(std::fread(image.data(), 1, image.size(), fp) == image.size());
    std::fclose(fp);
    auto g = GgufFile::from_bytes(std::move(image), "copy");
    CHECK(g.tensors().size() == 48);
    CHECK(std::memcmp(g.tensor("output.weight").data, f.tensor("output.weight").data,
                      f.tensor("output.weight").n_bytes) == 0);
}
