// coinfer: the command-line front end.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "commands.h"
#include "io/error.h"

namespace {

struct Command {
    const char* name;
    int (*run)(coinfer::cli::Args&);
    const char* summary;
};

const Command k_commands[] = {
    {"gguf", coinfer::cli::cmd_gguf, "print a GGUF file's metadata and tensor table"},
    {"tokenize", coinfer::cli::cmd_tokenize, "turn text into token ids"},
    {"generate", coinfer::cli::cmd_generate, "generate text from a prompt"},
    {"perplexity", coinfer::cli::cmd_perplexity, "perplexity of a text file"},
    {"serve", coinfer::cli::cmd_serve, "OpenAI-compatible HTTP server with streaming and metrics"},
    {"bench", coinfer::cli::cmd_bench, "throughput and latency (serve or batched), any model or synthetic:SHAPE"},
    {"synth", coinfer::cli::cmd_synth, "write a synthetic random-weight model as GGUF"},
};

void print_usage(std::FILE* out) {
    fmt::print(out, "usage: coinfer COMMAND [options]\n\ncommands:\n");
    for (const auto& c : k_commands) fmt::print(out, "  {:<12} {}\n", c.name, c.summary);
    fmt::print(out, "\nRun 'coinfer COMMAND --help' for a command's options.\n");
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.empty()) {
        fmt::print(stderr, "coinfer: missing command (see 'coinfer --help')\n");
        return 2;
    }
    if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
        print_usage(stdout);
        return 0;
    }
    for (const auto& c : k_commands) {
        if (args[0] != c.name) continue;
        coinfer::cli::Args a(std::vector<std::string>(args.begin() + 1, args.end()));
        try {
            return c.run(a);
        } catch (const coinfer::cli::UsageError& e) {
            fmt::print(stderr, "coinfer {}: {} (see 'coinfer {} --help')\n", c.name, e.what(), c.name);
            return 2;
        } catch (const coinfer::Error& e) {
            fmt::print(stderr, "coinfer {}: error: {}\n", c.name, e.what());
            return 1;
        } catch (const std::bad_alloc&) {
            fmt::print(stderr, "coinfer {}: error: out of memory\n", c.name);
            return 1;
        } catch (const std::exception& e) {
            fmt::print(stderr, "coinfer {}: internal error: {}\n", c.name, e.what());
            return 1;
        }
    }
    fmt::print(stderr, "coinfer: unknown command '{}' (see 'coinfer --help')\n", args[0]);
    return 2;
}
