#pragma once
// The coinfer subcommands. Each takes its arguments (after the subcommand name) and returns the
// process exit code. coinfer::Error means bad input (exit 1), cli::UsageError a bad command line (2).
#include <fstream>
#include <sstream>
#include <string>

#include "args.h"
#include "engine/kv_codec.h"
#include "io/error.h"

namespace coinfer::cli {

// --kv-type auto|f32|f16|q8_0|fp8 (default auto: the backend's own).
inline KvType kv_type_option(Args& args) {
    auto v = args.value("--kv-type");
    if (!v) return KV_TYPE_AUTO;
    try {
        return kv_type_from_name(*v);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--kv-type: {}", e.what()));
    }
}

// A whole file's bytes; coinfer::Error naming it when it cannot be read.
inline std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(fmt::format("{}: cannot open", path));
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

int cmd_gguf(Args& args);
int cmd_tokenize(Args& args);
int cmd_generate(Args& args);
int cmd_perplexity(Args& args);
int cmd_serve(Args& args);
int cmd_bench(Args& args);
int cmd_synth(Args& args);

}  // namespace coinfer::cli
