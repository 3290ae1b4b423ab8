#pragma once
// A Jinja interpreter for chat templates: the subset that tokenizer.chat_template sources use
// (Llama 2/3.x, Qwen2.5, Mistral, Phi-3, Hermes, Zephyr and their fine-tunes), rendered the way
// transformers' apply_chat_template renders them (trim_blocks and lstrip_blocks on, no
// autoescape, tojson as json.dumps).
//
// Supported: {{ }}, {% %}, {# #} with '-' whitespace control; if / elif / else, for (with
// tuple targets, an inline `if` filter, else and loop.*; break / continue), set (names,
// namespace attributes, and the block form), macro with defaults, and call-less filter blocks;
// expressions with Python's literals, lists, dicts, attribute and subscript access, slices,
// calls, filters, tests, `a if c else b`, arithmetic, comparisons, `in`, `~` and `and / or /
// not`. Builtins: range, namespace, raise_exception, strftime_now; the common filters, tests and
// str / dict / list methods. Anything else is an Error naming its line, so a caller can fall
// back to a built-in template.
//
// Templates are untrusted input: parsing is linear, recursion and loop sizes are capped, and
// rendering stops with an Error past an output cap, so no template can hang or exhaust memory.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace coinfer::jinja {

struct Value;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // insertion order, as Python's dict
struct CallArgs;
using Function = std::function<Value(CallArgs&)>;

struct Value {
    enum class Kind { undefined, none, boolean, integer, number, string, array, object, function };
    Kind kind = Kind::undefined;
    bool b = false;
    int64_t i = 0;
    double d = 0.0;
    std::string s;
    std::shared_ptr<Array> a;   // shared: lists and dicts are references, as in Python
    std::shared_ptr<Object> o;
    std::shared_ptr<Function> f;

    static Value none() { return with(Kind::none); }
    static Value boolean(bool v) { Value x = with(Kind::boolean); x.b = v; return x; }
    static Value integer(int64_t v) { Value x = with(Kind::integer); x.i = v; return x; }
    static Value number(double v) { Value x = with(Kind::number); x.d = v; return x; }
    static Value string(std::string v) { Value x = with(Kind::string); x.s = std::move(v); return x; }
    static Value array(Array v = {}) { Value x = with(Kind::array); x.a = std::make_shared<Array>(std::move(v)); return x; }
    static Value object(Object v = {}) { Value x = with(Kind::object); x.o = std::make_shared<Object>(std::move(v)); return x; }
    static Value function(Function fn) { Value x = with(Kind::function); x.f = std::make_shared<Function>(std::move(fn)); return x; }
    static Value from_json(const nlohmann::ordered_json& j);

    bool is(Kind k) const { return kind == k; }
    bool defined() const { return kind != Kind::undefined; }
    bool truthy() const;
    const Value* find(std::string_view key) const;  // an object's member, or null
    void set(const std::string& key, Value v);       // an object's member, added or replaced
    std::string str() const;                         // Python's str()
    std::string json(int indent = -1) const;         // json.dumps(ensure_ascii=False[, indent])

private:
    static Value with(Kind k) { Value x; x.kind = k; return x; }
};

struct CallArgs {
    std::vector<Value> args;
    std::vector<std::pair<std::string, Value>> kwargs;
    const Value* get(size_t pos, std::string_view name) const;  // by position, else by name
};

struct Node;

class Template {
public:
    // Throws coinfer::Error ("jinja: line N: ...") for a source it cannot parse.
    explicit Template(std::string_view source);
    ~Template();
    Template(Template&&) noexcept;
    Template& operator=(Template&&) noexcept;

    // Renders with `context` (an object) as the global variables. Throws coinfer::Error for
    // raise_exception(), an unsupported construct met while rendering, or a cap exceeded.
    std::string render(const Value& context) const;

    static constexpr size_t k_max_output = size_t(16) << 20;
    static constexpr int k_max_depth = 64;          // nested calls and expressions
    static constexpr int64_t k_max_iterations = 1 << 18;  // loop iterations and range() length, all told

private:
    std::shared_ptr<const Node> root_;
};

}  // namespace coinfer::jinja
