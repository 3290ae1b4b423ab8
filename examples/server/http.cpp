#include "http.h"

#include <fmt/format.h>

namespace coinfer::http {

namespace {

bool is_tchar(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
    switch (c) {
        case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+':
        case '-': case '.': case '^': case '_': case '`': case '|': case '~':
            return true;
        default:
            return false;
    }
}

bool is_vchar(unsigned char c) { return c >= 0x21 && c <= 0x7E; }
// field-vchar / obs-text / SP / HTAB (RFC 9110 5.5); CR, LF, NUL and other controls are not.
bool is_field_char(unsigned char c) { return is_vchar(c) || c >= 0x80 || c == ' ' || c == '\t'; }

char to_lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

std::string_view trim_ows(std::string_view s) {
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    return s;
}

bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (to_lower(a[i]) != to_lower(b[i])) return false;
    return true;
}

constexpr size_t k_max_method = 32;
constexpr size_t k_max_leading_crlf = 8;

}  // namespace

std::optional<std::string_view> Request::header(std::string_view lower_name) const {
    for (const auto& [k, v] : headers)
        if (k == lower_name) return std::string_view(v);
    return std::nullopt;
}

void Parser::reset() {
    state_ = STATE_START;
    req_ = Request{};
    n_head_ = 0;
    n_leading_crlf_ = 0;
    field_name_.clear();
    field_value_.clear();
    body_length_ = 0;
    error_status_ = 0;
    error_message_.clear();
}

ParseStatus Parser::fail(int status, std::string message) {
    state_ = STATE_ERROR;
    error_status_ = status;
    error_message_ = std::move(message);
    return PARSE_STATUS_ERROR;
}

bool Parser::finish_head() {
    // HTTP/1.1 needs exactly one Host (RFC 9112 3.2).
    int n_host = 0;
    std::optional<std::string_view> content_length;
    for (const auto& [k, v] : req_.headers) {
        if (k == "host") ++n_host;
        if (k == "transfer-encoding") {
            fail(501, "Transfer-Encoding is not supported; send the body with Content-Length");
            return false;
        }
        if (k == "content-length") {
            if (v.empty() || v.size() > 19) {
                fail(v.empty() ? 400 : 413, v.empty() ? "empty Content-Length" : "Content-Length is too large");
                return false;
            }
            for (char c : v)
                if (c < '0' || c > '9') {
                    fail(400, fmt::format("Content-Length '{}' is not a number", v));
                    return false;
                }
            if (content_length && *content_length != v) {
                fail(400, "conflicting Content-Length headers");
                return false;
            }
            content_length = v;
        }
    }
    if (req_.version_minor == 1 && n_host != 1) {
        fail(400, n_host == 0 ? "missing Host header" : "more than one Host header");
        return false;
    }
    body_length_ = 0;
    if (content_length) {
        uint64_t n = 0;
        for (char c : *content_length) n = n * 10 + static_cast<uint64_t>(c - '0');  // <= 19 digits: no overflow
        if (n > limits_.max_body_bytes) {
            fail(413, fmt::format("request body of {} bytes is larger than the limit of {} bytes", n,
                                  limits_.max_body_bytes));
            return false;
        }
        body_length_ = static_cast<size_t>(n);
    }
    // Connection: a comma-separated list of tokens; "close" anywhere wins.
    bool has_close = false, has_keep_alive = false;
    for (const auto& [k, v] : req_.headers) {
        if (k != "connection") continue;
        std::string_view rest = v;
        while (!rest.empty()) {
            size_t comma = rest.find(',');
            std::string_view tok = trim_ows(rest.substr(0, comma));
            has_close = has_close || iequals(tok, "close");
            has_keep_alive = has_keep_alive || iequals(tok, "keep-alive");
            rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
        }
    }
    req_.keep_alive = !has_close && (req_.version_minor == 1 || has_keep_alive);
    size_t q = req_.target.find('?');
    req_.path = req_.target.substr(0, q);
    req_.query = q == std::string::npos ? std::string() : req_.target.substr(q + 1);
    // Memory follows the bytes that arrive, not the Content-Length a client announces.
    req_.body.reserve(std::min<size_t>(body_length_, 64 * 1024));
    return true;
}

ParseStatus Parser::feed(std::string_view data, size_t& n_used) {
    n_used = 0;
    if (state_ == STATE_ERROR) return PARSE_STATUS_ERROR;
    if (state_ == STATE_DONE) return PARSE_STATUS_DONE;
    size_t i = 0;
    while (i < data.size()) {
        if (state_ == STATE_BODY) {
            size_t want = body_length_ - req_.body.size();
            size_t take = std::min(want, data.size() - i);
            req_.body.append(data.data() + i, take);
            i += take;
            if (req_.body.size() == body_length_) {
                state_ = STATE_DONE;
                break;
            }
            continue;
        }
        const unsigned char c = static_cast<unsigned char>(data[i]);
        ++i;
        if (++n_head_ > limits_.max_head_bytes) {
            n_used = i;
            return fail(431, fmt::format("request head is larger than {} bytes", limits_.max_head_bytes));
        }
        switch (state_) {
            case STATE_START:
                // RFC 9112 2.2: ignore empty lines before the request line (some clients send a
                // CRLF after a POST body).
                if (c == '\r' || c == '\n') {
                    if (c == '\n' && ++n_leading_crlf_ > k_max_leading_crlf) {
                        n_used = i;
                        return fail(400, "too many empty lines before the request line");
                    }
                    if (c == '\n') n_head_ = 0;
                    continue;
                }
                state_ = STATE_METHOD;
                [[fallthrough]];
            case STATE_METHOD:
                if (c == ' ' && !req_.method.empty()) {
                    state_ = STATE_TARGET;
                } else if (!is_tchar(c)) {
                    n_used = i;
                    return fail(400, "malformed request method");
                } else if (req_.method.size() >= k_max_method) {
                    n_used = i;
                    return fail(400, "request method is too long");
                } else {
                    req_.method.push_back(static_cast<char>(c));
                }
                break;
            case STATE_TARGET:
                if (c == ' ' && !req_.target.empty()) {
                    if (req_.target[0] != '/') {
                        n_used = i;
                        return fail(400, "request target must be an absolute path");
                    }
                    state_ = STATE_VERSION;
                } else if (!is_vchar(c)) {
                    n_used = i;
                    return fail(400, "malformed request target");
                } else {
                    req_.target.push_back(static_cast<char>(c));
                }
                break;
            case STATE_VERSION: {
                // field_value_ holds the version text while it is read.
                static constexpr std::string_view k_prefix = "HTTP/";
                const size_t k = field_value_.size();
                if (c == '\r') {
                    if (field_value_.size() != 8 || field_value_[6] != '.') {
                        n_used = i;
                        return fail(400, "malformed HTTP version");
                    }
                    if (field_value_[5] != '1') {
                        n_used = i;
                        return fail(505, "only HTTP/1.0 and HTTP/1.1 are supported");
                    }
                    if (field_value_[7] != '0' && field_value_[7] != '1') {
                        n_used = i;
                        return fail(505, "only HTTP/1.0 and HTTP/1.1 are supported");
                    }
                    req_.version_minor = field_value_[7] - '0';
                    field_value_.clear();
                    state_ = STATE_REQUEST_LINE_LF;
                    break;
                }
                bool ok = k < 5 ? c == static_cast<unsigned char>(k_prefix[k])
                                : (k == 5 || k == 7) ? (c >= '0' && c <= '9') : (k == 6 && c == '.');
                if (!ok) {
                    n_used = i;
                    return fail(400, "malformed HTTP version");
                }
                field_value_.push_back(static_cast<char>(c));
                break;
            }
            case STATE_REQUEST_LINE_LF:
                if (c != '\n') {
                    n_used = i;
                    return fail(400, "request line must end with CRLF");
                }
                state_ = STATE_FIELD_START;
                break;
            case STATE_FIELD_START:
                if (c == '\r') {
                    state_ = STATE_HEAD_LF;
                    break;
                }
                if (c == ' ' || c == '\t') {
                    n_used = i;
                    return fail(400, "obsolete header line folding is not accepted");
                }
                if (req_.headers.size() >= limits_.max_headers) {
                    n_used = i;
                    return fail(431, fmt::format("more than {} header fields", limits_.max_headers));
                }
                field_name_.clear();
                state_ = STATE_FIELD_NAME;
                [[fallthrough]];
            case STATE_FIELD_NAME:
                if (c == ':' && !field_name_.empty()) {
                    field_value_.clear();
                    state_ = STATE_FIELD_VALUE_START;
                } else if (!is_tchar(c)) {
                    n_used = i;
                    return fail(400, "malformed header field name");
                } else {
                    field_name_.push_back(to_lower(static_cast<char>(c)));
                }
                break;
            case STATE_FIELD_VALUE_START:
                if (c == ' ' || c == '\t') break;
                state_ = STATE_FIELD_VALUE;
                [[fallthrough]];
            case STATE_FIELD_VALUE:
                if (c == '\r') {
                    state_ = STATE_FIELD_LF;
                } else if (!is_field_char(c)) {
                    n_used = i;
                    return fail(400, fmt::format("invalid character in header '{}'", field_name_));
                } else {
                    field_value_.push_back(static_cast<char>(c));
                }
                break;
            case STATE_FIELD_LF:
                if (c != '\n') {
                    n_used = i;
                    return fail(400, "header line must end with CRLF");
                }
                req_.headers.emplace_back(std::move(field_name_), std::string(trim_ows(field_value_)));
                field_name_.clear();
                field_value_.clear();
                state_ = STATE_FIELD_START;
                break;
            case STATE_HEAD_LF:
                if (c != '\n') {
                    n_used = i;
                    return fail(400, "header section must end with CRLF");
                }
                if (!finish_head()) {
                    n_used = i;
                    return PARSE_STATUS_ERROR;
                }
                state_ = body_length_ == 0 ? STATE_DONE : STATE_BODY;
                break;
            case STATE_BODY:
            case STATE_DONE:
            case STATE_ERROR:
                break;  // not reached
        }
        if (state_ == STATE_DONE) break;
    }
    n_used = i;
    return state_ == STATE_DONE ? PARSE_STATUS_DONE : PARSE_STATUS_NEED_MORE;
}

std::string_view status_reason(int status) {
    switch (status) {
        case 100: return "Continue";
        case 200: return "OK";
        case 204: return "No Content";
        case 400: return "Bad Request";
        case 401: return "Unauthorized";
        case 403: return "Forbidden";
        case 404: return "Not Found";
        case 405: return "Method Not Allowed";
        case 408: return "Request Timeout";
        case 413: return "Content Too Large";
        case 415: return "Unsupported Media Type";
        case 429: return "Too Many Requests";
        case 431: return "Request Header Fields Too Large";
        case 500: return "Internal Server Error";
        case 501: return "Not Implemented";
        case 503: return "Service Unavailable";
        case 505: return "HTTP Version Not Supported";
        default: return "Unknown";
    }
}

std::string format_response(int status, std::string_view content_type, std::string_view body, bool keep_alive,
                            std::string_view extra_headers) {
    std::string out = fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}{}\r\n", status,
                                  status_reason(status), content_type, body.size(),
                                  keep_alive ? "" : "Connection: close\r\n", extra_headers);
    out += body;
    return out;
}

std::string format_stream_head(int status, std::string_view content_type, bool chunked, bool keep_alive) {
    return fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\nCache-Control: no-cache\r\n{}{}\r\n", status,
                       status_reason(status), content_type, chunked ? "Transfer-Encoding: chunked\r\n" : "",
                       keep_alive && chunked ? "" : "Connection: close\r\n");
}

std::string format_chunk(std::string_view data) {
    if (data.empty()) return "0\r\n\r\n";
    std::string out = fmt::format("{:x}\r\n", data.size());
    out += data;
    out += "\r\n";
    return out;
}

}  // namespace coinfer::http
