// coinfer serve: the OpenAI-compatible HTTP server (see server/server.h).
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <thread>

#include <asio/experimental/as_tuple.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

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
            "  --max-connections N      open connections; more get 503 (default 1024)\n"
            "  --max-pipelined N        requests queued per connection before reading pauses (default 64)\n"
            "  --max-buffered-bytes B   request bytes held per connection before reading pauses\n"
            "                           (default 4194304)\n"
            "  --drain-s S              on SIGTERM/SIGINT, running requests get this long to finish\n"
            "                           (default 30; a second signal exits at once)\n"
            "  --chat-template NAME     llama2, llama3, chatml, mistral, zephyr or phi3\n"
            "                           (default: recognised from the model)\n"
            "  --jinja                  render chats with the model's own tokenizer.chat_template\n"
            "                           (a Jinja interpreter; tools go to the template when it reads\n"
            "                           them); one that cannot be parsed falls back, with a warning\n"
            "  --model-name NAME        the model id clients see (default: the file name)\n"
            "  -c, --ctx-size N         per-request context (default: the model's)\n"
            "  --device cpu|cuda[:N]|auto backend (default auto: cuda:0 when present)\n"
            "  --data-parallel N        N engine replicas behind one server, each request routed to\n"
            "                           the one with the least work in hand (prefix-cache hits\n"
            "                           counted): on cuda, one per GPU from the --device ordinal\n"
            "                           on (cuda:0..N-1 by default); on cpu, N engines (default 1)\n"
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
    sopt.max_connections = static_cast<size_t>(int_in(args, "--max-connections", 1024, 1, 1 << 20));
    sopt.max_pipelined = static_cast<size_t>(int_in(args, "--max-pipelined", 64, 1, 1 << 16));
    sopt.max_buffered_bytes =
        static_cast<size_t>(int_in(args, "--max-buffered-bytes", 4 << 20, 1, int64_t(1) << 34));
    const double drain_s = args.float_value("--drain-s").value_or(30.0);
    if (!(drain_s >= 0 && drain_s <= 86400)) throw UsageError("--drain-s must be in [0, 86400]");

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
    const bool use_jinja = args.flag("--jinja");
    auto model_name = args.value("--model-name");

    EngineOptions eopt;
    eopt.device = args.value("--device").value_or("auto");
    const DeviceSpec device = parse_device(eopt.device);  // a clear error before the model loads
    const int64_t n_replicas = int_in(args, "--data-parallel", 1, 1, 64);
    if (device.cuda && n_replicas > 1 && device.index + n_replicas > cuda_device_count())
        throw UsageError(fmt::format("--data-parallel {} from {} needs cuda:{}..cuda:{}, and this machine has {} CUDA "
                                     "device(s)", n_replicas, device.name(), device.index,
                                     device.index + n_replicas - 1, cuda_device_count()));
    eopt.max_waiting = static_cast<int32_t>(int_in(args, "--max-waiting", 1024, 1, 1 << 24));
    eopt.backend.n_threads = static_cast<int32_t>(int_in(args, "--threads", 1, 1, 256, "-t"));
    eopt.backend.n_blocks = static_cast<int32_t>(int_in(args, "--kv-blocks", 0, 0, 1 << 24));
    eopt.backend.batch_invariant = args.flag("--batch-invariant");
    eopt.backend.kv_type = kv_type_option(args);
    eopt.planner.max_batch_tokens = static_cast<int32_t>(int_in(args, "--max-batch-tokens", 2048, 1, 1 << 20));
    eopt.planner.max_seqs = static_cast<int32_t>(int_in(args, "--max-seqs", 256, 1, 1 << 16));
    eopt.planner.max_prompt_tokens_mixed = static_cast<int32_t>(int_in(args, "--max-prompt-mixed", 512, 0, 1 << 20));
    eopt.n_ctx = static_cast<int32_t>(int_in(args, "--ctx-size", 0, 0, 1 << 24, "-c"));
    // Test hooks of the server tests (EngineOptions::fault_*): a lost device at pass N.
    if (const char* v = std::getenv("COINFER_TEST_FAULT_FATAL_AT"); v && *v) eopt.fault_fatal_at = std::atoll(v);
    // ... and steps failing at this rate (the HTTP soak).
    if (const char* v = std::getenv("COINFER_TEST_FAULT_RATE"); v && *v) eopt.fault_rate = std::atof(v);
    if (const char* v = std::getenv("COINFER_TEST_FAULT_SEED"); v && *v) eopt.fault_seed = std::strtoull(v, nullptr, 10);
    if (!model_path) throw UsageError("missing -m MODEL");
    if (!args.positionals().empty()) throw UsageError("unexpected argument");

    auto model = Model::load(*model_path);
    // An unknown --chat-template is an error now, not at the first chat request.
    ChatTemplate chat = ChatTemplate::for_model(model->file(), chat_template);
    if (use_jinja && !chat_template) {
        try {
            chat = ChatTemplate::for_model(model->file(), chat_template, true);
            std::fprintf(stderr, "chat template: the model's own (Jinja%s)\n", chat.renders_tools() ? ", with tools" : "");
        } catch (const Error& e) {
            std::fprintf(stderr, "warning: --jinja: %s; using the built-in '%s' format\n", e.what(), chat.name().c_str());
        }
    }
    eopt.loaded = model;
    aopt.model_name = model_name.value_or(std::filesystem::path(*model_path).filename().string());
    aopt.n_ctx = eopt.n_ctx > 0 ? eopt.n_ctx
                                : static_cast<int32_t>(std::min<int64_t>(model->config().n_ctx_train, INT32_MAX));

    // One io_context runs the server and the engine's completion handlers; the engine's step
    // loop has its own thread. Declared first so that it outlives everything that uses it.
    asio::io_context io;
    server::Metrics metrics;
    std::vector<std::string> devices;
    for (int64_t i = 0; i < n_replicas; ++i)
        devices.push_back(device.cuda ? DeviceSpec{true, int32_t(device.index + i)}.name() : "cpu");
    // Replicas load their devices at once (a large model's upload takes seconds per GPU).
    std::vector<std::unique_ptr<Engine>> engines(devices.size());
    {
        std::vector<std::exception_ptr> errors(devices.size());
        std::vector<std::thread> loaders;
        for (size_t i = 0; i < devices.size(); ++i)
            loaders.emplace_back([&, i] {
                try {
                    EngineOptions o = eopt;
                    o.device = devices[i];
                    engines[i] = std::make_unique<Engine>(io.get_executor(), std::move(o));
                } catch (...) {
                    errors[i] = std::current_exception();
                }
            });
        for (auto& t : loaders) t.join();
        for (auto& e : errors)
            if (e) std::rethrow_exception(e);
    }
    std::vector<Engine*> replicas;
    for (auto& e : engines) replicas.push_back(e.get());
    server::Router router(replicas);
    server::Api api(router, chat, metrics, aopt);
    server::Server srv(io, api, metrics, sopt);
    srv.start();

    // Shutdown. First signal: stop accepting, let running requests finish for --drain-s, then
    // end what is left (streams get a final error event and [DONE], others 503: the engine
    // stops, see Engine::shutdown) and exit 0 once every connection has closed. Second signal:
    // exit at once.
    asio::signal_set signals(io, SIGINT, SIGTERM);
    asio::steady_timer drain_timer(io);
    bool draining = false;
    auto finish = [&] {
        srv.stop();
        signals.cancel();
        drain_timer.cancel();
    };
    std::function<void(const asio::error_code&, int)> on_signal = [&](const asio::error_code& ec, int sig) {
        if (ec) return;
        const char* name = sig == SIGINT ? "SIGINT" : "SIGTERM";
        if (draining) {
            fmt::print(stderr, "coinfer serve: second {}, exiting now\n", name);
            finish();
            io.stop();
            return;
        }
        draining = true;
        fmt::print(stderr, "coinfer serve: {} received, draining ({} connections open, up to {} s)\n", name,
                   srv.open_connections(), drain_s);
        srv.drain();
        signals.async_wait(on_signal);
        asio::co_spawn(
            io,
            [&, deadline = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                               std::chrono::duration<double>(drain_s))]() -> asio::awaitable<void> {
                auto wait_closed = [&](std::chrono::steady_clock::time_point until) -> asio::awaitable<bool> {
                    while (srv.open_connections() > 0 && std::chrono::steady_clock::now() < until) {
                        drain_timer.expires_after(std::chrono::milliseconds(20));
                        auto [e] = co_await drain_timer.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
                        if (e) co_return false;  // cancelled: a second signal
                    }
                    co_return srv.open_connections() == 0;
                };
                if (!co_await wait_closed(deadline)) {
                    if (io.stopped()) co_return;  // a second signal
                    fmt::print(stderr, "coinfer serve: drain time over, ending {} connections' requests\n",
                               srv.open_connections());
                    for (auto& e : engines) e->shutdown();
                    co_await wait_closed(std::chrono::steady_clock::now() + std::chrono::seconds(5));
                }
                finish();
            },
            asio::detached);
    };
    signals.async_wait(on_signal);
    std::signal(SIGPIPE, SIG_IGN);

    fmt::print("coinfer serve: listening on http://{}:{}\n", sopt.host, srv.port());
    std::string on = devices.size() == 1 ? engines[0]->backend_name() : fmt::format("{}", fmt::join(devices, ", "));
    fmt::print(stderr, "coinfer serve: model {} on {}, chat template {}, context {}\n", aopt.model_name, on,
               chat.name(), aopt.n_ctx);
    std::fflush(stdout);
    io.run();
    return 0;
}

}  // namespace coinfer::cli
