#include "grammar.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>

#include "io/error.h"

namespace coinfer {

namespace {

// ---- characters ----

using CpRanges = std::vector<std::pair<uint32_t, uint32_t>>;  // code point ranges, inclusive
constexpr uint32_t k_max_cp = 0x10FFFF;

// Sorted, merged, without the surrogates (never valid in UTF-8).
CpRanges normalize(CpRanges r) {
    CpRanges cut;
    for (auto [a, b] : r) {
        if (a > b) continue;
        if (a < 0xD800 && b >= 0xD800) {
            cut.push_back({a, 0xD7FF});
            if (b > 0xDFFF) cut.push_back({0xE000, b});
        } else if (a >= 0xD800 && a <= 0xDFFF) {
            if (b > 0xDFFF) cut.push_back({0xE000, b});
        } else {
            cut.push_back({a, b});
        }
    }
    std::sort(cut.begin(), cut.end());
    CpRanges out;
    for (auto [a, b] : cut) {
        if (!out.empty() && a <= out.back().second + 1) out.back().second = std::max(out.back().second, b);
        else out.push_back({a, b});
    }
    return out;
}

CpRanges complement(const CpRanges& r) {
    CpRanges out;
    uint32_t next = 0;
    for (auto [a, b] : normalize(r)) {
        if (a > next) out.push_back({next, a - 1});
        next = b + 1;
    }
    if (next <= k_max_cp) out.push_back({next, k_max_cp});
    return normalize(out);
}

int utf8_len(uint32_t cp) { return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4; }

void utf8_encode(uint32_t cp, uint8_t* out) {
    const int n = utf8_len(cp);
    if (n == 1) {
        out[0] = uint8_t(cp);
        return;
    }
    static constexpr uint8_t lead[5] = {0, 0, 0xC0, 0xE0, 0xF0};
    for (int i = n - 1; i > 0; --i) {
        out[i] = uint8_t(0x80 | (cp & 0x3F));
        cp >>= 6;
    }
    out[0] = uint8_t(lead[n] | cp);
}

// The byte-range sequences whose union is exactly the UTF-8 encodings of [lo, hi]: a range is
// split where the encoding length changes, then until each continuation byte ranges freely.
using ByteSeq = std::vector<std::pair<uint8_t, uint8_t>>;
void utf8_sequences(uint32_t lo, uint32_t hi, std::vector<ByteSeq>& out) {
    if (lo > hi) return;
    for (uint32_t edge : {0x7Fu, 0x7FFu, 0xFFFFu}) {
        if (lo <= edge && edge < hi) {
            utf8_sequences(lo, edge, out);
            utf8_sequences(edge + 1, hi, out);
            return;
        }
    }
    const int n = utf8_len(lo);
    for (int i = 1; i < n; ++i) {
        const uint32_t m = (1u << (6 * i)) - 1;
        if ((lo & ~m) != (hi & ~m)) {
            if ((lo & m) != 0) {
                utf8_sequences(lo, lo | m, out);
                utf8_sequences((lo | m) + 1, hi, out);
                return;
            }
            if ((hi & m) != m) {
                utf8_sequences(lo, (hi & ~m) - 1, out);
                utf8_sequences(hi & ~m, hi, out);
                return;
            }
        }
    }
    uint8_t a[4], b[4];
    utf8_encode(lo, a);
    utf8_encode(hi, b);
    ByteSeq s;
    for (int i = 0; i < n; ++i) s.push_back({a[i], b[i]});
    out.push_back(std::move(s));
}

// ---- parsing: GBNF to rules of alternatives of symbols ----

struct Sym {
    bool is_ref = false;
    int32_t rule = -1;  // is_ref
    CpRanges chars;     // otherwise: one character from these
};
using Seq = std::vector<Sym>;

class Parser {
public:
    explicit Parser(std::string_view src) : src_(src) {}

    std::shared_ptr<Grammar> run() {
        if (src_.size() > Grammar::k_max_source_bytes)
            throw_error("grammar: {} bytes (at most {})", src_.size(), Grammar::k_max_source_bytes);
        space(true);
        while (pos_ < src_.size()) {
            rule();
            space(true);
        }
        for (size_t r = 0; r < defined_.size(); ++r)
            if (!defined_[r]) fail_at(first_use_[r], fmt::format("rule '{}' is used but never defined", names_[r]));
        auto it = ids_.find("root");
        if (it == ids_.end()) throw_error("grammar: no 'root' rule (it is where generation starts)");
        return compile(it->second);
    }

private:
    // ---- lexing ----
    [[noreturn]] void fail_at(size_t at, const std::string& why) const {
        size_t line = 1, col = 1;
        for (size_t i = 0; i < at && i < src_.size(); ++i) {
            if (src_[i] == '\n') ++line, col = 1;
            else ++col;
        }
        throw_error("grammar: {}:{}: {}", line, col, why);
    }
    [[noreturn]] void fail(const std::string& why) const { fail_at(pos_, why); }
    bool at_end() const { return pos_ >= src_.size(); }
    char peek(size_t k = 0) const { return pos_ + k < src_.size() ? src_[pos_ + k] : '\0'; }

    // Blanks and comments; newlines too when inside parentheses (or between rules).
    void space(bool newlines) {
        while (!at_end()) {
            const char c = peek();
            if (c == ' ' || c == '\t') ++pos_;
            else if (c == '#') while (!at_end() && peek() != '\n') ++pos_;
            else if (newlines && (c == '\n' || c == '\r')) ++pos_;
            else break;
        }
    }
    static bool is_name_char(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    }
    std::string name() {
        const size_t start = pos_;
        while (!at_end() && is_name_char(peek())) ++pos_;
        if (pos_ == start) fail("expected a rule name");
        return std::string(src_.substr(start, pos_ - start));
    }
    uint32_t hex(int digits) {
        uint32_t v = 0;
        for (int i = 0; i < digits; ++i) {
            const char c = peek();
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0) fail(fmt::format("expected {} hex digits", digits));
            v = v * 16 + uint32_t(d);
            ++pos_;
        }
        return v;
    }
    // One character of a literal or class: an escape or a UTF-8 sequence.
    uint32_t character() {
        if (at_end()) fail("unexpected end of the grammar");
        const auto c = static_cast<unsigned char>(peek());
        if (c == '\\') {
            ++pos_;
            const char e = peek();
            ++pos_;
            switch (e) {
                case 'n': return '\n';
                case 't': return '\t';
                case 'r': return '\r';
                case '0': return 0;
                case 'x': return hex(2);
                case 'u': return hex(4);
                case 'U': {
                    const uint32_t v = hex(8);
                    if (v > k_max_cp) fail("code point above U+10FFFF");
                    return v;
                }
                case '\\': case '"': case '[': case ']': case '-': case '^': case '/': case '\'': return uint32_t(e);
                default: --pos_; fail(fmt::format("unknown escape '\\{}'", e));
            }
        }
        const int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (n == 0 || pos_ + size_t(n) > src_.size()) fail("invalid UTF-8 in the grammar");
        uint32_t cp = n == 1 ? c : n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
        for (int i = 1; i < n; ++i) {
            const auto d = static_cast<unsigned char>(src_[pos_ + size_t(i)]);
            if ((d & 0xC0) != 0x80) fail("invalid UTF-8 in the grammar");
            cp = (cp << 6) | (d & 0x3F);
        }
        pos_ += size_t(n);
        return cp;
    }

    // ---- rules ----
    int32_t rule_id(const std::string& n, size_t at) {
        auto [it, fresh] = ids_.try_emplace(n, int32_t(names_.size()));
        if (fresh) {
            names_.push_back(n);
            alts_.emplace_back();
            defined_.push_back(false);
            first_use_.push_back(at);
        }
        return it->second;
    }
    int32_t new_rule(const std::string& base) {
        const std::string n = fmt::format("{}-{}", base, names_.size());
        const int32_t id = rule_id(n, pos_);
        defined_[size_t(id)] = true;
        return id;
    }
    void count(size_t n) {
        n_syms_ += n;
        if (n_syms_ > Grammar::k_max_elements) fail(fmt::format("the grammar grows past {} elements", Grammar::k_max_elements));
    }

    void rule() {
        const size_t at = pos_;
        const std::string n = name();
        space(false);
        if (src_.substr(pos_, 3) != "::=") fail("expected '::=' after the rule name");
        pos_ += 3;
        space(false);
        const int32_t id = rule_id(n, at);
        if (defined_[size_t(id)]) fail_at(at, fmt::format("rule '{}' is defined twice", n));
        defined_[size_t(id)] = true;
        current_ = n;
        alts_[size_t(id)] = alternatives(0);
        if (peek() == ')') fail("unexpected ')'");
        if (!at_end() && peek() != '\n' && peek() != '\r') fail("expected the end of the line");
    }

    std::vector<Seq> alternatives(int depth) {
        std::vector<Seq> alts;
        alts.push_back(sequence(depth));
        while (peek() == '|') {
            ++pos_;
            space(depth > 0);
            alts.push_back(sequence(depth));
        }
        return alts;
    }

    Seq sequence(int depth) {
        Seq seq;
        while (!at_end()) {
            const char c = peek();
            if (c == '|' || c == ')' || c == '\n' || c == '\r') break;
            const size_t start = seq.size();
            if (c == '"') {
                ++pos_;
                while (peek() != '"') {
                    if (at_end() || peek() == '\n') fail("unterminated string literal");
                    const uint32_t cp = character();
                    seq.push_back(Sym{false, -1, {{cp, cp}}});
                }
                ++pos_;
            } else if (c == '[') {
                ++pos_;
                const bool neg = peek() == '^';
                if (neg) ++pos_;
                CpRanges r;
                while (peek() != ']') {
                    if (at_end() || peek() == '\n') fail("unterminated character class");
                    const uint32_t a = character();
                    uint32_t b = a;
                    if (peek() == '-' && peek(1) != ']') {
                        ++pos_;
                        b = character();
                        if (b < a) fail("a character range runs backwards");
                    }
                    r.push_back({a, b});
                }
                ++pos_;
                r = neg ? complement(r) : normalize(r);
                if (r.empty()) fail("the character class matches nothing");
                seq.push_back(Sym{false, -1, std::move(r)});
            } else if (c == '.') {
                ++pos_;
                seq.push_back(Sym{false, -1, normalize({{0, k_max_cp}})});
            } else if (c == '(') {
                if (depth >= Grammar::k_max_nesting) fail(fmt::format("groups nest deeper than {}", Grammar::k_max_nesting));
                ++pos_;
                space(true);
                const int32_t id = new_rule(current_);
                auto inner = alternatives(depth + 1);
                if (peek() != ')') fail("expected ')'");
                ++pos_;
                alts_[size_t(id)] = std::move(inner);
                seq.push_back(Sym{true, id, {}});
            } else if (is_name_char(c)) {
                const size_t at = pos_;
                const std::string ref = name();
                seq.push_back(Sym{true, rule_id(ref, at), {}});
            } else {
                fail(fmt::format("unexpected '{}'", c));
            }
            count(seq.size() - start);
            space(depth > 0);
            if (src_.substr(pos_, 3) == "::=") fail("expected a newline before the next rule");
            repetition(seq, start, depth);
        }
        return seq;
    }

    // *, +, ?, {m}, {m,}, {m,n} on the last item (a whole literal counts as one item).
    void repetition(Seq& seq, size_t start, int depth) {
        while (true) {
            const char c = peek();
            if (c != '*' && c != '+' && c != '?' && c != '{') return;
            if (start >= seq.size()) fail(fmt::format("'{}' follows nothing", c));
            ++pos_;
            int64_t lo = 0, hi = -1;  // hi -1: unbounded
            if (c == '+') lo = 1;
            else if (c == '?') hi = 1;
            else if (c == '{') {
                space(false);
                lo = number();
                space(false);
                hi = lo;
                if (peek() == ',') {
                    ++pos_;
                    space(false);
                    hi = peek() == '}' ? -1 : number();
                    space(false);
                }
                if (peek() != '}') fail("expected '}'");
                ++pos_;
                if (hi >= 0 && hi < lo) fail("a repetition's maximum is below its minimum");
            }
            // The item as one symbol.
            Sym item;
            if (seq.size() - start == 1) {
                item = seq.back();
            } else {
                const int32_t id = new_rule(current_);
                alts_[size_t(id)] = {Seq(seq.begin() + std::ptrdiff_t(start), seq.end())};
                item = Sym{true, id, {}};
            }
            seq.resize(start);
            for (int64_t i = 0; i < lo; ++i) seq.push_back(item);
            if (hi < 0) {
                // item* as  R ::= item R |
                const int32_t r = new_rule(current_);
                alts_[size_t(r)] = {Seq{item, Sym{true, r, {}}}, Seq{}};
                seq.push_back(Sym{true, r, {}});
            } else if (hi > lo) {
                // up to (hi - lo) more, nested:  R_k ::= item R_{k+1} |
                int32_t next = -1;
                for (int64_t k = hi - lo; k >= 1; --k) {
                    const int32_t r = new_rule(current_);
                    Seq with{item};
                    if (next >= 0) with.push_back(Sym{true, next, {}});
                    alts_[size_t(r)] = {with, Seq{}};
                    next = r;
                }
                seq.push_back(Sym{true, next, {}});
            }
            count(size_t(lo + (hi < 0 ? 3 : 2 * (hi - lo))));
            space(depth > 0);
        }
    }
    int64_t number() {
        const size_t start = pos_;
        int64_t v = 0;
        while (peek() >= '0' && peek() <= '9') {
            v = v * 10 + (peek() - '0');
            if (v > Grammar::k_max_repeat) fail(fmt::format("repetition counts above {} are refused", Grammar::k_max_repeat));
            ++pos_;
        }
        if (pos_ == start) fail("expected a number");
        return v;
    }

    // ---- compiling to byte-level elements ----
    std::shared_ptr<Grammar> compile(int32_t root) {
        const size_t n = names_.size();
        // Productive rules (some alternative derives a finite string); the others' alternatives
        // are dropped, so the matcher never enters a path with no end.
        std::vector<char> productive(n, 0);
        for (bool changed = true; changed;) {
            changed = false;
            for (size_t r = 0; r < n; ++r) {
                if (productive[r]) continue;
                for (const Seq& s : alts_[r]) {
                    if (std::all_of(s.begin(), s.end(), [&](const Sym& y) { return !y.is_ref || productive[size_t(y.rule)]; })) {
                        productive[r] = changed = true;
                        break;
                    }
                }
            }
        }
        if (!productive[size_t(root)]) throw_error("grammar: the language is empty: rule 'root' never completes");
        for (auto& alts : alts_)
            std::erase_if(alts, [&](const Seq& s) {
                return std::any_of(s.begin(), s.end(), [&](const Sym& y) { return y.is_ref && !productive[size_t(y.rule)]; });
            });
        // Left recursion (a rule reaching itself before any byte) would expand forever.
        std::vector<char> nullable(n, 0);
        for (bool changed = true; changed;) {
            changed = false;
            for (size_t r = 0; r < n; ++r) {
                if (nullable[r]) continue;
                for (const Seq& s : alts_[r])
                    if (std::all_of(s.begin(), s.end(), [&](const Sym& y) { return y.is_ref && nullable[size_t(y.rule)]; })) {
                        nullable[r] = changed = true;
                        break;
                    }
            }
        }
        std::vector<std::vector<int32_t>> left(n);
        for (size_t r = 0; r < n; ++r)
            for (const Seq& s : alts_[r])
                for (const Sym& y : s) {
                    if (!y.is_ref) break;
                    left[r].push_back(y.rule);
                    if (!nullable[size_t(y.rule)]) break;
                }
        std::vector<int> color(n, 0);  // 0 new, 1 on the path, 2 done
        for (size_t s = 0; s < n; ++s) {
            if (color[s]) continue;
            std::vector<std::pair<int32_t, size_t>> stack{{int32_t(s), 0}};
            color[s] = 1;
            while (!stack.empty()) {
                auto& [r, i] = stack.back();
                if (i < left[size_t(r)].size()) {
                    const int32_t to = left[size_t(r)][i++];
                    if (color[size_t(to)] == 1)
                        throw_error("grammar: rule '{}' is left-recursive (it can reach itself before any character)",
                                    base_name(names_[size_t(to)]));
                    if (color[size_t(to)] == 0) {
                        color[size_t(to)] = 1;
                        stack.push_back({to, 0});
                    }
                } else {
                    color[size_t(r)] = 2;
                    stack.pop_back();
                }
            }
        }

        auto g = std::make_shared<Grammar>();
        g->root = root;
        g->rule_names = names_;
        g->rule_alts.resize(n);
        // Character sets of more than one byte range become rules of their own, one per set.
        std::map<CpRanges, int32_t> set_rules;
        auto set_rule = [&](const CpRanges& cps) -> int32_t {
            auto it = set_rules.find(cps);
            if (it != set_rules.end()) return it->second;
            const int32_t id = int32_t(g->rule_alts.size());
            g->rule_alts.emplace_back();
            g->rule_names.push_back("[class]");
            set_rules.emplace(cps, id);
            std::vector<ByteSeq> seqs;
            for (auto [a, b] : cps) utf8_sequences(a, b, seqs);
            for (const ByteSeq& bs : seqs) {
                g->rule_alts[size_t(id)].push_back(int32_t(g->elems.size()));
                for (auto [lo, hi] : bs) g->elems.push_back({Grammar::ELEM_RANGE, lo, hi, -1});
                g->elems.push_back({Grammar::ELEM_END});
            }
            if (g->elems.size() > Grammar::k_max_elements)
                throw_error("grammar: it grows past {} elements", Grammar::k_max_elements);
            return id;
        };
        for (size_t r = 0; r < n; ++r) {
            for (const Seq& s : alts_[r]) {
                std::vector<Grammar::Elem> run;
                for (const Sym& y : s) {
                    if (y.is_ref) {
                        run.push_back({Grammar::ELEM_REF, 0, 0, y.rule});
                    } else if (y.chars.size() == 1 && utf8_len(y.chars[0].first) == utf8_len(y.chars[0].second) &&
                               (y.chars[0].first == y.chars[0].second || y.chars[0].second < 0x80)) {
                        // One code point, or one ASCII range: its bytes inline.
                        uint8_t a[4], b[4];
                        utf8_encode(y.chars[0].first, a);
                        utf8_encode(y.chars[0].second, b);
                        for (int i = 0; i < utf8_len(y.chars[0].first); ++i) run.push_back({Grammar::ELEM_RANGE, a[i], b[i], -1});
                    } else {
                        run.push_back({Grammar::ELEM_REF, 0, 0, set_rule(y.chars)});
                    }
                }
                g->rule_alts[r].push_back(int32_t(g->elems.size()));
                g->elems.insert(g->elems.end(), run.begin(), run.end());
                g->elems.push_back({Grammar::ELEM_END});
                if (g->elems.size() > Grammar::k_max_elements)
                    throw_error("grammar: it grows past {} elements", Grammar::k_max_elements);
            }
        }
        return g;
    }
    static std::string base_name(const std::string& n) {
        const size_t dash = n.rfind('-');
        if (dash != std::string::npos && dash + 1 < n.size() &&
            n.find_first_not_of("0123456789", dash + 1) == std::string::npos)
            return n.substr(0, dash) + " (a group or repetition in it)";
        return n;
    }

    std::string_view src_;
    size_t pos_ = 0;
    std::string current_;
    std::unordered_map<std::string, int32_t> ids_;
    std::vector<std::string> names_;
    std::vector<std::vector<Seq>> alts_;
    std::vector<char> defined_;
    std::vector<size_t> first_use_;
    size_t n_syms_ = 0;
};

}  // namespace

std::shared_ptr<const Grammar> Grammar::parse(std::string_view gbnf) { return Parser(gbnf).run(); }

namespace {

// Recently compiled grammars by source ("g:" GBNF or "s:" schema), most recent last.
std::shared_ptr<const Grammar> cached(std::string key, const std::function<std::shared_ptr<const Grammar>()>& compile) {
    static std::mutex mutex;
    static std::vector<std::pair<std::string, std::shared_ptr<const Grammar>>> recent;
    constexpr size_t k_max = 64;
    {
        std::lock_guard lock(mutex);
        for (auto it = recent.begin(); it != recent.end(); ++it)
            if (it->first == key) {
                auto hit = std::move(*it);
                recent.erase(it);
                recent.push_back(hit);
                return hit.second;
            }
    }
    auto g = compile();  // outside the lock; a bad source throws to its caller and is not kept
    std::lock_guard lock(mutex);
    if (recent.size() >= k_max) recent.erase(recent.begin());
    recent.push_back({std::move(key), g});
    return g;
}

}  // namespace

std::shared_ptr<const Grammar> Grammar::cached_gbnf(const std::string& gbnf) {
    return cached("g:" + gbnf, [&] { return parse(gbnf); });
}

std::shared_ptr<const Grammar> Grammar::cached_json_schema(const std::string& schema_json) {
    return cached("s:" + schema_json, [&] { return from_json_schema(schema_json); });
}

std::shared_ptr<const Grammar> Grammar::json_object() {
    static const std::shared_ptr<const Grammar> g = parse(R"(root ::= ws object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2})) )* "\"" ws
number ::= "-"? ([0-9] | [1-9] [0-9]{1,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})? ws
ws ::= (" " | "\n" [ \t]{0,16})?
)");
    return g;
}

// ---- the vocabulary trie ----

TokenTrie::TokenTrie(const Tokenizer& tok) : n_vocab_(tok.n_vocab()) {
    pieces.resize(size_t(n_vocab_));
    for (TokenId id = 0; id < n_vocab_; ++id) {
        if (tok.is_eog(id)) eog_.push_back(id);
        if (!tok.is_control(id) && !tok.is_eog(id)) pieces[size_t(id)] = tok.token_to_piece(id, false);
    }
    build();
}

TokenTrie::TokenTrie(std::vector<std::string> p, std::vector<TokenId> eog)
    : pieces(std::move(p)), n_vocab_(int32_t(pieces.size())), eog_(std::move(eog)) {
    for (TokenId id : eog_) pieces[size_t(id)].clear();
    build();
}

void TokenTrie::build() {
    struct Tmp {
        std::map<uint8_t, uint32_t> kids;
        std::vector<TokenId> toks;
    };
    std::vector<Tmp> tmp(1);
    for (TokenId id = 0; id < n_vocab_; ++id) {
        const std::string& p = pieces[size_t(id)];
        if (p.empty()) continue;
        uint32_t at = 0;
        for (unsigned char c : p) {
            auto it = tmp[at].kids.find(c);
            if (it == tmp[at].kids.end()) {
                tmp.emplace_back();
                it = tmp[at].kids.emplace(c, uint32_t(tmp.size() - 1)).first;
            }
            at = it->second;
        }
        tmp[at].toks.push_back(id);
        max_depth_ = std::max(max_depth_, p.size());
    }
    // Breadth first, so that each node's children are one contiguous run.
    nodes.resize(tmp.size());
    std::deque<std::pair<uint32_t, uint32_t>> q{{0, 0}};  // (tmp index, node index)
    uint32_t next = 1;
    while (!q.empty()) {
        auto [t, n] = q.front();
        q.pop_front();
        Node& nd = nodes[n];
        nd.first_token = uint32_t(ids.size());
        nd.n_tokens = uint32_t(tmp[t].toks.size());
        ids.insert(ids.end(), tmp[t].toks.begin(), tmp[t].toks.end());
        nd.first_child = next;
        nd.n_children = uint16_t(tmp[t].kids.size());
        for (auto [byte, kid] : tmp[t].kids) {
            nodes[next].byte = byte;
            q.push_back({kid, next});
            ++next;
        }
    }
}

// ---- the matcher ----

GrammarContext::GrammarContext(std::shared_ptr<const Grammar> grammar, std::shared_ptr<const TokenTrie> trie)
    : g_(std::move(grammar)), trie_(std::move(trie)) {
    bytes_.resize(g_->elems.size(), {0, 0, 0, 0});
    for (size_t i = 0; i < g_->elems.size(); ++i) {
        const Grammar::Elem& e = g_->elems[i];
        if (e.type != Grammar::ELEM_RANGE) continue;
        for (unsigned b = e.lo; b <= e.hi; ++b) bytes_[i][b >> 6] |= uint64_t(1) << (b & 63);
    }
    nodes_.push_back({-1, -1});  // node 0: the empty stack
    seen_.push_back(0);
    follow_.emplace_back();
    follow_done_.push_back(1);
    ++generation_;
    for (int32_t alt : g_->rule_alts[size_t(g_->root)]) expand(alt, 0, initial_);
    std::sort(initial_.begin(), initial_.end());
}

int32_t GrammarContext::node(int32_t pos, int32_t parent) {
    const uint64_t key = (uint64_t(uint32_t(pos)) << 32) | uint32_t(parent);
    auto [it, fresh] = node_ids_.try_emplace(key, int32_t(nodes_.size()));
    if (fresh) {
        nodes_.push_back({pos, parent});
        seen_.push_back(0);
        follow_.emplace_back();
        follow_done_.push_back(0);
    }
    return it->second;
}

void GrammarContext::expand(int32_t pos0, int32_t parent0, State& out) {
    // Iterative (a chain of references may be long): (position, the stack below it).
    work_.clear();
    work_.push_back({pos0, parent0});
    while (!work_.empty()) {
        auto [pos, parent] = work_.back();
        work_.pop_back();
        const Grammar::Elem& e = g_->elems[size_t(pos)];
        if (e.type == Grammar::ELEM_END) {
            if (parent == 0) {
                if (seen_[0] != generation_) {
                    seen_[0] = generation_;
                    out.push_back(0);
                }
            } else {
                work_.push_back({nodes_[size_t(parent)].pos, nodes_[size_t(parent)].parent});
            }
            continue;
        }
        const int32_t id = node(pos, parent);
        if (seen_[size_t(id)] == generation_) continue;
        seen_[size_t(id)] = generation_;
        if (e.type == Grammar::ELEM_RANGE) {
            out.push_back(id);
            continue;
        }
        // A reference: its rule's alternatives over what follows it (nothing to return to when
        // it ends its alternative, so tail loops keep the stack's depth).
        const int32_t cont = g_->elems[size_t(pos) + 1].type == Grammar::ELEM_END ? parent : node(pos + 1, parent);
        const auto& alts = g_->rule_alts[size_t(e.rule)];
        for (auto it = alts.rbegin(); it != alts.rend(); ++it) work_.push_back({*it, cont});
    }
}

const GrammarContext::State& GrammarContext::follow(int32_t id) {
    if (!follow_done_[size_t(id)]) {
        State out;
        ++generation_;
        const Node n = nodes_[size_t(id)];
        expand(n.pos + 1, n.parent, out);
        // node() may have grown the tables: index again.
        follow_[size_t(id)] = std::move(out);
        follow_done_[size_t(id)] = 1;
    }
    return follow_[size_t(id)];
}

void GrammarContext::advance(const State& from, uint8_t byte, State& out) {
    out.clear();
    // Successors first (computing one bumps the generation), then their union.
    for (int32_t id : from)
        if (id != 0 && (bytes_[size_t(nodes_[size_t(id)].pos)][byte >> 6] >> (byte & 63) & 1)) (void)follow(id);
    ++generation_;
    for (int32_t id : from) {
        if (id == 0 || !(bytes_[size_t(nodes_[size_t(id)].pos)][byte >> 6] >> (byte & 63) & 1)) continue;
        for (int32_t next : follow_[size_t(id)]) {
            if (seen_[size_t(next)] == generation_) continue;
            seen_[size_t(next)] = generation_;
            out.push_back(next);
        }
    }
    if (out.size() > 1) std::sort(out.begin(), out.end());
}

int32_t GrammarContext::intern(const State& st) {
    std::string key(reinterpret_cast<const char*>(st.data()), st.size() * sizeof(int32_t));
    auto [it, fresh] = state_ids_.try_emplace(std::move(key), int32_t(states_.size()));
    if (fresh) {
        states_.push_back(st);
        std::array<int32_t, 256> unknown;
        unknown.fill(-1);
        trans_.push_back(unknown);
    }
    return it->second;
}

int32_t GrammarContext::step(int32_t sid, uint8_t byte) {
    int32_t next = trans_[size_t(sid)][byte];
    if (next != -1) return next;
    State out;
    advance(states_[size_t(sid)], byte, out);
    next = out.empty() ? -2 : intern(out);
    trans_[size_t(sid)][byte] = next;  // indexed again: intern() may have grown the table
    return next;
}

void GrammarContext::walk(uint32_t trie_node, int32_t sid, std::vector<uint32_t>& words) {
    const TokenTrie::Node& tn = trie_->nodes[trie_node];
    for (uint32_t c = tn.first_child; c < tn.first_child + tn.n_children; ++c) {
        const TokenTrie::Node& kid = trie_->nodes[c];
        const int32_t next = step(sid, kid.byte);
        if (next < 0) continue;
        for (uint32_t t = kid.first_token; t < kid.first_token + kid.n_tokens; ++t) {
            const TokenId id = trie_->ids[t];
            words[size_t(id) >> 5] |= 1u << (id & 31);
        }
        if (kid.n_children > 0) walk(c, next, words);
    }
}

void GrammarContext::fill_mask(const State& state, std::vector<uint32_t>& words) {
    const size_t n_words = (size_t(trie_->n_vocab()) + 31) / 32;
    // Bounded memory: past 2^16 states (or 16 MiB of masks) everything memoized is dropped.
    if (states_.size() > (size_t(1) << 16) || (mask_cache_.size() + 1) * n_words * 4 > (size_t(16) << 20)) {
        state_ids_.clear();
        states_.clear();
        trans_.clear();
        mask_cache_.clear();
    }
    const int32_t sid = intern(state);
    if (auto it = mask_cache_.find(sid); it != mask_cache_.end()) {
        words = it->second;
        return;
    }
    words.assign(n_words, 0);
    walk(0, sid, words);
    if (!state.empty() && state[0] == 0)
        for (TokenId id : trie_->eog_ids()) words[size_t(id) >> 5] |= 1u << (id & 31);
    mask_cache_.emplace(sid, words);
}

GrammarMatcher::GrammarMatcher(std::shared_ptr<GrammarContext> ctx) : ctx_(std::move(ctx)), state_(ctx_->initial_) {}

GrammarMatcher::GrammarMatcher(std::shared_ptr<const Grammar> grammar, std::shared_ptr<const TokenTrie> trie)
    : GrammarMatcher(std::make_shared<GrammarContext>(std::move(grammar), std::move(trie))) {}

bool GrammarMatcher::accept_bytes(std::string_view bytes) {
    GrammarContext::State cur = state_, next;
    for (unsigned char c : bytes) {
        ctx_->advance(cur, c, next);
        if (next.empty()) return false;
        cur.swap(next);
    }
    state_ = std::move(cur);
    return true;
}

bool GrammarMatcher::allows(TokenId id) {
    const TokenTrie& trie = ctx_->trie();
    if (id < 0 || id >= trie.n_vocab()) return false;
    const std::string& p = trie.pieces[size_t(id)];
    if (p.empty()) {
        const auto& eog = trie.eog_ids();
        return can_end() && std::find(eog.begin(), eog.end(), id) != eog.end();
    }
    GrammarContext::State cur = state_, next;
    for (unsigned char c : p) {
        ctx_->advance(cur, c, next);
        if (next.empty()) return false;
        cur.swap(next);
    }
    return true;
}

bool GrammarMatcher::accept_token(TokenId id) {
    if (!allows(id)) return false;
    const std::string& p = ctx_->trie().pieces[size_t(id)];
    if (p.empty()) {
        state_ = {0};  // end of generation
        return true;
    }
    return accept_bytes(p);
}

bool GrammarMatcher::can_end() const { return !state_.empty() && state_[0] == 0; }
bool GrammarMatcher::must_end() const { return state_.size() == 1 && state_[0] == 0; }

}  // namespace coinfer
