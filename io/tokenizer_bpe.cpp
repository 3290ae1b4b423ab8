// Byte-level BPE (tokenizer.ggml.model = "gpt2"), matching llama.cpp's ids.
//
// encode(fragment):
//   1. Decode the bytes leniently the way llama.cpp does (invalid bytes become U+FFFD, overlong
//      forms are re-encoded shortest), so the regexes see valid UTF-8.
//   2. Pre-tokenize with the regex list of tokenizer.ggml.pre. Each regex splits every piece that
//      the previous one produced; text a regex does not match stays a piece of its own.
//   3. BPE each piece: one symbol per byte (its GPT-2 byte-to-unicode character), merged by rank.
//      Symbols are ids: vocab ids, or ids past n_vocab for merge strings not in the vocab.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "error.h"
#include "tokenizer.h"

namespace coinfer {
namespace {

// ---- UTF-8 helpers ----

void utf8_append(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}

// Decodes one code point with llama.cpp's lenient rules: only the lead byte's length and the
// continuation bytes' top bits are checked, so overlong forms and surrogates are accepted.
// Returns the byte length, or 0 for an invalid sequence (the caller emits U+FFFD for one byte).
size_t utf8_decode_lenient(std::string_view s, size_t i, uint32_t& cp) {
    const auto b = [&](size_t k) { return static_cast<uint8_t>(s[i + k]); };
    const auto cont = [&](size_t k) { return i + k < s.size() && (b(k) & 0xC0) == 0x80; };
    const uint8_t c = b(0);
    if (c < 0x80) {
        cp = c;
        return 1;
    }
    if ((c & 0xE0) == 0xC0) {
        if (!cont(1)) return 0;
        cp = ((c & 0x1Fu) << 6) | (b(1) & 0x3Fu);
        return 2;
    }
    if ((c & 0xF0) == 0xE0) {
        if (!cont(1) || !cont(2)) return 0;
        cp = ((c & 0x0Fu) << 12) | ((b(1) & 0x3Fu) << 6) | (b(2) & 0x3Fu);
        return 3;
    }
    if ((c & 0xF8) == 0xF0) {
        if (!cont(1) || !cont(2) || !cont(3)) return 0;
        cp = ((c & 0x07u) << 18) | ((b(1) & 0x3Fu) << 12) | ((b(2) & 0x3Fu) << 6) | (b(3) & 0x3Fu);
        // llama.cpp cannot re-encode these either; treat the lead byte as invalid.
        if (cp > 0x10FFFF) return 0;
        return 4;
    }
    return 0;
}

// True when `s` is strict UTF-8 (shortest forms, no surrogates, <= U+10FFFF): the common case,
// where the text can be used as is.
bool utf8_is_strict(std::string_view s) {
    size_t i = 0;
    const size_t n = s.size();
    while (i < n) {
        const uint8_t c = static_cast<uint8_t>(s[i]);
        if (c < 0x80) {
            ++i;
            continue;
        }
        uint32_t cp = 0;
        const size_t len = utf8_decode_lenient(s, i, cp);
        if (len == 0) return false;
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) {
            return false;
        }
        if (cp >= 0xD800 && cp <= 0xDFFF) return false;
        i += len;
    }
    return true;
}

// Rebuilds the text the way llama.cpp sees it (code point by code point). `match` gets the same
// byte layout but with code points PCRE2 rejects (surrogates) replaced by a private-use
// character of the same length, which no pre-tokenizer regex treats specially.
void utf8_sanitize(std::string_view s, std::string& out, std::string& match) {
    out.clear();
    match.clear();
    size_t i = 0;
    while (i < s.size()) {
        uint32_t cp = 0;
        size_t len = utf8_decode_lenient(s, i, cp);
        if (len == 0) {
            cp = 0xFFFD;
            len = 1;
        }
        i += len;
        utf8_append(out, cp);
        utf8_append(match, (cp >= 0xD800 && cp <= 0xDFFF) ? 0xE000 : cp);
    }
}

size_t utf8_char_len(uint8_t lead) {
    if (lead < 0x80) return 1;
    if ((lead & 0xE0) == 0xC0) return 2;
    if ((lead & 0xF0) == 0xE0) return 3;
    return 4;
}

// ---- GPT-2 byte <-> unicode alphabet ----

// Printable Latin-1 bytes stand for themselves; the other 68 bytes map to U+0100 onwards, in
// byte order.
struct ByteAlphabet {
    std::array<uint32_t, 256> byte_to_cp{};
    std::array<int16_t, 512> cp_to_byte{};  // -1: not a byte character

    ByteAlphabet() {
        cp_to_byte.fill(-1);
        uint32_t n = 0;
        for (uint32_t b = 0; b < 256; ++b) {
            const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) ||
                                   (b >= 0xAE && b <= 0xFF);
            byte_to_cp[b] = printable ? b : 256 + n++;
            cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
        }
    }
};

const ByteAlphabet& byte_alphabet() {
    static const ByteAlphabet alphabet;
    return alphabet;
}

// ---- pre-tokenizer regexes ----

// llama.cpp's whitespace (the Unicode White_Space property). Its regex engines see exactly these
// as \s (non-ASCII ones are folded to \v before matching), so \s and \S are spelled out rather
// than left to the PCRE2 build's notion of space.
constexpr const char* k_ws_items =
    R"(\x{9}-\x{D}\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// Rewrites \s and \S (inside and outside character classes) into explicit classes.
std::string expand_whitespace(std::string_view re, std::string_view pre) {
    std::string out;
    bool in_class = false;
    for (size_t i = 0; i < re.size(); ++i) {
        const char c = re[i];
        if (c == '\\' && i + 1 < re.size()) {
            const char e = re[i + 1];
            if (e == 's') {
                out += in_class ? std::string(k_ws_items) : fmt::format("[{}]", k_ws_items);
            } else if (e == 'S') {
                if (in_class) throw_error("pre-tokenizer '{}': \\S inside a class", pre);
                out += fmt::format("[^{}]", k_ws_items);
            } else {
                out += c;
                out += e;
            }
            ++i;
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = true;
            out += c;
            // A ']' right after '[' or '[^' is a literal.
            if (i + 1 < re.size() && re[i + 1] == '^') out += re[++i];
            if (i + 1 < re.size() && re[i + 1] == ']') out += re[++i];
            continue;
        }
        if (c == ']' && in_class) in_class = false;
        out += c;
    }
    return out;
}

// The regex strings are llama.cpp's (src/llama-vocab.cpp, llm_tokenizer_bpe), which in turn
// come from each model's tokenizer.json.
constexpr const char* k_re_gpt2 =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))";
constexpr const char* k_re_llama3 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* k_re_qwen2 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// CJK runs (U+4E00-U+9FA5, U+0800-U+4E00, U+AC00-U+D7FF). llama.cpp folds non-ASCII whitespace
// (U+1680, U+2000.., U+3000, ...) to \v before matching, so those never count as CJK here.
constexpr const char* k_re_cjk =
    R"((?:(?!\s)[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}])+)";
// Cased letters of the DeepSeek LLM tokenizer.json, as code point ranges.
constexpr const char* k_re_deepseek_llm_letters =
    R"(\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293})"
    R"(\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A})"
    R"(\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556})"
    R"(\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF})"
    R"(\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D})"
    R"(\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D})"
    R"(\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3})"
    R"(\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107})"
    R"(\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D})"
    R"(\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184})"
    R"(\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D})"
    R"(\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF})"
    R"(\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F})"
    R"(\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2})"
    R"(\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+)";
// ASCII and fullwidth punctuation, quotes, U+3001-U+3002 (the tokenizer.json range starts at
// U+3000, which llama.cpp folds to \v first).
constexpr const char* k_re_deepseek_llm_punct =
    R"(\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3001}-\x{3002}]+)";
constexpr const char* k_re_gpt4o =
    R"([^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* k_re_tekken =
    R"([^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct PreTokenizer {
    std::vector<std::string> regexes;
    bool ignore_merges = false;  // a piece that is a whole token skips BPE (Llama 3 family)
};

PreTokenizer pre_tokenizer_for(const std::string& pre) {
    const auto is = [&](std::initializer_list<const char*> names) {
        return std::any_of(names.begin(), names.end(), [&](const char* n) { return pre == n; });
    };
    if (is({"default", ""})) {
        return {{R"([\p{P}\$\+<=>\^~\|]+)", k_re_gpt2, R"(\p{N}+)", "[0-9][0-9][0-9]"}};
    }
    if (is({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
            "lfm2"})) {
        return {{k_re_llama3}, true};
    }
    if (is({"dbrx", "smaug-bpe", "chatglm-bpe", "glm4"})) return {{k_re_llama3}};
    if (is({"deepseek-llm"})) {
        return {{"[\r\n]", k_re_deepseek_llm_letters, k_re_deepseek_llm_punct, R"(\s+$)", k_re_cjk,
                 R"(\p{N}+)"}};
    }
    if (is({"deepseek-coder"})) {
        return {{"[\r\n]", R"(\s?\p{L}+)", R"(\s?\p{P}+)", k_re_cjk, R"(\p{N})"}};
    }
    if (is({"falcon"})) {
        return {{R"([\p{P}\$\+<=>\^~\|`]+)", k_re_gpt2, "[0-9][0-9][0-9]"}};
    }
    if (is({"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"})) {
        return {{R"(\p{N})", k_re_gpt2}};
    }
    if (is({"gpt-2", "mpt", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es",
            "jina-v2-de", "jina-v2-code", "roberta-bpe", "olmo", "jais", "exaone4", "trillion",
            "granite-docling", "a.x-4.0", "mellum"})) {
        return {{k_re_gpt2}};
    }
    if (is({"qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan",
            "kormo"})) {
        return {{k_re_qwen2}};
    }
    if (is({"gpt-4o", "llama4"})) return {{k_re_gpt4o}};
    if (is({"tekken"})) return {{k_re_tekken}, true};
    if (is({"poro-chat", "bloom", "gpt3-finnish"})) {
        return {{R"( ?[^(\s|.,!?…。，、।۔،)]+)"}};
    }
    throw_error("tokenizer.ggml.pre: unknown pre-tokenizer '{}'", pre);
}

struct CompiledRegex {
    pcre2_code* code = nullptr;
    CompiledRegex() = default;
    CompiledRegex(const CompiledRegex&) = delete;
    CompiledRegex& operator=(const CompiledRegex&) = delete;
    CompiledRegex(CompiledRegex&& o) noexcept : code(o.code) { o.code = nullptr; }
    ~CompiledRegex() {
        if (code) pcre2_code_free(code);
    }
};

CompiledRegex compile_regex(const std::string& re, const std::string& pre) {
    const std::string pattern = expand_whitespace(re, pre);
    int err = 0;
    PCRE2_SIZE err_off = 0;
    CompiledRegex out;
    out.code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                             PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY, &err, &err_off,
                             nullptr);
    if (!out.code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof(msg));
        throw_error("pre-tokenizer '{}': regex does not compile at offset {}: {}", pre, err_off,
                    reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(out.code, PCRE2_JIT_COMPLETE);  // the interpreter is the fallback
    return out;
}

// ---- merge table: open addressing, (left id, right id) -> (rank, merged id) ----

struct MergeTable {
    struct Slot {
        uint64_t key = 0;  // (left << 32 | right) + 1; 0 marks an empty slot
        int32_t rank = 0;
        int32_t result = 0;
    };
    std::vector<Slot> slots;
    uint64_t mask = 0;

    void reserve(size_t n) {
        size_t cap = 16;
        while (cap < n * 2) cap <<= 1;
        slots.assign(cap, Slot{});
        mask = cap - 1;
    }
    static uint64_t make_key(int32_t a, int32_t b) {
        return ((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) |
                static_cast<uint32_t>(b)) + 1;
    }
    static uint64_t hash(uint64_t k) {
        k ^= k >> 33;
        k *= 0xff51afd7ed558ccdULL;
        k ^= k >> 33;
        return k;
    }
    // Keeps the first (lowest-rank) entry for a duplicated pair, as llama.cpp does.
    void insert(int32_t a, int32_t b, int32_t rank, int32_t result) {
        const uint64_t key = make_key(a, b);
        for (uint64_t i = hash(key) & mask;; i = (i + 1) & mask) {
            if (slots[i].key == key) return;
            if (slots[i].key == 0) {
                slots[i] = {key, rank, result};
                return;
            }
        }
    }
    const Slot* find(int32_t a, int32_t b) const {
        const uint64_t key = make_key(a, b);
        for (uint64_t i = hash(key) & mask;; i = (i + 1) & mask) {
            if (slots[i].key == key) return &slots[i];
            if (slots[i].key == 0) return nullptr;
        }
    }
};

class BpeAlgo final : public TokenizerAlgo {
public:
    // Keeps no reference to `vocab`: the Tokenizer that owns both may be moved.
    explicit BpeAlgo(const Vocab& vocab)
        : token_to_id_(vocab.token_to_id), n_vocab_(vocab.n_vocab()) {
        PreTokenizer pt = pre_tokenizer_for(vocab.pre);
        ignore_merges_ = pt.ignore_merges;
        for (const auto& re : pt.regexes) regexes_.push_back(compile_regex(re, vocab.pre));

        const ByteAlphabet& alpha = byte_alphabet();
        std::string s;
        for (int b = 0; b < 256; ++b) {
            s.clear();
            utf8_append(s, alpha.byte_to_cp[b]);
            byte_symbol_[b] = symbol_id(s);
        }
        merges_.reserve(vocab.merges.size());
        std::string joined;
        for (size_t rank = 0; rank < vocab.merges.size(); ++rank) {
            const auto& [left, right] = vocab.merges[rank];
            if (left.empty() || right.empty()) continue;  // can never apply
            joined = left;
            joined += right;
            const int32_t a = symbol_id(left);
            const int32_t b = symbol_id(right);
            merges_.insert(a, b, static_cast<int32_t>(rank), symbol_id(joined));
        }
        extra_index_ = {};  // only needed while building
        for (int b = 0; b < 256; ++b) {
            auto it = token_to_id_.find(std::string(1, static_cast<char>(b)));
            byte_token_[b] = it != token_to_id_.end() ? it->second : -1;
        }

        pieces_.resize(vocab.tokens.size());
        for (size_t id = 0; id < vocab.tokens.size(); ++id) {
            pieces_[id] = make_piece(vocab, static_cast<TokenId>(id));
        }
        // Whole-piece lookups are only needed when merges may be skipped.
        if (!ignore_merges_) token_to_id_ = {};
    }

    void encode(std::string_view text, std::vector<TokenId>& out) const override {
        if (text.empty()) return;
        if (text.size() > UINT32_MAX) {
            throw_error("tokenizer: text of {} bytes is too long", text.size());
        }
        std::string fixed, fixed_match;
        std::string_view src = text, match = text;
        if (!utf8_is_strict(text)) {
            utf8_sanitize(text, fixed, fixed_match);
            src = fixed;
            match = fixed_match;
        }

        // [n_pieces] byte ranges of `src`, refined by each regex in turn.
        std::vector<std::pair<uint32_t, uint32_t>> pieces{{0, static_cast<uint32_t>(src.size())}};
        std::vector<std::pair<uint32_t, uint32_t>> next;
        pcre2_match_data* md = pcre2_match_data_create(2, nullptr);
        if (!md) throw std::bad_alloc();
        try {
            for (const auto& re : regexes_) {
                next.clear();
                for (const auto& [b, e] : pieces) split_piece(re.code, md, match, b, e, next);
                pieces.swap(next);
            }
        } catch (...) {
            pcre2_match_data_free(md);
            throw;
        }
        pcre2_match_data_free(md);

        Scratch scratch;
        for (const auto& [b, e] : pieces) encode_word(src.substr(b, e - b), scratch, out);
    }

    std::string piece(TokenId id) const override {
        if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) return {};
        return pieces_[id];
    }

private:
    struct Symbol {
        int32_t id;
        int32_t prev, next;  // -1: none
        uint32_t n_bytes;    // 0: merged away
    };
    struct Candidate {
        int32_t rank;
        int32_t left, right;  // symbol indices
        int32_t left_id, right_id, result;
        // Lowest rank first, then leftmost, like llama.cpp's queue.
        bool operator<(const Candidate& o) const {
            return rank != o.rank ? rank > o.rank : left > o.left;
        }
    };
    struct Scratch {
        std::vector<Symbol> symbols;
        std::vector<Candidate> heap;
        std::string mapped;
    };

    // Splits match[b, e) by one regex into matches and the gaps between them. The piece is the
    // whole subject, so lookaheads and $ stop at its end, as in llama.cpp.
    static void split_piece(pcre2_code* code, pcre2_match_data* md, std::string_view match,
                            uint32_t b, uint32_t e,
                            std::vector<std::pair<uint32_t, uint32_t>>& out) {
        const auto* subject = reinterpret_cast<PCRE2_SPTR>(match.data() + b);
        const size_t len = e - b;
        size_t gap_start = 0, off = 0;
        uint32_t options = PCRE2_NO_UTF_CHECK;
        while (off < len) {
            int rc = pcre2_match(code, subject, len, off, options, md, nullptr);
            if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
                // Deep input: the interpreter keeps its frames on the heap.
                options |= PCRE2_NO_JIT;
                continue;
            }
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) {
                PCRE2_UCHAR msg[256];
                pcre2_get_error_message(rc, msg, sizeof(msg));
                throw_error("tokenizer: pre-tokenizer regex failed on a {}-byte piece: {}", len,
                            reinterpret_cast<const char*>(msg));
            }
            const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
            const size_t ms = ov[0], me = ov[1];
            if (me <= ms) {  // empty match: step over one character
                if (ms >= len) break;
                off = ms + utf8_char_len(static_cast<uint8_t>(match[b + ms]));
                continue;
            }
            if (ms > gap_start) out.emplace_back(b + gap_start, b + ms);
            out.emplace_back(b + ms, b + me);
            gap_start = off = me;
        }
        if (gap_start < len) out.emplace_back(b + gap_start, e);
    }

    void push_candidate(Scratch& s, int32_t left, int32_t right) const {
        if (left < 0 || right < 0) return;
        const auto* m = merges_.find(s.symbols[left].id, s.symbols[right].id);
        if (!m) return;
        s.heap.push_back(
            {m->rank, left, right, s.symbols[left].id, s.symbols[right].id, m->result});
        std::push_heap(s.heap.begin(), s.heap.end());
    }

    void encode_word(std::string_view word, Scratch& s, std::vector<TokenId>& out) const {
        if (word.empty()) return;
        const ByteAlphabet& alpha = byte_alphabet();
        if (ignore_merges_) {
            s.mapped.clear();
            for (unsigned char c : word) utf8_append(s.mapped, alpha.byte_to_cp[c]);
            if (auto it = token_to_id_.find(s.mapped); it != token_to_id_.end()) {
                out.push_back(it->second);
                return;
            }
        }
        const auto n = static_cast<int32_t>(word.size());
        s.symbols.resize(n);
        for (int32_t i = 0; i < n; ++i) {
            s.symbols[i] = {byte_symbol_[static_cast<unsigned char>(word[i])], i - 1,
                            i + 1 < n ? i + 1 : -1, 1};
        }
        s.heap.clear();
        for (int32_t i = 1; i < n; ++i) push_candidate(s, i - 1, i);

        while (!s.heap.empty()) {
            std::pop_heap(s.heap.begin(), s.heap.end());
            const Candidate c = s.heap.back();
            s.heap.pop_back();
            Symbol& l = s.symbols[c.left];
            Symbol& r = s.symbols[c.right];
            // Stale: one side was merged away or grew since the candidate was queued.
            if (l.n_bytes == 0 || r.n_bytes == 0 || l.id != c.left_id || r.id != c.right_id) {
                continue;
            }
            l.id = c.result;
            l.n_bytes += r.n_bytes;
            r.n_bytes = 0;
            l.next = r.next;
            if (r.next >= 0) s.symbols[r.next].prev = c.left;
            push_candidate(s, l.prev, c.left);
            push_candidate(s, c.left, l.next);
        }

        const int32_t n_vocab = n_vocab_;
        for (int32_t i = 0; i >= 0 && i < n; i = s.symbols[i].next) {
            const int32_t id = s.symbols[i].id;
            if (id < n_vocab) {
                out.push_back(id);
                continue;
            }
            // Not a token: llama.cpp falls back to single-byte tokens of the symbol's text, and
            // drops bytes that have none.
            const std::string& str = extra_strings_[id - n_vocab];
            for (unsigned char ch : str) {
                if (byte_token_[ch] >= 0) out.push_back(byte_token_[ch]);
            }
        }
    }

    // The vocab id of a symbol string, or an id past n_vocab for strings that are no token.
    int32_t symbol_id(const std::string& str) {
        if (auto it = token_to_id_.find(str); it != token_to_id_.end()) return it->second;
        if (auto it = extra_index_.find(str); it != extra_index_.end()) return it->second;
        const int32_t id = n_vocab_ + static_cast<int32_t>(extra_strings_.size());
        extra_strings_.push_back(str);
        extra_index_.emplace(str, id);
        return id;
    }

    // The bytes a token stands for: byte characters mapped back to bytes; user-defined and
    // control tokens verbatim (the Tokenizer decides whether control tokens are shown).
    static std::string make_piece(const Vocab& vocab, TokenId id) {
        const std::string& text = vocab.tokens[id];
        const int32_t type = id < static_cast<TokenId>(vocab.types.size()) ? vocab.types[id]
                                                                           : TOKEN_TYPE_NORMAL;
        if (type == TOKEN_TYPE_USER_DEFINED || type == TOKEN_TYPE_CONTROL ||
            type == TOKEN_TYPE_UNKNOWN) {
            return text;
        }
        if (type != TOKEN_TYPE_NORMAL) return {};  // unused/byte/undefined: llama.cpp shows nothing
        const ByteAlphabet& alpha = byte_alphabet();
        std::string out;
        out.reserve(text.size());
        size_t i = 0;
        while (i < text.size()) {
            uint32_t cp = 0;
            size_t len = utf8_decode_lenient(text, i, cp);
            if (len == 0) {
                out.push_back(text[i++]);  // malformed token text: pass the byte through
                continue;
            }
            if (cp < alpha.cp_to_byte.size() && alpha.cp_to_byte[cp] >= 0) {
                out.push_back(static_cast<char>(alpha.cp_to_byte[cp]));
            } else {
                out.append(text, i, len);  // not a byte character: keep it as UTF-8
            }
            i += len;
        }
        return out;
    }

    std::unordered_map<std::string, TokenId> token_to_id_;  // kept only with ignore_merges_
    int32_t n_vocab_ = 0;
    std::array<TokenId, 256> byte_token_{};  // token of each single raw byte string, or -1
    std::vector<CompiledRegex> regexes_;
    bool ignore_merges_ = false;
    std::array<int32_t, 256> byte_symbol_{};
    MergeTable merges_;
    std::vector<std::string> extra_strings_;  // [id - n_vocab]: symbol strings with no token
    std::unordered_map<std::string, int32_t> extra_index_;
    std::vector<std::string> pieces_;  // [n_vocab]
};

}  // namespace

std::unique_ptr<TokenizerAlgo> make_bpe_algo(const Vocab& vocab) {
    return std::make_unique<BpeAlgo>(vocab);
}

}  // namespace coinfer
