#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <utility>

namespace coinfer {

namespace {

constexpr uint32_t k_magic = 0x46554747;  // "GGUF" little-endian
constexpr int k_max_array_depth = 16;      // nested arrays deeper than this are refused
constexpr uint32_t k_max_dims = 4;
// Counts are bounded by the bytes left, but an element can take several times its encoded size
// in memory: reserve at most this many up front and let larger containers grow as they fill.
constexpr uint64_t k_max_reserve = 1 << 16;

// Smallest encoding of one element of each type, used to bound counts by the bytes left.
uint64_t min_encoded_size(uint32_t type) {
    switch (type) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
        case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
        case GGUF_TYPE_STRING: return 8;        // length only
        case GGUF_TYPE_ARRAY: return 4 + 8;     // element type + count
        default: return 0;
    }
}

// Bounds-checked little-endian reader over the file image.
class Cursor {
public:
    Cursor(const std::string& file, const uint8_t* base, uint64_t size)
        : file_(file), base_(base), size_(size) {}

    uint64_t pos() const { return pos_; }
    uint64_t left() const { return size_ - pos_; }

    [[noreturn]] void fail(std::string_view field, uint64_t at, std::string_view what) const {
        throw_error("{}: {} at offset {}: {}", file_, field, at, what);
    }

    void need(uint64_t n, std::string_view field) const {
        if (n > left())
            fail(field, pos_, fmt::format("needs {} bytes but only {} remain in the file", n, left()));
    }

    template <typename T>
    T read(std::string_view field) {
        need(sizeof(T), field);
        T v;
        std::memcpy(&v, base_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }

    std::string read_string(std::string_view field) {
        uint64_t at = pos_;
        auto n = read<uint64_t>(field);
        if (n > left())
            fail(field, at, fmt::format("string length {} exceeds the {} bytes left", n, left()));
        std::string s(reinterpret_cast<const char*>(base_ + pos_), n);
        pos_ += n;
        return s;
    }

private:
    const std::string& file_;
    const uint8_t* base_;
    uint64_t size_;
    uint64_t pos_ = 0;
};

template <typename T>
std::vector<T> read_scalars(Cursor& c, uint64_t n, std::string_view field) {
    c.need(n * sizeof(T), field);  // n was already bounded by the bytes left
    std::vector<T> v(n);
    for (auto& x : v) x = c.read<T>(field);
    return v;
}

GgufArray read_array(Cursor& c, const std::string& field, int depth);

GgufValue read_value(Cursor& c, uint32_t type, const std::string& field, int depth) {
    switch (type) {
        case GGUF_TYPE_UINT8: return {c.read<uint8_t>(field)};
        case GGUF_TYPE_INT8: return {c.read<int8_t>(field)};
        case GGUF_TYPE_UINT16: return {c.read<uint16_t>(field)};
        case GGUF_TYPE_INT16: return {c.read<int16_t>(field)};
        case GGUF_TYPE_UINT32: return {c.read<uint32_t>(field)};
        case GGUF_TYPE_INT32: return {c.read<int32_t>(field)};
        case GGUF_TYPE_FLOAT32: return {c.read<float>(field)};
        case GGUF_TYPE_BOOL: {
            uint64_t at = c.pos();
            auto b = c.read<uint8_t>(field);
            if (b > 1) c.fail(field, at, fmt::format("bool value {} is not 0 or 1", b));
            return {b != 0};
        }
        case GGUF_TYPE_STRING: return {c.read_string(field)};
        case GGUF_TYPE_ARRAY: return {read_array(c, field, depth + 1)};
        case GGUF_TYPE_UINT64: return {c.read<uint64_t>(field)};
        case GGUF_TYPE_INT64: return {c.read<int64_t>(field)};
        case GGUF_TYPE_FLOAT64: return {c.read<double>(field)};
        default: c.fail(field, c.pos(), fmt::format("unknown value type {}", type));
    }
}

GgufArray read_array(Cursor& c, const std::string& field, int depth) {
    uint64_t at = c.pos();
    if (depth > k_max_array_depth)
        c.fail(field, at, fmt::format("arrays nested deeper than {}", k_max_array_depth));
    auto elem = c.read<uint32_t>(field + " (array type)");
    if (elem >= GGUF_TYPE_COUNT)
        c.fail(field, at, fmt::format("unknown array element type {}", elem));
    uint64_t at_n = c.pos();
    auto n = c.read<uint64_t>(field + " (array count)");
    uint64_t min = min_encoded_size(elem);
    if (n > c.left() / min)
        c.fail(field, at_n,
               fmt::format("array of {} {} cannot fit in the {} bytes left", n,
                           gguf_type_name(elem), c.left()));
    GgufArray a;
    switch (elem) {
        case GGUF_TYPE_UINT8: a.data = read_scalars<uint8_t>(c, n, field); break;
        case GGUF_TYPE_INT8: a.data = read_scalars<int8_t>(c, n, field); break;
        case GGUF_TYPE_UINT16: a.data = read_scalars<uint16_t>(c, n, field); break;
        case GGUF_TYPE_INT16: a.data = read_scalars<int16_t>(c, n, field); break;
        case GGUF_TYPE_UINT32: a.data = read_scalars<uint32_t>(c, n, field); break;
        case GGUF_TYPE_INT32: a.data = read_scalars<int32_t>(c, n, field); break;
        case GGUF_TYPE_FLOAT32: a.data = read_scalars<float>(c, n, field); break;
        case GGUF_TYPE_UINT64: a.data = read_scalars<uint64_t>(c, n, field); break;
        case GGUF_TYPE_INT64: a.data = read_scalars<int64_t>(c, n, field); break;
        case GGUF_TYPE_FLOAT64: a.data = read_scalars<double>(c, n, field); break;
        case GGUF_TYPE_BOOL: {
            std::vector<bool> v(n);
            for (uint64_t i = 0; i < n; ++i) v[i] = std::get<bool>(read_value(c, elem, field, depth).data);
            a.data = std::move(v);
            break;
        }
        case GGUF_TYPE_STRING: {
            std::vector<std::string> v;
            v.reserve(std::min(n, k_max_reserve));
            for (uint64_t i = 0; i < n; ++i) v.push_back(c.read_string(field));
            a.data = std::move(v);
            break;
        }
        case GGUF_TYPE_ARRAY: {
            std::vector<GgufArray> v;
            v.reserve(std::min(n, k_max_reserve));
            for (uint64_t i = 0; i < n; ++i) v.push_back(read_array(c, field, depth + 1));
            a.data = std::move(v);
            break;
        }
    }
    return a;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
    return __builtin_mul_overflow(a, b, out);
}

}  // namespace

std::string_view gguf_type_name(uint32_t type) {
    static constexpr std::string_view names[] = {"uint8", "int8", "uint16", "int16", "uint32",
                                                 "int32", "float32", "bool", "string", "array",
                                                 "uint64", "int64", "float64"};
    return type < GGUF_TYPE_COUNT ? names[type] : std::string_view("unknown");
}

size_t GgufArray::size() const {
    return std::visit([](const auto& v) { return v.size(); }, data);
}

// ---- GgufFile ----

GgufFile::GgufFile(GgufFile&& o) noexcept { *this = std::move(o); }

GgufFile& GgufFile::operator=(GgufFile&& o) noexcept {
    if (this == &o) return *this;
    if (map_) munmap(map_, size_);
    path_ = std::move(o.path_);
    owned_ = std::move(o.owned_);
    base_ = o.map_ ? o.base_ : owned_.data();
    size_ = o.size_;
    map_ = std::exchange(o.map_, nullptr);
    version_ = o.version_;
    alignment_ = o.alignment_;
    data_offset_ = o.data_offset_;
    kv_ = std::move(o.kv_);
    kv_index_ = std::move(o.kv_index_);
    tensors_ = std::move(o.tensors_);
    tensor_index_ = std::move(o.tensor_index_);
    o.base_ = nullptr;
    o.size_ = 0;
    return *this;
}

GgufFile::~GgufFile() {
    if (map_) munmap(map_, size_);
}

GgufFile GgufFile::open(const std::string& path) {
    GgufFile f;
    f.path_ = path;
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_error("{}: cannot open: {}", path, std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0) {
        int e = errno;
        ::close(fd);
        throw_error("{}: cannot stat: {}", path, std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw_error("{}: not a regular file", path);
    }
    f.size_ = static_cast<uint64_t>(st.st_size);
    if (f.size_ > 0) {
        void* m = mmap(nullptr, f.size_, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            ::close(fd);
            throw_error("{}: cannot mmap {} bytes: {}", path, f.size_, std::strerror(e));
        }
        f.map_ = m;
        f.base_ = static_cast<const uint8_t*>(m);
    }
    ::close(fd);
    f.parse();
    return f;
}

GgufFile GgufFile::from_bytes(std::vector<uint8_t> bytes, std::string name) {
    GgufFile f;
    f.path_ = std::move(name);
    f.owned_ = std::move(bytes);
    f.base_ = f.owned_.data();
    f.size_ = f.owned_.size();
    f.parse();
    return f;
}

void GgufFile::parse() {
    Cursor c(path_, base_, size_);
    auto magic = c.read<uint32_t>("magic");
    if (magic != k_magic)
        c.fail("magic", 0, fmt::format("0x{:08x} is not a GGUF file (expected \"GGUF\")", magic));
    version_ = c.read<uint32_t>("version");
    if (version_ == 1) c.fail("version", 4, "GGUF version 1 is not supported (only 2 and 3)");
    if (version_ != 2 && version_ != 3) {
        if ((version_ & 0xFFFF) == 0 && version_ != 0)
            c.fail("version", 4, fmt::format("version {} looks byte-swapped: big-endian GGUF files are not supported", version_));
        c.fail("version", 4, fmt::format("unsupported version {} (only 2 and 3)", version_));
    }
    uint64_t at = c.pos();
    auto n_tensors = c.read<uint64_t>("tensor count");
    auto at_kv = c.pos();
    auto n_kv = c.read<uint64_t>("metadata count");
    // Each tensor info takes at least 24 bytes, each key/value at least 13.
    if (n_tensors > c.left() / 24)
        c.fail("tensor count", at, fmt::format("{} tensors cannot fit in a {}-byte file", n_tensors, size_));
    if (n_kv > c.left() / 13)
        c.fail("metadata count", at_kv, fmt::format("{} key/value pairs cannot fit in a {}-byte file", n_kv, size_));

    kv_.reserve(std::min(n_kv, k_max_reserve));
    for (uint64_t i = 0; i < n_kv; ++i) {
        uint64_t at_key = c.pos();
        std::string key = c.read_string(fmt::format("metadata key #{}", i));
        std::string field = fmt::format("metadata '{}'", key);
        if (kv_index_.count(key)) c.fail(field, at_key, "duplicate key");
        uint64_t at_type = c.pos();
        auto type = c.read<uint32_t>(field + " (type)");
        if (type >= GGUF_TYPE_COUNT) c.fail(field, at_type, fmt::format("unknown value type {}", type));
        GgufValue v = read_value(c, type, field, 0);
        kv_index_.emplace(key, kv_.size());
        kv_.emplace_back(std::move(key), std::move(v));
    }

    if (const GgufValue* a = find("general.alignment")) {
        const auto* p = std::get_if<uint32_t>(&a->data);
        if (!p) fail_key("general.alignment", fmt::format("has type {}, expected uint32", gguf_type_name(a->type())));
        if (*p == 0 || (*p & (*p - 1)) != 0)
            fail_key("general.alignment", fmt::format("{} is not a power of two", *p));
        alignment_ = *p;
    }

    tensors_.reserve(std::min(n_tensors, k_max_reserve));
    std::vector<uint64_t> offset_field_at;  // where each tensor's offset field sits, for errors
    offset_field_at.reserve(std::min(n_tensors, k_max_reserve));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        GgufTensorInfo t;
        uint64_t at_t = c.pos();
        t.name = c.read_string(fmt::format("tensor #{} name", i));
        std::string field = fmt::format("tensor '{}'", t.name);
        if (tensor_index_.count(t.name)) c.fail(field, at_t, "duplicate tensor name");
        uint64_t at_d = c.pos();
        t.n_dims = c.read<uint32_t>(field + " n_dims");
        if (t.n_dims > k_max_dims)
            c.fail(field, at_d, fmt::format("n_dims {} exceeds the maximum of {}", t.n_dims, k_max_dims));
        uint64_t n_el = 1;
        for (uint32_t d = 0; d < t.n_dims; ++d) {
            uint64_t at_ne = c.pos();
            auto ne = c.read<uint64_t>(field + " dims");
            if (ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
                mul_overflows(n_el, ne, &n_el) ||
                n_el > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                c.fail(field, at_ne, "element count overflows 64 bits");
            t.ne[d] = static_cast<int64_t>(ne);
        }
        t.n_elements = n_el;
        uint64_t at_ty = c.pos();
        auto type = c.read<uint32_t>(field + " type");
        auto info = ggml_type_info(type);
        if (!info) c.fail(field, at_ty, fmt::format("unknown tensor type id {}", type));
        t.type = static_cast<GgmlType>(type);
        if (t.ne[0] % info->block_size != 0)
            c.fail(field, at_ty, fmt::format("row length {} is not a multiple of the {} block size {}",
                                             t.ne[0], info->name, info->block_size));
        uint64_t blocks = n_el / info->block_size;
        if (mul_overflows(blocks, info->type_size, &t.n_bytes))
            c.fail(field, at_ty, "byte size overflows 64 bits");
        uint64_t at_off = c.pos();
        t.offset = c.read<uint64_t>(field + " offset");
        if (t.offset % alignment_ != 0)
            c.fail(field, at_off, fmt::format("data offset {} is not a multiple of the alignment {}",
                                              t.offset, alignment_));
        tensor_index_.emplace(t.name, tensors_.size());
        tensors_.push_back(std::move(t));
        offset_field_at.push_back(at_off);
    }

    uint64_t end_of_infos = c.pos();
    data_offset_ = (end_of_infos + alignment_ - 1) / alignment_ * alignment_;
    if (n_tensors > 0 && data_offset_ > size_)
        c.fail("data section", end_of_infos,
               fmt::format("aligned start {} is past the end of the {}-byte file", data_offset_, size_));
    uint64_t data_size = data_offset_ <= size_ ? size_ - data_offset_ : 0;

    // Every tensor lies inside the data section, and no two overlap.
    std::vector<size_t> order(tensors_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    for (size_t i = 0; i < tensors_.size(); ++i) {
        auto& t = tensors_[i];
        uint64_t at_off = offset_field_at[i];
        if (t.offset > data_size || t.n_bytes > data_size - t.offset)
            c.fail(fmt::format("tensor '{}'", t.name), at_off,
                   fmt::format("data [{}, +{}) runs past the end of the file (data section holds {} bytes)",
                               t.offset, t.n_bytes, data_size));
        t.data = base_ + data_offset_ + t.offset;
    }
    // Ties: empty tensors first, so one sharing an offset with the next tensor is no overlap.
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        return std::pair(tensors_[a].offset, tensors_[a].n_bytes) <
               std::pair(tensors_[b].offset, tensors_[b].n_bytes);
    });
    for (size_t k = 1; k < order.size(); ++k) {
        const auto& prev = tensors_[order[k - 1]];
        const auto& cur = tensors_[order[k]];
        if (prev.offset + prev.n_bytes > cur.offset)
            throw_error("{}: tensor '{}' at data offset {}: overlaps tensor '{}'", path_, cur.name,
                        data_offset_ + cur.offset, prev.name);
    }
}

void GgufFile::fail_key(std::string_view key, std::string_view what) const {
    throw_error("{}: metadata key '{}' {}", path_, key, what);
}

const GgufValue* GgufFile::find(std::string_view key) const {
    auto it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

int64_t GgufFile::get_int(std::string_view key) const {
    auto v = get_int_opt(key);
    if (!v) fail_key(key, "missing");
    return *v;
}

std::optional<int64_t> GgufFile::get_int_opt(std::string_view key) const {
    const GgufValue* v = find(key);
    if (!v) return std::nullopt;
    return std::visit(
        [&](const auto& x) -> int64_t {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, uint64_t>) {
                if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                    fail_key(key, fmt::format("value {} is out of range", x));
                return static_cast<int64_t>(x);
            } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
                return static_cast<int64_t>(x);
            } else {
                fail_key(key, fmt::format("has type {}, expected an integer", gguf_type_name(v->type())));
            }
        },
        v->data);
}

std::optional<double> GgufFile::get_float_opt(std::string_view key) const {
    const GgufValue* v = find(key);
    if (!v) return std::nullopt;
    if (const auto* f = std::get_if<float>(&v->data)) return *f;
    if (const auto* d = std::get_if<double>(&v->data)) return *d;
    fail_key(key, fmt::format("has type {}, expected float32", gguf_type_name(v->type())));
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensorInfo& GgufFile::tensor(std::string_view name) const {
    if (const auto* t = find_tensor(name)) return *t;
    throw_error("{}: tensor '{}' is missing", path_, name);
}

// ---- GgufWriter ----

namespace {

class Out {
public:
    std::vector<uint8_t> bytes;
    template <typename T>
    void put(T v) {
        const auto* p = reinterpret_cast<const uint8_t*>(&v);
        bytes.insert(bytes.end(), p, p + sizeof(T));
    }
    void put_string(const std::string& s) {
        put<uint64_t>(s.size());
        bytes.insert(bytes.end(), s.begin(), s.end());
    }
    void pad_to(uint64_t align) {
        while (bytes.size() % align) bytes.push_back(0);
    }
};

void write_array(Out& o, const GgufArray& a);

void write_value(Out& o, const GgufValue& v) {
    std::visit(
        [&](const auto& x) {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, std::string>) o.put_string(x);
            else if constexpr (std::is_same_v<T, GgufArray>) write_array(o, x);
            else if constexpr (std::is_same_v<T, bool>) o.put<uint8_t>(x ? 1 : 0);
            else o.put<T>(x);
        },
        v.data);
}

void write_array(Out& o, const GgufArray& a) {
    o.put<uint32_t>(a.elem_type());
    o.put<uint64_t>(a.size());
    std::visit(
        [&](const auto& vec) {
            using T = typename std::decay_t<decltype(vec)>::value_type;
            for (const auto& x : vec) {
                if constexpr (std::is_same_v<T, std::string>) o.put_string(x);
                else if constexpr (std::is_same_v<T, GgufArray>) write_array(o, x);
                else if constexpr (std::is_same_v<T, bool>) o.put<uint8_t>(x ? 1 : 0);
                else o.put<T>(x);
            }
        },
        a.data);
}

}  // namespace

void GgufWriter::set(std::string key, GgufValue value) {
    for (auto& [k, v] : kv_)
        if (k == key) {
            v = std::move(value);
            return;
        }
    kv_.emplace_back(std::move(key), std::move(value));
}

void GgufWriter::add_tensor(std::string name, GgmlType type, std::vector<int64_t> ne,
                            std::vector<uint8_t> data) {
    if (ne.empty() || ne.size() > k_max_dims)
        throw_error("tensor '{}': {} dims (1 to {} allowed)", name, ne.size(), k_max_dims);
    // Rows counted apart from ne[0], which may be 0; checked so no product overflows.
    uint64_t rows = 1;
    for (size_t i = 0; i < ne.size(); ++i) {
        if (ne[i] < 0) throw_error("tensor '{}': dimension {} is negative ({})", name, i, ne[i]);
        if (i > 0 && mul_overflows(rows, static_cast<uint64_t>(ne[i]), &rows))
            throw_error("tensor '{}': element count overflows 64 bits", name);
    }
    auto row = ggml_row_bytes(type, ne[0]);
    if (!row) throw_error("tensor '{}': row length {} does not fit type {}", name, ne[0], ggml_type_name(type));
    uint64_t want = 0, n_el = 0;
    if (mul_overflows(*row, rows, &want) || mul_overflows(rows, static_cast<uint64_t>(ne[0]), &n_el) ||
        n_el > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw_error("tensor '{}': size overflows 64 bits", name);
    if (data.size() != want)
        throw_error("tensor '{}': {} bytes given, {} expected", name, data.size(), want);
    for (const auto& t : tensors_)
        if (t.name == name) throw_error("tensor '{}' added twice", name);
    tensors_.push_back({std::move(name), type, std::move(ne), std::move(data)});
}

uint64_t GgufWriter::alignment() const {
    for (const auto& [k, v] : kv_)
        if (k == "general.alignment")
            if (const auto* p = std::get_if<uint32_t>(&v.data)) return *p;
    return 32;
}

std::vector<uint8_t> GgufWriter::to_bytes() const {
    const uint64_t align = alignment();
    if (align == 0 || (align & (align - 1)) != 0)
        throw_error("general.alignment {} is not a power of two", align);
    Out o;
    o.put<uint32_t>(k_magic);
    o.put<uint32_t>(3);
    o.put<uint64_t>(tensors_.size());
    o.put<uint64_t>(kv_.size());
    for (const auto& [k, v] : kv_) {
        o.put_string(k);
        o.put<uint32_t>(v.type());
        write_value(o, v);
    }
    uint64_t offset = 0;
    for (const auto& t : tensors_) {
        o.put_string(t.name);
        o.put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
        for (auto d : t.ne) o.put<uint64_t>(static_cast<uint64_t>(d));
        o.put<uint32_t>(t.type);
        o.put<uint64_t>(offset);
        offset += (t.data.size() + align - 1) / align * align;
    }
    o.pad_to(align);
    for (const auto& t : tensors_) {
        o.bytes.insert(o.bytes.end(), t.data.begin(), t.data.end());
        o.pad_to(align);
    }
    return std::move(o.bytes);
}

void GgufWriter::write(const std::string& path) const {
    auto bytes = to_bytes();
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) throw_error("{}: cannot open for writing", path);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw_error("{}: write failed", path);
}

}  // namespace coinfer
