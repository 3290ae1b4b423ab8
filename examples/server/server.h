#pragma once
// `coinfer serve`: an HTTP/1.1 server on Asio C++20 coroutines, sharing one io_context with the
// engine's completion handlers (the engine's step loop runs on its own thread).
//
// Each connection runs three coroutines:
//   reader   - reads and parses requests into a bounded queue (pipelining), and notices the
//              peer closing at any time, which cancels the request being generated;
//   handler  - answers the queued requests one at a time, in order (through Api);
//   watchdog - closes the connection when a header, body, write or keep-alive deadline passes.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#include <string_view>
#include <unordered_set>

#include <asio.hpp>

#include "http.h"
#include "io/chat_template.h"
#include "metrics.h"
#include "router.h"
#include "scheduler/engine.h"

namespace coinfer::server {

struct ServerOptions {
    std::string host = "127.0.0.1";
    uint16_t port = 8080;           // 0: any free port (see Server::port())
    http::Limits limits;            // head size, header count, body size
    double timeout_s = 30;          // header and body read timeouts, and a stalled write
    double keep_alive_s = 60;       // an idle keep-alive connection is closed after this
    size_t max_pipelined = 64;      // parsed requests queued per connection before reading pauses
    size_t max_buffered_bytes = size_t(4) << 20;  // request bytes held per connection before reading pauses
    size_t max_connections = 1024;  // open connections; more are answered 503 and closed
};

struct ApiOptions {
    std::string model_name;          // the id in /v1/models and responses
    std::optional<std::string> api_key;
    int32_t n_ctx = 0;               // the engine's per-request context
    size_t max_logit_bias = 300;     // logit_bias entries a request may give (OpenAI's cap)
    size_t max_stop_bytes = 1024;    // all of a request's stop strings together
    std::vector<std::string> allowed_origins;  // browser origins served besides the page's own; "*": any
};

// One request and its response, as the API sees them.
class Exchange {
public:
    virtual ~Exchange() = default;
    virtual const http::Request& request() const = 0;
    // When the request's last byte arrived.
    virtual std::chrono::steady_clock::time_point received_at() const = 0;
    // A whole response. False when the connection failed (the caller just returns).
    virtual asio::awaitable<bool> respond(int status, std::string_view content_type, std::string_view body,
                                          std::string_view extra_headers = {}) = 0;
    // A streamed response: the head, then pieces of body, then the end.
    virtual asio::awaitable<bool> stream_begin(int status, std::string_view content_type) = 0;
    virtual asio::awaitable<bool> stream_write(std::string_view data) = 0;
    virtual asio::awaitable<bool> stream_end() = 0;
    // True once the peer has closed or reset the connection.
    virtual bool peer_closed() const = 0;
    // Called (once) if the peer closes while it is set; the API cancels its generation there.
    virtual void on_peer_closed(std::function<void()> hook) = 0;
};

class Api {
public:
    // Requests go to the router's replicas (one engine, or data parallel replicas).
    Api(Router& router, ChatTemplate chat, Metrics& metrics, ApiOptions opt);
    asio::awaitable<void> handle(Exchange& ex);

    struct Impl;

private:
    std::shared_ptr<Impl> impl_;
};

class Connection;

class Server {
public:
    Server(asio::io_context& io, Api& api, Metrics& metrics, ServerOptions opt);
    ~Server();
    // Binds and listens; throws coinfer::Error when the address cannot be used.
    void start();
    uint16_t port() const { return port_; }
    // Stops accepting and closes every connection (their requests are cancelled).
    void stop();
    // Graceful shutdown, first part: stops accepting; idle connections close now, busy ones
    // after their current response (requests queued behind it get 503).
    void drain();
    size_t open_connections() const { return connections_->size(); }

    Api& api() { return api_; }
    Metrics& metrics() { return metrics_; }
    const ServerOptions& options() const { return opt_; }

private:
    asio::awaitable<void> accept_loop();

    asio::io_context& io_;
    Api& api_;
    Metrics& metrics_;
    ServerOptions opt_;
    asio::ip::tcp::acceptor acceptor_;
    uint16_t port_ = 0;
    bool stopping_ = false;
    std::chrono::steady_clock::time_point last_refusal_log_{};
    // Open connections, so stop() can close them. Shared: a connection may outlive the server
    // object if the io_context is torn down with coroutines still suspended.
    std::shared_ptr<std::unordered_set<Connection*>> connections_;
};

}  // namespace coinfer::server
