#pragma once
// A small strict HTTP/1.1 request parser (RFC 9112) and response writer for `coinfer serve`.
//
// The parser is a resumable byte-at-a-time state machine: feed it whatever bytes arrived and it
// says how many it used and whether a whole request (head and body) is ready. Anything outside
// the grammar is an error with the status to answer (400, 413, 431, 501, 505); the caller sends
// it and closes the connection. It never throws on input and never reads past what it is given.
//
// Deliberately not accepted: obs-fold header continuations, bare LF line ends, whitespace
// before the colon, Transfer-Encoding (501: bodies need Content-Length), conflicting
// Content-Length values, absolute-form targets other than on the path, HTTP/2 prefaces.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace coinfer::http {

struct Limits {
    size_t max_head_bytes = 16 * 1024;  // request line and headers together (431 beyond)
    size_t max_headers = 100;           // header fields (431 beyond)
    size_t max_body_bytes = 1 << 20;    // Content-Length above this is 413
};

struct Request {
    std::string method;  // "GET", "POST", ...
    std::string target;  // as sent: "/v1/completions?x=1"
    std::string path;    // target without the query
    std::string query;   // after '?', without it
    int version_minor = 1;  // HTTP/1.x
    std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased, values trimmed
    std::string body;
    bool keep_alive = true;

    // The value of the first header with this (lower-case) name.
    std::optional<std::string_view> header(std::string_view lower_name) const;
};

enum ParseStatus {
    PARSE_STATUS_NEED_MORE,  // all input used, the request is not complete yet
    PARSE_STATUS_DONE,       // a request is ready in request(); call reset() before the next one
    PARSE_STATUS_ERROR,      // malformed; error_status() and error_message() say why
};

class Parser {
public:
    explicit Parser(Limits limits = {}) : limits_(limits) {}

    // Consumes bytes from `data` and returns the new status. `n_used` is how many bytes were
    // taken: on DONE the rest belongs to the next (pipelined) request.
    ParseStatus feed(std::string_view data, size_t& n_used);

    // True once a request's first byte has been seen (for the header timeout).
    bool started() const { return state_ != STATE_START || n_head_ > 0; }
    // True once the head is complete and only the body is awaited.
    bool in_body() const { return state_ == STATE_BODY; }

    Request& request() { return req_; }
    int error_status() const { return error_status_; }
    const std::string& error_message() const { return error_message_; }

    void reset();  // ready for the next request on the connection

private:
    enum State {
        STATE_START,  // before the request line (leading CRLFs are skipped)
        STATE_METHOD,
        STATE_TARGET,
        STATE_VERSION,
        STATE_REQUEST_LINE_LF,
        STATE_FIELD_START,  // a field name or the CRLF that ends the head
        STATE_FIELD_NAME,
        STATE_FIELD_VALUE_START,
        STATE_FIELD_VALUE,
        STATE_FIELD_LF,
        STATE_HEAD_LF,
        STATE_BODY,
        STATE_DONE,
        STATE_ERROR,
    };

    ParseStatus fail(int status, std::string message);
    bool finish_head();  // checks framing headers; false after fail()

    Limits limits_;
    State state_ = STATE_START;
    Request req_;
    size_t n_head_ = 0;        // head bytes seen
    size_t n_leading_crlf_ = 0;
    std::string field_name_, field_value_;
    size_t body_length_ = 0;
    int error_status_ = 0;
    std::string error_message_;
};

// The reason phrase of a status code ("Not Found").
std::string_view status_reason(int status);

// A whole response with Content-Length. `extra_headers` are complete "Name: value\r\n" lines.
std::string format_response(int status, std::string_view content_type, std::string_view body, bool keep_alive,
                            std::string_view extra_headers = {});

// The head of a streamed response: chunked on HTTP/1.1, close-delimited on HTTP/1.0.
std::string format_stream_head(int status, std::string_view content_type, bool chunked, bool keep_alive);
// One chunk of a chunked body ("" gives the last chunk).
std::string format_chunk(std::string_view data);

}  // namespace coinfer::http
