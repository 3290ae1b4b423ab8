#pragma once
// Where the demos look for a model when none is given: stories260K.gguf from
// $COINFER_TEST_MODELS, else ../shared/models from the current directory, else ../shared/models
// beside the source tree (COINFER_SOURCE_ROOT, set by meson).
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <system_error>

#include <fmt/format.h>

namespace coinfer::examples {

inline constexpr const char* k_default_model_name = "stories260K.gguf";

inline std::optional<std::string> default_model_path() {
    namespace fs = std::filesystem;
    auto found = [](const fs::path& dir) -> std::optional<std::string> {
        std::error_code ec;
        fs::path p = dir / k_default_model_name;
        if (fs::is_regular_file(p, ec)) return p.lexically_normal().string();
        return std::nullopt;
    };
    if (const char* env = std::getenv("COINFER_TEST_MODELS"); env && *env) {
        if (auto p = found(env)) return p;
    }
    if (auto p = found(fs::path("..") / "shared" / "models")) return p;
#ifdef COINFER_SOURCE_ROOT
    if (auto p = found(fs::path(COINFER_SOURCE_ROOT) / ".." / "shared" / "models")) return p;
#endif
    return std::nullopt;
}

// What to tell the user when no model was given and none was found; the caller exits 2.
// `how` says how this program takes a model path, e.g. "-m PATH".
inline void print_no_model_help(const char* program, const char* how) {
    fmt::print(stderr,
               "{}: no model given and {} was not found.\n"
               "Point it at a GGUF file with {}, or set COINFER_TEST_MODELS to a folder\n"
               "that holds {} (looked in $COINFER_TEST_MODELS, ../shared/models and\n"
               "../shared/models beside the source tree).\n",
               program, k_default_model_name, how, k_default_model_name);
}

}  // namespace coinfer::examples
