#include "synthetic.h"

#include <cstdlib>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numbers>
#include <thread>

#include <fmt/format.h>

#include "quant.h"

namespace coinfer {

const std::vector<SyntheticShape>& synthetic_shapes() {
    // tiny: every row length a multiple of 256 so that q4_k works; small enough for CI.
    static const std::vector<SyntheticShape> shapes = {
        {"tiny", 256, 2, 4, 2, 512, 512, 512, 10000.0f},
        {"tinyllama-1.1b", 2048, 22, 32, 4, 5632, 32000, 4096, 10000.0f},
        {"llama2-7b", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0f},
        {"llama3-8b", 4096, 32, 32, 8, 14336, 32000, 4096, 500000.0f},
        {"llama3.1-8b", 4096, 32, 32, 8, 14336, 32000, 131072, 500000.0f, 8.0f},
        // The shapes tensor parallelism exists for (a 32k vocab, as every synthetic shape here).
        {"llama2-70b", 8192, 80, 64, 8, 28672, 32000, 4096, 10000.0f},
        {"llama3-70b", 8192, 80, 64, 8, 28672, 32000, 8192, 500000.0f},
    };
    return shapes;
}

const SyntheticShape& synthetic_shape(std::string_view name) {
    std::string known;
    for (const auto& s : synthetic_shapes()) {
        if (s.name == name) return s;
        known += (known.empty() ? "" : ", ") + s.name;
    }
    throw_error("unknown synthetic shape '{}' (known: {})", name, known);
}

SyntheticWeights synthetic_type(std::string_view name) {
    if (name == "f16") return {GGML_TYPE_F16};
    if (name == "bf16") return {GGML_TYPE_BF16};
    if (name == "q8_0") return {GGML_TYPE_Q8_0};
    if (name == "q4_0") return {GGML_TYPE_Q4_0};
    if (name == "q4_k") return {GGML_TYPE_Q4_K};
    if (name == "q5_k") return {GGML_TYPE_Q5_K};
    if (name == "q6_k") return {GGML_TYPE_Q6_K};
    if (name == "q4_k_m") return {GGML_TYPE_Q4_K, true};
    if (name == "q5_k_m") return {GGML_TYPE_Q5_K, true};
    throw_error("unknown synthetic weight type '{}' (known: f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, q4_k_m, q5_k_m)",
                name);
}

bool is_synthetic_path(std::string_view path) { return path.starts_with("synthetic:"); }

SyntheticSpec parse_synthetic_path(std::string_view path) {
    if (!is_synthetic_path(path)) throw_error("'{}' is not of the form synthetic:SHAPE[:TYPE][:ctx=N]", path);
    std::string_view rest = path.substr(std::string_view("synthetic:").size());
    std::vector<std::string_view> parts;
    for (size_t at = 0;;) {
        const size_t colon = rest.find(':', at);
        parts.push_back(rest.substr(at, colon == std::string_view::npos ? std::string_view::npos : colon - at));
        if (colon == std::string_view::npos) break;
        at = colon + 1;
    }
    std::string_view type = "f16";
    int64_t n_ctx = 0;
    for (size_t i = 1; i < parts.size(); ++i) {
        if (parts[i].starts_with("ctx=")) {
            const std::string v(parts[i].substr(4));
            char* end = nullptr;
            const long long c = std::strtoll(v.c_str(), &end, 10);
            if (v.empty() || *end != '\0' || c < 1 || c > (1 << 24))
                throw_error("'{}': ctx= takes a context length of 1..16777216 tokens", path);
            n_ctx = c;
        } else if (i == 1) {
            type = parts[i];
        } else {
            throw_error("'{}' is not of the form synthetic:SHAPE[:TYPE][:ctx=N]", path);
        }
    }
    SyntheticSpec spec;
    spec.shape = synthetic_shape(parts[0]);
    if (n_ctx > 0) spec.shape.n_ctx = n_ctx;
    const SyntheticWeights w = synthetic_type(type);
    spec.type = w.type;
    spec.mix_m = w.mix_m;
    return spec;
}

namespace {

// ---- random numbers: a pure function of (key, index) ----

uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

uint64_t fnv1a(std::string_view s) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001B3ull;
    return h;
}

// The standard normal quantile at p_j = j / 2^16 (ends clamped to half a step): a table for
// inverse-CDF sampling, which costs a lookup and a lerp per value instead of Box-Muller's
// log, sqrt, sin and cos (4x faster; generation of a 7B model is dominated by this).
// Tails beyond ~4.3 sigma are cut, which leaves the std within 1e-4 of nominal.
struct NormalTable {
    static constexpr int k_bits = 16;
    static constexpr int k_n = 1 << k_bits;
    std::vector<float> q = std::vector<float>(k_n + 1);  // [k_n + 1]

    NormalTable() {
        // Newton on Phi(x) = p, warm-started from the neighbour, from the median outwards.
        double x = 0;
        for (int j = k_n / 2; j <= k_n; ++j) {
            const double p = std::min(static_cast<double>(j), k_n - 0.5) / k_n;
            for (int it = 0; it < 6; ++it) {
                const double cdf = 0.5 * std::erfc(-x / std::numbers::sqrt2);
                const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2 * std::numbers::pi);
                x -= (cdf - p) / pdf;
            }
            q[static_cast<size_t>(j)] = static_cast<float>(x);
            q[static_cast<size_t>(k_n - j)] = static_cast<float>(-x);
        }
    }
};

const NormalTable& normal_table() {
    static const NormalTable t;
    return t;
}

// dst[0..n) = N(0, std^2) values number first..first+n of stream `key` (first and n even).
// One SplitMix64 output per pair; each 32-bit half is a 16-bit table index and a 16-bit fraction.
void fill_normal(uint64_t key, uint64_t first, float* dst, int64_t n, float std_dev) {
    const float* q = normal_table().q.data();
    constexpr float k_frac = 1.0f / 65536.0f;
    for (int64_t i = 0; i < n; i += 2) {
        const uint64_t h = splitmix64(key + ((first + static_cast<uint64_t>(i)) >> 1) * 0x9E3779B97F4A7C15ull);
        for (int k = 0; k < 2 && i + k < n; ++k) {
            const uint32_t w = static_cast<uint32_t>(h >> (32 * k));
            const uint32_t idx = w & 0xFFFF;
            const float f = static_cast<float>(w >> 16) * k_frac;
            dst[i + k] = std_dev * (q[idx] + (q[idx + 1] - q[idx]) * f);
        }
    }
}

// Runs fn(begin, end) over [0, n) split into contiguous chunks on up to n_threads threads.
template <typename Fn>
void parallel_for(int64_t n, int32_t n_threads, int64_t min_per_thread, Fn&& fn) {
    const int64_t t = std::clamp<int64_t>(n / std::max<int64_t>(1, min_per_thread), 1, n_threads);
    if (t <= 1) {
        fn(int64_t(0), n);
        return;
    }
    std::vector<std::jthread> threads;
    threads.reserve(static_cast<size_t>(t));
    for (int64_t i = 0; i < t; ++i) threads.emplace_back([&fn, i, t, n] { fn(n * i / t, n * (i + 1) / t); });
}

// ---- the model's tensors ----

// Llama 3.1's per-dimension RoPE frequency divisors (its published rope_scaling: low / high
// frequency factors 1 / 4 over an original context of 8192): 1 for short wavelengths, the
// factor for long ones, a smooth blend between.
std::vector<float> llama31_rope_freqs(const SyntheticShape& s, int64_t n_rot) {
    const double low_ff = 1.0, high_ff = 4.0, orig = 8192.0, scale = s.llama31_rope_factor;
    std::vector<float> ff(static_cast<size_t>(n_rot / 2));
    for (int64_t i = 0; i < n_rot / 2; ++i) {
        const double freq = std::pow(double(s.rope_freq_base), -2.0 * double(i) / double(n_rot));
        const double wavelen = 2.0 * 3.14159265358979323846 / freq;
        double f = 1.0;
        if (wavelen > orig / low_ff) {
            f = scale;
        } else if (wavelen >= orig / high_ff) {
            const double smooth = (orig / wavelen - low_ff) / (high_ff - low_ff);
            f = 1.0 / ((1.0 - smooth) / scale + smooth);
        }
        ff[static_cast<size_t>(i)] = static_cast<float>(f);
    }
    return ff;
}

struct TensorPlan {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;  // ggml order
    bool is_norm = false;     // a vector of ones, or `values` when given
    std::vector<float> values = {};
    uint64_t n_bytes = 0;
    uint64_t offset = 0;      // into the data section
};

struct ModelPlan {
    std::vector<std::pair<std::string, GgufValue>> kv;
    std::vector<TensorPlan> tensors;
    uint64_t n_data_bytes = 0;
};

constexpr uint64_t k_alignment = 32;

uint64_t align_up(uint64_t x) { return (x + k_alignment - 1) / k_alignment * k_alignment; }

// llama_ftype ids for general.file_type.
uint32_t file_type_id(GgmlType t, bool mix_m) {
    switch (t) {
        case GGML_TYPE_F16: return 1;
        case GGML_TYPE_Q4_0: return 2;
        case GGML_TYPE_Q8_0: return 7;
        case GGML_TYPE_Q4_K: return mix_m ? 15 : 14;  // Q4_K_M, Q4_K_S
        case GGML_TYPE_Q5_K: return mix_m ? 17 : 16;  // Q5_K_M, Q5_K_S
        case GGML_TYPE_Q6_K: return 18;
        case GGML_TYPE_BF16: return 32;
        default: return 0;
    }
}

std::string type_suffix(GgmlType t, bool mix_m) {
    std::string s;
    switch (t) {
        case GGML_TYPE_F16: s = "f16"; break;
        case GGML_TYPE_BF16: s = "bf16"; break;
        case GGML_TYPE_Q8_0: s = "q8_0"; break;
        case GGML_TYPE_Q4_0: s = "q4_0"; break;
        case GGML_TYPE_Q4_K: s = "q4_k"; break;
        case GGML_TYPE_Q5_K: s = "q5_k"; break;
        case GGML_TYPE_Q6_K: s = "q6_k"; break;
        default: s = ggml_type_name(t);
    }
    if (mix_m) s.append("_m");
    return s;
}

// llama.cpp's layer choice for the _M mixes (llama-quant.cpp, use_more_bits).
bool use_more_bits(int64_t i_layer, int64_t n_layer) {
    return i_layer < n_layer / 8 || i_layer >= 7 * n_layer / 8 || (i_layer - n_layer / 8) % 3 == 2;
}

template <typename T>
GgufValue value(T v) {
    return GgufValue{GgufValueData(std::move(v))};
}

template <typename T>
GgufValue array(std::vector<T> v) {
    return GgufValue{GgufValueData(GgufArray{GgufArrayData(std::move(v))})};
}

// A minimal SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, "▁" and the printable
// ASCII characters (alone and after "▁"), then filler pieces "▁tN" up to n_vocab.
void add_builtin_tokenizer(std::vector<std::pair<std::string, GgufValue>>& kv, int64_t n_vocab) {
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
    std::vector<int32_t> types = {TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL};
    for (int b = 0; b < 256; ++b) {
        tokens.push_back(fmt::format("<0x{:02X}>", b));
        types.push_back(TOKEN_TYPE_BYTE);
    }
    const std::string space = "\xE2\x96\x81";  // U+2581, SentencePiece's space
    auto add = [&](std::string t) {
        if (static_cast<int64_t>(tokens.size()) >= n_vocab) return;
        tokens.push_back(std::move(t));
        types.push_back(TOKEN_TYPE_NORMAL);
    };
    add(space);
    for (char c = '!'; c <= '~'; ++c) add(std::string(1, c));
    for (char c = '!'; c <= '~'; ++c) add(space + c);
    for (int64_t i = 0; static_cast<int64_t>(tokens.size()) < n_vocab; ++i) add(fmt::format("{}t{}", space, i));
    if (static_cast<int64_t>(tokens.size()) != n_vocab)
        throw_error("synthetic vocabulary of {} tokens is too small (at least {})", n_vocab, tokens.size());
    std::vector<float> scores(tokens.size(), 0.0f);
    for (size_t i = 0; i < tokens.size(); ++i)
        if (types[i] == TOKEN_TYPE_NORMAL) scores[i] = -static_cast<float>(i);  // shorter pieces first
    kv.emplace_back("tokenizer.ggml.model", value(std::string("llama")));
    kv.emplace_back("tokenizer.ggml.tokens", array(std::move(tokens)));
    kv.emplace_back("tokenizer.ggml.scores", array(std::move(scores)));
    kv.emplace_back("tokenizer.ggml.token_type", array(std::move(types)));
    kv.emplace_back("tokenizer.ggml.bos_token_id", value(uint32_t(1)));
    kv.emplace_back("tokenizer.ggml.eos_token_id", value(uint32_t(2)));
    kv.emplace_back("tokenizer.ggml.unknown_token_id", value(uint32_t(0)));
    kv.emplace_back("tokenizer.ggml.add_bos_token", value(true));
    kv.emplace_back("tokenizer.ggml.add_eos_token", value(false));
}

ModelPlan make_plan(const SyntheticSpec& spec, const GgufFile* vocab) {
    SyntheticShape s = spec.shape;
    if (s.n_embd % s.n_head != 0 || s.n_head % s.n_head_kv != 0)
        throw_error("synthetic shape '{}' has inconsistent head counts", s.name);
    if (vocab) {
        const auto& toks = vocab->get<GgufArray>("tokenizer.ggml.tokens");
        const auto n = static_cast<int64_t>(toks.size());
        if (s.name == "tiny") {
            s.n_vocab = n;  // CI shape: take whatever the vocab file has
        } else if (n != s.n_vocab) {
            throw_error("{}: the vocabulary has {} tokens but shape '{}' needs {}", vocab->path(), n,
                        s.name, s.n_vocab);
        }
    }
    const int64_t head_dim = s.n_embd / s.n_head;
    const int64_t n_kv = s.n_head_kv * head_dim;
    const GgmlType t = spec.type;
    for (GgmlType tt : {t, spec.mix_m ? GGML_TYPE_Q6_K : t}) {
        const int64_t bs = quant_block_size(tt);
        for (int64_t n_in : {s.n_embd, s.n_ff})
            if (n_in % bs != 0)
                throw_error("shape '{}': rows of {} elements are not a multiple of {}'s block size {}", s.name,
                            n_in, ggml_type_name(tt), bs);
    }

    ModelPlan p;
    auto& kv = p.kv;
    kv.emplace_back("general.architecture", value(std::string("llama")));
    kv.emplace_back("general.name", value(fmt::format("synthetic-{}-{}", s.name, type_suffix(t, spec.mix_m))));
    kv.emplace_back("general.file_type", value(file_type_id(t, spec.mix_m)));
    kv.emplace_back("general.quantization_version", value(uint32_t(2)));
    kv.emplace_back("llama.context_length", value(uint32_t(s.n_ctx)));
    kv.emplace_back("llama.embedding_length", value(uint32_t(s.n_embd)));
    kv.emplace_back("llama.block_count", value(uint32_t(s.n_layer)));
    kv.emplace_back("llama.feed_forward_length", value(uint32_t(s.n_ff)));
    kv.emplace_back("llama.attention.head_count", value(uint32_t(s.n_head)));
    kv.emplace_back("llama.attention.head_count_kv", value(uint32_t(s.n_head_kv)));
    kv.emplace_back("llama.rope.dimension_count", value(uint32_t(head_dim)));
    kv.emplace_back("llama.rope.freq_base", value(s.rope_freq_base));
    kv.emplace_back("llama.attention.layer_norm_rms_epsilon", value(1e-5f));
    kv.emplace_back("llama.vocab_size", value(uint32_t(s.n_vocab)));
    if (vocab) {
        for (const auto& [k, v] : vocab->metadata())
            if (k.starts_with("tokenizer.")) kv.emplace_back(k, v);
    } else {
        add_builtin_tokenizer(kv, s.n_vocab);
    }

    auto matrix = [&](std::string name, int64_t n_in, int64_t n_out, bool more_bits = false) {
        const GgmlType tt = spec.mix_m && more_bits ? GGML_TYPE_Q6_K : t;
        TensorPlan tp{std::move(name), tt, {n_in, n_out}};
        tp.n_bytes = quant_row_bytes(tt, n_in) * static_cast<uint64_t>(n_out);
        p.tensors.push_back(std::move(tp));
    };
    auto norm = [&](std::string name, int64_t n) {
        TensorPlan tp{std::move(name), GGML_TYPE_F32, {n}, true};
        tp.n_bytes = static_cast<uint64_t>(n) * sizeof(float);
        p.tensors.push_back(std::move(tp));
    };
    matrix("token_embd.weight", s.n_embd, s.n_vocab);
    for (int64_t i = 0; i < s.n_layer; ++i) {
        const std::string b = fmt::format("blk.{}.", i);
        norm(b + "attn_norm.weight", s.n_embd);
        matrix(b + "attn_q.weight", s.n_embd, s.n_embd);
        matrix(b + "attn_k.weight", s.n_embd, n_kv);
        matrix(b + "attn_v.weight", s.n_embd, n_kv, use_more_bits(i, s.n_layer));
        matrix(b + "attn_output.weight", s.n_embd, s.n_embd);
        norm(b + "ffn_norm.weight", s.n_embd);
        matrix(b + "ffn_gate.weight", s.n_embd, s.n_ff);
        matrix(b + "ffn_up.weight", s.n_embd, s.n_ff);
        matrix(b + "ffn_down.weight", s.n_ff, s.n_embd, use_more_bits(i, s.n_layer));
    }
    norm("output_norm.weight", s.n_embd);
    if (s.llama31_rope_factor > 0.0f) {
        norm("rope_freqs.weight", head_dim / 2);
        p.tensors.back().values = llama31_rope_freqs(s, head_dim);
    }
    matrix("output.weight", s.n_embd, s.n_vocab, true);

    uint64_t off = 0;
    for (auto& tp : p.tensors) {
        tp.offset = off;
        off = align_up(off + tp.n_bytes);
    }
    p.n_data_bytes = off;
    return p;
}

// ---- GGUF v3 header serialisation ----

struct ByteOut {
    std::vector<uint8_t> b;
    template <typename T>
    void put(T v) {
        const size_t at = b.size();
        b.resize(at + sizeof(T));
        std::memcpy(b.data() + at, &v, sizeof(T));
    }
    void put_string(const std::string& s) {
        put<uint64_t>(s.size());
        b.insert(b.end(), s.begin(), s.end());
    }
};

void put_array(ByteOut& o, const GgufArray& a);

void put_value(ByteOut& o, const GgufValueData& d) {
    std::visit(
        [&](const auto& v) {
            using T = std::decay_t<decltype(v)>;
            if constexpr (std::is_same_v<T, std::string>) o.put_string(v);
            else if constexpr (std::is_same_v<T, GgufArray>) put_array(o, v);
            else if constexpr (std::is_same_v<T, bool>) o.put<uint8_t>(v ? 1 : 0);
            else o.put<T>(v);
        },
        d);
}

void put_array(ByteOut& o, const GgufArray& a) {
    o.put<uint32_t>(a.elem_type());
    o.put<uint64_t>(a.size());
    std::visit(
        [&](const auto& vec) {
            using E = typename std::decay_t<decltype(vec)>::value_type;
            for (const auto& e : vec) {
                if constexpr (std::is_same_v<E, std::string>) o.put_string(e);
                else if constexpr (std::is_same_v<E, GgufArray>) put_array(o, e);
                else if constexpr (std::is_same_v<E, bool>) o.put<uint8_t>(e ? 1 : 0);
                else o.put<E>(e);
            }
        },
        a.data);
}

// Everything before the data section, padded to the alignment.
std::vector<uint8_t> header_bytes(const ModelPlan& p) {
    ByteOut o;
    o.put<uint32_t>(0x46554747u);  // "GGUF", little-endian
    o.put<uint32_t>(3);
    o.put<uint64_t>(p.tensors.size());
    o.put<uint64_t>(p.kv.size());
    for (const auto& [k, v] : p.kv) {
        o.put_string(k);
        o.put<uint32_t>(v.type());
        put_value(o, v.data);
    }
    for (const auto& t : p.tensors) {
        o.put_string(t.name);
        o.put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
        for (int64_t n : t.ne) o.put<uint64_t>(static_cast<uint64_t>(n));
        o.put<uint32_t>(t.type);
        o.put<uint64_t>(t.offset);
    }
    o.b.resize(align_up(o.b.size()), 0);
    return std::move(o.b);
}

int32_t thread_count(const SyntheticSpec& spec) {
    if (spec.n_threads > 0) return spec.n_threads;
    return static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
}

// Writes tensor t's bytes (exactly t.n_bytes) to dst, rows spread over the threads.
void fill_tensor(const SyntheticSpec& spec, const TensorPlan& t, uint8_t* dst, int32_t n_threads) {
    if (t.is_norm) {
        for (int64_t i = 0; i < t.ne[0]; ++i) {
            const float v = t.values.empty() ? 1.0f : t.values[static_cast<size_t>(i)];
            std::memcpy(dst + i * sizeof(float), &v, sizeof(float));
        }
        return;
    }
    const int64_t n_in = t.ne[0], n_out = t.ne[1];
    const size_t row_bytes = quant_row_bytes(t.type, n_in);
    const uint64_t key = splitmix64(spec.seed ^ fnv1a(t.name));
    parallel_for(n_out, n_threads, 16, [&](int64_t r0, int64_t r1) {
        std::vector<float> row(static_cast<size_t>(n_in));  // [n_in], one row at a time
        for (int64_t r = r0; r < r1; ++r) {
            fill_normal(key, static_cast<uint64_t>(r) * static_cast<uint64_t>(n_in), row.data(), n_in, 0.02f);
            quantize_row(t.type, row.data(), dst + static_cast<size_t>(r) * row_bytes, n_in);
        }
    });
}

}  // namespace

std::shared_ptr<const Model> make_synthetic_model(const SyntheticSpec& spec) {
    const ModelPlan p = make_plan(spec, nullptr);
    std::vector<uint8_t> header = header_bytes(p);
    const size_t data_at = header.size();
    std::vector<uint8_t> image = std::move(header);  // the whole GGUF image; padding stays zero
    image.resize(data_at + p.n_data_bytes);
    const int32_t n_threads = thread_count(spec);
    for (const auto& t : p.tensors) fill_tensor(spec, t, image.data() + data_at + t.offset, n_threads);
    const std::string name = fmt::format("synthetic:{}:{}", spec.shape.name, type_suffix(spec.type, spec.mix_m));
    return Model::from_file(GgufFile::from_bytes(std::move(image), name));
}

void write_synthetic_gguf(const SyntheticSpec& spec, const std::string& path, const GgufFile* vocab,
                          const std::function<void(size_t, size_t)>& on_tensor) {
    const ModelPlan p = make_plan(spec, vocab);
    const std::vector<uint8_t> header = header_bytes(p);
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "wb"), &std::fclose);
    if (!f) throw_error("{}: cannot open for writing: {}", path, std::strerror(errno));
    auto write = [&](const uint8_t* d, size_t n) {
        if (n && std::fwrite(d, 1, n, f.get()) != n) throw_error("{}: write failed: {}", path, std::strerror(errno));
    };
    write(header.data(), header.size());
    const int32_t n_threads = thread_count(spec);
    std::vector<uint8_t> buf;
    uint64_t at = 0;
    for (size_t i = 0; i < p.tensors.size(); ++i) {
        const TensorPlan& t = p.tensors[i];
        buf.assign(static_cast<size_t>(align_up(t.n_bytes)), 0);  // the tensor and its padding
        fill_tensor(spec, t, buf.data(), n_threads);
        if (at != t.offset) throw_error("internal: tensor '{}' offset {} != {}", t.name, t.offset, at);
        write(buf.data(), buf.size());
        at += buf.size();
        if (on_tensor) on_tensor(i + 1, p.tensors.size());
    }
    if (std::fclose(f.release()) != 0) throw_error("{}: close failed: {}", path, std::strerror(errno));
}

}  // namespace coinfer
