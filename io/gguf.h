#pragma once
// GGUF (versions 2 and 3) reader over mmap, and a version-3 writer.
//
// Everything read from a file is validated before use. Any violation throws coinfer::Error with
// the file name, the field and the byte offset. Nothing is allocated from an unchecked count.
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "error.h"
#include "ggml_types.h"

namespace coinfer {

enum GgufType : uint32_t {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT = 13,
};

std::string_view gguf_type_name(uint32_t type);

struct GgufArray;

// One variant alternative per element type, in GgufType order except ARRAY (nested arrays).
using GgufArrayData =
    std::variant<std::vector<uint8_t>, std::vector<int8_t>, std::vector<uint16_t>,
                 std::vector<int16_t>, std::vector<uint32_t>, std::vector<int32_t>,
                 std::vector<float>, std::vector<bool>, std::vector<std::string>,
                 std::vector<GgufArray>, std::vector<uint64_t>, std::vector<int64_t>,
                 std::vector<double>>;

struct GgufArray {
    GgufArrayData data;

    GgufType elem_type() const { return static_cast<GgufType>(data.index()); }
    size_t size() const;
    bool operator==(const GgufArray&) const = default;
};

// Variant index equals the GgufType id.
using GgufValueData = std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float,
                                   bool, std::string, GgufArray, uint64_t, int64_t, double>;

struct GgufValue {
    GgufValueData data;

    GgufType type() const { return static_cast<GgufType>(data.index()); }
    bool operator==(const GgufValue&) const = default;
};

// Maps a C++ type to its GGUF type id (for typed accessors).
template <typename T>
constexpr GgufType gguf_type_of();

struct GgufTensorInfo {
    std::string name;
    GgmlType type = GGML_TYPE_F32;
    uint32_t n_dims = 0;
    std::array<int64_t, 4> ne{1, 1, 1, 1};  // ggml order: ne[0] is the innermost (row) dimension
    uint64_t offset = 0;                    // relative to the data section
    uint64_t n_elements = 0;
    uint64_t n_bytes = 0;
    const uint8_t* data = nullptr;  // points into the mapped file

    int64_t rows() const { return ne[1] * ne[2] * ne[3]; }
};

class GgufFile {
public:
    // Maps and parses a file. Throws coinfer::Error on any problem.
    static GgufFile open(const std::string& path);
    // Parses an in-memory image (tests, fuzzing). `name` appears in error messages.
    static GgufFile from_bytes(std::vector<uint8_t> bytes, std::string name = "<memory>");

    GgufFile(GgufFile&&) noexcept;
    GgufFile& operator=(GgufFile&&) noexcept;
    ~GgufFile();

    const std::string& path() const { return path_; }
    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; }
    uint64_t file_size() const { return size_; }

    // Metadata in file order.
    const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
    const GgufValue* find(std::string_view key) const;
    bool has(std::string_view key) const { return find(key) != nullptr; }

    // Typed accessors: a missing key or a different type is an Error naming the key.
    template <typename T>
    const T& get(std::string_view key) const;
    template <typename T>
    std::optional<T> get_opt(std::string_view key) const;
    // Any integer type, range-checked into int64.
    int64_t get_int(std::string_view key) const;
    std::optional<int64_t> get_int_opt(std::string_view key) const;
    // float32 or float64.
    std::optional<double> get_float_opt(std::string_view key) const;
    // Arrays: element type must match T exactly.
    template <typename T>
    const std::vector<T>& get_array(std::string_view key) const;

    const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
    const GgufTensorInfo* find_tensor(std::string_view name) const;
    const GgufTensorInfo& tensor(std::string_view name) const;  // Error if missing

private:
    GgufFile() = default;
    void parse();
    [[noreturn]] void fail_key(std::string_view key, std::string_view what) const;

    std::string path_;
    const uint8_t* base_ = nullptr;
    uint64_t size_ = 0;
    void* map_ = nullptr;  // mmap'd region, if any
    std::vector<uint8_t> owned_;

    uint32_t version_ = 0;
    uint64_t alignment_ = 32;
    uint64_t data_offset_ = 0;
    std::vector<std::pair<std::string, GgufValue>> kv_;
    std::map<std::string, size_t, std::less<>> kv_index_;
    std::vector<GgufTensorInfo> tensors_;
    std::map<std::string, size_t, std::less<>> tensor_index_;
};

// Writes GGUF version 3. Keys and tensors are written in insertion order.
class GgufWriter {
public:
    void set(std::string key, GgufValue value);
    template <typename T>
    void set(std::string key, T value) {
        set(std::move(key), GgufValue{GgufValueData(std::move(value))});
    }
    // ne in ggml order (innermost first); data must be exactly the tensor's byte size.
    void add_tensor(std::string name, GgmlType type, std::vector<int64_t> ne,
                    std::vector<uint8_t> data);

    std::vector<uint8_t> to_bytes() const;
    void write(const std::string& path) const;

private:
    uint64_t alignment() const;

    std::vector<std::pair<std::string, GgufValue>> kv_;
    struct Tensor {
        std::string name;
        GgmlType type;
        std::vector<int64_t> ne;
        std::vector<uint8_t> data;
    };
    std::vector<Tensor> tensors_;
};

// ---- template definitions ----

template <typename T>
constexpr GgufType gguf_type_of() {
    if constexpr (std::is_same_v<T, uint8_t>) return GGUF_TYPE_UINT8;
    else if constexpr (std::is_same_v<T, int8_t>) return GGUF_TYPE_INT8;
    else if constexpr (std::is_same_v<T, uint16_t>) return GGUF_TYPE_UINT16;
    else if constexpr (std::is_same_v<T, int16_t>) return GGUF_TYPE_INT16;
    else if constexpr (std::is_same_v<T, uint32_t>) return GGUF_TYPE_UINT32;
    else if constexpr (std::is_same_v<T, int32_t>) return GGUF_TYPE_INT32;
    else if constexpr (std::is_same_v<T, float>) return GGUF_TYPE_FLOAT32;
    else if constexpr (std::is_same_v<T, bool>) return GGUF_TYPE_BOOL;
    else if constexpr (std::is_same_v<T, std::string>) return GGUF_TYPE_STRING;
    else if constexpr (std::is_same_v<T, GgufArray>) return GGUF_TYPE_ARRAY;
    else if constexpr (std::is_same_v<T, uint64_t>) return GGUF_TYPE_UINT64;
    else if constexpr (std::is_same_v<T, int64_t>) return GGUF_TYPE_INT64;
    else if constexpr (std::is_same_v<T, double>) return GGUF_TYPE_FLOAT64;
    else static_assert(sizeof(T) == 0, "not a GGUF value type");
}

template <typename T>
const T& GgufFile::get(std::string_view key) const {
    const GgufValue* v = find(key);
    if (!v) fail_key(key, "missing");
    if (const T* p = std::get_if<T>(&v->data)) return *p;
    fail_key(key, fmt::format("has type {}, expected {}", gguf_type_name(v->type()),
                              gguf_type_name(gguf_type_of<T>())));
}

template <typename T>
std::optional<T> GgufFile::get_opt(std::string_view key) const {
    if (!find(key)) return std::nullopt;
    return get<T>(key);
}

template <typename T>
const std::vector<T>& GgufFile::get_array(std::string_view key) const {
    const auto& arr = get<GgufArray>(key);
    if (const auto* p = std::get_if<std::vector<T>>(&arr.data)) return *p;
    fail_key(key, fmt::format("is an array of {}, expected an array of {}",
                              gguf_type_name(arr.elem_type()), gguf_type_name(gguf_type_of<T>())));
}

}  // namespace coinfer
