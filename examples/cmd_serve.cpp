// coinfer serve: the OpenAI-compatible HTTP server (see server/server.h).
#include <csignal>
#include <filesystem>

#include <fmt/format.h>

#include "commands.h"
#include "server/server.h"

namespace coinfer::cli {

namespace {

int64_t int_in(Args& args, std::string_view name, int64_t def, int64_t lo, int64_t hi, std::string_view alias = {}) {
    int64_t v = args.int_value(name, alias).value_or(def);
    if (v < lo || v > hi) throw UsageError(fmt::format("{} {} is out of range ({}..{})", name, v, lo, hi));
    return v;
}

}  // namespace

int cmd_serve(Args& args) {
    if (args.help()) {
        fmt::print(
            "usage: coinfer serve -m MODEL [options]\n\n"
            "Serves the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,\n"
            "/v1/models), plus /health, /metrics, /tokenize, /detokenize and a web page at /.\n"
            "  -m, --model MODEL        GGUF model file\n"
            "  --host ADDR              address to listen on (default 127.0.0.1)\n"
            "  --port N                 port (default 8080; 0 picks a free one, printed at start)\n"
            "  --api-key KEY            require 'Authorization: Bearer KEY' on the API endpoints\n"
            "  --max-waiting N          requests queued before 429 (default 1024)\n"
            "  --max-body-bytes B       largest request body (default 1048576)\n"
            "  --max-logit-bias N       logit_bias entries per request (default 300)\n"
            "  --max-stop-bytes B       bytes of all stop strings of a request (default 1024)\n"
            "  --allowed-origins LIST   comma-separated browser origins allowed besides the server's own\n"
            "                           page ('*': any); requests with another Origin get 403\n"
            "  --timeout-s S            header/body read and stalled-write timeout (default 30)\n"
            "  --keep-alive-s S         idle keep-alive connections close after this (default 60)\n"
            "  --chat-template NAME     llama2, llama3, chatml, mistral, zephyr or phi3\n"
            "                           (default: recognised from the model)\n"
            "  --model-name NAME        the model id clients see (default: the file name)\n"
            "  -c, --ctx-size N         per-request context (default: the model's)\n"
            "  --device cpu|cuda|auto   backend (default auto)\n"
            "  -t, --threads N          CPU threads (default 1)\n"
            "  --max-batch-tokens N     tokens per engine step (default 2048)\n"
            "  --max-seqs N             sequences per engine step (default 256)\n"
            "  --max-prompt-mixed N     prompt tokens in a step that also decodes (default 512, 0: no cap)\n"
            "  --kv-blocks N            KV cache blocks (default: the backend's choice)\n"
            "  --batch-invariant        cuda: same bits alone or in any batch (slower big batches)\n"
            "  --kv-type T              KV cache: auto (f32 on cpu, f16 on cuda), f32, f16, q8_0, fp8\n");
        return 0;
    }
    auto model_path = args.value("--model", "-m");
    server::ServerOptions sopt;
    sopt.host = args.value("--host").value_or("127.0.0.1");
    sopt.port = static_cast<uint16_t>(int_in(args, "--port", 8080, 0, 65535));
    sopt.limits.max_body_bytes = static_cast<size_t>(int_in(args, "--max-body-bytes", 1 << 20, 1, int64_t(1) << 32));
    const double timeout = args.float_value("--timeout-s").value_or(30.0);
    if (!(timeout > 0 && timeout <= 86400)) throw UsageError("--timeout-s must be in (0, 86400]");
    sopt.timeout_s = timeout;
    const double keep_alive = args.float_value("--keep-alive-s").value_or(60.0);
    if (!(keep_alive > 0 && keep_alive <= 86400)) throw UsageError("--keep-alive-s must be in (0, 86400]");
    sopt.keep_alive_s = keep_alive;

    server::ApiOptions aopt;
    aopt.api_key = args.value("--api-key");
    if (aopt.api_key && aopt.api_key->empty()) throw UsageError("--api-key must not be empty");
    aopt.max_logit_bias = static_cast<size_t>(int_in(args, "--max-logit-bias", 300, 0, 1 << 20));
    aopt.max_stop_bytes = static_cast<size_t>(int_in(args, "--max-stop-bytes", 1024, 0, 1 << 20));
    if (auto origins = args.value("--allowed-origins")) {
        std::string_view rest = *origins;
        while (!rest.empty()) {
            const size_t comma = rest.find(',');
            std::string_view o = rest.substr(0, comma);
            while (!o.empty() && o.front() == ' ') o.remove_prefix(1);
            while (!o.empty() && o.back() == ' ') o.remove_suffix(1);
            if (!o.empty()) aopt.allowed_origins.emplace_back(o);
            rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
        }
    }
    auto chat_template = args.value("--chat-template");
    auto model_name = args.value("--model-name");

    EngineOptions eopt;
    eopt.device = args.value("--device").value_or("auto");
    if (eopt.device != "cpu" && eopt.device != "cuda" && eopt.device != "auto")
        throw UsageError(fmt::format("--device must be cpu, cuda or auto, not '{}'", eopt.device));
    eopt.max_waiting = static_cast<int32_t>(int_in(args, "--max-waiting", 1024, 1, 1 << 24));
    eopt.backend.n_threads = static_cast<int32_t>(int_in(args, "--threads", 1, 1, 256, "-t"));
    eopt.backend.n_blocks = static_cast<int32_t>(int_in(args, "--kv-blocks", 0, 0, 1 << 24));
    eopt.backend.batch_invariant = args.flag("--batch-invariant");
    eopt.backend.kv_type = kv_type_option(args);
    eopt.planner.max_batch_tokens = static_cast<int32_t>(int_in(args, "--max-batch-tokens", 2048, 1, 1 << 20));
    eopt.planner.max_seqs = static_cast<int32_t>(int_in(args, "--max-seqs", 256, 1, 1 << 16));
    eopt.planner.max_prompt_tokens_mixed = static_cast<int32_t>(int_in(args, "--max-prompt-mixed", 512, 0, 1 << 20));
    eopt.n_ctx = static_cast<int32_t>(int_in(args, "--ctx-size", 0, 0, 1 << 24, "-c"));
    if (!model_path) throw UsageError("missing -m MODEL");
    if (!args.positionals().empty()) throw UsageError("unexpected argument");

    auto model = Model::load(*model_path);
    // An unknown --chat-template is an error now, not at the first chat request.
    ChatTemplate chat = ChatTemplate::for_model(model->file(), chat_template);
    eopt.loaded = model;
    aopt.model_name = model_name.value_or(std::filesystem::path(*model_path).filename().string());
    aopt.n_ctx = eopt.n_ctx > 0 ? eopt.n_ctx
                                : static_cast<int32_t>(std::min<int64_t>(model->config().n_ctx_train, INT32_MAX));

    // One io_context runs the server and the engine's completion handlers; the engine's step
    // loop has its own thread. Declared first so that it outlives everything that uses it.
    asio::io_context io;
    server::Metrics metrics;
    Engine engine(io.get_executor(), eopt);
    server::Api api(engine, chat, metrics, aopt);
    server::Server srv(io, api, metrics, sopt);
    srv.start();

    asio::signal_set signals(io, SIGINT, SIGTERM);
    signals.async_wait([&](const asio::error_code& ec, int sig) {
        if (ec) return;
        fmt::print(stderr, "coinfer serve: {} received, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
        srv.stop();  // closes connections; their generations are cancelled
    });
    std::signal(SIGPIPE, SIG_IGN);

    fmt::print("coinfer serve: listening on http://{}:{}\n", sopt.host, srv.port());
    fmt::print(stderr, "coinfer serve: model {} on {}, chat template {}, context {}\n", aopt.model_name,
               engine.backend_name(), chat.name(), aopt.n_ctx);
    std::fflush(stdout);
    io.run();
    return 0;
}

}  // namespace coinfer::cli
