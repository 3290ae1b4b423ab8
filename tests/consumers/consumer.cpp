// An outside project using coinfer as installed (CMake: find_package) or as a meson subproject:
// only the public header, one co_await-ed completion on the model given. Prints the text.
//   consumer MODEL.gguf
#include <coinfer/coinfer.hpp>

#include <cstdio>
#include <exception>
#include <string>

asio::awaitable<void> run(coinfer::Engine& engine, int& status) {
    coinfer::Request req;
    req.prompt = "Once upon a time";
    req.max_tokens = 24;
    req.sampling.temperature = 0.0f;  // greedy: the same story every run
    coinfer::Completion done = co_await engine.async_complete(req, asio::use_awaitable);
    std::printf("consumer: %s%s\n", req.prompt.c_str(), done.text.c_str());
    status = done.ids.empty() ? 1 : 0;
}

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: consumer MODEL.gguf\n");
        return 2;
    }
    int status = 1;
    try {
        asio::io_context io;
        coinfer::EngineOptions opt;
        opt.model = argv[1];
        opt.device = "cpu";
        coinfer::Engine engine(io.get_executor(), opt);
        asio::co_spawn(io, run(engine, status), [](std::exception_ptr e) {
            if (e) std::rethrow_exception(e);
        });
        io.run();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "consumer: %s\n", e.what());
        return 1;
    }
    return status;
}
