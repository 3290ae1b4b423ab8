// embed: coinfer inside your own Asio service. One coroutine streams a completion token by
// token; another awaits a whole completion. Both share the engine, which batches them together.
//   embed [MODEL.gguf]
#include <asio.hpp>
#include <fmt/format.h>

#include "default_model.h"
#include "scheduler/engine.h"

asio::awaitable<void> stream_story(coinfer::Engine& engine) {
    coinfer::Request req;
    req.prompt = "Once upon a time";
    req.max_tokens = 64;
    req.sampling = {.temperature = 0.8f, .top_p = 0.95f, .seed = 42};
    auto stream = engine.generate(req);
    std::string text;
    while (auto tok = co_await stream.next()) text += tok->text;  // a service would forward each piece
    fmt::print("[stream] {}{} (finish={})\n", req.prompt, text, coinfer::finish_reason_name(stream.finish_reason()));
}

asio::awaitable<void> whole_story(coinfer::Engine& engine) {
    coinfer::Request req;
    req.prompt = "The little dog";
    req.max_tokens = 64;
    req.sampling = {.temperature = 0.8f, .top_p = 0.95f, .seed = 7};
    coinfer::Completion done = co_await engine.async_complete(req, asio::use_awaitable);
    fmt::print("[complete] {}{} ({} tokens, finish={}, {:.3f}s)\n", req.prompt, done.text, done.ids.size(),
               coinfer::finish_reason_name(done.finish_reason), done.total_seconds);
}

int main(int argc, char** argv) {
    auto model = argc > 1 ? std::optional<std::string>(argv[1]) : coinfer::examples::default_model_path();
    if (!model) {
        coinfer::examples::print_no_model_help("embed", "a path argument (embed MODEL.gguf)");
        return 2;
    }
    try {
        asio::io_context io;
        coinfer::EngineOptions opt;
        opt.model = *model;  // device "auto": CUDA when this build has it, else CPU
        coinfer::Engine engine(io.get_executor(), opt);
        int n_failed = 0;
        auto report = [&](std::exception_ptr e) {  // co_spawn's completion: rethrow to see the error
            try {
                if (e) std::rethrow_exception(e);
            } catch (const std::exception& ex) {
                fmt::print(stderr, "embed: {}\n", ex.what());
                ++n_failed;
            }
        };
        asio::co_spawn(io, stream_story(engine), report);
        asio::co_spawn(io, whole_story(engine), report);
        io.run();  // returns once both coroutines are done
        return n_failed ? 1 : 0;
    } catch (const std::exception& e) {  // e.g. the model file cannot be read
        fmt::print(stderr, "embed: {}\n", e.what());
        return 1;
    }
}
