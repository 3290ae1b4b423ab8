#include "jinja.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <ctime>
#include <optional>

#include <fmt/format.h>

#include "error.h"

namespace coinfer::jinja {

// ---- values ----

bool Value::truthy() const {
    switch (kind) {
        case Kind::undefined:
        case Kind::none: return false;
        case Kind::boolean: return b;
        case Kind::integer: return i != 0;
        case Kind::number: return d != 0.0;
        case Kind::string: return !s.empty();
        case Kind::array: return !a->empty();
        case Kind::object: return !o->empty();
        case Kind::function: return true;
    }
    return false;
}

const Value* Value::find(std::string_view key) const {
    if (kind != Kind::object) return nullptr;
    for (const auto& [k, v] : *o)
        if (k == key) return &v;
    return nullptr;
}

void Value::set(const std::string& key, Value v) {
    for (auto& [k, x] : *o)
        if (k == key) {
            x = std::move(v);
            return;
        }
    o->emplace_back(key, std::move(v));
}

Value Value::from_json(const nlohmann::ordered_json& j) {
    switch (j.type()) {
        case nlohmann::ordered_json::value_t::null: return none();
        case nlohmann::ordered_json::value_t::boolean: return boolean(j.get<bool>());
        case nlohmann::ordered_json::value_t::number_integer: return integer(j.get<int64_t>());
        case nlohmann::ordered_json::value_t::number_unsigned: return integer(static_cast<int64_t>(j.get<uint64_t>()));
        case nlohmann::ordered_json::value_t::number_float: return number(j.get<double>());
        case nlohmann::ordered_json::value_t::string: return string(j.get<std::string>());
        case nlohmann::ordered_json::value_t::array: {
            Array a;
            for (const auto& x : j) a.push_back(from_json(x));
            return array(std::move(a));
        }
        case nlohmann::ordered_json::value_t::object: {
            Object o;
            for (auto it = j.begin(); it != j.end(); ++it) o.emplace_back(it.key(), from_json(it.value()));
            return object(std::move(o));
        }
        default: return Value();
    }
}

namespace {

std::string float_repr(double d) {
    if (std::isnan(d)) return "nan";
    if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
    std::string s = fmt::format("{}", d);
    if (s.find_first_of(".e") == std::string::npos) s += ".0";
    return s;
}

void json_string(std::string& out, std::string_view s) {
    out += '"';
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            default:
                if (c < 0x20) out += fmt::format("\\u{:04x}", c);
                else out += static_cast<char>(c);
        }
    }
    out += '"';
}

void json_dump(std::string& out, const Value& v, int indent, int level) {
    auto newline = [&](int l) {
        out += '\n';
        out.append(size_t(indent * l), ' ');
    };
    switch (v.kind) {
        case Value::Kind::undefined:
        case Value::Kind::none:
        case Value::Kind::function: out += "null"; break;
        case Value::Kind::boolean: out += v.b ? "true" : "false"; break;
        case Value::Kind::integer: out += std::to_string(v.i); break;
        case Value::Kind::number: out += std::isfinite(v.d) ? float_repr(v.d) : (std::isnan(v.d) ? "NaN" : (v.d > 0 ? "Infinity" : "-Infinity")); break;
        case Value::Kind::string: json_string(out, v.s); break;
        case Value::Kind::array:
            if (v.a->empty()) {
                out += "[]";
                break;
            }
            out += '[';
            for (size_t k = 0; k < v.a->size(); ++k) {
                if (k) out += indent >= 0 ? "," : ", ";
                if (indent >= 0) newline(level + 1);
                json_dump(out, (*v.a)[k], indent, level + 1);
            }
            if (indent >= 0) newline(level);
            out += ']';
            break;
        case Value::Kind::object:
            if (v.o->empty()) {
                out += "{}";
                break;
            }
            out += '{';
            for (size_t k = 0; k < v.o->size(); ++k) {
                if (k) out += indent >= 0 ? "," : ", ";
                if (indent >= 0) newline(level + 1);
                json_string(out, (*v.o)[k].first);
                out += ": ";
                json_dump(out, (*v.o)[k].second, indent, level + 1);
            }
            if (indent >= 0) newline(level);
            out += '}';
            break;
    }
}

void py_repr(std::string& out, const Value& v) {
    if (v.is(Value::Kind::string)) {
        out += '\'';
        for (char c : v.s) {
            if (c == '\'' || c == '\\') out += '\\';
            if (c == '\n') out += "\\n";
            else out += c;
        }
        out += '\'';
    } else if (v.is(Value::Kind::array)) {
        out += '[';
        for (size_t k = 0; k < v.a->size(); ++k) {
            if (k) out += ", ";
            py_repr(out, (*v.a)[k]);
        }
        out += ']';
    } else if (v.is(Value::Kind::object)) {
        out += '{';
        for (size_t k = 0; k < v.o->size(); ++k) {
            if (k) out += ", ";
            py_repr(out, Value::string((*v.o)[k].first));
            out += ": ";
            py_repr(out, (*v.o)[k].second);
        }
        out += '}';
    } else {
        out += v.str();
    }
}

}  // namespace

std::string Value::str() const {
    switch (kind) {
        case Kind::undefined: return "";
        case Kind::none: return "None";
        case Kind::boolean: return b ? "True" : "False";
        case Kind::integer: return std::to_string(i);
        case Kind::number: return float_repr(d);
        case Kind::string: return s;
        case Kind::function: return "<function>";
        case Kind::array:
        case Kind::object: {
            std::string out;
            py_repr(out, *this);
            return out;
        }
    }
    return "";
}

std::string Value::json(int indent) const {
    std::string out;
    json_dump(out, *this, indent, 0);
    return out;
}

const Value* CallArgs::get(size_t pos, std::string_view name) const {
    if (pos < args.size()) return &args[pos];
    for (const auto& [k, v] : kwargs)
        if (k == name) return &v;
    return nullptr;
}

// ---- syntax tree ----

namespace {

struct Expr;
using ExprP = std::shared_ptr<const Expr>;

struct Expr {
    enum class K { literal, name, list, dict, attr, item, slice, call, filter, test, unary, binary, cond };
    K k = K::literal;
    int line = 0;
    Value lit;
    std::string name;            // variable, attribute, filter, test or operator
    std::vector<ExprP> items;    // list items; dict keys and values alternating; call / filter args
    std::vector<std::pair<std::string, ExprP>> kwargs;
    ExprP a, b, c;               // operands (slice: start, stop, step in items)
    bool negated = false;        // `is not`
};

}  // namespace

struct Node {
    enum class K { seq, text, output, if_, for_, set, set_block, macro, break_, continue_, filter_block };
    K k = K::seq;
    int line = 0;
    std::string text;
    ExprP expr;                                           // output, set value, for iterable
    std::vector<std::pair<ExprP, std::shared_ptr<Node>>> branches;  // if: (condition or null, body)
    std::vector<std::string> targets;                     // for / set names
    std::string attr;                                     // set ns.attr
    ExprP cond;                                           // for ... if cond
    std::shared_ptr<Node> body, else_body;
    std::vector<std::shared_ptr<Node>> children;          // seq
    std::vector<std::pair<std::string, ExprP>> params;    // macro parameters and defaults
    std::string name;                                     // macro or filter name
    std::vector<ExprP> filter_args;
};

namespace {

[[noreturn]] void fail(int line, const std::string& what) { throw_error("jinja: line {}: {}", line, what); }

// ---- template pieces ----

struct Piece {
    enum class K { text, expr, stmt } k;
    std::string s;
    int line;
};

int line_at(std::string_view src, size_t pos) { return 1 + int(std::count(src.begin(), src.begin() + long(pos), '\n')); }

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Splits the source into text, {{ }} and {% %} pieces (comments dropped), applying '-' whitespace
// control, trim_blocks and lstrip_blocks.
std::vector<Piece> split(std::string_view src) {
    std::vector<Piece> out;
    std::string text;
    bool strip_ws = false, strip_newline = false;
    int text_line = 1;
    size_t pos = 0;
    auto flush_text = [&](size_t upto) {
        std::string_view t = src.substr(pos, upto - pos);
        if (strip_ws) {
            while (!t.empty() && is_space(t.front())) t.remove_prefix(1);
        } else if (strip_newline) {
            if (t.substr(0, 2) == "\r\n") t.remove_prefix(2);
            else if (!t.empty() && t.front() == '\n') t.remove_prefix(1);
        }
        strip_ws = strip_newline = false;
        text.append(t);
    };
    while (pos <= src.size()) {
        size_t open = src.find('{', pos);
        while (open != std::string_view::npos && open + 1 < src.size() && src[open + 1] != '{' && src[open + 1] != '%' &&
               src[open + 1] != '#')
            open = src.find('{', open + 1);
        if (open == std::string_view::npos || open + 1 >= src.size()) {
            flush_text(src.size());
            break;
        }
        flush_text(open);
        const char kind = src[open + 1];
        size_t inner = open + 2;
        const bool minus_left = inner < src.size() && src[inner] == '-';
        const bool plus_left = inner < src.size() && src[inner] == '+';
        if (minus_left || plus_left) ++inner;
        if (minus_left) {
            while (!text.empty() && is_space(text.back())) text.pop_back();
        } else if (kind != '{' && !plus_left) {  // lstrip_blocks: a tag that opens its line in the source
            size_t j = open;
            while (j > 0 && (src[j - 1] == ' ' || src[j - 1] == '\t')) --j;
            if (j == 0 || src[j - 1] == '\n')
                for (size_t n = open - j; n > 0 && !text.empty() && (text.back() == ' ' || text.back() == '\t'); --n)
                    text.pop_back();
        }
        if (!text.empty()) out.push_back({Piece::K::text, std::move(text), text_line});
        text.clear();
        const int line = line_at(src, open);
        // The close, skipping quoted strings inside expressions and statements.
        const std::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        size_t k = inner;
        char quote = 0;
        size_t end = std::string_view::npos;
        for (; k + 1 < src.size(); ++k) {
            const char c = src[k];
            if (kind != '#') {
                if (quote) {
                    if (c == '\\') ++k;
                    else if (c == quote) quote = 0;
                    continue;
                }
                if (c == '\'' || c == '"') {
                    quote = c;
                    continue;
                }
            }
            if (src.substr(k, 2) == close) {
                end = k;
                break;
            }
        }
        if (end == std::string_view::npos) fail(line, fmt::format("'{{{}' is not closed", kind));
        size_t body_end = end;
        const bool minus_right = body_end > inner && src[body_end - 1] == '-';
        const bool plus_right = body_end > inner && src[body_end - 1] == '+';
        if (minus_right || plus_right) --body_end;
        std::string body(src.substr(inner, body_end - inner));
        pos = end + 2;
        strip_ws = minus_right;
        strip_newline = !minus_right && !plus_right && kind != '{';  // trim_blocks
        text_line = line_at(src, pos);
        if (kind == '#') continue;
        if (kind == '%') {
            // {% raw %}...{% endraw %}: the text between, untouched.
            std::string_view b = body;
            while (!b.empty() && is_space(b.front())) b.remove_prefix(1);
            while (!b.empty() && is_space(b.back())) b.remove_suffix(1);
            if (b == "raw") {
                size_t search = pos;
                while (true) {
                    const size_t t = src.find("{%", search);
                    if (t == std::string_view::npos) fail(line, "'raw' without 'endraw'");
                    const size_t te = src.find("%}", t);
                    if (te == std::string_view::npos) fail(line, "'raw' without 'endraw'");
                    std::string_view tb = src.substr(t + 2, te - t - 2);
                    while (!tb.empty() && (is_space(tb.front()) || tb.front() == '-')) tb.remove_prefix(1);
                    while (!tb.empty() && (is_space(tb.back()) || tb.back() == '-')) tb.remove_suffix(1);
                    if (tb == "endraw") {
                        out.push_back({Piece::K::text, std::string(src.substr(pos, t - pos)), line});
                        pos = te + 2;
                        break;
                    }
                    search = te + 2;
                }
                continue;
            }
        }
        out.push_back({kind == '{' ? Piece::K::expr : Piece::K::stmt, std::move(body), line});
    }
    if (!text.empty()) out.push_back({Piece::K::text, std::move(text), text_line});
    return out;
}

// ---- expression tokens ----

struct Tok {
    enum class K { name, integer, number, string, op, end } k;
    std::string s;
    int64_t i = 0;
    double d = 0;
};

std::vector<Tok> tokenize(std::string_view s, int line) {
    std::vector<Tok> out;
    size_t p = 0;
    while (p < s.size()) {
        const char c = s[p];
        if (is_space(c)) {
            ++p;
            continue;
        }
        if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
            size_t q = p;
            while (q < s.size() && (std::isalnum(static_cast<unsigned char>(s[q])) || s[q] == '_')) ++q;
            out.push_back({Tok::K::name, std::string(s.substr(p, q - p))});
            p = q;
            continue;
        }
        if (std::isdigit(static_cast<unsigned char>(c))) {
            size_t q = p;
            bool is_float = false;
            while (q < s.size() && (std::isdigit(static_cast<unsigned char>(s[q])) || s[q] == '_')) ++q;
            if (q + 1 < s.size() && s[q] == '.' && std::isdigit(static_cast<unsigned char>(s[q + 1]))) {
                is_float = true;
                ++q;
                while (q < s.size() && std::isdigit(static_cast<unsigned char>(s[q]))) ++q;
            }
            std::string num(s.substr(p, q - p));
            num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
            Tok t{is_float ? Tok::K::number : Tok::K::integer, num};
            try {
                if (is_float) t.d = std::stod(num);
                else t.i = std::stoll(num);
            } catch (const std::exception&) {
                fail(line, fmt::format("bad number '{}'", num));
            }
            out.push_back(std::move(t));
            p = q;
            continue;
        }
        if (c == '\'' || c == '"') {
            std::string v;
            size_t q = p + 1;
            for (; q < s.size() && s[q] != c; ++q) {
                if (s[q] == '\\' && q + 1 < s.size()) {
                    const char e = s[++q];
                    switch (e) {
                        case 'n': v += '\n'; break;
                        case 't': v += '\t'; break;
                        case 'r': v += '\r'; break;
                        case '\\': v += '\\'; break;
                        case '\'': v += '\''; break;
                        case '"': v += '"'; break;
                        default: v += '\\'; v += e;
                    }
                } else {
                    v += s[q];
                }
            }
            if (q >= s.size()) fail(line, "unterminated string");
            out.push_back({Tok::K::string, std::move(v)});
            p = q + 1;
            continue;
        }
        static const char* const ops[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<", ">", "=", "(",
                                          ")", "[", "]", "{", "}", ",", ".", ":", "|", "~"};
        bool matched = false;
        for (const char* op : ops) {
            const std::string_view o(op);
            if (s.substr(p, o.size()) == o) {
                out.push_back({Tok::K::op, std::string(o)});
                p += o.size();
                matched = true;
                break;
            }
        }
        if (!matched) fail(line, fmt::format("unexpected character '{}'", c));
    }
    out.push_back({Tok::K::end, ""});
    return out;
}

// ---- expression parser ----

class ExprParser {
public:
    ExprParser(std::vector<Tok> toks, int line) : t_(std::move(toks)), line_(line) {}

    bool at_end() const { return t_[p_].k == Tok::K::end; }
    const Tok& peek(size_t ahead = 0) const { return t_[std::min(p_ + ahead, t_.size() - 1)]; }
    bool is_op(std::string_view op, size_t ahead = 0) const { return peek(ahead).k == Tok::K::op && peek(ahead).s == op; }
    bool is_name(std::string_view n, size_t ahead = 0) const { return peek(ahead).k == Tok::K::name && peek(ahead).s == n; }
    void expect_op(std::string_view op) {
        if (!is_op(op)) fail(line_, fmt::format("expected '{}', found '{}'", op, peek().s));
        ++p_;
    }
    std::string name() {
        if (peek().k != Tok::K::name) fail(line_, fmt::format("expected a name, found '{}'", peek().s));
        return t_[p_++].s;
    }
    void expect_end() {
        if (!at_end()) fail(line_, fmt::format("unexpected '{}'", peek().s));
    }
    bool accept_name(std::string_view n) {
        if (!is_name(n)) return false;
        ++p_;
        return true;
    }

    ExprP expression() {  // with a conditional and no tuple
        depth_guard g(*this);
        ExprP e = or_expr();
        if (is_name("if")) {
            ++p_;
            auto x = make(Expr::K::cond);
            x->a = e;
            x->b = or_expr();
            if (accept_name("else")) x->c = expression();
            return x;
        }
        return e;
    }

    ExprP expression_no_cond() { return or_expr(); }  // a for loop's iterable: `if` filters it

    // `a, b` without brackets (a for target or a set value) gives a list.
    ExprP tuple_or_expression() {
        ExprP first = expression();
        if (!is_op(",")) return first;
        auto x = make(Expr::K::list);
        x->items.push_back(first);
        while (is_op(",")) {
            ++p_;
            if (at_end()) break;
            x->items.push_back(expression());
        }
        return x;
    }

private:
    struct depth_guard {
        ExprParser& p;
        explicit depth_guard(ExprParser& q) : p(q) {
            if (++p.depth_ > Template::k_max_depth) fail(p.line_, "expression nested too deeply");
        }
        ~depth_guard() { --p.depth_; }
    };

    std::shared_ptr<Expr> make(Expr::K k) {
        auto x = std::make_shared<Expr>();
        x->k = k;
        x->line = line_;
        return x;
    }
    ExprP binary(std::string op, ExprP l, ExprP r) {
        auto x = make(Expr::K::binary);
        x->name = std::move(op);
        x->a = std::move(l);
        x->b = std::move(r);
        return x;
    }

    ExprP or_expr() {
        ExprP e = and_expr();
        while (accept_name("or")) e = binary("or", e, and_expr());
        return e;
    }
    ExprP and_expr() {
        ExprP e = not_expr();
        while (accept_name("and")) e = binary("and", e, not_expr());
        return e;
    }
    ExprP not_expr() {
        if (accept_name("not")) {
            depth_guard g(*this);
            auto x = make(Expr::K::unary);
            x->name = "not";
            x->a = not_expr();
            return x;
        }
        return compare();
    }
    ExprP compare() {
        ExprP e = math1();
        while (true) {
            if (peek().k == Tok::K::op && (peek().s == "==" || peek().s == "!=" || peek().s == "<" || peek().s == ">" ||
                                           peek().s == "<=" || peek().s == ">=")) {
                const std::string op = t_[p_++].s;
                e = binary(op, e, math1());
            } else if (is_name("in")) {
                ++p_;
                e = binary("in", e, math1());
            } else if (is_name("not") && is_name("in", 1)) {
                p_ += 2;
                e = binary("not in", e, math1());
            } else {
                return e;
            }
        }
    }
    ExprP math1() {
        ExprP e = concat();
        while (is_op("+") || is_op("-")) {
            const std::string op = t_[p_++].s;
            e = binary(op, e, concat());
        }
        return e;
    }
    ExprP concat() {
        ExprP e = math2();
        while (is_op("~")) {
            ++p_;
            e = binary("~", e, math2());
        }
        return e;
    }
    ExprP math2() {
        ExprP e = power();
        while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
            const std::string op = t_[p_++].s;
            e = binary(op, e, power());
        }
        return e;
    }
    ExprP power() {
        ExprP e = unary();
        while (is_op("**")) {
            ++p_;
            e = binary("**", e, unary());
        }
        return e;
    }
    ExprP unary() {
        if (is_op("-") || is_op("+")) {
            depth_guard g(*this);
            const std::string op = t_[p_++].s;
            auto x = make(Expr::K::unary);
            x->name = op;
            x->a = unary();
            return x;
        }
        return filters(postfix(primary()));
    }

    void call_args(Expr& x) {
        expect_op("(");
        while (!is_op(")")) {
            if (peek().k == Tok::K::name && is_op("=", 1)) {
                std::string k = name();
                ++p_;
                x.kwargs.emplace_back(std::move(k), expression());
            } else {
                x.items.push_back(expression());
            }
            if (!is_op(",")) break;
            ++p_;
        }
        expect_op(")");
    }

    ExprP postfix(ExprP e) {
        while (true) {
            if (is_op(".")) {
                ++p_;
                auto x = make(Expr::K::attr);
                x->a = e;
                if (peek().k == Tok::K::integer) x->name = std::to_string(t_[p_++].i);
                else x->name = name();
                e = x;
            } else if (is_op("[")) {
                ++p_;
                ExprP lo, hi, st;
                bool slice = false;
                if (!is_op(":")) lo = expression();
                if (is_op(":")) {
                    slice = true;
                    ++p_;
                    if (!is_op("]") && !is_op(":")) hi = expression();
                    if (is_op(":")) {
                        ++p_;
                        if (!is_op("]")) st = expression();
                    }
                }
                expect_op("]");
                auto x = make(slice ? Expr::K::slice : Expr::K::item);
                x->a = e;
                if (slice) x->items = {lo, hi, st};
                else x->b = lo;
                e = x;
            } else if (is_op("(")) {
                auto x = make(Expr::K::call);
                x->a = e;
                call_args(*x);
                e = x;
            } else {
                return e;
            }
        }
    }

    ExprP filters(ExprP e) {
        while (true) {
            if (is_op("|")) {
                ++p_;
                auto x = make(Expr::K::filter);
                x->a = e;
                x->name = name();
                if (is_op("(")) call_args(*x);
                e = x;
            } else if (is_name("is")) {
                ++p_;
                auto x = make(Expr::K::test);
                x->a = e;
                x->negated = accept_name("not");
                if (peek().k == Tok::K::name) x->name = name();
                else if (is_op("==")) x->name = "==", ++p_;
                else fail(line_, "expected a test name after 'is'");
                if (is_op("(")) {
                    call_args(*x);
                } else if (peek().k == Tok::K::string || peek().k == Tok::K::integer || peek().k == Tok::K::number ||
                           (peek().k == Tok::K::name && !is_name("and") && !is_name("or") && !is_name("else") &&
                            !is_name("if") && !is_name("in") && !is_name("not") && !is_name("is"))) {
                    x->items.push_back(primary());  // `is divisibleby 3`, `is sameas none`
                }
                e = x;
            } else {
                return e;
            }
        }
    }

    ExprP primary() {
        depth_guard g(*this);
        const Tok& t = peek();
        if (t.k == Tok::K::string) {
            auto x = make(Expr::K::literal);
            x->lit = Value::string(t.s);
            ++p_;
            while (peek().k == Tok::K::string) x->lit.s += t_[p_++].s;  // adjacent literals join
            return x;
        }
        if (t.k == Tok::K::integer || t.k == Tok::K::number) {
            auto x = make(Expr::K::literal);
            x->lit = t.k == Tok::K::integer ? Value::integer(t.i) : Value::number(t.d);
            ++p_;
            return x;
        }
        if (t.k == Tok::K::name) {
            const std::string n = t.s;
            ++p_;
            auto x = make(Expr::K::literal);
            if (n == "true" || n == "True") x->lit = Value::boolean(true);
            else if (n == "false" || n == "False") x->lit = Value::boolean(false);
            else if (n == "none" || n == "None") x->lit = Value::none();
            else {
                x->k = Expr::K::name;
                x->name = n;
            }
            return x;
        }
        if (is_op("(")) {
            ++p_;
            if (is_op(")")) {  // ()
                ++p_;
                return make(Expr::K::list);
            }
            ExprP e = tuple_or_expression();
            expect_op(")");
            return e;
        }
        if (is_op("[")) {
            ++p_;
            auto x = make(Expr::K::list);
            while (!is_op("]")) {
                x->items.push_back(expression());
                if (!is_op(",")) break;
                ++p_;
            }
            expect_op("]");
            return x;
        }
        if (is_op("{")) {
            ++p_;
            auto x = make(Expr::K::dict);
            while (!is_op("}")) {
                x->items.push_back(expression());
                expect_op(":");
                x->items.push_back(expression());
                if (!is_op(",")) break;
                ++p_;
            }
            expect_op("}");
            return x;
        }
        fail(line_, fmt::format("unexpected '{}'", t.k == Tok::K::end ? "end of expression" : t.s));
    }

    std::vector<Tok> t_;
    size_t p_ = 0;
    int line_;
    int depth_ = 0;
};

// ---- statement parser ----

class Parser {
public:
    explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

    std::shared_ptr<Node> parse() {
        std::string end_kw;
        auto root = block({}, end_kw);
        return root;
    }

private:
    // Parses pieces into a sequence until a statement whose keyword is in `ends` (returned in
    // end_kw with its parser left on the rest of that statement).
    std::shared_ptr<Node> block(const std::vector<std::string>& ends, std::string& end_kw) {
        auto seq = std::make_shared<Node>();
        seq->k = Node::K::seq;
        while (i_ < pieces_.size()) {
            const Piece& pc = pieces_[i_++];
            if (pc.k == Piece::K::text) {
                auto n = std::make_shared<Node>();
                n->k = Node::K::text;
                n->text = pc.s;
                seq->children.push_back(n);
                continue;
            }
            ExprParser ep(tokenize(pc.s, pc.line), pc.line);
            if (pc.k == Piece::K::expr) {
                auto n = std::make_shared<Node>();
                n->k = Node::K::output;
                n->line = pc.line;
                n->expr = ep.expression();
                ep.expect_end();
                seq->children.push_back(n);
                continue;
            }
            const std::string kw = ep.name();
            if (std::find(ends.begin(), ends.end(), kw) != ends.end()) {
                end_kw = kw;
                stmt_ = std::make_unique<ExprParser>(std::move(ep));
                return seq;
            }
            seq->children.push_back(statement(kw, ep, pc.line));
        }
        if (!ends.empty()) fail(pieces_.empty() ? 0 : pieces_.back().line, fmt::format("missing '{}'", ends.back()));
        return seq;
    }

    std::shared_ptr<Node> statement(const std::string& kw, ExprParser& ep, int line) {
        auto n = std::make_shared<Node>();
        n->line = line;
        std::string end_kw;
        if (kw == "if") {
            n->k = Node::K::if_;
            ExprP cond = ep.expression();
            ep.expect_end();
            while (true) {
                auto body = block({"elif", "else", "endif"}, end_kw);
                n->branches.emplace_back(cond, body);
                if (end_kw == "endif") break;
                if (end_kw == "else") {
                    stmt_->expect_end();
                    auto tail = block({"endif"}, end_kw);
                    n->branches.emplace_back(nullptr, tail);
                    break;
                }
                cond = stmt_->expression();
                stmt_->expect_end();
            }
            return n;
        }
        if (kw == "for") {
            n->k = Node::K::for_;
            n->targets.push_back(ep.name());
            while (ep.is_op(",")) {
                ep.expect_op(",");
                n->targets.push_back(ep.name());
            }
            if (!ep.accept_name("in")) fail(line, "expected 'in' in for");
            n->expr = ep.expression_no_cond();
            if (ep.accept_name("if")) n->cond = ep.expression();
            if (ep.accept_name("recursive")) fail(line, "recursive loops are not supported");
            ep.expect_end();
            n->body = block({"else", "endfor"}, end_kw);
            if (end_kw == "else") {
                stmt_->expect_end();
                n->else_body = block({"endfor"}, end_kw);
            }
            return n;
        }
        if (kw == "set") {
            std::string target = ep.name();
            if (ep.is_op(".")) {
                ep.expect_op(".");
                n->attr = ep.name();
            }
            n->targets.push_back(target);
            while (ep.is_op(",")) {
                ep.expect_op(",");
                n->targets.push_back(ep.name());
            }
            if (ep.is_op("=")) {
                ep.expect_op("=");
                n->k = Node::K::set;
                n->expr = ep.tuple_or_expression();
                ep.expect_end();
                return n;
            }
            ep.expect_end();
            n->k = Node::K::set_block;
            n->body = block({"endset"}, end_kw);
            return n;
        }
        if (kw == "macro") {
            n->k = Node::K::macro;
            n->name = ep.name();
            ep.expect_op("(");
            while (!ep.is_op(")")) {
                std::string p = ep.name();
                ExprP def;
                if (ep.is_op("=")) {
                    ep.expect_op("=");
                    def = ep.expression();
                }
                n->params.emplace_back(std::move(p), def);
                if (!ep.is_op(",")) break;
                ep.expect_op(",");
            }
            ep.expect_op(")");
            ep.expect_end();
            n->body = block({"endmacro"}, end_kw);
            return n;
        }
        if (kw == "filter") {
            n->k = Node::K::filter_block;
            n->name = ep.name();
            ep.expect_end();
            n->body = block({"endfilter"}, end_kw);
            return n;
        }
        if (kw == "generation") {  // transformers' marker for assistant masks: renders its body
            ep.expect_end();
            return block({"endgeneration"}, end_kw);
        }
        if (kw == "break" || kw == "continue") {
            ep.expect_end();
            n->k = kw == "break" ? Node::K::break_ : Node::K::continue_;
            return n;
        }
        fail(line, fmt::format("unsupported statement '{}'", kw));
    }

    std::vector<Piece> pieces_;
    size_t i_ = 0;
    std::unique_ptr<ExprParser> stmt_;  // the statement that ended the last block
};

// ---- rendering ----

using K = Value::Kind;

bool is_num(const Value& v) { return v.is(K::integer) || v.is(K::number) || v.is(K::boolean); }
double num(const Value& v) { return v.is(K::integer) ? double(v.i) : v.is(K::boolean) ? double(v.b) : v.d; }
bool is_int_like(const Value& v) { return v.is(K::integer) || v.is(K::boolean); }
int64_t int_of(const Value& v) { return v.is(K::integer) ? v.i : v.is(K::boolean) ? int64_t(v.b) : int64_t(v.d); }

bool equal(const Value& a, const Value& b) {
    if (is_num(a) && is_num(b)) return is_int_like(a) && is_int_like(b) ? int_of(a) == int_of(b) : num(a) == num(b);
    if (a.kind != b.kind) return false;
    switch (a.kind) {
        case K::undefined:
        case K::none: return true;
        case K::string: return a.s == b.s;
        case K::array:
            if (a.a->size() != b.a->size()) return false;
            for (size_t k = 0; k < a.a->size(); ++k)
                if (!equal((*a.a)[k], (*b.a)[k])) return false;
            return true;
        case K::object:
            if (a.o->size() != b.o->size()) return false;
            for (const auto& [k, v] : *a.o) {
                const Value* w = b.find(k);
                if (!w || !equal(v, *w)) return false;
            }
            return true;
        case K::function: return a.f == b.f;
        default: return false;
    }
}

size_t utf8_length(std::string_view s) {
    size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

std::string strip(std::string_view s, std::string_view chars, bool left, bool right) {
    auto in = [&](char c) { return chars.empty() ? is_space(c) || c == '\v' || c == '\f' : chars.find(c) != std::string_view::npos; };
    size_t b = 0, e = s.size();
    if (left)
        while (b < e && in(s[b])) ++b;
    if (right)
        while (e > b && in(s[e - 1])) --e;
    return std::string(s.substr(b, e - b));
}

std::string upper(std::string s) {
    for (char& c : s) c = char(std::toupper(static_cast<unsigned char>(c)));
    return s;
}
std::string lower(std::string s) {
    for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count = -1) {
    if (from.empty()) return s;
    std::string out;
    size_t p = 0;
    for (int64_t n = 0; count < 0 || n < count; ++n) {
        const size_t q = s.find(from, p);
        if (q == std::string::npos) break;
        out.append(s, p, q - p);
        out += to;
        p = q + from.size();
    }
    out.append(s, p);
    return out;
}

class Renderer {
public:
    explicit Renderer(const Value& context) {
        auto g = std::make_shared<Scope>();
        if (context.is(K::object))
            for (const auto& [k, v] : *context.o) (*g)[k] = v;
        scopes_.push_back(g);
    }

    std::string out;

    void render(const Node& n) {
        switch (n.k) {
            case Node::K::seq:
                for (const auto& c : n.children) {
                    render(*c);
                    if (control_) return;
                }
                return;
            case Node::K::text: emit(n.text); return;
            case Node::K::output: emit(eval(*n.expr).str()); return;
            case Node::K::if_:
                for (const auto& [cond, body] : n.branches)
                    if (!cond || eval(*cond).truthy()) {
                        render(*body);
                        return;
                    }
                return;
            case Node::K::for_: render_for(n); return;
            case Node::K::set: assign(n, eval(*n.expr)); return;
            case Node::K::set_block: assign(n, Value::string(capture(*n.body))); return;
            case Node::K::macro: define_macro(n); return;
            case Node::K::filter_block: {
                CallArgs none;
                emit(filter(n.name, Value::string(capture(*n.body)), none, n.line).str());
                return;
            }
            case Node::K::break_: control_ = 1; return;
            case Node::K::continue_: control_ = 2; return;
        }
    }

private:
    using Scope = std::map<std::string, Value>;
    std::vector<std::shared_ptr<Scope>> scopes_;  // innermost last; [0]: the template's globals
    int depth_ = 0;
    int64_t iterations_ = 0;
    int control_ = 0;  // 1: break, 2: continue

    struct Depth {
        Renderer& r;
        int line;
        Depth(Renderer& x, int l) : r(x), line(l) {
            if (++r.depth_ > Template::k_max_depth * 4) fail(line, "nested too deeply while rendering");
        }
        ~Depth() { --r.depth_; }
    };

    void emit(std::string_view s) {
        out.append(s);
        if (out.size() > Template::k_max_output) throw_error("jinja: the output passed {} bytes", Template::k_max_output);
    }

    std::string capture(const Node& body) {
        std::string saved;
        saved.swap(out);
        render(body);
        saved.swap(out);
        return saved;
    }

    Value lookup(const std::string& name) const {
        for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
            const auto f = (*it)->find(name);
            if (f != (*it)->end()) return f->second;
        }
        return builtin(name);
    }

    void assign(const Node& n, Value v) {
        if (!n.attr.empty()) {
            Value target = lookup(n.targets[0]);
            if (!target.is(K::object)) fail(n.line, fmt::format("'{}' is not a namespace", n.targets[0]));
            target.set(n.attr, std::move(v));
            return;
        }
        if (n.targets.size() == 1) {
            (*scopes_.back())[n.targets[0]] = std::move(v);
            return;
        }
        if (!v.is(K::array) || v.a->size() != n.targets.size()) fail(n.line, "cannot unpack the value into the names");
        for (size_t k = 0; k < n.targets.size(); ++k) (*scopes_.back())[n.targets[k]] = (*v.a)[k];
    }

    static std::vector<Value> items_of(const Value& v) {
        if (v.is(K::array)) return *v.a;
        if (v.is(K::object)) {
            std::vector<Value> keys;
            for (const auto& [k, x] : *v.o) keys.push_back(Value::string(k));
            return keys;
        }
        if (v.is(K::string)) {
            std::vector<Value> chars;
            for (char c : v.s) chars.push_back(Value::string(std::string(1, c)));
            return chars;
        }
        return {};
    }

    void bind_targets(const Node& n, const Value& item) {
        if (n.targets.size() == 1) {
            (*scopes_.back())[n.targets[0]] = item;
            return;
        }
        if (!item.is(K::array) || item.a->size() != n.targets.size()) fail(n.line, "cannot unpack a loop item");
        for (size_t k = 0; k < n.targets.size(); ++k) (*scopes_.back())[n.targets[k]] = (*item.a)[k];
    }

    void render_for(const Node& n) {
        Depth d(*this, n.line);
        const std::vector<Value> all = items_of(eval(*n.expr));
        scopes_.push_back(std::make_shared<Scope>());
        std::vector<Value> items;
        for (const Value& it : all) {
            if (n.cond) {
                bind_targets(n, it);
                if (!eval(*n.cond).truthy()) continue;
            }
            items.push_back(it);
        }
        if (items.empty()) {
            scopes_.pop_back();
            if (n.else_body) render(*n.else_body);
            return;
        }
        const auto len = int64_t(items.size());
        // One loop object, its members updated in place each iteration.
        Value loop = Value::object({{"index", {}}, {"index0", {}}, {"revindex", {}}, {"revindex0", {}}, {"first", {}},
                                    {"last", {}}, {"length", Value::integer(len)}, {"previtem", {}}, {"nextitem", {}}});
        (*scopes_.back())["loop"] = loop;
        Object& lo = *loop.o;
        for (int64_t k = 0; k < len; ++k) {
            if (++iterations_ > Template::k_max_iterations) fail(n.line, "too many loop iterations");
            bind_targets(n, items[size_t(k)]);
            lo[0].second = Value::integer(k + 1);
            lo[1].second = Value::integer(k);
            lo[2].second = Value::integer(len - k);
            lo[3].second = Value::integer(len - k - 1);
            lo[4].second = Value::boolean(k == 0);
            lo[5].second = Value::boolean(k == len - 1);
            lo[7].second = k > 0 ? items[size_t(k - 1)] : Value();
            lo[8].second = k + 1 < len ? items[size_t(k + 1)] : Value();
            render(*n.body);
            if (control_ == 1) {
                control_ = 0;
                break;
            }
            control_ = 0;
        }
        scopes_.pop_back();
    }

    void define_macro(const Node& n) {
        const Node* node = &n;
        (*scopes_.back())[n.name] = Value::function([this, node](CallArgs& a) {
            Depth d(*this, node->line);
            auto frame = std::make_shared<Scope>();
            for (size_t k = 0; k < node->params.size(); ++k) {
                const auto& [pname, def] = node->params[k];
                const Value* v = a.get(k, pname);
                (*frame)[pname] = v ? *v : def ? eval(*def) : Value();
            }
            std::vector<std::shared_ptr<Scope>> saved = {scopes_.front(), frame};
            saved.swap(scopes_);
            std::string text;
            try {
                text = capture(*node->body);
            } catch (...) {
                saved.swap(scopes_);
                throw;
            }
            saved.swap(scopes_);
            control_ = 0;
            return Value::string(std::move(text));
        });
    }

    static Value builtin(const std::string& name) {
        if (name == "range")
            return Value::function([](CallArgs& a) {
                int64_t start = 0, stop = 0, step = 1;
                if (a.args.size() == 1) stop = int_of(a.args[0]);
                else if (a.args.size() >= 2) start = int_of(a.args[0]), stop = int_of(a.args[1]);
                if (a.args.size() >= 3) step = int_of(a.args[2]);
                if (step == 0) throw_error("jinja: range() step must not be zero");
                Array out;
                for (int64_t v = start; step > 0 ? v < stop : v > stop; v += step) {
                    if (out.size() >= size_t(Template::k_max_iterations)) throw_error("jinja: range() too long");
                    out.push_back(Value::integer(v));
                }
                return Value::array(std::move(out));
            });
        if (name == "namespace" || name == "dict")
            return Value::function([](CallArgs& a) {
                Value ns = Value::object();
                if (!a.args.empty() && a.args[0].is(K::object))
                    for (const auto& [k, v] : *a.args[0].o) ns.set(k, v);
                for (auto& [k, v] : a.kwargs) ns.set(k, v);
                return ns;
            });
        if (name == "raise_exception")
            return Value::function([](CallArgs& a) -> Value {
                throw_error("chat template: {}", a.args.empty() ? std::string("error") : a.args[0].str());
            });
        if (name == "strftime_now")
            return Value::function([](CallArgs& a) {
                const std::time_t now = std::time(nullptr);
                std::tm tm{};
                localtime_r(&now, &tm);
                char buf[256];
                const std::string f = a.args.empty() ? "%Y-%m-%d" : a.args[0].str();
                const size_t n = std::strftime(buf, sizeof buf, f.c_str(), &tm);
                return Value::string(std::string(buf, n));
            });
        return Value();
    }

    Value attr(const Value& obj, const std::string& name) {
        if (obj.is(K::object)) {
            const Value* v = obj.find(name);
            return v ? *v : Value();
        }
        if (obj.is(K::array) && !name.empty() && std::isdigit(static_cast<unsigned char>(name[0]))) {
            const size_t k = std::stoul(name);
            return k < obj.a->size() ? (*obj.a)[k] : Value();
        }
        return Value();
    }

    static Value item(const Value& obj, const Value& key) {
        if (obj.is(K::object)) {
            const Value* v = obj.find(key.str());
            return v ? *v : Value();
        }
        if ((obj.is(K::array) || obj.is(K::string)) && is_int_like(key)) {
            const auto n = int64_t(obj.is(K::array) ? obj.a->size() : obj.s.size());
            int64_t k = int_of(key);
            if (k < 0) k += n;
            if (k < 0 || k >= n) return Value();
            return obj.is(K::array) ? (*obj.a)[size_t(k)] : Value::string(std::string(1, obj.s[size_t(k)]));
        }
        return Value();
    }

    Value slice(const Value& obj, const Expr& e) {
        const auto n = int64_t(obj.is(K::array) ? obj.a->size() : obj.is(K::string) ? obj.s.size() : 0);
        auto bound = [&](const ExprP& x, int64_t def) -> std::optional<int64_t> {
            if (!x) return std::nullopt;
            const Value v = eval(*x);
            if (v.is(K::none)) return std::nullopt;
            (void)def;
            return int_of(v);
        };
        const int64_t step = bound(e.items[2], 1).value_or(1);
        if (step == 0) fail(e.line, "slice step must not be zero");
        auto clamp = [&](std::optional<int64_t> v, int64_t def) {
            if (!v) return def;
            int64_t x = *v < 0 ? *v + n : *v;
            return step > 0 ? std::clamp<int64_t>(x, 0, n) : std::clamp<int64_t>(x, -1, n - 1);
        };
        const int64_t lo = clamp(bound(e.items[0], 0), step > 0 ? 0 : n - 1);
        const int64_t hi = clamp(bound(e.items[1], n), step > 0 ? n : -1);
        if (obj.is(K::string)) {
            std::string s;
            for (int64_t k = lo; step > 0 ? k < hi : k > hi; k += step) s += obj.s[size_t(k)];
            return Value::string(std::move(s));
        }
        Array a;
        if (obj.is(K::array))
            for (int64_t k = lo; step > 0 ? k < hi : k > hi; k += step) a.push_back((*obj.a)[size_t(k)]);
        return Value::array(std::move(a));
    }

    CallArgs args_of(const Expr& e) {
        CallArgs a;
        for (const auto& x : e.items) a.args.push_back(eval(*x));
        for (const auto& [k, x] : e.kwargs) a.kwargs.emplace_back(k, eval(*x));
        return a;
    }

    bool test(const std::string& name, const Value& v, const CallArgs& a, int line) {
        const Value* arg = a.get(0, "");
        if (name == "defined") return v.defined();
        if (name == "undefined") return !v.defined();
        if (name == "none") return v.is(K::none);
        if (name == "string") return v.is(K::string);
        if (name == "number") return v.is(K::integer) || v.is(K::number);
        if (name == "integer") return v.is(K::integer);
        if (name == "float") return v.is(K::number);
        if (name == "boolean") return v.is(K::boolean);
        if (name == "true") return v.is(K::boolean) && v.b;
        if (name == "false") return v.is(K::boolean) && !v.b;
        if (name == "mapping") return v.is(K::object);
        if (name == "iterable") return v.is(K::array) || v.is(K::object) || v.is(K::string);
        if (name == "sequence") return v.is(K::array) || v.is(K::string);
        if (name == "callable") return v.is(K::function);
        if (name == "odd") return is_int_like(v) && int_of(v) % 2 != 0;
        if (name == "even") return is_int_like(v) && int_of(v) % 2 == 0;
        if (name == "lower") return v.is(K::string) && lower(v.s) == v.s;
        if (name == "upper") return v.is(K::string) && upper(v.s) == v.s;
        if (!arg) fail(line, fmt::format("test '{}' needs an argument", name));
        if (name == "divisibleby") return int_of(*arg) != 0 && int_of(v) % int_of(*arg) == 0;
        if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") return equal(v, *arg);
        if (name == "ne") return !equal(v, *arg);
        if (name == "in") return contains(*arg, v);
        fail(line, fmt::format("unknown test '{}'", name));
    }

    static bool contains(const Value& container, const Value& x) {
        if (container.is(K::string)) return x.is(K::string) && container.s.find(x.s) != std::string::npos;
        if (container.is(K::array))
            return std::any_of(container.a->begin(), container.a->end(), [&](const Value& y) { return equal(x, y); });
        if (container.is(K::object)) return x.is(K::string) && container.find(x.s);
        return false;
    }

    Value filter(const std::string& name, const Value& v, CallArgs& a, int line) {
        const Value* arg0 = a.get(0, "");
        if (name == "tojson") {
            const Value* ind = a.get(0, "indent");
            return Value::string(v.json(ind && !ind->is(K::none) ? int(int_of(*ind)) : -1));
        }
        if (name == "trim") return Value::string(strip(v.str(), arg0 ? arg0->str() : "", true, true));
        if (name == "upper") return Value::string(upper(v.str()));
        if (name == "lower") return Value::string(lower(v.str()));
        if (name == "capitalize") {
            std::string s = lower(v.str());
            if (!s.empty()) s[0] = char(std::toupper(static_cast<unsigned char>(s[0])));
            return Value::string(s);
        }
        if (name == "title") return call_method(v, "title", a, line);
        if (name == "length" || name == "count") {
            if (v.is(K::string)) return Value::integer(int64_t(utf8_length(v.s)));
            if (v.is(K::array)) return Value::integer(int64_t(v.a->size()));
            if (v.is(K::object)) return Value::integer(int64_t(v.o->size()));
            return Value::integer(0);
        }
        if (name == "first" || name == "last") {
            const std::vector<Value> it = items_of(v);
            if (it.empty()) return Value();
            return name == "first" ? it.front() : it.back();
        }
        if (name == "join") {
            std::string s;
            const std::string sep = arg0 ? arg0->str() : "";
            const Value* attr_name = a.get(1, "attribute");
            bool first = true;
            for (const Value& x : items_of(v)) {
                if (!first) s += sep;
                first = false;
                s += (attr_name ? attr(x, attr_name->str()) : x).str();
            }
            return Value::string(std::move(s));
        }
        if (name == "default" || name == "d") {
            const Value* b = a.get(1, "boolean");
            const bool use = !v.defined() || (b && b->truthy() && !v.truthy());
            return use ? (arg0 ? *arg0 : Value::string("")) : v;
        }
        if (name == "string") return Value::string(v.str());
        if (name == "safe") return v;
        if (name == "int") {
            if (is_num(v)) return Value::integer(int_of(v));
            try {
                return Value::integer(std::stoll(v.str()));
            } catch (const std::exception&) {
                return Value::integer(0);
            }
        }
        if (name == "float") {
            if (is_num(v)) return Value::number(num(v));
            try {
                return Value::number(std::stod(v.str()));
            } catch (const std::exception&) {
                return Value::number(0.0);
            }
        }
        if (name == "abs") return v.is(K::integer) ? Value::integer(v.i < 0 ? -v.i : v.i) : Value::number(std::fabs(num(v)));
        if (name == "list") return Value::array(items_of(v));
        if (name == "items") return call_method(v, "items", a, line);
        if (name == "replace") return call_method(v, "replace", a, line);
        if (name == "reverse") {
            if (v.is(K::string)) return Value::string(std::string(v.s.rbegin(), v.s.rend()));
            std::vector<Value> it = items_of(v);
            std::reverse(it.begin(), it.end());
            return Value::array(std::move(it));
        }
        if (name == "unique") {
            Array out;
            for (const Value& x : items_of(v))
                if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return equal(x, y); })) out.push_back(x);
            return Value::array(std::move(out));
        }
        if (name == "selectattr" || name == "rejectattr") {
            if (!arg0) fail(line, fmt::format("{} needs an attribute", name));
            Array out;
            for (const Value& x : items_of(v)) {
                const Value field = attr(x, arg0->str());
                bool ok;
                if (a.args.size() >= 2) {
                    CallArgs targs;
                    for (size_t k = 2; k < a.args.size(); ++k) targs.args.push_back(a.args[k]);
                    ok = test(a.args[1].str(), field, targs, line);
                } else {
                    ok = field.truthy();
                }
                if (ok == (name == "selectattr")) out.push_back(x);
            }
            return Value::array(std::move(out));
        }
        if (name == "map") {
            Array out;
            const Value* attr_name = a.get(99, "attribute");
            for (const Value& x : items_of(v)) {
                if (attr_name) {
                    out.push_back(attr(x, attr_name->str()));
                } else if (arg0) {
                    CallArgs rest;
                    for (size_t k = 1; k < a.args.size(); ++k) rest.args.push_back(a.args[k]);
                    out.push_back(filter(arg0->str(), x, rest, line));
                }
            }
            return Value::array(std::move(out));
        }
        if (name == "indent") {
            const int64_t width = arg0 ? int_of(*arg0) : 4;
            const Value* first = a.get(1, "first");
            const std::string pad(size_t(std::clamp<int64_t>(width, 0, 64)), ' ');
            std::string s = v.str(), out;
            for (size_t k = 0; k < s.size(); ++k) {
                out += s[k];
                if (s[k] == '\n' && k + 1 < s.size() && s[k + 1] != '\n') out += pad;
            }
            return Value::string(first && first->truthy() ? pad + out : out);
        }
        fail(line, fmt::format("unknown filter '{}'", name));
    }

    Value call_method(const Value& obj, const std::string& name, CallArgs& a, int line) {
        const Value* arg0 = a.get(0, "");
        if (obj.is(K::string)) {
            const std::string& s = obj.s;
            if (name == "strip" || name == "lstrip" || name == "rstrip")
                return Value::string(strip(s, arg0 && !arg0->is(K::none) ? arg0->str() : "", name != "rstrip", name != "lstrip"));
            if (name == "upper") return Value::string(upper(s));
            if (name == "lower") return Value::string(lower(s));
            if (name == "capitalize") return filter("capitalize", obj, a, line);
            if (name == "title") {
                std::string t = s;
                bool start = true;
                for (char& c : t) {
                    const bool alpha = std::isalpha(static_cast<unsigned char>(c));
                    c = alpha ? char(start ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c))) : c;
                    start = !alpha;
                }
                return Value::string(t);
            }
            if (name == "startswith" || name == "endswith") {
                auto one = [&](const std::string& p) {
                    return name == "startswith" ? s.compare(0, p.size(), p) == 0
                                                : s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
                };
                if (arg0 && arg0->is(K::array))
                    return Value::boolean(std::any_of(arg0->a->begin(), arg0->a->end(), [&](const Value& p) { return one(p.str()); }));
                return Value::boolean(arg0 && one(arg0->str()));
            }
            if (name == "replace") {
                if (a.args.size() < 2) fail(line, "replace() needs two arguments");
                return Value::string(replace_all(s, a.args[0].str(), a.args[1].str(), a.args.size() > 2 ? int_of(a.args[2]) : -1));
            }
            if (name == "split") {
                Array out;
                const Value* maxs = a.get(1, "maxsplit");
                int64_t left = maxs ? int_of(*maxs) : -1;
                if (!arg0 || arg0->is(K::none)) {
                    size_t p = 0;
                    while (p < s.size()) {
                        while (p < s.size() && is_space(s[p])) ++p;
                        if (p >= s.size()) break;
                        if (left == 0) {
                            out.push_back(Value::string(strip(s.substr(p), "", false, true)));
                            break;
                        }
                        size_t q = p;
                        while (q < s.size() && !is_space(s[q])) ++q;
                        out.push_back(Value::string(s.substr(p, q - p)));
                        --left;
                        p = q;
                    }
                } else {
                    const std::string sep = arg0->str();
                    if (sep.empty()) fail(line, "split() with an empty separator");
                    size_t p = 0;
                    while (true) {
                        const size_t q = left == 0 ? std::string::npos : s.find(sep, p);
                        if (q == std::string::npos) {
                            out.push_back(Value::string(s.substr(p)));
                            break;
                        }
                        out.push_back(Value::string(s.substr(p, q - p)));
                        --left;
                        p = q + sep.size();
                    }
                }
                return Value::array(std::move(out));
            }
            if (name == "find") return Value::integer(arg0 ? [&] {
                const size_t q = s.find(arg0->str());
                return q == std::string::npos ? int64_t(-1) : int64_t(q);
            }() : -1);
            if (name == "count") {
                if (!arg0 || arg0->str().empty()) return Value::integer(0);
                int64_t n = 0;
                for (size_t q = s.find(arg0->str()); q != std::string::npos; q = s.find(arg0->str(), q + arg0->s.size())) ++n;
                return Value::integer(n);
            }
            if (name == "join") {
                std::string out;
                bool first = true;
                for (const Value& x : arg0 ? items_of(*arg0) : std::vector<Value>{}) {
                    if (!first) out += s;
                    first = false;
                    out += x.str();
                }
                return Value::string(std::move(out));
            }
        }
        if (obj.is(K::object)) {
            if (name == "items") {
                Array out;
                for (const auto& [k, v] : *obj.o) out.push_back(Value::array({Value::string(k), v}));
                return Value::array(std::move(out));
            }
            if (name == "keys") return Value::array(items_of(obj));
            if (name == "values") {
                Array out;
                for (const auto& [k, v] : *obj.o) out.push_back(v);
                return Value::array(std::move(out));
            }
            if (name == "get") {
                const Value* v = arg0 ? obj.find(arg0->str()) : nullptr;
                const Value* def = a.get(1, "default");
                return v ? *v : def ? *def : Value::none();
            }
        }
        if (obj.is(K::array)) {
            if (name == "append") {
                if (!arg0) fail(line, "append() needs an argument");
                if (obj.a->size() >= size_t(Template::k_max_iterations)) fail(line, "list too long");
                obj.a->push_back(*arg0);
                return Value::none();
            }
            if (name == "pop") {
                if (obj.a->empty()) fail(line, "pop() from an empty list");
                int64_t k = arg0 ? int_of(*arg0) : -1;
                if (k < 0) k += int64_t(obj.a->size());
                if (k < 0 || k >= int64_t(obj.a->size())) fail(line, "pop() index out of range");
                Value v = (*obj.a)[size_t(k)];
                obj.a->erase(obj.a->begin() + k);
                return v;
            }
        }
        fail(line, fmt::format("unknown method '{}'", name));
    }

    Value binary(const Expr& e) {
        const std::string& op = e.name;
        if (op == "and") {
            Value l = eval(*e.a);
            return l.truthy() ? eval(*e.b) : l;
        }
        if (op == "or") {
            Value l = eval(*e.a);
            return l.truthy() ? l : eval(*e.b);
        }
        const Value l = eval(*e.a), r = eval(*e.b);
        if (op == "==") return Value::boolean(equal(l, r));
        if (op == "!=") return Value::boolean(!equal(l, r));
        if (op == "in") return Value::boolean(contains(r, l));
        if (op == "not in") return Value::boolean(!contains(r, l));
        if (op == "~") return Value::string(l.str() + r.str());
        if (op == "<" || op == ">" || op == "<=" || op == ">=") {
            int c;
            if (is_num(l) && is_num(r)) c = num(l) < num(r) ? -1 : num(l) > num(r) ? 1 : 0;
            else if (l.is(K::string) && r.is(K::string)) c = l.s.compare(r.s) < 0 ? -1 : l.s.compare(r.s) > 0 ? 1 : 0;
            else fail(e.line, fmt::format("cannot compare with '{}'", op));
            return Value::boolean(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
        }
        if (op == "+") {
            if (l.is(K::string) && r.is(K::string)) return Value::string(l.s + r.s);
            if (l.is(K::array) && r.is(K::array)) {
                Array out = *l.a;
                out.insert(out.end(), r.a->begin(), r.a->end());
                return Value::array(std::move(out));
            }
        }
        if (op == "*" && l.is(K::string) && is_int_like(r)) {
            std::string out;
            for (int64_t k = 0; k < std::min<int64_t>(int_of(r), 1 << 16); ++k) out += l.s;
            return Value::string(std::move(out));
        }
        if (!is_num(l) || !is_num(r))
            fail(e.line, fmt::format("unsupported operand types for '{}' ({} and {})", op, l.str(), r.str()));
        const bool ints = is_int_like(l) && is_int_like(r);
        if (op == "+") return ints ? Value::integer(int_of(l) + int_of(r)) : Value::number(num(l) + num(r));
        if (op == "-") return ints ? Value::integer(int_of(l) - int_of(r)) : Value::number(num(l) - num(r));
        if (op == "*") return ints ? Value::integer(int_of(l) * int_of(r)) : Value::number(num(l) * num(r));
        if (op == "/") {
            if (num(r) == 0) fail(e.line, "division by zero");
            return Value::number(num(l) / num(r));
        }
        if (op == "//" || op == "%") {
            if (num(r) == 0) fail(e.line, "division by zero");
            if (ints) {
                const int64_t a = int_of(l), b = int_of(r);
                int64_t q = a / b;
                if ((a % b != 0) && ((a < 0) != (b < 0))) --q;  // Python floors
                return op == "//" ? Value::integer(q) : Value::integer(a - q * b);
            }
            const double q = std::floor(num(l) / num(r));
            return op == "//" ? Value::number(q) : Value::number(num(l) - q * num(r));
        }
        if (op == "**") return ints && int_of(r) >= 0 ? Value::integer(int64_t(std::pow(double(int_of(l)), double(int_of(r)))))
                                                     : Value::number(std::pow(num(l), num(r)));
        fail(e.line, fmt::format("unknown operator '{}'", op));
    }

public:
    Value eval(const Expr& e) {
        Depth d(*this, e.line);
        switch (e.k) {
            case Expr::K::literal: return e.lit;
            case Expr::K::name: return lookup(e.name);
            case Expr::K::list: {
                Array a;
                for (const auto& x : e.items) a.push_back(eval(*x));
                return Value::array(std::move(a));
            }
            case Expr::K::dict: {
                Value o = Value::object();
                for (size_t k = 0; k + 1 < e.items.size(); k += 2) o.set(eval(*e.items[k]).str(), eval(*e.items[k + 1]));
                return o;
            }
            case Expr::K::attr: return attr(eval(*e.a), e.name);
            case Expr::K::item: return item(eval(*e.a), eval(*e.b));
            case Expr::K::slice: return slice(eval(*e.a), e);
            case Expr::K::call: {
                CallArgs a = args_of(e);
                if (e.a->k == Expr::K::attr) {
                    const Value obj = eval(*e.a->a);
                    if (const Value* member = obj.find(e.a->name); member && member->is(K::function)) return (*member->f)(a);
                    return call_method(obj, e.a->name, a, e.line);
                }
                const Value fn = eval(*e.a);
                if (!fn.is(K::function)) fail(e.line, "calling something that is not a function");
                return (*fn.f)(a);
            }
            case Expr::K::filter: {
                CallArgs a = args_of(e);
                return filter(e.name, eval(*e.a), a, e.line);
            }
            case Expr::K::test: {
                CallArgs a = args_of(e);
                return Value::boolean(test(e.name, eval(*e.a), a, e.line) != e.negated);
            }
            case Expr::K::unary: {
                const Value v = eval(*e.a);
                if (e.name == "not") return Value::boolean(!v.truthy());
                if (!is_num(v)) fail(e.line, fmt::format("bad operand for unary '{}'", e.name));
                if (e.name == "-") return is_int_like(v) ? Value::integer(-int_of(v)) : Value::number(-num(v));
                return v;
            }
            case Expr::K::binary: return binary(e);
            case Expr::K::cond:
                if (eval(*e.b).truthy()) return eval(*e.a);
                return e.c ? eval(*e.c) : Value();
        }
        return Value();
    }
};

}  // namespace

Template::Template(std::string_view source) : root_(Parser(split(source)).parse()) {}
Template::~Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;

std::string Template::render(const Value& context) const {
    Renderer r(context);
    r.render(*root_);
    return std::move(r.out);
}

}  // namespace coinfer::jinja
