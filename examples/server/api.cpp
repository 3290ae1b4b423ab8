// The HTTP endpoints of `coinfer serve`: OpenAI's /v1/completions, /v1/chat/completions and
// /v1/models, plus /health, /metrics, /tokenize, /detokenize and the web page at /.
//
// Every request body is checked field by field before anything reaches the engine: a wrong type,
// a NaN or out-of-range number, or an unknown token id is a 400 naming the field.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <ctime>
#include <limits>
#include <mutex>
#include <random>
#include <string_view>
#include <thread>
#include <variant>

#include <asio/experimental/as_tuple.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "index_html.h"  // generated from server/web/index.html
#include "server.h"
#include "tools.h"
#include "engine/grammar.h"

namespace coinfer::server {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
constexpr auto k_use_tuple = asio::experimental::as_tuple(asio::use_awaitable);
constexpr int k_max_json_depth = 64;
constexpr size_t k_max_stops = 16;

// A request we refuse, in OpenAI's error shape.
struct ApiError {
    int status;
    std::string message;
    std::string param;
    std::string code;
};

[[noreturn]] void bad(std::string param, std::string message) {
    throw ApiError{400, std::move(message), std::move(param), {}};
}

std::string dump(const json& j) {
    // Generated text is valid UTF-8 by construction, but never let a stray byte throw here.
    return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string error_json(const ApiError& e) {
    const char* type = "invalid_request_error";
    if (e.status == 401) type = "authentication_error";
    else if (e.status == 404) type = "not_found_error";
    else if (e.status == 429) type = "rate_limit_error";
    else if (e.status >= 500) type = "server_error";
    json err = {{"message", e.message},
                {"type", type},
                {"param", e.param.empty() ? json(nullptr) : json(e.param)},
                {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
    return dump(json{{"error", err}});
}

// Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool valid_utf8(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        size_t n = 0;
        uint32_t cp = 0;
        if (c < 0x80) {
            ++i;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 1, cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2, cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3, cp = c & 0x07;
        } else {
            return false;
        }
        for (size_t k = 1; k <= n; ++k) {
            if (i + k >= s.size()) return false;
            const unsigned char d = static_cast<unsigned char>(s[i + k]);
            if ((d & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (d & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += n + 1;
    }
    return true;
}

// The deepest nesting of arrays and objects in a JSON text and how many values it holds (the
// commas and containers outside strings), one linear pass. Malformed text is left to the parser.
struct JsonShape {
    int depth = 0;
    size_t values = 0;
};
JsonShape json_shape(std::string_view s) {
    JsonShape r;
    int depth = 0;
    bool in_string = false;
    size_t commas = 0, containers = 0;
    for (size_t i = 0; i < s.size(); ++i) {
        const char ch = s[i];
        if (in_string) {
            if (ch == '\\') ++i;
            else if (ch == '"') in_string = false;
        } else if (ch == '"') {
            in_string = true;
        } else if (ch == '[' || ch == '{') {
            r.depth = std::max(r.depth, ++depth);
            ++containers;
        } else if (ch == ']' || ch == '}') {
            --depth;
        } else if (ch == ',') {
            ++commas;
        }
    }
    r.values = commas + containers + 1;
    return r;
}

// max_values: the most JSON values a body may hold (a prompt of token ids is the largest legitimate
// array); more are refused before parsing, which would cost ~0.25 us a value on this thread.
json parse_body(const std::string& body, size_t max_values) {
    if (body.empty()) bad("", "the request body is empty; send a JSON object");
    // JSON text never holds a raw NUL (not even in strings), and the parser would stop reading
    // at one, taking the bytes before it for the whole request.
    if (body.find('\0') != std::string::npos) bad("", "invalid JSON: the body contains a NUL byte");
    // Depth is limited so that hostile nesting cannot exhaust the stack (nlohmann destroys
    // values recursively). Checked before parsing: a parser callback would make nlohmann
    // re-check a parent array after every element, quadratic in a wide array.
    const JsonShape shape = json_shape(body);
    if (shape.depth > k_max_json_depth) bad("", fmt::format("JSON nested deeper than {}", k_max_json_depth));
    if (shape.values > max_values)
        bad("", fmt::format("the body holds {} JSON values; at most {} (arrays and messages beyond the context)",
                            shape.values, max_values));
    json j;
    try {
        j = json::parse(body);
    } catch (const json::exception& e) {
        bad("", fmt::format("invalid JSON: {}", e.what()));
    }
    if (!j.is_object()) bad("", "the request body must be a JSON object");
    return j;
}

// A field's value, or nullptr when it is absent or null (OpenAI treats both as "default").
const json* field(const json& body, const char* name) {
    auto it = body.find(name);
    if (it == body.end() || it->is_null()) return nullptr;
    return &*it;
}

std::optional<double> opt_number(const json& body, const char* name, double lo, double hi, bool lo_open = false) {
    const json* f = field(body, name);
    if (!f) return std::nullopt;
    if (!f->is_number()) bad(name, fmt::format("'{}' must be a number", name));
    const double v = f->get<double>();
    if (!std::isfinite(v) || v < lo || v > hi || (lo_open && v == lo))
        bad(name, fmt::format("'{}' must be {} {} and at most {} (got {})", name, lo_open ? "above" : "at least", lo,
                              hi, f->dump()));
    return v;
}

std::optional<int64_t> opt_int(const json& body, const char* name, int64_t lo, int64_t hi) {
    const json* f = field(body, name);
    if (!f) return std::nullopt;
    if (!f->is_number_integer()) bad(name, fmt::format("'{}' must be an integer", name));
    if (f->is_number_unsigned()) {
        const uint64_t u = f->get<uint64_t>();
        if (u > static_cast<uint64_t>(hi)) bad(name, fmt::format("'{}' must be at most {} (got {})", name, hi, u));
        return static_cast<int64_t>(u);
    }
    const int64_t v = f->get<int64_t>();
    if (v < lo || v > hi) bad(name, fmt::format("'{}' must be between {} and {} (got {})", name, lo, hi, v));
    return v;
}

std::optional<bool> opt_bool(const json& body, const char* name) {
    const json* f = field(body, name);
    if (!f) return std::nullopt;
    if (!f->is_boolean()) bad(name, fmt::format("'{}' must be true or false", name));
    return f->get<bool>();
}

std::optional<std::string> opt_string(const json& body, const char* name) {
    const json* f = field(body, name);
    if (!f) return std::nullopt;
    if (!f->is_string()) bad(name, fmt::format("'{}' must be a string", name));
    std::string s = f->get<std::string>();
    if (!valid_utf8(s)) bad(name, fmt::format("'{}' is not valid UTF-8", name));
    return s;
}

std::vector<TokenId> token_array(const json& arr, const char* name, int32_t n_vocab) {
    std::vector<TokenId> ids;
    ids.reserve(arr.size());
    for (const json& t : arr) {
        if (!t.is_number_integer()) bad(name, fmt::format("'{}' must hold token ids (integers)", name));
        const bool neg = !t.is_number_unsigned() && t.get<int64_t>() < 0;
        if (neg || t.get<uint64_t>() >= static_cast<uint64_t>(n_vocab))
            bad(name, fmt::format("token id {} in '{}' is outside the vocabulary (0..{})", t.dump(), name, n_vocab - 1));
        ids.push_back(static_cast<TokenId>(t.get<int64_t>()));
    }
    return ids;
}

bool is_token_array(const json& j) {
    if (!j.is_array() || j.empty()) return false;
    for (const json& t : j)
        if (!t.is_number()) return false;
    return true;
}

template <typename Rng>
std::string random_hex(Rng&& next, int n) {
    std::string s;
    while (static_cast<int>(s.size()) < n) s += fmt::format("{:016x}", next());
    return s.substr(0, static_cast<size_t>(n));
}

// got == key, in a time that depends on the key's length only: no early exit on a length
// mismatch or on the first differing byte.
bool constant_time_equal(std::string_view got, std::string_view key) {
    unsigned diff = got.size() == key.size() ? 0u : 1u;
    for (size_t i = 0; i < key.size(); ++i) {
        const unsigned char g = i < got.size() ? static_cast<unsigned char>(got[i]) : 0;
        diff |= g ^ static_cast<unsigned char>(key[i]);
    }
    return diff == 0;
}

// The credentials of an "Authorization: Bearer KEY" header: the scheme matched without regard
// to case (RFC 9110), spaces around the key dropped.
std::optional<std::string_view> bearer_token(std::string_view h) {
    while (!h.empty() && h.front() == ' ') h.remove_prefix(1);
    constexpr std::string_view scheme = "bearer";
    if (h.size() <= scheme.size() || h[scheme.size()] != ' ') return std::nullopt;
    for (size_t i = 0; i < scheme.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(h[i])) != scheme[i]) return std::nullopt;
    h.remove_prefix(scheme.size());
    while (!h.empty() && h.front() == ' ') h.remove_prefix(1);
    while (!h.empty() && h.back() == ' ') h.remove_suffix(1);
    return h;
}

// What one generation request asks for, after validation.
struct GenSpec {
    Request req;
    bool chat = false;
    bool stream = false;
    bool include_usage = false;
    int32_t n_logprobs = -1;  // completions: top-n logprobs per token; -1: none
    bool chat_logprobs = false;
    int32_t n_chat_top = 0;
    server::Tools tools;  // chat: function tools; when active the text is held back and parsed
};

}  // namespace

struct Api::Impl {
    Router& router;
    ChatTemplate chat;
    Metrics& metrics;
    ApiOptions opt;
    const int64_t started = static_cast<int64_t>(std::time(nullptr));
    std::mutex rng_mutex;  // rng serves the workers and the io thread alike (see random())
    std::mt19937_64 rng{std::random_device{}()};
    // Request bodies are parsed, templated and tokenized here, off the io thread, so that a
    // megabyte of JSON delays no one's tokens (see handle()). Declared last: destroyed (joined)
    // first, while everything its work touches is still there.
    asio::thread_pool workers;

    Impl(Router& r, ChatTemplate c, Metrics& m, ApiOptions o)
        : router(r),
          chat(std::move(c)),
          metrics(m),
          opt(std::move(o)),
          workers(std::clamp<size_t>(std::thread::hardware_concurrency() / 2, 1, 8)) {}

    // Seeds and ids, from the workers and the io thread alike.
    uint64_t random() {
        std::lock_guard lock(rng_mutex);
        return rng();
    }

    const Tokenizer& tokenizer() const { return router.model().tokenizer(); }
    int32_t n_vocab() const { return tokenizer().n_vocab(); }

    asio::awaitable<void> handle(Exchange& ex);
    std::variant<struct Reply, GenSpec> route(const http::Request& r);
    asio::awaitable<void> generate(Exchange& ex, GenSpec& g);  // g must outlive it

    // `raw`: the body's text, for what must keep its member order (JSON schemas).
    void parse_sampling(const json& body, std::string_view raw, GenSpec& g);
    void parse_constraint(const json& body, std::string_view raw, GenSpec& g);
    GenSpec parse_completion(const json& body, std::string_view raw);
    GenSpec parse_chat(const json& body, std::string_view raw);
    void refuse_if_cannot_fit(std::string_view text, const char* param) const;
    bool origin_allowed(std::string_view origin, std::optional<std::string_view> host) const;
    std::string piece(TokenId id) const { return tokenizer().token_to_piece(id, true); }

};

Api::Api(Router& router, ChatTemplate chat, Metrics& metrics, ApiOptions opt)
    : impl_(std::make_shared<Impl>(router, std::move(chat), metrics, std::move(opt))) {}

asio::awaitable<void> Api::handle(Exchange& ex) { return impl_->handle(ex); }

// ---- request bodies ----

// Structured output: OpenAI's response_format (json_object, json_schema), llama.cpp's grammar
// and json_schema fields. Checked here, on a worker, so a bad one is a 400 naming its field.
void Api::Impl::parse_constraint(const json& body, std::string_view raw, GenSpec& g) {
    // A schema's properties come in the order the client wrote them (the document follows it),
    // so schemas are taken from an order-keeping parse of the body.
    std::optional<nlohmann::ordered_json> ordered;
    auto schema_text = [&](std::initializer_list<const char*> path) {
        if (!ordered) ordered = nlohmann::ordered_json::parse(raw);
        const nlohmann::ordered_json* at = &*ordered;
        for (const char* k : path) at = &(*at)[k];
        return at->dump();
    };
    int n_given = 0;
    const char* param = nullptr;
    if (const json* f = field(body, "response_format")) {
        if (!f->is_object() || !f->contains("type") || !(*f)["type"].is_string())
            bad("response_format", "'response_format' must be an object with a 'type'");
        const std::string type = (*f)["type"].get<std::string>();
        if (type == "json_object") {
            // llama.cpp's extension: a schema beside json_object.
            const auto it = f->find("schema");
            g.req.json_schema = it != f->end() ? schema_text({"response_format", "schema"}) : R"({"type":"object"})";
            ++n_given;
        } else if (type == "json_schema") {
            const auto js = f->find("json_schema");
            if (js == f->end() || !js->is_object() || !js->contains("schema") ||
                !((*js)["schema"].is_object() || (*js)["schema"].is_boolean()))
                bad("response_format", "response_format json_schema needs {\"json_schema\": {\"schema\": {...}}}");
            g.req.json_schema = schema_text({"response_format", "json_schema", "schema"});
            ++n_given;
        } else if (type != "text") {
            bad("response_format", fmt::format("response_format type '{}' is not one of text, json_object, json_schema", type));
        }
        param = "response_format";
    }
    if (const json* f = field(body, "json_schema")) {
        if (!f->is_object()) bad("json_schema", "'json_schema' must be a schema object");
        g.req.json_schema = schema_text({"json_schema"});
        ++n_given;
        param = "json_schema";
    }
    if (const json* f = field(body, "grammar")) {
        if (!f->is_string()) bad("grammar", "'grammar' must be a string of GBNF");
        g.req.grammar = f->get<std::string>();
        ++n_given;
        param = "grammar";
    }
    if (n_given > 1) bad(param, "give one of response_format, json_schema and grammar");
    try {
        // Compiled here, off the io thread; the engine finds it in the cache.
        if (!g.req.json_schema.empty()) (void)Grammar::cached_json_schema(g.req.json_schema);
        if (!g.req.grammar.empty()) (void)Grammar::cached_gbnf(g.req.grammar);
    } catch (const Error& e) {
        bad(param, e.what());
    }
}

void Api::Impl::parse_sampling(const json& body, std::string_view raw, GenSpec& g) {
    SamplingParams& sp = g.req.sampling;
    sp.temperature = static_cast<float>(opt_number(body, "temperature", 0, 100).value_or(1.0));
    sp.top_p = static_cast<float>(opt_number(body, "top_p", 0, 1, true).value_or(1.0));
    const int64_t top_k = opt_int(body, "top_k", -1, INT32_MAX).value_or(0);
    sp.top_k = top_k < 0 ? 0 : static_cast<int32_t>(top_k);  // -1 is vLLM's "off"
    sp.min_p = static_cast<float>(opt_number(body, "min_p", 0, 1).value_or(0.0));
    sp.presence_penalty = static_cast<float>(opt_number(body, "presence_penalty", -2, 2).value_or(0.0));
    sp.frequency_penalty = static_cast<float>(opt_number(body, "frequency_penalty", -2, 2).value_or(0.0));
    sp.repeat_penalty = static_cast<float>(opt_number(body, "repetition_penalty", 0, 10, true).value_or(1.0));
    if (const json* f = field(body, "seed")) {
        if (!f->is_number_integer()) bad("seed", "'seed' must be an integer");
        sp.seed = f->is_number_unsigned() ? f->get<uint64_t>() : static_cast<uint64_t>(f->get<int64_t>());
    } else {
        sp.seed = random();
    }
    if (const json* f = field(body, "logit_bias")) {
        if (!f->is_object()) bad("logit_bias", "'logit_bias' must be an object mapping token ids to biases");
        if (f->size() > opt.max_logit_bias)
            bad("logit_bias", fmt::format("logit_bias has {} entries; at most {} (--max-logit-bias)", f->size(),
                                          opt.max_logit_bias));
        for (const auto& [key, val] : f->items()) {
            int64_t id = -1;
            auto [p, ec] = std::from_chars(key.data(), key.data() + key.size(), id);
            if (ec != std::errc() || p != key.data() + key.size() || id < 0 || id >= n_vocab())
                bad("logit_bias", fmt::format("logit_bias key '{}' is not a token id in 0..{}", key, n_vocab() - 1));
            if (!val.is_number() || !std::isfinite(val.get<double>()) || std::fabs(val.get<double>()) > 100)
                bad("logit_bias", fmt::format("logit_bias for token {} must be a number in -100..100", id));
            sp.logit_bias.emplace_back(static_cast<int32_t>(id), static_cast<float>(val.get<double>()));
        }
    }
    if (const json* f = field(body, "stop")) {
        if (f->is_string()) {
            g.req.stop.push_back(f->get<std::string>());
        } else if (f->is_array()) {
            if (f->size() > k_max_stops) bad("stop", fmt::format("at most {} stop strings", k_max_stops));
            for (const json& s : *f) {
                if (!s.is_string()) bad("stop", "'stop' must be a string or a list of strings");
                g.req.stop.push_back(s.get<std::string>());
            }
        } else {
            bad("stop", "'stop' must be a string or a list of strings");
        }
        size_t bytes = 0;
        for (const std::string& st : g.req.stop) bytes += st.size();
        if (bytes > opt.max_stop_bytes)
            bad("stop", fmt::format("the stop strings hold {} bytes; at most {} together (--max-stop-bytes)", bytes,
                                    opt.max_stop_bytes));
    }
    parse_constraint(body, raw, g);
    g.req.ignore_eos = opt_bool(body, "ignore_eos").value_or(false);
    g.stream = opt_bool(body, "stream").value_or(false);
    if (const json* f = field(body, "stream_options")) {
        if (!f->is_object()) bad("stream_options", "'stream_options' must be an object");
        g.include_usage = opt_bool(*f, "include_usage").value_or(false);
    }
    if (auto n = opt_int(body, "n", 1, 1000); n && *n != 1) bad("n", "only n = 1 is supported");
    if (auto n = opt_int(body, "best_of", 1, 1000); n && *n != 1) bad("best_of", "only best_of = 1 is supported");
    if (opt_bool(body, "echo").value_or(false)) bad("echo", "echo is not supported");
    try {
        sp.validate();
    } catch (const Error& e) {
        bad("", e.what());
    }
}

// The page's own origin: scheme://HOST where HOST is the Host header; else one listed in
// --allowed-origins ("*": any).
bool Api::Impl::origin_allowed(std::string_view origin, std::optional<std::string_view> host) const {
    for (const std::string& a : opt.allowed_origins)
        if (a == "*" || a == origin) return true;
    const size_t sep = origin.find("://");
    return host && sep != std::string_view::npos && origin.substr(sep + 3) == *host;
}

// A prompt whose byte length alone shows it cannot fit the context is refused before it is
// tokenized (tokenizing a megabyte takes the thread for a while, to end in the same 400).
void Api::Impl::refuse_if_cannot_fit(std::string_view text, const char* param) const {
    const size_t per_token = tokenizer().vocab().max_token_bytes;
    if (per_token == 0 || opt.n_ctx <= 0) return;
    if (text.size() > size_t(opt.n_ctx) * per_token)
        throw ApiError{400,
                       fmt::format("the prompt's {} bytes need more than the context's {} tokens (no token spells "
                                   "more than {} bytes)",
                                   text.size(), opt.n_ctx, per_token),
                       param, "context_length_exceeded"};
}

GenSpec Api::Impl::parse_completion(const json& body, std::string_view raw) {
    GenSpec g;
    const json* p = field(body, "prompt");
    if (!p) bad("prompt", "'prompt' is required");
    // A list of one prompt is accepted (that is what many clients send).
    if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];
    if (p->is_string()) {
        g.req.prompt = p->get<std::string>();
        if (!valid_utf8(g.req.prompt)) bad("prompt", "'prompt' is not valid UTF-8");
        refuse_if_cannot_fit(g.req.prompt, "prompt");
    } else if (is_token_array(*p)) {
        g.req.prompt_ids = token_array(*p, "prompt", n_vocab());
    } else if (p->is_array() && p->size() > 1 && !is_token_array(*p)) {
        bad("prompt", "only one prompt per request is supported");
    } else {
        bad("prompt", "'prompt' must be a string or a non-empty array of token ids");
    }
    // Raw completions may spell control tokens (a hand-written template); "parse_special": false
    // keeps them text.
    g.req.parse_special = opt_bool(body, "parse_special").value_or(true);
    g.req.max_tokens = static_cast<int32_t>(opt_int(body, "max_tokens", 1, std::max(opt.n_ctx, 1)).value_or(16));
    parse_sampling(body, raw, g);
    if (auto lp = opt_int(body, "logprobs", 0, SamplingParams::k_max_logprobs)) {
        g.n_logprobs = static_cast<int32_t>(*lp);
        g.req.sampling.n_logprobs = std::max<int32_t>(1, g.n_logprobs);  // the chosen token's needs n >= 1
    }
    // Tokenized here, on a worker, as the engine would (the router reads the ids' prefix).
    if (g.req.prompt_ids.empty()) g.req.prompt_ids = tokenizer().encode(g.req.prompt, g.req.add_special, g.req.parse_special);
    return g;
}

GenSpec Api::Impl::parse_chat(const json& body, std::string_view raw) {
    GenSpec g;
    g.chat = true;
    const json* m = field(body, "messages");
    if (!m || !m->is_array() || m->empty()) bad("messages", "'messages' must be a non-empty array");
    std::vector<ChatMessage> messages;
    for (const json& msg : *m) {
        if (!msg.is_object()) bad("messages", "each message must be an object");
        std::string role = opt_string(msg, "role").value_or("");
        if (role == "developer") role = "system";
        if (role != "system" && role != "user" && role != "assistant" && role != "tool")
            bad("messages", fmt::format("message role must be system, user, assistant or tool (got '{}')", role));
        std::string content;
        if (const json* c = field(msg, "content")) {
            if (c->is_string()) {
                content = c->get<std::string>();
            } else if (c->is_array()) {
                for (const json& part : *c) {
                    if (!part.is_object() || opt_string(part, "type").value_or("") != "text")
                        bad("messages", "only text content parts are supported");
                    content += opt_string(part, "text").value_or("");
                }
            } else {
                bad("messages", "message content must be a string or a list of text parts");
            }
        }
        // Calls and results: a Jinja template that renders tools takes them as they are; else
        // they are written into the text in the tools' convention (tools.h).
        const bool native = chat.renders_tools();
        std::string tool_calls, tool_call_id;
        if (role == "assistant") {
            if (const json* calls = field(msg, "tool_calls")) {
                if (!calls->is_array()) bad("messages", "an assistant message's tool_calls must be an array");
                if (native) {
                    tool_calls = calls->dump();
                } else {
                    const std::string written = server::render_tool_calls(*calls);
                    content = content.empty() ? written : content + "\n" + written;
                }
            }
        }
        if (role == "tool") {
            if (native) {
                tool_call_id = opt_string(msg, "tool_call_id").value_or("");
            } else {  // a function's result: a user turn in the tools' convention
                role = "user";
                content = server::render_tool_result(content);
            }
        }
        if (!valid_utf8(content)) bad("messages", "message content is not valid UTF-8");
        messages.push_back({std::move(role), std::move(content), std::move(tool_calls), std::move(tool_call_id)});
    }
    try {
        g.tools = server::parse_tools(body, raw);
    } catch (const server::ToolsError& e) {
        bad(e.param, e.message);
    }
    std::optional<std::string> tools_json;
    if (g.tools.active() && chat.renders_tools()) {
        // The model's own template describes the functions (OpenAI's tools, as sent).
        tools_json = nlohmann::ordered_json::parse(raw)["tools"].dump();  // in the body's key order
    } else if (g.tools.active()) {  // the functions are described in the system turn
        const std::string text = server::tools_system_text(g.tools);
        if (messages.front().role == "system") messages.front().content += "\n\n" + text;
        else messages.insert(messages.begin(), ChatMessage{"system", text});
    }
    std::string prompt;
    std::vector<std::pair<size_t, size_t>> contents;
    try {
        prompt = chat.apply(messages, true, &contents, tools_json ? &*tools_json : nullptr);
    } catch (const Error& e) {
        bad("messages", e.what());
    }
    // Only the template's markers are control tokens: "</s>" or "<|im_end|>" in a message stays
    // text, so no message can close its turn or open another role's.
    refuse_if_cannot_fit(prompt, "messages");
    g.req.prompt_ids = tokenizer().encode(prompt, true, true, contents);
    if (g.req.prompt_ids.empty()) bad("messages", "the rendered prompt is empty");
    const int64_t room = std::max<int64_t>(1, opt.n_ctx - static_cast<int64_t>(g.req.prompt_ids.size()));
    auto max_tokens = opt_int(body, "max_completion_tokens", 1, std::max(opt.n_ctx, 1));
    if (!max_tokens) max_tokens = opt_int(body, "max_tokens", 1, std::max(opt.n_ctx, 1));
    g.req.max_tokens = static_cast<int32_t>(max_tokens.value_or(room));
    parse_sampling(body, raw, g);
    if (g.tools.forced()) {
        // The output is the call itself: {"name": ..., "arguments": {...}} by the schema.
        if (!g.req.json_schema.empty() || !g.req.grammar.empty())
            bad("tool_choice", "a required or named tool_choice cannot be combined with response_format or grammar");
        g.req.json_schema = server::forced_call_schema(g.tools);
        try {
            (void)Grammar::cached_json_schema(g.req.json_schema);
        } catch (const Error& e) {
            bad("tools", e.what());
        }
    }
    for (auto& s : chat.stop_strings()) g.req.stop.push_back(s);
    g.chat_logprobs = opt_bool(body, "logprobs").value_or(false);
    if (auto n = opt_int(body, "top_logprobs", 0, SamplingParams::k_max_logprobs)) {
        if (!g.chat_logprobs) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
        g.n_chat_top = static_cast<int32_t>(*n);
    }
    if (g.chat_logprobs) g.req.sampling.n_logprobs = std::max<int32_t>(1, g.n_chat_top);
    return g;
}

// ---- generation ----

namespace {

const char* finish_name(FinishReason r) { return r == FINISH_REASON_LENGTH ? "length" : "stop"; }

json usage_json(int64_t n_prompt, int64_t n_gen) {
    return {{"prompt_tokens", n_prompt}, {"completion_tokens", n_gen}, {"total_tokens", n_prompt + n_gen}};
}

std::string sse(const json& j) { return "data: " + dump(j) + "\n\n"; }

std::string whole_response(const std::string& id, bool chat, int64_t created, const std::string& model, json choice,
                           json usage) {
    json j = json::object();
    j["id"] = id;
    j["object"] = chat ? "chat.completion" : "text_completion";
    j["created"] = created;
    j["model"] = model;
    j["choices"] = json::array({std::move(choice)});
    j["usage"] = std::move(usage);
    return dump(j);
}

}  // namespace

asio::awaitable<void> Api::Impl::generate(Exchange& ex, GenSpec& g) {
    std::optional<TokenStream> stream;
    Router::Lease lease;  // counts this request's tokens on its replica until it ends
    std::optional<ApiError> refused;
    try {
        Router::Routed routed = router.generate(g.req);
        stream.emplace(std::move(routed.stream));
        lease = std::move(routed.lease);
    } catch (const EngineError& e) {
        if (e.code() == EngineErrc::queue_full) refused = ApiError{429, e.what(), "", "queue_full"};
        else if (e.code() == EngineErrc::too_long) refused = ApiError{400, e.what(), "", "context_length_exceeded"};
        else if (e.code() == EngineErrc::engine_failed) refused = ApiError{503, e.what(), "", "engine_failed"};
        else refused = ApiError{503, e.what(), "", "engine_unavailable"};
    } catch (const Error& e) {
        refused = ApiError{400, e.what(), "", {}};
    }
    if (refused) {
        const std::string body = error_json(*refused);
        // A full queue drains in about a step or two: say when to come back.
        const std::string_view extra = refused->status == 429 ? "Retry-After: 1\r\n" : "";
        co_await ex.respond(refused->status, "application/json", body, extra);
        co_return;
    }
    if (ex.peer_closed()) {
        stream->cancel();
        metrics.count_finish("cancelled");
        co_return;
    }
    TokenStream* s = &*stream;
    ex.on_peer_closed([s] { s->cancel(); });
    // However this coroutine ends, the hook must not outlive the stream it points at.
    struct PeerHookReset {
        Exchange& e;
        ~PeerHookReset() { e.on_peer_closed(nullptr); }
    } peer_hook_reset{ex};

    const std::string id = (g.chat ? "chatcmpl-" : "cmpl-") + random_hex([this] { return random(); }, 24);
    const int64_t created = static_cast<int64_t>(std::time(nullptr));
    const int64_t n_prompt = static_cast<int64_t>(stream->prompt_ids().size());
    const std::string object = g.chat ? "chat.completion.chunk" : "text_completion";
    const bool want_lp = g.n_logprobs >= 0 || g.chat_logprobs;

    auto chunk = [&](json choice) {
        json j = {{"id", id}, {"object", object}, {"created", created}, {"model", opt.model_name}};
        j["choices"] = json::array({std::move(choice)});
        if (g.include_usage) j["usage"] = nullptr;
        return j;
    };
    // The logprobs of one token, in the endpoint's shape.
    size_t text_offset = 0;
    auto completion_lp = [&](const TokenEvent& ev, json& lp) {
        lp["tokens"].push_back(piece(ev.id));
        lp["token_logprobs"].push_back(ev.logprob ? json(*ev.logprob) : json(nullptr));
        json top = json::object();
        for (size_t k = 0; k < ev.top_logprobs.size() && static_cast<int32_t>(k) < g.n_logprobs; ++k)
            top[piece(ev.top_logprobs[k].id)] = ev.top_logprobs[k].logprob;
        lp["top_logprobs"].push_back(std::move(top));
        lp["text_offset"].push_back(text_offset);
    };
    auto chat_lp = [&](const TokenEvent& ev) {
        auto entry = [&](TokenId tid, float logprob) {
            std::string p = piece(tid);
            json bytes = json::array();
            for (char c : p) bytes.push_back(static_cast<unsigned char>(c));
            return json{{"token", p}, {"logprob", logprob}, {"bytes", std::move(bytes)}};
        };
        json e = entry(ev.id, ev.logprob.value_or(0.0f));
        e["top_logprobs"] = json::array();
        for (size_t k = 0; k < ev.top_logprobs.size() && static_cast<int32_t>(k) < g.n_chat_top; ++k)
            e["top_logprobs"].push_back(entry(ev.top_logprobs[k].id, ev.top_logprobs[k].logprob));
        return e;
    };

    // With tools the text may be a call, sent as tool_calls when the text ends: a forced call is
    // held back whole, with "auto" the text before a call streams as it comes.
    const bool hold = g.tools.active();
    server::ToolTextStream tool_text;
    bool ok = true;
    if (g.stream) {
        ok = co_await ex.stream_begin(200, "text/event-stream");
        if (ok && g.chat) {
            // (Built before the co_await: GCC 12 cannot keep brace-init temporaries across it.)
            json first = json::object();
            first["index"] = 0;
            first["delta"] = json{{"role", "assistant"}, {"content", ""}};
            first["logprobs"] = nullptr;
            first["finish_reason"] = nullptr;
            const std::string out = sse(chunk(std::move(first)));
            ok = co_await ex.stream_write(out);
        }
    }
    std::string text;
    json lp_all = g.chat ? json{{"content", json::array()}} : json::object();
    int64_t n_gen = 0;
    auto last = ex.received_at();
    std::error_code error;
    while (ok && !ex.peer_closed()) {
        auto [ec, ev] = co_await stream->async_next(k_use_tuple);
        if (ec) {
            error = ec;
            break;
        }
        if (!ev) break;
        lease.on_token();
        const auto now = Clock::now();
        const double dt = std::chrono::duration<double>(now - last).count();
        if (n_gen == 0) metrics.observe_ttft(dt);
        else metrics.observe_itl(dt);
        last = now;
        ++n_gen;
        if (g.stream && !hold) {
            if (ev->text.empty() && !want_lp) continue;  // held back (a partial character or stop string)
            json choice;
            if (g.chat) {
                choice = {{"index", 0}, {"delta", {{"content", ev->text}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
                if (g.chat_logprobs) choice["logprobs"] = {{"content", json::array({chat_lp(*ev)})}};
            } else {
                choice = {{"text", ev->text}, {"index", 0}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
                if (g.n_logprobs >= 0) {
                    json lp = json::object();
                    completion_lp(*ev, lp);
                    choice["logprobs"] = std::move(lp);
                }
            }
            text_offset += ev->text.size();
            const std::string out = sse(chunk(std::move(choice)));
            ok = co_await ex.stream_write(out);
        } else {
            if (g.chat_logprobs) lp_all["content"].push_back(chat_lp(*ev));
            else if (g.n_logprobs >= 0) completion_lp(*ev, lp_all);
            text_offset += ev->text.size();
            text += ev->text;
            if (g.stream && hold && !g.tools.forced()) {
                const std::string_view piece_out = tool_text.next(text);
                if (!piece_out.empty()) {
                    json c = {{"index", 0}, {"delta", {{"content", std::string(piece_out)}}}, {"logprobs", nullptr},
                              {"finish_reason", nullptr}};
                    const std::string out = sse(chunk(std::move(c)));
                    ok = co_await ex.stream_write(out);
                }
            }
        }
    }
    ex.on_peer_closed(nullptr);
    const FinishReason reason = stream->finish_reason();
    if (!ok || ex.peer_closed() || error == asio::error::operation_aborted || reason == FINISH_REASON_CANCELLED) {
        // The client went away: the request is cancelled (its blocks free at the next step).
        stream->cancel();
        metrics.count_finish("cancelled");
        metrics.add_tokens(n_prompt, n_gen);
        co_return;
    }
    if (error) {
        ApiError e{500, stream->error_message().empty() ? error.message() : stream->error_message(), "", {}};
        if (error == EngineErrc::too_long) e.status = 400, e.code = "context_length_exceeded";
        else if (error == EngineErrc::stopped) e.status = 503, e.code = "engine_stopped";
        else if (error == EngineErrc::engine_failed) e.status = 503, e.code = "engine_failed";
        else if (error == EngineErrc::invalid_request) e.status = 400, e.code = "invalid_request";
        metrics.count_finish("error");
        const std::string body = error_json(e);
        if (g.stream) {
            const std::string out = "data: " + body + "\n\ndata: [DONE]\n\n";
            if (co_await ex.stream_write(out)) co_await ex.stream_end();
        } else {
            co_await ex.respond(e.status, "application/json", body);
        }
        co_return;
    }
    // Tool calls in the held-back text: OpenAI's tool_calls, finish_reason "tool_calls".
    server::ParsedCalls parsed;
    if (hold) parsed = server::parse_tool_calls(text, g.tools);
    if (hold && parsed.calls.empty()) parsed.content = text;
    json tool_calls = json::array();
    for (size_t i = 0; i < parsed.calls.size(); ++i) {
        const std::string call_id = "call_" + random_hex([this] { return random(); }, 24);
        tool_calls.push_back({{"id", call_id},
                              {"type", "function"},
                              {"function", {{"name", parsed.calls[i].name}, {"arguments", parsed.calls[i].arguments}}}});
    }
    const std::string finish = tool_calls.empty() ? finish_name(reason) : "tool_calls";
    metrics.count_finish(finish_name(reason));
    metrics.add_tokens(n_prompt, n_gen);
    json usage = usage_json(n_prompt, n_gen);
    if (g.stream) {
        std::string out;
        if (hold) {  // the held-back text, then the calls, as deltas
            // What was streamed is a prefix of the text outside the calls (it stops at a call).
            std::string rest = tool_calls.empty() ? text : parsed.outside;
            rest.erase(0, std::min(rest.size(), tool_text.sent()));
            if (!tool_calls.empty()) rest = rest.substr(0, rest.find_last_not_of(" \t\r\n") + 1);
            if (!rest.empty() || g.chat_logprobs) {
                json c = {{"index", 0}, {"delta", {{"content", rest}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
                if (g.chat_logprobs) c["logprobs"] = lp_all;
                out += sse(chunk(std::move(c)));
            }
            if (!tool_calls.empty()) {
                json deltas = json::array();
                for (size_t i = 0; i < tool_calls.size(); ++i) {
                    json d = tool_calls[i];
                    d["index"] = i;
                    deltas.push_back(std::move(d));
                }
                json c = {{"index", 0}, {"delta", {{"tool_calls", std::move(deltas)}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
                out += sse(chunk(std::move(c)));
            }
        }
        json last_choice = g.chat ? json{{"index", 0}, {"delta", json::object()}, {"logprobs", nullptr},
                                         {"finish_reason", finish}}
                                  : json{{"text", ""}, {"index", 0}, {"logprobs", nullptr},
                                         {"finish_reason", finish}};
        out += sse(chunk(std::move(last_choice)));
        if (g.include_usage) {
            json u = {{"id", id}, {"object", object}, {"created", created}, {"model", opt.model_name},
                      {"choices", json::array()}, {"usage", usage}};
            out += sse(u);
        }
        out += "data: [DONE]\n\n";
        if (co_await ex.stream_write(out)) co_await ex.stream_end();
        co_return;
    }
    json choice;
    if (g.chat) {
        json message = {{"role", "assistant"}, {"content", hold ? parsed.content : text}};
        if (!tool_calls.empty()) {
            if (parsed.content.empty()) message["content"] = nullptr;
            message["tool_calls"] = std::move(tool_calls);
        }
        choice = {{"index", 0},
                  {"message", std::move(message)},
                  {"logprobs", g.chat_logprobs ? lp_all : json(nullptr)},
                  {"finish_reason", finish}};
    } else {
        choice = {{"text", text},
                  {"index", 0},
                  {"logprobs", g.n_logprobs >= 0 ? lp_all : json(nullptr)},
                  {"finish_reason", finish_name(reason)}};
    }
    const std::string out = whole_response(id, g.chat, created, opt.model_name, std::move(choice), std::move(usage));
    co_await ex.respond(200, "application/json", out);
}

// ---- routing ----

// The workers' parsing is background work next to the io thread (which writes everyone's
// tokens) and the engine's step thread: on a machine with few cores it takes what they leave.
void lower_this_thread_priority() {
#ifdef __linux__
    thread_local bool done = false;
    if (done) return;
    done = true;
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
#endif
}

// A whole reply, decided without suspending (GCC 12 coroutines and brace-init temporaries
// do not mix, so handle() only co_awaits plain strings).
struct Reply {
    int status = 200;
    std::string content_type = "application/json";
    std::string body;
    std::string extra_headers;
};

std::variant<Reply, GenSpec> Api::Impl::route(const http::Request& r) {
    struct Route {
        const char* path;
        const char* method;
        bool open;  // served without the API key
    };
    static const Route k_routes[] = {
        {"/", "GET", true},
        {"/health", "GET", true},
        {"/metrics", "GET", true},
        {"/v1/models", "GET", false},
        {"/v1/completions", "POST", false},
        {"/v1/chat/completions", "POST", false},
        {"/tokenize", "POST", false},
        {"/detokenize", "POST", false},
    };
    const Route* route = nullptr;
    for (const Route& rt : k_routes)
        if (r.path == rt.path) route = &rt;
    Reply reply;
    try {
        // Browsers send Origin with cross-site requests, and a page elsewhere may POST
        // text/plain here without a preflight: only the page's own origin (the Host it asked
        // for) and --allowed-origins are served. Clients that send no Origin are not browsers.
        if (auto origin = r.header("origin"); origin && !origin_allowed(*origin, r.header("host")))
            throw ApiError{403, fmt::format("origin '{}' is not allowed (--allowed-origins)", *origin), "",
                           "origin_not_allowed"};
        // With a key, only the open routes answer without it: unknown paths and wrong methods
        // are 401 too, so they tell nothing to a client without the key.
        if ((!route || !route->open) && opt.api_key) {
            auto auth = r.header("authorization");
            auto key = auth ? bearer_token(*auth) : std::nullopt;
            if (!key || !constant_time_equal(*key, *opt.api_key)) {
                reply.extra_headers = "WWW-Authenticate: Bearer\r\n";
                throw ApiError{401, "invalid or missing API key (send 'Authorization: Bearer KEY')", "",
                               "invalid_api_key"};
            }
        }
        if (!route) throw ApiError{404, fmt::format("no such endpoint: {} {}", r.method, r.path), "", "not_found"};
        // HEAD is GET without the body (the connection drops it).
        if (r.method != route->method && !(r.method == "HEAD" && std::string_view(route->method) == "GET")) {
            reply.extra_headers = fmt::format("Allow: {}\r\n", route->method);
            throw ApiError{405, fmt::format("{} does not accept {} (use {})", r.path, r.method, route->method), "",
                           "method_not_allowed"};
        }
        const std::string_view path = r.path;
        if (path == "/") {
            reply.content_type = "text/html; charset=utf-8";
            reply.body.assign(reinterpret_cast<const char*>(k_index_html), k_index_html_size);
            return reply;
        }
        if (path == "/health") {
            const std::vector<EngineStats> st = router.stats();
            const size_t n_failed = size_t(std::count_if(st.begin(), st.end(), [](const auto& s) { return s.failed; }));
            json j = json::object();
            if (n_failed == st.size()) {
                // Every device is lost: a load balancer should take this server out.
                reply.status = 503;
                j["status"] = "error";
                j["error"] = st.front().failure;
            } else {
                j["status"] = "ok";
            }
            if (st.size() > 1) {
                // Data parallel: each replica's state; a lost one gets no more requests.
                json reps = json::array();
                for (const EngineStats& s : st) {
                    json r = {{"status", s.failed ? "error" : "ok"}};
                    if (s.failed) r["error"] = s.failure;
                    reps.push_back(std::move(r));
                }
                j["replicas"] = std::move(reps);
            }
            reply.body = dump(j);
            return reply;
        }
        if (path == "/metrics") {
            reply.content_type = "text/plain; version=0.0.4; charset=utf-8";
            reply.body = metrics.render(router.stats());
            return reply;
        }
        if (path == "/v1/models") {
            json m = {{"id", opt.model_name},
                      {"object", "model"},
                      {"created", started},
                      {"owned_by", "coinfer"},
                      {"max_model_len", opt.n_ctx}};
            reply.body = dump(json{{"object", "list"}, {"data", json::array({m})}});
            return reply;
        }
        // A prompt of token ids (the longest legitimate array) holds up to the context.
        const json body = parse_body(r.body, std::max<size_t>(size_t(1) << 16, 2 * size_t(std::max(opt.n_ctx, 0))));
        if (path == "/tokenize") {
            std::optional<std::string> text = opt_string(body, "content");
            if (!text) text = opt_string(body, "prompt");
            if (!text) bad("content", "'content' (a string) is required");
            const bool add_special = opt_bool(body, "add_special").value_or(true);
            const bool parse_special = opt_bool(body, "parse_special").value_or(true);
            reply.body = dump(json{{"tokens", tokenizer().encode(*text, add_special, parse_special)}});
            return reply;
        }
        if (path == "/detokenize") {
            const json* t = field(body, "tokens");
            if (!t || !t->is_array()) bad("tokens", "'tokens' must be an array of token ids");
            auto ids = token_array(*t, "tokens", n_vocab());
            reply.body = dump(json{{"content", tokenizer().decode(ids)}});
            return reply;
        }
        return path == "/v1/completions" ? parse_completion(body, r.body) : parse_chat(body, r.body);
    } catch (const ApiError& e) {
        reply.status = e.status;
        reply.body = error_json(e);
    } catch (const Error& e) {  // e.g. from the tokenizer
        reply.status = 400;
        reply.body = error_json(ApiError{400, e.what(), "", {}});
    }
    return reply;
}

asio::awaitable<void> Api::Impl::handle(Exchange& ex) {
    // Requests with a body go to a worker for route() (parsing, the chat template,
    // tokenization), then come back to the io thread for the engine and the connection. The
    // request stays put meanwhile: its connection handles one at a time.
    std::variant<Reply, GenSpec> routed;
    if (ex.request().method == "POST") {
        auto io_executor = co_await asio::this_coro::executor;
        co_await asio::post(workers, asio::use_awaitable);
        lower_this_thread_priority();
        routed = route(ex.request());
        co_await asio::post(io_executor, asio::use_awaitable);
    } else {
        routed = route(ex.request());
    }
    if (auto* reply = std::get_if<Reply>(&routed)) {
        co_await ex.respond(reply->status, reply->content_type, reply->body, reply->extra_headers);
        co_return;
    }
    GenSpec spec = std::move(std::get<GenSpec>(routed));
    co_await generate(ex, spec);
}

}  // namespace coinfer::server
