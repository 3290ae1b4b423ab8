// multi_client: N coroutine clients share one coinfer::Engine, each streaming its own story.
// The engine batches every running client's next token into one forward pass; the live view
// shows the clients side by side with the engine's batch size and KV use above them.
//
//   multi_client [-m MODEL] [-c N] [-n MAX_TOKENS] [--plain] [--duration-s S] ...
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <asio.hpp>
#include <fmt/format.h>

#include "args.h"
#include "default_model.h"
#include "scheduler/engine.h"

namespace {

using Clock = std::chrono::steady_clock;
using coinfer::cli::UsageError;

// TinyStories-style openings; client i takes prompt i mod the list.
constexpr const char* k_prompts[] = {
    "Once upon a time, there was a little girl named Lily.",
    "One day, a big dog found a red ball in the park.",
    "Tom and his mom went to the store to buy some food.",
    "There was a small bird who wanted to fly very high.",
    "Sara had a new toy car. She liked to play with it every day.",
    "In a small house near the woods lived a kind old man.",
    "Ben saw a shiny rock on the ground and picked it up.",
    "The sun was hot, so Mia and her friend went to the pond.",
    "A little cat named Kitty was very hungry one morning.",
    "Max wanted to build the biggest sand castle on the beach.",
    "Once there was a boy who did not like to share his toys.",
    "Anna found a box under her bed. She opened it slowly.",
};
constexpr size_t k_n_prompts = sizeof(k_prompts) / sizeof(k_prompts[0]);

enum ClientStatus {
    CLIENT_STATUS_WAITING,    // submitted, no token yet
    CLIENT_STATUS_RUNNING,
    CLIENT_STATUS_DONE,
    CLIENT_STATUS_CANCELLED,
    CLIENT_STATUS_ERROR,
};

const char* client_status_name(ClientStatus s) {
    switch (s) {
        case CLIENT_STATUS_WAITING: return "waiting";
        case CLIENT_STATUS_RUNNING: return "running";
        case CLIENT_STATUS_DONE: return "done";
        case CLIENT_STATUS_CANCELLED: return "cancelled";
        case CLIENT_STATUS_ERROR: return "error";
    }
    return "?";
}

// One client; touched only on the io_context's thread.
struct Client {
    int32_t index = 0;
    std::string prompt;
    std::string text;
    int32_t n_tokens = 0;
    ClientStatus status = CLIENT_STATUS_WAITING;
    coinfer::FinishReason finish = coinfer::FINISH_REASON_NONE;
    std::string error;
    Clock::time_point t_start, t_last;
    asio::cancellation_signal cancel;  // bound to the client's coroutine

    bool finished() const { return status >= CLIENT_STATUS_DONE; }
    // Generated tokens per second since submission, as this client saw them.
    double tokens_per_second(Clock::time_point now) const {
        if (n_tokens == 0) return 0;
        const Clock::time_point end = finished() ? t_last : now;
        const double dt = std::chrono::duration<double>(end - t_start).count();
        return dt > 0 ? n_tokens / dt : 0;
    }
};

struct Options {
    std::string model;
    int32_t n_clients = 8;
    int32_t max_tokens = 128;
    float temperature = 0.8f;
    uint64_t seed = 1234;
    std::string device = "auto";
    int32_t n_threads = 1;
    bool plain = false;
    double duration_s = 0;  // 0: run to the end
};

void print_usage() {
    fmt::print(
        "usage: multi_client [options]\n\n"
        "N concurrent clients stream stories from one coinfer engine (continuous batching).\n"
        "  -m, --model MODEL   GGUF file (default: stories260K.gguf from $COINFER_TEST_MODELS\n"
        "                      or ../shared/models)\n"
        "  -c, --clients N     concurrent clients (default 8)\n"
        "  -n, --max-tokens N  tokens per client (default 128)\n"
        "  --temp T            temperature (default 0.8)\n"
        "  --seed S            base seed; client i uses S + i (default 1234)\n"
        "  --device D          cpu, cuda, cuda:N or auto (default auto)\n"
        "  --threads N         CPU backend threads (default 1)\n"
        "  --plain             no live view: print each story at the end\n"
        "  --duration-s S      stop after S seconds (cancels the clients, exits 0)\n");
}

Options parse_options(int argc, char** argv) {
    coinfer::cli::Args args(std::vector<std::string>(argv + 1, argv + argc));
    Options o;
    if (args.help()) {
        print_usage();
        std::exit(0);
    }
    if (auto m = args.value("--model", "-m")) o.model = *m;
    auto int_in = [&](std::string_view name, std::string_view alias, int64_t lo, int64_t hi, int32_t def) {
        auto v = args.int_value(name, alias);
        if (!v) return def;
        if (*v < lo || *v > hi) throw UsageError(fmt::format("{} {} is out of range ({}..{})", name, *v, lo, hi));
        return static_cast<int32_t>(*v);
    };
    o.n_clients = int_in("--clients", "-c", 1, 1024, o.n_clients);
    o.max_tokens = int_in("--max-tokens", "-n", 1, 1 << 20, o.max_tokens);
    o.n_threads = int_in("--threads", "-t", 1, 256, o.n_threads);
    if (auto t = args.float_value("--temp")) {
        if (!(*t >= 0 && *t <= 100)) throw UsageError(fmt::format("--temp {} is out of range (0..100)", *t));
        o.temperature = static_cast<float>(*t);
    }
    if (auto s = args.int_value("--seed")) o.seed = static_cast<uint64_t>(*s);
    if (auto d = args.value("--device")) o.device = *d;
    (void)coinfer::parse_device(o.device);
    o.plain = args.flag("--plain");
    if (auto d = args.float_value("--duration-s")) {
        if (!(*d > 0 && *d < 1e7)) throw UsageError(fmt::format("--duration-s {} must be positive", *d));
        o.duration_s = *d;
    }
    if (!args.positionals().empty()) throw UsageError("unexpected argument (see --help)");
    return o;
}

asio::awaitable<void> run_client(coinfer::Engine& engine, Client& c, const Options& o) {
    coinfer::Request req;
    req.prompt = c.prompt;
    req.max_tokens = o.max_tokens;
    req.sampling.temperature = o.temperature;
    req.sampling.top_p = 0.95f;
    req.sampling.seed = o.seed + static_cast<uint64_t>(c.index);
    c.t_start = Clock::now();
    try {
        auto stream = engine.generate(req);
        while (auto tok = co_await stream.next()) {
            c.t_last = Clock::now();
            if (c.n_tokens++ == 0) {
                c.status = CLIENT_STATUS_RUNNING;
            }
            c.text += tok->text;
        }
        c.finish = stream.finish_reason();
        c.status = c.finish == coinfer::FINISH_REASON_CANCELLED ? CLIENT_STATUS_CANCELLED : CLIENT_STATUS_DONE;
        if (c.finish == coinfer::FINISH_REASON_ERROR) {
            c.status = CLIENT_STATUS_ERROR;
            c.error = stream.error_message();
        }
    } catch (const std::system_error& e) {
        // A cancelled next() ends with operation_aborted; anything else is the request's error.
        if (e.code() == asio::error::operation_aborted) {
            c.status = CLIENT_STATUS_CANCELLED;
            c.finish = coinfer::FINISH_REASON_CANCELLED;
        } else {
            c.status = CLIENT_STATUS_ERROR;
            c.finish = coinfer::FINISH_REASON_ERROR;
            c.error = e.what();
        }
    } catch (const std::exception& e) {
        c.status = CLIENT_STATUS_ERROR;
        c.finish = coinfer::FINISH_REASON_ERROR;
        c.error = e.what();
    }
    if (c.n_tokens == 0) c.t_last = Clock::now();
}

// ---- the live view ----

struct TermSize {
    int cols = 80;
    int rows = 24;
};

TermSize term_size() {
    TermSize t;
    winsize w{};
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &w) == 0 && w.ws_col > 0 && w.ws_row > 0) {
        t.cols = w.ws_col;
        t.rows = w.ws_row;
    }
    return t;
}

// The code point at text[i] as it may go to the terminal, and its length in bytes in `n`.
// Generated text must not move the cursor or start an escape: C0 and C1 controls become a
// space, bytes that are not UTF-8 become '?'.
std::string display_cp(std::string_view text, size_t i, size_t& n) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    n = 1;
    if (c < 0x20 || c == 0x7F) return " ";
    if (c < 0x80) return std::string(1, static_cast<char>(c));
    const size_t len = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
    if (len == 0 || i + len > text.size()) return "?";
    for (size_t k = 1; k < len; ++k)
        if ((static_cast<unsigned char>(text[i + k]) & 0xC0) != 0x80) return "?";
    n = len;
    if (c == 0xC2 && static_cast<unsigned char>(text[i + 1]) < 0xA0) return " ";  // U+0080..U+009F
    return std::string(text.substr(i, len));
}

// Word-wraps `text` to `width` columns (one column per code point); control characters become
// spaces (generated text must not move the cursor), newlines start a new line.
std::vector<std::string> wrap(std::string_view text, int width) {
    std::vector<std::string> lines(1);
    int n_cols = 0;
    size_t space_byte = std::string::npos;  // just past the last space in the current line
    int space_col = 0;
    for (size_t i = 0; i < text.size();) {
        if (text[i] == '\n') {
            lines.emplace_back();
            n_cols = 0;
            space_byte = std::string::npos;
            ++i;
            continue;
        }
        size_t n = 0;
        std::string cp = display_cp(text, i, n);
        i += n;
        if (n_cols == width) {
            std::string& cur = lines.back();
            if (cp == " ") {  // a space at the edge is the break itself
                lines.emplace_back();
                n_cols = 0;
                space_byte = std::string::npos;
                continue;
            }
            if (space_byte != std::string::npos && space_byte < cur.size()) {
                std::string rest = cur.substr(space_byte);
                cur.resize(space_byte);
                lines.push_back(std::move(rest));
                n_cols -= space_col;
            } else {
                lines.emplace_back();
                n_cols = 0;
            }
            space_byte = std::string::npos;
        }
        lines.back() += cp;
        ++n_cols;
        if (cp == " ") {
            space_byte = lines.back().size();
            space_col = n_cols;
        }
    }
    return lines;
}

// `s` cut or padded to exactly `width` columns (s is one line; controls show as spaces).
std::string fit(std::string_view s, int width) {
    std::string out;
    int n_cols = 0;
    for (size_t i = 0; i < s.size() && n_cols < width;) {
        size_t n = 0;
        out += display_cp(s, i, n);
        i += n;
        ++n_cols;
    }
    out.append(static_cast<size_t>(width - n_cols), ' ');
    return out;
}

const char* status_color(ClientStatus s) {
    switch (s) {
        case CLIENT_STATUS_WAITING: return "\x1b[33m";    // yellow
        case CLIENT_STATUS_RUNNING: return "\x1b[36m";    // cyan
        case CLIENT_STATUS_DONE: return "\x1b[32m";       // green
        case CLIENT_STATUS_CANCELLED: return "\x1b[35m";  // magenta
        case CLIENT_STATUS_ERROR: return "\x1b[31m";      // red
    }
    return "";
}

// One panel's lines, each exactly `width` columns (escapes aside).
std::vector<std::string> render_panel(const Client& c, int width, int height, Clock::time_point now) {
    std::vector<std::string> out;
    std::string title = fmt::format("#{} {} {}t {:.0f}t/s", c.index, client_status_name(c.status), c.n_tokens,
                                    c.tokens_per_second(now));
    if (c.finished() && c.finish != coinfer::FINISH_REASON_NONE)
        title += fmt::format(" ({})", coinfer::finish_reason_name(c.finish));
    out.push_back(fmt::format("\x1b[1m{}{}\x1b[0m", status_color(c.status), fit(title, width)));
    out.push_back(fmt::format("\x1b[2m{}\x1b[0m", fit(c.prompt, width)));
    const int n_text_rows = height - 2;
    if (n_text_rows <= 0) return out;
    // The text continues the prompt line above it, so its leading space would only indent it.
    std::string_view text = c.text;
    if (!text.empty() && text[0] == ' ') text.remove_prefix(1);
    std::vector<std::string> body = c.status == CLIENT_STATUS_ERROR ? wrap("error: " + c.error, width) : wrap(text, width);
    const size_t first = body.size() > static_cast<size_t>(n_text_rows) ? body.size() - n_text_rows : 0;
    for (size_t i = first; i < body.size(); ++i) out.push_back(fit(body[i], width));
    while (static_cast<int>(out.size()) < height) out.push_back(std::string(static_cast<size_t>(width), ' '));
    return out;
}

// The whole frame: a header line, then the clients in a grid of panels. With room for every
// client side by side they are columns; a narrow terminal stacks them.
std::string render_frame(const std::vector<std::unique_ptr<Client>>& clients, const coinfer::Engine& engine,
                         Clock::time_point t0, int64_t n_total_tokens) {
    const TermSize ts = term_size();
    const auto now = Clock::now();
    const coinfer::EngineStats st = engine.stats();
    const double elapsed = std::chrono::duration<double>(now - t0).count();
    const int n = static_cast<int>(clients.size());

    constexpr int k_min_col_width = 24;
    const int n_cols = std::clamp((ts.cols + 1) / (k_min_col_width + 1), 1, n);
    const int n_grid_rows = (n + n_cols - 1) / n_cols;
    const int col_width = std::max(8, (ts.cols - (n_cols - 1)) / n_cols);  // one column of '|' between
    const int panel_height = std::max(3, (ts.rows - 3) / n_grid_rows - 1);  // one separator row below each

    std::string f = "\x1b[H";  // cursor home; each line clears its own rest
    // Two short header lines rather than one long one, so an 80-column terminal shows them whole.
    const std::string header1 =
        fmt::format("coinfer multi_client | {} | {} clients | {} tok in {:.1f}s | {:.0f} tok/s total",
                    engine.backend_name(), n, n_total_tokens, elapsed, elapsed > 0 ? n_total_tokens / elapsed : 0.0);
    const std::string header2 =
        fmt::format("batch {} seqs (peak {}) | running {} waiting {} | KV {} used {} free | {:.0f} tok/s",
                    st.last_batch_seqs, st.peak_batch_seqs, st.n_running, st.n_waiting, st.kv_blocks_used,
                    st.kv_blocks_free, st.tokens_per_second);
    f += "\x1b[1;7m" + fit(header1, ts.cols) + "\x1b[0m\x1b[K\r\n";
    f += "\x1b[7m" + fit(header2, ts.cols) + "\x1b[0m\x1b[K\r\n";
    int n_lines = 2;
    for (int gr = 0; gr < n_grid_rows; ++gr) {
        std::vector<std::vector<std::string>> panels;
        for (int gc = 0; gc < n_cols; ++gc) {
            const int i = gr * n_cols + gc;
            if (i < n) panels.push_back(render_panel(*clients[static_cast<size_t>(i)], col_width, panel_height, now));
        }
        // At most rows - 1 lines end in a newline, so the screen never scrolls.
        for (int line = 0; line < panel_height && n_lines < ts.rows - 1; ++line, ++n_lines) {
            for (size_t p = 0; p < panels.size(); ++p) {
                if (p > 0) f += "\x1b[2m|\x1b[0m";
                f += panels[p][static_cast<size_t>(line)];
            }
            f += "\x1b[K\r\n";
        }
        if (n_lines < ts.rows - 1) {
            f += "\x1b[2m" + std::string(static_cast<size_t>(ts.cols), '-') + "\x1b[0m\x1b[K\r\n";
            ++n_lines;
        }
    }
    f += "\x1b[J";  // clear whatever an earlier, larger frame left below
    return f;
}

void write_all(std::string_view s) {
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    try {
        o = parse_options(argc, argv);
    } catch (const UsageError& e) {
        fmt::print(stderr, "multi_client: {}\n", e.what());
        return 2;
    }
    if (o.model.empty()) {
        auto p = coinfer::examples::default_model_path();
        if (!p) {
            coinfer::examples::print_no_model_help("multi_client", "-m PATH");
            return 2;
        }
        o.model = *p;
    }
    const bool live = !o.plain && isatty(STDOUT_FILENO);

    asio::io_context io;
    std::optional<coinfer::Engine> engine;
    try {
        coinfer::EngineOptions eo;
        eo.model = o.model;
        eo.device = o.device;
        eo.backend.n_threads = o.n_threads;
        engine.emplace(io.get_executor(), std::move(eo));
    } catch (const std::exception& e) {
        fmt::print(stderr, "multi_client: {}\n", e.what());
        return 1;
    }

    std::vector<std::unique_ptr<Client>> clients;
    for (int32_t i = 0; i < o.n_clients; ++i) {
        auto c = std::make_unique<Client>();
        c->index = i;
        c->prompt = k_prompts[static_cast<size_t>(i) % k_n_prompts];
        clients.push_back(std::move(c));
    }

    const auto t0 = Clock::now();
    int32_t n_running = o.n_clients;
    bool interrupted = false;
    asio::signal_set signals(io, SIGINT, SIGTERM);
    asio::steady_timer deadline(io);
    asio::steady_timer redraw(io);

    auto cancel_all = [&] {
        for (auto& c : clients) c->cancel.emit(asio::cancellation_type::terminal);
    };
    signals.async_wait([&](std::error_code ec, int) {
        if (ec) return;
        interrupted = true;
        cancel_all();
    });
    if (o.duration_s > 0) {
        deadline.expires_after(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.duration_s)));
        deadline.async_wait([&](std::error_code ec) {
            if (!ec) cancel_all();
        });
    }

    for (auto& cp : clients) {
        Client& c = *cp;
        asio::co_spawn(io, run_client(*engine, c, o),
                       asio::bind_cancellation_slot(c.cancel.slot(), [&](std::exception_ptr) {
                           // The last client to finish releases what keeps io.run() going.
                           if (--n_running == 0) {
                               signals.cancel();
                               deadline.cancel();
                               redraw.cancel();
                           }
                       }));
    }

    auto n_total_tokens = [&] {
        int64_t n = 0;
        for (auto& c : clients) n += c->n_tokens;
        return n;
    };
    if (live) {
        write_all("\x1b[?25l\x1b[2J");  // hide the cursor, clear once; frames then overwrite in place
        asio::co_spawn(io, [&]() -> asio::awaitable<void> {
            // At most ~20 frames a second, whatever the token rate.
            while (n_running > 0) {
                write_all(render_frame(clients, *engine, t0, n_total_tokens()));
                redraw.expires_after(std::chrono::milliseconds(50));
                std::error_code ec;
                co_await redraw.async_wait(asio::redirect_error(asio::use_awaitable, ec));
            }
        }, asio::detached);
    }

    try {
        io.run();
    } catch (const std::exception& e) {
        if (live) write_all("\x1b[0m\x1b[?25h\n");  // give the terminal its cursor back
        fmt::print(stderr, "multi_client: {}\n", e.what());
        return 1;
    }
    const auto t_end = Clock::now();
    if (live) {
        write_all(render_frame(clients, *engine, t0, n_total_tokens()));  // the final state stays on screen
        write_all("\x1b[0m\x1b[?25h\n");
    } else {
        for (auto& c : clients) {
            fmt::print("=== client {}: {}\n", c->index, c->prompt);
            fmt::print("{}{}\n\n", c->text, c->status == CLIENT_STATUS_ERROR ? "[error: " + c->error + "]" : "");
        }
    }

    const double elapsed = std::chrono::duration<double>(t_end - t0).count();
    const coinfer::EngineStats st = engine->stats();
    fmt::print("summary ({} clients, backend {}, peak batch {} seqs):\n", o.n_clients, engine->backend_name(),
               st.peak_batch_seqs);
    for (auto& c : clients) {
        fmt::print("client {}: {}, {} tokens, {:.1f} tok/s, finish={}{}\n", c->index, client_status_name(c->status),
                   c->n_tokens, c->tokens_per_second(t_end), coinfer::finish_reason_name(c->finish),
                   c->error.empty() ? "" : " (" + c->error + ")");
    }
    const int64_t n_tokens = n_total_tokens();
    fmt::print("total: {} tokens in {:.2f}s, {:.1f} tok/s\n", n_tokens, elapsed, elapsed > 0 ? n_tokens / elapsed : 0.0);
    std::fflush(stdout);
    if (interrupted) return 130;  // the usual status after SIGINT
    bool any_error = false;
    for (auto& c : clients) any_error |= c->status == CLIENT_STATUS_ERROR;
    return any_error ? 1 : 0;
}
