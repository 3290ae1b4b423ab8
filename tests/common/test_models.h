#pragma once
// Finding the shared test models: $COINFER_TEST_MODELS, else ../shared/models beside the source
// tree. A test that needs a missing file says so and skips.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

namespace coinfer::test {

inline std::filesystem::path models_dir() {
    if (const char* env = std::getenv("COINFER_TEST_MODELS"); env && *env) return env;
#ifdef COINFER_SOURCE_ROOT
    return std::filesystem::path(COINFER_SOURCE_ROOT) / ".." / "shared" / "models";
#else
    return std::filesystem::path("..") / "shared" / "models";
#endif
}

// Why a test could not run (the first reason given). A binary whose tests then checked nothing
// exits 77 (tests/common/doctest_main.cpp).
inline std::string& skip_reason() {
    static std::string why;
    return why;
}
inline void mark_skipped(const std::string& why) {
    if (skip_reason().empty()) skip_reason() = why;
}

// Full path of a file under the models folder, or nullopt after printing a skip message.
inline std::optional<std::string> model_file(const std::string& rel) {
    auto p = models_dir() / rel;
    if (std::filesystem::exists(p)) return p.lexically_normal().string();
    const std::string path = p.lexically_normal().string();
    std::fprintf(stderr, "SKIP: test model %s not found (set COINFER_TEST_MODELS)\n", path.c_str());
    mark_skipped("test model " + path + " not found (set COINFER_TEST_MODELS)");
    return std::nullopt;
}

}  // namespace coinfer::test
