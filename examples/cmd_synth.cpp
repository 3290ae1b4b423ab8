// coinfer synth: writes a synthetic random-weight model as a GGUF file.
#include <chrono>
#include <cstdio>
#include <optional>

#include <unistd.h>

#include <fmt/format.h>

#include "commands.h"
#include "engine/synthetic.h"

namespace coinfer::cli {

int cmd_synth(Args& args) {
    if (args.help()) {
        std::string shapes;
        for (const auto& s : synthetic_shapes())
            shapes += fmt::format("    {:<16} d {}, {} layers, {} heads, {} KV heads, ff {}, vocab {}, ctx {}\n",
                                  s.name, s.n_embd, s.n_layer, s.n_head, s.n_head_kv, s.n_ff, s.n_vocab, s.n_ctx);
        fmt::print(
            "usage: coinfer synth SHAPE TYPE -o FILE.gguf [--vocab VOCAB.gguf]\n\n"
            "Writes random Llama weights (normal, std 0.02, norms 1, fixed seed) of a named shape,\n"
            "every matrix in TYPE (f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k; q4_k_m and q5_k_m are\n"
            "llama-quantize's mixes, with Q6_K for output, attn_v and ffn_down where it puts them),\n"
            "the same model that --model synthetic:SHAPE:TYPE builds in memory.\n"
            "  -o, --output FILE        the GGUF file to write\n"
            "  --vocab VOCAB.gguf       copy its tokenizer.* keys (default: a small built-in vocabulary);\n"
            "                           the tiny shape takes the vocab's size, the others must match it\n"
            "  -t, --threads N          generator threads (default: all cores)\n\n"
            "shapes:\n{}",
            shapes);
        return 0;
    }
    auto out = args.value("--output", "-o");
    auto vocab_path = args.value("--vocab");
    int64_t threads = args.int_value("--threads", "-t").value_or(0);
    auto pos = args.positionals();
    if (pos.size() != 2) throw UsageError("expected SHAPE TYPE");
    if (!out) throw UsageError("missing -o FILE.gguf");
    if (threads < 0 || threads > 1024) throw UsageError(fmt::format("--threads {} is out of range", threads));
    SyntheticSpec spec;
    spec.shape = synthetic_shape(pos[0]);
    const SyntheticWeights w = synthetic_type(pos[1]);
    spec.type = w.type;
    spec.mix_m = w.mix_m;
    spec.n_threads = static_cast<int32_t>(threads);
    std::optional<GgufFile> vocab;
    if (vocab_path) {
        vocab.emplace(GgufFile::open(*vocab_path));
        if (!vocab->has("tokenizer.ggml.tokens")) throw Error(fmt::format("{}: no tokenizer.ggml.tokens", *vocab_path));
    }
    const bool tty = isatty(STDERR_FILENO);
    const auto t0 = std::chrono::steady_clock::now();
    write_synthetic_gguf(spec, *out, vocab ? &*vocab : nullptr, [&](size_t i, size_t n) {
        if (tty) fmt::print(stderr, "\r[{:>4}/{}] tensors", i, n);
    });
    if (tty) fmt::print(stderr, "\n");
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print("wrote {} ({} {}) in {:.1f} s\n", *out, spec.shape.name, pos[1], s);
    return 0;
}

}  // namespace coinfer::cli
