// coinfer generate and coinfer perplexity: single-request runs straight on a backend.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "engine/generate.h"

namespace coinfer::cli {

namespace {

struct BackendChoice {
    std::shared_ptr<const Model> model;
    std::unique_ptr<Backend> backend;
    std::unique_ptr<KvBlockPool> pool;
};

// --device and --threads, shared by generate and perplexity.
BackendChoice open_backend(Args& args, std::shared_ptr<const Model> model, int32_t n_ctx_needed) {
    const std::string device = args.value("--device").value_or("auto");
    int64_t threads = args.int_value("--threads", "-t").value_or(1);
    if (threads < 1 || threads > 256) throw UsageError(fmt::format("--threads {} is out of range (1..256)", threads));
    BackendChoice b;
    b.model = std::move(model);
    BackendOptions opt;
    opt.n_threads = static_cast<int32_t>(threads);
    opt.n_blocks = (n_ctx_needed + opt.block_size - 1) / opt.block_size + 1;
    opt.kv_type = kv_type_option(args);
    b.backend = make_backend(b.model, device, opt);
    b.pool = std::make_unique<KvBlockPool>(b.backend->n_blocks(), b.backend->block_size());
    return b;
}

float float_opt(Args& args, std::string_view name, float def, std::string_view alias = {}) {
    auto v = args.float_value(name, alias);
    return v ? static_cast<float>(*v) : def;
}

}  // namespace

int cmd_generate(Args& args) {
    if (args.help()) {
        fmt::print(
            "usage: coinfer generate -m MODEL -p PROMPT [-n N] [options]\n\n"
            "Generates a continuation of PROMPT and streams it to stdout.\n"
            "  -m, --model MODEL        GGUF model file\n"
            "  -p, --prompt TEXT        the prompt (tokenized with BOS and special tokens)\n"
            "  -f, --file F             read the prompt from F instead\n"
            "  -n, --n-predict N        tokens to generate (default 128)\n"
            "  --temp T                 temperature, 0 = greedy (default 0.8)\n"
            "  --top-k K                0 = off (default 40)\n"
            "  --top-p P                in (0, 1], 1 = off (default 0.95)\n"
            "  --min-p M                in [0, 1], 0 = off (default 0.05)\n"
            "  --repeat-penalty R       1 = off (default 1)\n"
            "  --repeat-last-n N        penalty window, -1 = all (default 64)\n"
            "  --frequency-penalty F    OpenAI-style (default 0)\n"
            "  --presence-penalty P     OpenAI-style (default 0)\n"
            "  --seed S                 sampling seed (default: random)\n"
            "  --stop STR               stop string, repeatable; not included in the output\n"
            "  --ignore-eos             keep generating past end-of-generation tokens\n"
            "  --logprobs N             with --json, the top-N [id, logprob] per generated token\n"
            "  --json                   print one JSON object instead of streaming text\n"
            "  -c, --ctx-size N         context length (default: the model's)\n"
            "  --device cpu|cuda[:N]    backend (default cuda:0 when a GPU is present, else cpu)\n"
            "  -t, --threads N          CPU threads (default 1)\n"
            "  --kv-type T              KV cache: auto (f32 on cpu, f16 on cuda), f32, f16, q8_0, fp8\n");
        return 0;
    }
    auto model_path = args.value("--model", "-m");
    auto prompt = args.value("--prompt", "-p");
    auto prompt_file = args.value("--file", "-f");
    GenerateOptions opt;
    opt.max_tokens = static_cast<int32_t>(std::clamp<int64_t>(args.int_value("--n-predict", "-n").value_or(128), INT32_MIN, INT32_MAX));
    SamplingParams& sp = opt.sampling;
    sp.temperature = float_opt(args, "--temp", 0.8f);
    sp.top_k = static_cast<int32_t>(std::clamp<int64_t>(args.int_value("--top-k").value_or(40), INT32_MIN, INT32_MAX));
    sp.top_p = float_opt(args, "--top-p", 0.95f);
    sp.min_p = float_opt(args, "--min-p", 0.05f);
    sp.repeat_penalty = float_opt(args, "--repeat-penalty", 1.0f);
    sp.penalty_last_n = static_cast<int32_t>(std::clamp<int64_t>(args.int_value("--repeat-last-n").value_or(64), INT32_MIN, INT32_MAX));
    sp.frequency_penalty = float_opt(args, "--frequency-penalty", 0.0f);
    sp.presence_penalty = float_opt(args, "--presence-penalty", 0.0f);
    auto seed = args.int_value("--seed", "-s");
    sp.seed = seed ? static_cast<uint64_t>(*seed) : std::random_device{}();
    sp.n_logprobs = static_cast<int32_t>(std::clamp<int64_t>(args.int_value("--logprobs").value_or(0), -1, 1000));
    opt.stop = args.values("--stop");
    opt.ignore_eos = args.flag("--ignore-eos");
    bool json = args.flag("--json");
    auto ctx = args.int_value("--ctx-size", "-c");
    if (ctx && (*ctx < 8 || *ctx > (1 << 24))) throw UsageError(fmt::format("--ctx-size {} is out of range", *ctx));
    if (!model_path) throw UsageError("missing -m MODEL");
    if (prompt && prompt_file) throw UsageError("give either -p or -f, not both");
    if (prompt_file) prompt = read_file(*prompt_file);
    if (!prompt) throw UsageError("missing -p PROMPT");
    if (opt.max_tokens < 0) throw UsageError(fmt::format("-n must not be negative (got {})", opt.max_tokens));
    if (sp.n_logprobs < 0 || sp.n_logprobs > SamplingParams::k_max_logprobs)
        throw UsageError(fmt::format("--logprobs must be in 0..{}", SamplingParams::k_max_logprobs));
    try {
        sp.validate();
    } catch (const Error& e) {
        throw UsageError(e.what());
    }

    // Context: the model's unless given; the KV pool is sized for it.
    auto model = Model::load(*model_path);
    opt.n_ctx = ctx ? static_cast<int32_t>(*ctx) : static_cast<int32_t>(std::min<int64_t>(model->config().n_ctx_train, 1 << 20));
    auto prompt_ids = model->tokenizer().encode(*prompt, true, true);
    validate_generate(*model, prompt_ids.size(), opt);
    BackendChoice b = open_backend(args, std::move(model), opt.n_ctx);
    if (!args.positionals().empty()) throw UsageError("unexpected argument");

    std::function<void(std::string_view)> on_text;
    if (!json) {
        fmt::print("{}", *prompt);
        std::fflush(stdout);
        on_text = [](std::string_view s) {
            fmt::print("{}", s);
            std::fflush(stdout);
        };
    }
    GenerateResult r = generate(*b.backend, *b.pool, *b.model, prompt_ids, opt, on_text);
    const double pp_tps = r.prompt_seconds > 0 ? r.prompt_ids.size() / r.prompt_seconds : 0;
    const double tg_tps = r.gen_seconds > 0 ? r.ids.size() / r.gen_seconds : 0;
    if (!json) {
        fmt::print("\n");
        fmt::print(stderr, "\n[{} prompt tokens at {:.1f} tok/s, {} generated at {:.1f} tok/s, finish: {}]\n",
                   r.prompt_ids.size(), pp_tps, r.ids.size(), tg_tps, r.finish_reason);
        return 0;
    }
    nlohmann::json j;
    j["prompt"] = *prompt;
    j["prompt_ids"] = r.prompt_ids;
    j["ids"] = r.ids;
    j["text"] = r.text;
    j["finish_reason"] = r.finish_reason;
    j["seed"] = sp.seed;
    j["timing"] = {{"prompt_tokens", r.prompt_ids.size()},
                   {"prompt_seconds", r.prompt_seconds},
                   {"prompt_tokens_per_s", pp_tps},
                   {"generated_tokens", r.ids.size()},
                   {"generated_seconds", r.gen_seconds},
                   {"generated_tokens_per_s", tg_tps}};
    if (sp.n_logprobs > 0) {
        auto& tl = j["top_logprobs"] = nlohmann::json::array();
        for (const auto& step : r.top_logprobs) {
            auto row = nlohmann::json::array();
            for (const auto& lp : step) row.push_back({lp.id, lp.logprob});
            tl.push_back(row);
        }
    }
    fmt::print("{}\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    return 0;
}

int cmd_perplexity(Args& args) {
    if (args.help()) {
        fmt::print(
            "usage: coinfer perplexity -m MODEL -f FILE [-c CTX]\n\n"
            "Perplexity of FILE the way llama.cpp computes it: chunks of CTX tokens, each starting\n"
            "with BOS, the second half of each chunk scored. The last line is PPL = value +/- stderr.\n"
            "  -c, --ctx-size CTX       chunk length (default 512)\n"
            "  --device cpu|cuda[:N]    backend (default cuda:0 when a GPU is present, else cpu)\n"
            "  -t, --threads N          CPU threads (default 1)\n"
            "  --kv-type T              KV cache: auto (f32 on cpu, f16 on cuda), f32, f16, q8_0, fp8\n");
        return 0;
    }
    auto model_path = args.value("--model", "-m");
    auto file = args.value("--file", "-f");
    int64_t ctx = args.int_value("--ctx-size", "-c").value_or(512);
    if (!model_path) throw UsageError("missing -m MODEL");
    if (!file) throw UsageError("missing -f FILE");
    if (ctx < 4 || ctx > (1 << 20)) throw UsageError(fmt::format("-c {} is out of range (4..1048576)", ctx));
    std::string text = read_file(*file);
    BackendChoice b = open_backend(args, Model::load(*model_path), static_cast<int32_t>(ctx));
    if (!args.positionals().empty()) throw UsageError("unexpected argument");
    if (ctx > b.model->config().n_ctx_train)
        fmt::print(stderr, "warning: context {} exceeds the model's training context {}\n", ctx, b.model->config().n_ctx_train);
    auto r = perplexity(*b.backend, *b.pool, *b.model, text, static_cast<int32_t>(ctx),
                        [](const PerplexityResult& p) { fmt::print("[{}] {:.4f}\n", p.n_chunks, p.ppl); });
    fmt::print("{} chunks of {} tokens, {} tokens scored\n", r.n_chunks, ctx, r.n_scored);
    fmt::print("PPL = {:.4f} +/- {:.5f}\n", r.ppl, r.ppl_stderr);
    return 0;
}

}  // namespace coinfer::cli
