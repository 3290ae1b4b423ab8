// coinfer gguf FILE [--json]: metadata, model config and tensor table of a GGUF file.
#include <cstdio>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "io/gguf.h"
#include "io/model_config.h"

namespace coinfer::cli {

namespace {

constexpr size_t k_array_shown = 8;  // longer arrays are cut when printed

std::string quote(const std::string& s) {
    return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string format_array(const GgufArray& a);

std::string format_value(const GgufValue& v) {
    return std::visit(
        [](const auto& x) -> std::string {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, std::string>) return quote(x);
            else if constexpr (std::is_same_v<T, GgufArray>) return format_array(x);
            else if constexpr (std::is_same_v<T, bool>) return x ? "true" : "false";
            else if constexpr (std::is_same_v<T, uint8_t> || std::is_same_v<T, int8_t>) return fmt::format("{}", int(x));
            else return fmt::format("{}", x);
        },
        v.data);
}

std::string format_array(const GgufArray& a) {
    std::string out = fmt::format("[{} x {}] [", gguf_type_name(a.elem_type()), a.size());
    std::visit(
        [&](const auto& vec) {
            using E = typename std::decay_t<decltype(vec)>::value_type;
            for (size_t i = 0; i < vec.size() && i < k_array_shown; ++i) {
                if (i) out += ", ";
                if constexpr (std::is_same_v<E, bool>) out += vec[i] ? "true" : "false";
                else out += format_value(GgufValue{GgufValueData(E(vec[i]))});
            }
            if (vec.size() > k_array_shown) out += ", ...";
        },
        a.data);
    return out + "]";
}

nlohmann::json array_json(const GgufArray& a);

nlohmann::json value_json(const GgufValue& v) {
    return std::visit(
        [](const auto& x) -> nlohmann::json {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, GgufArray>) return array_json(x);
            else return x;
        },
        v.data);
}

nlohmann::json array_json(const GgufArray& a) {
    nlohmann::json items = nlohmann::json::array();
    std::visit(
        [&](const auto& vec) {
            using E = typename std::decay_t<decltype(vec)>::value_type;
            for (size_t i = 0; i < vec.size() && i < k_array_shown; ++i)
                items.push_back(value_json(GgufValue{GgufValueData(E(vec[i]))}));
        },
        a.data);
    return {{"type", std::string(gguf_type_name(a.elem_type()))}, {"count", a.size()},
            {"items", items}, {"truncated", a.size() > k_array_shown}};
}

std::string shape_str(const GgufTensorInfo& t) {
    std::string s;
    for (uint32_t d = 0; d < t.n_dims; ++d) s += (d ? ", " : "") + std::to_string(t.ne[d]);
    return "[" + s + "]";
}

}  // namespace

int cmd_gguf(Args& args) {
    if (args.help()) {
        fmt::print(
            "usage: coinfer gguf FILE [--json]\n\n"
            "Prints a GGUF file's header, metadata (long arrays cut), the model config when the\n"
            "architecture is supported, and the tensor table (name, type, shape, offset, bytes).\n"
            "  --json   one JSON object instead of text\n");
        return 0;
    }
    bool json = args.flag("--json");
    auto pos = args.positionals();
    if (pos.size() != 1) throw UsageError("expected exactly one FILE");
    GgufFile f = GgufFile::open(pos[0]);

    std::optional<ModelConfig> cfg;
    std::string cfg_error;
    try {
        cfg = ModelConfig::from_gguf(f);
    } catch (const Error& e) {
        cfg_error = e.what();
    }

    if (json) {
        nlohmann::json j;
        j["file"] = f.path();
        j["version"] = f.version();
        j["alignment"] = f.alignment();
        j["data_offset"] = f.data_offset();
        j["file_size"] = f.file_size();
        auto& md = j["metadata"] = nlohmann::json::object();
        for (const auto& [k, v] : f.metadata()) md[k] = value_json(v);
        if (cfg) {
            j["model"] = {{"arch", cfg->arch}, {"n_layer", cfg->n_layer}, {"n_embd", cfg->n_embd},
                          {"n_head", cfg->n_head}, {"n_head_kv", cfg->n_head_kv},
                          {"head_dim", cfg->head_dim}, {"n_ff", cfg->n_ff}, {"n_rot", cfg->n_rot},
                          {"n_vocab", cfg->n_vocab}, {"n_ctx_train", cfg->n_ctx_train},
                          {"rms_eps", cfg->rms_eps}, {"rope_freq_base", cfg->rope_freq_base},
                          {"tied_embeddings", cfg->tied_embeddings}};
        } else if (f.has("general.architecture")) {
            j["model_error"] = cfg_error;
        }
        auto& ts = j["tensors"] = nlohmann::json::array();
        for (const auto& t : f.tensors()) {
            std::vector<int64_t> shape(t.ne.begin(), t.ne.begin() + t.n_dims);
            ts.push_back({{"name", t.name}, {"type", std::string(ggml_type_name(t.type))},
                          {"shape", shape}, {"offset", f.data_offset() + t.offset},
                          {"bytes", t.n_bytes}});
        }
        fmt::print("{}\n", j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
        return 0;
    }

    fmt::print("file: {}\n", f.path());
    fmt::print("GGUF v{}, {} bytes, alignment {}, data at offset {}, {} metadata keys, {} tensors\n",
               f.version(), f.file_size(), f.alignment(), f.data_offset(), f.metadata().size(),
               f.tensors().size());
    fmt::print("\nmetadata:\n");
    for (const auto& [k, v] : f.metadata())
        fmt::print("  {:<44} {:<7} {}\n", k, gguf_type_name(v.type()), format_value(v));
    if (cfg) {
        fmt::print(
            "\nmodel: arch {}, n_layer {}, n_embd {}, n_head {}, n_head_kv {}, head_dim {}, n_ff {}, "
            "n_rot {}, vocab {}, n_ctx_train {}, rms_eps {:g}, rope_freq_base {:g}, tied_embeddings {}\n",
            cfg->arch, cfg->n_layer, cfg->n_embd, cfg->n_head, cfg->n_head_kv, cfg->head_dim,
            cfg->n_ff, cfg->n_rot, cfg->n_vocab, cfg->n_ctx_train, cfg->rms_eps,
            cfg->rope_freq_base, cfg->tied_embeddings ? "yes" : "no");
    } else if (f.has("general.architecture")) {
        fmt::print("\nmodel: not loadable: {}\n", cfg_error);
    }
    fmt::print("\ntensors: {}\n", f.tensors().size());
    fmt::print("  {:>4}  {:<32} {:<6} {:<22} {:>12} {:>12}\n", "#", "name", "type", "shape", "offset", "bytes");
    uint64_t total = 0;
    for (size_t i = 0; i < f.tensors().size(); ++i) {
        const auto& t = f.tensors()[i];
        fmt::print("  {:>4}  {:<32} {:<6} {:<22} {:>12} {:>12}\n", i, t.name, ggml_type_name(t.type),
                   shape_str(t), f.data_offset() + t.offset, t.n_bytes);
        total += t.n_bytes;
    }
    fmt::print("  total tensor bytes: {}\n", total);
    return 0;
}

}  // namespace coinfer::cli
