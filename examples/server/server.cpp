#include "server.h"

#include <deque>

#include <asio/experimental/as_tuple.hpp>
#include <fmt/format.h>

#include "io/error.h"

namespace coinfer::server {

namespace {

using Clock = std::chrono::steady_clock;
using asio::ip::tcp;
constexpr auto k_use_tuple = asio::experimental::as_tuple(asio::use_awaitable);
constexpr Clock::time_point k_never = Clock::time_point::max();

Clock::duration seconds(double s) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// How long a closing connection keeps reading (and dropping) what the client still sends, so
// that our last response is not destroyed by a TCP reset (the "lingering close").
constexpr double k_linger_s = 2.0;

}  // namespace

class Connection final : public Exchange, public std::enable_shared_from_this<Connection> {
public:
    Connection(tcp::socket sock, Server& server)
        : sock_(std::move(sock)),
          watchdog_(sock_.get_executor()),
          reader_wake_(sock_.get_executor()),
          handler_wake_(sock_.get_executor()),
          api_(server.api()),
          metrics_(server.metrics()),
          opt_(server.options()),
          parser_(opt_.limits) {}

    void start(std::shared_ptr<std::unordered_set<Connection*>> registry) {
        registry_ = std::move(registry);
        registry_->insert(this);
        metrics_.connection_opened();
        asio::error_code ec;
        sock_.set_option(tcp::no_delay(true), ec);  // SSE pieces are small; send them now
        read_deadline_ = Clock::now() + seconds(opt_.keep_alive_s);
        auto self = shared_from_this();
        asio::co_spawn(sock_.get_executor(), [self]() { return self->reader(); }, asio::detached);
        asio::co_spawn(sock_.get_executor(), [self]() { return self->handler(); }, asio::detached);
        asio::co_spawn(sock_.get_executor(), [self]() { return self->watchdog(); }, asio::detached);
    }

    void close() {
        if (closed_) return;
        closed_ = true;
        asio::error_code ec;
        sock_.shutdown(tcp::socket::shutdown_both, ec);
        sock_.close(ec);
        watchdog_.cancel();
        reader_wake_.cancel();
        handler_wake_.cancel();
        notify_peer_closed();
        metrics_.connection_closed();
        if (registry_) registry_->erase(this);
    }

    // Server::drain(): an idle connection closes now; a busy one after its current response.
    void begin_drain() {
        server_draining_ = true;
        if (!busy_ && queue_.empty() && !parser_.started()) {
            close();
            return;
        }
        handler_wake_.cancel();
    }

    // ---- Exchange ----
    const http::Request& request() const override { return current_; }
    Clock::time_point received_at() const override { return received_at_; }
    bool peer_closed() const override { return peer_closed_ || closed_; }
    void on_peer_closed(std::function<void()> hook) override { peer_hook_ = std::move(hook); }

    asio::awaitable<bool> respond(int status, std::string_view content_type, std::string_view body,
                                  std::string_view extra_headers) override {
        metrics_.count_response(status);
        // Named locals only across co_await: GCC 12 destroys some temporaries in a co_await
        // expression twice.
        std::string out = http::format_response(status, content_type, body, keep_alive_, extra_headers);
        if (current_.method == "HEAD") out.resize(out.size() - body.size());  // the headers GET would get
        const bool ok = co_await write(out);
        co_return ok;
    }

    asio::awaitable<bool> stream_begin(int status, std::string_view content_type) override {
        metrics_.count_response(status);
        chunked_ = current_.version_minor == 1;
        if (!chunked_) keep_alive_ = false;  // HTTP/1.0: the body ends when we close
        const std::string out = http::format_stream_head(status, content_type, chunked_, keep_alive_);
        const bool ok = co_await write(out);
        co_return ok;
    }

    asio::awaitable<bool> stream_write(std::string_view data) override {
        if (data.empty()) co_return !closed_;
        std::string out;
        if (chunked_) out = http::format_chunk(data);
        else out.assign(data);
        const bool ok = co_await write(out);
        co_return ok;
    }

    asio::awaitable<bool> stream_end() override {
        if (!chunked_) co_return !closed_;
        const std::string out = http::format_chunk({});
        const bool ok = co_await write(out);
        co_return ok;
    }

private:
    struct Item {
        http::Request req;
        Clock::time_point received;
        int error_status = 0;  // a parse error to answer, then close
        std::string error_message;
        size_t bytes = 0;      // of its body, held until it is answered
    };

    void notify_peer_closed() {
        if (auto hook = std::move(peer_hook_)) {
            peer_hook_ = nullptr;
            hook();
        }
    }

    // `data` must live until the write completes (callers pass a named local).
    asio::awaitable<bool> write(const std::string& data) {
        if (closed_) co_return false;
        write_deadline_ = Clock::now() + seconds(opt_.timeout_s);
        auto [ec, n] = co_await asio::async_write(sock_, asio::buffer(data), k_use_tuple);
        write_deadline_ = k_never;
        if (ec) {
            close();
            co_return false;
        }
        co_return true;
    }

    // Pipelining back-pressure: enough requests, or request bytes, are waiting to be answered.
    // With none waiting the next request is always read (its body up to --max-body-bytes).
    bool backlogged() const {
        return !queue_.empty() &&
               (queue_.size() >= opt_.max_pipelined || queued_bytes_ + inbuf_.size() >= opt_.max_buffered_bytes);
    }

    // Header and body timeouts run from a request's first byte and from the end of its head.
    void update_read_deadline() {
        const auto now = Clock::now();
        if (draining_) return;
        if (parser_.in_body()) {
            if (phase_ != PHASE_BODY) {
                phase_ = PHASE_BODY;
                read_deadline_ = now + seconds(opt_.timeout_s);
            }
        } else if (parser_.started()) {
            if (phase_ != PHASE_HEAD) {
                phase_ = PHASE_HEAD;
                read_deadline_ = now + seconds(opt_.timeout_s);
            }
        } else {
            phase_ = PHASE_IDLE;
            // A connection with a request in hand is not idle.
            read_deadline_ = (busy_ || !queue_.empty()) ? k_never : now + seconds(opt_.keep_alive_s);
        }
    }

    asio::awaitable<void> reader() {
        std::string buf(16 * 1024, '\0');
        for (;;) {
            // Parse whatever is buffered, up to the pipelining limits.
            while (!draining_ && !inbuf_.empty() && !backlogged()) {
                size_t n_used = 0;
                http::ParseStatus st = parser_.feed(inbuf_, n_used);
                inbuf_.erase(0, n_used);
                if (st == http::PARSE_STATUS_DONE) {
                    const size_t bytes = parser_.request().body.size();
                    queued_bytes_ += bytes;
                    queue_.push_back(Item{std::move(parser_.request()), Clock::now(), 0, {}, bytes});
                    parser_.reset();
                    phase_ = PHASE_IDLE;
                    handler_wake_.cancel();
                    continue;
                }
                if (st == http::PARSE_STATUS_ERROR) {
                    queue_.push_back(Item{{}, Clock::now(), parser_.error_status(), parser_.error_message()});
                    draining_ = true;  // what follows cannot be framed; drop it
                    inbuf_.clear();
                    handler_wake_.cancel();
                    break;
                }
                break;  // need more
            }
            if (draining_) inbuf_.clear();
            update_read_deadline();
            if (closed_) co_return;
            // 100-continue: only when nothing else is being answered, so it cannot interleave.
            if (!draining_ && parser_.in_body() && !busy_ && queue_.empty() && !sent_continue_) {
                auto expect = parser_.request().header("expect");
                sent_continue_ = true;
                if (expect && (*expect == "100-continue" || *expect == "100-Continue")) {
                    static const std::string k_continue = "HTTP/1.1 100 Continue\r\n\r\n";
                    const bool ok = co_await write(k_continue);
                    if (!ok) co_return;
                }
            }
            if (!parser_.in_body()) sent_continue_ = false;
            if (!draining_ && backlogged() && !inbuf_.empty()) {
                // Pipelining back-pressure: wait for the handler to take requests.
                reader_wake_.expires_at(k_never);
                co_await reader_wake_.async_wait(k_use_tuple);
                if (closed_) co_return;
                continue;
            }
            auto [ec, n] = co_await sock_.async_read_some(asio::buffer(buf), k_use_tuple);
            if (closed_) co_return;
            if (ec) {
                // EOF or reset: the client is gone. Its generation (if any) is cancelled now;
                // queued requests are still answered (a half-closed client can read them).
                peer_closed_ = true;
                notify_peer_closed();
                reader_done_ = true;
                handler_wake_.cancel();
                if (handler_done_ || (!busy_ && queue_.empty())) close();
                co_return;
            }
            if (!draining_) inbuf_.append(buf.data(), n);
        }
    }

    asio::awaitable<void> handler() {
        for (;;) {
            while (queue_.empty() && !reader_done_ && !closed_) {
                handler_wake_.expires_at(k_never);
                co_await handler_wake_.async_wait(k_use_tuple);
            }
            if (closed_ || queue_.empty()) break;
            Item item = std::move(queue_.front());
            queue_.pop_front();
            queued_bytes_ -= item.bytes;
            reader_wake_.cancel();
            busy_ = true;
            update_read_deadline();
            if (server_draining_) {
                current_ = std::move(item.req);
                keep_alive_ = false;
                received_at_ = item.received;
                co_await respond_error(503, "the server is shutting down");
                break;
            }
            if (item.error_status) {
                current_ = http::Request{};
                keep_alive_ = false;
                received_at_ = item.received;
                co_await respond_error(item.error_status, item.error_message);
                break;
            }
            current_ = std::move(item.req);
            received_at_ = item.received;
            keep_alive_ = current_.keep_alive;
            try {
                co_await api_.handle(*this);
            } catch (const std::exception& e) {
                // Api answers its own errors; this is a bug, and only this request pays for it.
                fmt::print(stderr, "coinfer serve: internal error: {}\n", e.what());
                close();
            }
            peer_hook_ = nullptr;
            busy_ = false;
            if (closed_ || !keep_alive_ || server_draining_) break;
            update_read_deadline();
        }
        handler_done_ = true;
        if (closed_) co_return;
        // Lingering close: stop sending, keep reading (and dropping) for a moment.
        asio::error_code ec;
        sock_.shutdown(tcp::socket::shutdown_send, ec);
        draining_ = true;
        inbuf_.clear();
        read_deadline_ = Clock::now() + seconds(k_linger_s);
        reader_wake_.cancel();
        if (reader_done_) close();
    }

    asio::awaitable<bool> respond_error(int status, const std::string& message) {
        const std::string body = error_json(status, message);
        const bool ok = co_await respond(status, "application/json", body, {});
        co_return ok;
    }

    // Written by hand (not through nlohmann): the message is ASCII from the parser.
    static std::string error_json(int status, const std::string& message) {
        std::string escaped;
        for (char c : message) {
            if (c == '"' || c == '\\') escaped += '\\';
            if (static_cast<unsigned char>(c) >= 0x20) escaped += c;
        }
        const char* type = status >= 500 ? "server_error" : "invalid_request_error";
        return fmt::format(R"({{"error":{{"message":"{}","type":"{}","param":null,"code":{}}}}})", escaped, type,
                           status);
    }

    asio::awaitable<void> watchdog() {
        const double tick = std::clamp(std::min(opt_.timeout_s, opt_.keep_alive_s) / 4, 0.05, 1.0);
        while (!closed_) {
            const auto now = Clock::now();
            if (now >= std::min(read_deadline_, write_deadline_)) {
                // A request that stopped arriving mid-head or mid-body hears 408 (when nothing
                // else is being written); an idle keep-alive connection just closes.
                if (now >= read_deadline_ && write_deadline_ == k_never && phase_ != PHASE_IDLE && !busy_ &&
                    queue_.empty() && !draining_) {
                    draining_ = true;
                    busy_ = true;
                    keep_alive_ = false;
                    current_ = http::Request{};
                    co_await respond_error(408, "the request did not arrive in time");
                }
                close();
                co_return;
            }
            watchdog_.expires_after(seconds(tick));
            co_await watchdog_.async_wait(k_use_tuple);
        }
    }

    enum Phase { PHASE_IDLE, PHASE_HEAD, PHASE_BODY };

    tcp::socket sock_;
    asio::steady_timer watchdog_;
    asio::steady_timer reader_wake_;   // the handler took a request (pipelining back-pressure)
    asio::steady_timer handler_wake_;  // a request was queued, or the reader stopped
    Api& api_;
    Metrics& metrics_;
    ServerOptions opt_;
    std::shared_ptr<std::unordered_set<Connection*>> registry_;

    http::Parser parser_;
    std::string inbuf_;
    std::deque<Item> queue_;
    Phase phase_ = PHASE_IDLE;
    Clock::time_point read_deadline_ = k_never;
    Clock::time_point write_deadline_ = k_never;

    http::Request current_;
    Clock::time_point received_at_;
    bool keep_alive_ = true;
    bool chunked_ = false;
    bool busy_ = false;
    bool sent_continue_ = false;
    bool draining_ = false;
    bool reader_done_ = false;
    bool peer_closed_ = false;
    bool closed_ = false;
    bool handler_done_ = false;
    bool server_draining_ = false;
    size_t queued_bytes_ = 0;
    std::function<void()> peer_hook_;

    friend class Server;
};

Server::Server(asio::io_context& io, Api& api, Metrics& metrics, ServerOptions opt)
    : io_(io),
      api_(api),
      metrics_(metrics),
      opt_(std::move(opt)),
      acceptor_(io),
      connections_(std::make_shared<std::unordered_set<Connection*>>()) {}

Server::~Server() = default;

void Server::start() {
    asio::error_code ec;
    auto addr = asio::ip::make_address(opt_.host, ec);
    if (ec) throw_error("--host '{}' is not an IP address", opt_.host);
    tcp::endpoint ep(addr, opt_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) throw_error("cannot listen on {}:{}: {}", opt_.host, opt_.port, ec.message());
    port_ = acceptor_.local_endpoint().port();
    asio::co_spawn(io_, accept_loop(), asio::detached);
}

asio::awaitable<void> Server::accept_loop() {
    while (!stopping_) {
        auto [ec, sock] = co_await acceptor_.async_accept(k_use_tuple);
        if (stopping_) co_return;
        if (ec) {
            if (ec == asio::error::operation_aborted) co_return;
            // EMFILE and the like: wait a moment instead of spinning.
            asio::steady_timer t(io_, std::chrono::milliseconds(50));
            co_await t.async_wait(k_use_tuple);
            continue;
        }
        if (connections_->size() >= opt_.max_connections) {
            // Over the cap: a short 503, then close (the client hears why instead of hanging
            // in the backlog).
            const auto now = Clock::now();
            if (now - last_refusal_log_ >= std::chrono::seconds(1)) {
                last_refusal_log_ = now;
                fmt::print(stderr, "coinfer serve: {} connections open (--max-connections), refusing new ones\n",
                           connections_->size());
            }
            auto s = std::make_shared<tcp::socket>(std::move(sock));
            static const std::string k_busy = http::format_response(
                503, "application/json",
                R"({"error":{"message":"too many open connections","type":"server_error","param":null,"code":503}})",
                false, "Retry-After: 1\r\n");
            asio::async_write(*s, asio::buffer(k_busy), [s](const asio::error_code&, size_t) {
                asio::error_code ec;
                s->shutdown(tcp::socket::shutdown_send, ec);
                s->close(ec);
            });
            continue;
        }
        auto conn = std::make_shared<Connection>(std::move(sock), *this);
        conn->start(connections_);
    }
}

void Server::drain() {
    stopping_ = true;
    asio::error_code ec;
    acceptor_.close(ec);
    std::vector<Connection*> conns(connections_->begin(), connections_->end());
    for (Connection* c : conns) c->begin_drain();
}

void Server::stop() {
    stopping_ = true;
    asio::error_code ec;
    acceptor_.close(ec);
    // Copy: close() removes from the set.
    std::vector<Connection*> conns(connections_->begin(), connections_->end());
    for (Connection* c : conns) c->close();
}

}  // namespace coinfer::server
