#include "tokenizer.h"

#include <algorithm>
#include <cctype>

#include "error.h"

namespace coinfer {

namespace {

enum TokenStrip : uint8_t {
    TOKEN_STRIP_LEFT = 1,   // whitespace before the token is dropped
    TOKEN_STRIP_RIGHT = 2,  // whitespace after the token is dropped
};

bool is_special_type(int32_t type) {
    return type == TOKEN_TYPE_CONTROL || type == TOKEN_TYPE_USER_DEFINED ||
           type == TOKEN_TYPE_UNKNOWN;
}

// Reads an optional token id. Both 0xFFFFFFFF (as uint32) and -1 mean "none".
// Returns nullopt when absent, -1 for none.
std::optional<TokenId> read_token_id(const GgufFile& f, const std::string& key, int32_t n_vocab) {
    const std::optional<int64_t> v = f.get_int_opt(key);
    if (!v) return std::nullopt;
    if (*v == -1 || *v == 0xFFFFFFFFll) return TokenId(-1);
    if (*v < 0 || *v >= n_vocab)
        throw_error("{}: metadata key '{}' = {} is not a token id (vocabulary has {} tokens)",
                    f.path(), key, *v, n_vocab);
    return static_cast<TokenId>(*v);
}

// BPE pre-tokenizers for which llama.cpp adds BOS / keeps spaces as they are by default.
bool bpe_pre_adds_bos(std::string_view pre) {
    for (std::string_view p : {"llama3", "llama-v3", "llama-bpe", "falcon3", "tekken", "chameleon"})
        if (pre == p) return true;
    return false;
}

bool bpe_pre_keeps_spaces(std::string_view pre) {
    for (std::string_view p : {"deepseek-llm", "deepseek-coder", "deepseek-v3", "command-r", "qwen2",
                               "poro-chat", "viking", "tekken", "smollm", "chameleon"})
        if (pre == p) return true;
    return false;
}

// llama.cpp's clean_up_tokenization_spaces passes.
std::string clean_spaces(const std::string& in) {
    if (in.size() < 2) return in;
    // " ?", " !", " .", " ," lose the space
    std::string a;
    a.reserve(in.size());
    a += in[0];
    for (size_t i = 1; i < in.size(); ++i) {
        const char x = in[i];
        if (in[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ','))
            a.pop_back();
        a += x;
    }
    // " ' " becomes "'"
    std::string b;
    b.reserve(a.size());
    if (!a.empty()) b += a[0];
    for (size_t i = 1; i < a.size(); ++i) {
        const char x = a[i];
        if (x == '\'' && i + 1 < a.size() && a[i - 1] == ' ' && a[i + 1] == ' ') {
            b.pop_back();
            b += x;
            ++i;  // skip the space after
            continue;
        }
        b += x;
    }
    // " 's", " 'm", " 're", " 've" lose the space
    std::string c;
    c.reserve(b.size());
    if (!b.empty()) c += b[0];
    for (size_t i = 1; i < b.size(); ++i) {
        const char x = b[i];
        if (b[i - 1] == ' ' && x == '\'' && i + 1 < b.size()) {
            const char x1 = b[i + 1];
            if (x1 == 's' || x1 == 'm') {
                c.pop_back();
            } else if (i + 2 < b.size()) {
                const char x2 = b[i + 2];
                if ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')) c.pop_back();
            }
        }
        c += x;
    }
    return c;
}

// Length of the UTF-8 sequence at s[i]: > 0 valid, 0 truncated at the end of s (could still
// become valid), -1 invalid (its first byte is junk).
int utf8_seq(std::string_view s, size_t i) {
    const auto b0 = static_cast<uint8_t>(s[i]);
    if (b0 < 0x80) return 1;
    int len;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        len = 3;
        if (b0 == 0xE0) lo = 0xA0;  // overlong
        if (b0 == 0xED) hi = 0x9F;  // surrogates
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        len = 4;
        if (b0 == 0xF0) lo = 0x90;  // overlong
        if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
        return -1;
    }
    for (int k = 1; k < len; ++k) {
        if (i + k >= s.size()) return 0;
        const auto b = static_cast<uint8_t>(s[i + k]);
        const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
        if (!ok) return -1;
    }
    return len;
}

// Copies s with each invalid byte replaced by U+FFFD; a truncated tail also becomes U+FFFD.
std::string utf8_sanitize(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
        const int n = utf8_seq(s, i);
        if (n > 0) {
            out.append(s.substr(i, n));
            i += n;
        } else if (n == 0) {
            out += "\xEF\xBF\xBD";
            break;
        } else {
            out += "\xEF\xBF\xBD";
            ++i;
        }
    }
    return out;
}

}  // namespace

size_t utf8_complete_prefix(std::string_view s) {
    size_t i = 0;
    while (i < s.size()) {
        const int n = utf8_seq(s, i);
        if (n == 0) return i;
        i += n > 0 ? n : 1;
    }
    return i;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_gguf(const GgufFile& f) {
    Tokenizer t;
    t.vocab_ = std::make_unique<Vocab>();
    Vocab& v = *t.vocab_;
    const std::string& path = f.path();

    v.model = f.get<std::string>("tokenizer.ggml.model");
    v.pre = f.get_opt<std::string>("tokenizer.ggml.pre").value_or("default");
    if (v.model == "llama") {
        v.kind = TOKENIZER_KIND_SPM;
    } else if (v.model == "gpt2") {
        v.kind = TOKENIZER_KIND_BPE;
    } else if (v.model == "bert") {
        v.kind = TOKENIZER_KIND_WPM;
    } else {
        throw_error("{}: tokenizer.ggml.model = '{}' is not supported (supported: llama, gpt2, bert)",
                    path, v.model);
    }

    // Token texts. llama.cpp renames empty ones so that every text stays a unique key.
    v.tokens = f.get_array<std::string>("tokenizer.ggml.tokens");
    if (v.tokens.empty()) throw_error("{}: tokenizer.ggml.tokens is empty", path);
    if (v.tokens.size() > size_t(1) << 30)
        throw_error("{}: tokenizer.ggml.tokens has {} entries, too many", path, v.tokens.size());
    const int32_t n_vocab = v.n_vocab();
    v.token_to_id.reserve(v.tokens.size());
    for (int32_t i = 0; i < n_vocab; ++i) {
        std::string& text = v.tokens[i];
        if (text.empty()) text = fmt::format("[EMPTY_{}]", i);
        auto [it, inserted] = v.token_to_id.emplace(text, i);
        if (!inserted)
            throw_error("{}: tokenizer.ggml.tokens[{}] = '{}' duplicates token {}", path, i, text,
                        it->second);
    }

    if (f.has("tokenizer.ggml.scores")) {
        v.scores = f.get_array<float>("tokenizer.ggml.scores");
        if (v.scores.size() != v.tokens.size())
            throw_error("{}: tokenizer.ggml.scores has {} entries, expected {} (one per token)", path,
                        v.scores.size(), v.tokens.size());
    } else {
        v.scores.assign(v.tokens.size(), 0.0f);
    }

    if (f.has("tokenizer.ggml.token_type")) {
        v.types = f.get_array<int32_t>("tokenizer.ggml.token_type");
        if (v.types.size() != v.tokens.size())
            throw_error("{}: tokenizer.ggml.token_type has {} entries, expected {} (one per token)",
                        path, v.types.size(), v.tokens.size());
        // Unknown type values read as UNDEFINED, as in llama.cpp.
        for (int32_t& type : v.types)
            if (type < TOKEN_TYPE_UNDEFINED || type > TOKEN_TYPE_BYTE) type = TOKEN_TYPE_UNDEFINED;
    } else {
        v.types.assign(v.tokens.size(), TOKEN_TYPE_NORMAL);
    }

    if (v.kind == TOKENIZER_KIND_BPE) {
        if (!f.has("tokenizer.ggml.merges"))
            throw_error("{}: tokenizer.ggml.merges is missing (required for model 'gpt2')", path);
        const auto& merges = f.get_array<std::string>("tokenizer.ggml.merges");
        v.merges.reserve(merges.size());
        for (size_t i = 0; i < merges.size(); ++i) {
            const std::string& m = merges[i];
            // The first part may itself start with a space, so search from index 1 like llama.cpp.
            const size_t pos = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
            if (pos == std::string::npos || pos + 1 >= m.size())
                throw_error("{}: tokenizer.ggml.merges[{}] = '{}' is not of the form 'a b'", path, i, m);
            v.merges.emplace_back(m.substr(0, pos), m.substr(pos + 1));
        }
    }

    // Defaults as llama.cpp sets them per model type.
    auto default_id = [&](TokenId id) { return v.valid(id) ? id : TokenId(-1); };
    switch (v.kind) {
        case TOKENIZER_KIND_SPM:
            v.bos = default_id(1);
            v.eos = default_id(2);
            v.unk = default_id(0);
            v.add_bos = true;
            v.add_eos = false;
            v.add_space_prefix = true;
            v.clean_spaces = false;
            break;
        case TOKENIZER_KIND_BPE:
            v.bos = default_id(11);
            v.eos = default_id(11);
            v.add_bos = bpe_pre_adds_bos(v.pre);
            v.add_eos = false;
            v.add_space_prefix = false;
            v.clean_spaces = !bpe_pre_keeps_spaces(v.pre);
            break;
        case TOKENIZER_KIND_WPM:
            v.bos = default_id(101);  // [CLS]
            v.unk = default_id(100);
            v.sep = default_id(102);
            v.pad = default_id(0);
            v.add_bos = true;
            v.add_eos = false;
            v.add_space_prefix = false;
            v.clean_spaces = true;
            break;
    }

    auto read_id = [&](const char* key, TokenId& dst) {
        if (auto id = read_token_id(f, key, n_vocab)) dst = *id;
    };
    read_id("tokenizer.ggml.bos_token_id", v.bos);
    read_id("tokenizer.ggml.eos_token_id", v.eos);
    read_id("tokenizer.ggml.unknown_token_id", v.unk);
    read_id("tokenizer.ggml.seperator_token_id", v.sep);
    read_id("tokenizer.ggml.padding_token_id", v.pad);
    read_id("tokenizer.ggml.eot_token_id", v.eot);
    read_id("tokenizer.ggml.eom_token_id", v.eom);
    if (v.kind == TOKENIZER_KIND_WPM) read_id("tokenizer.ggml.cls_token_id", v.bos);
    // FIM ids only matter here for end-of-generation; the deprecated keys come last as in llama.cpp.
    TokenId fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1, fim_rep = -1, fim_sep = -1;
    read_id("tokenizer.ggml.fim_pre_token_id", fim_pre);
    read_id("tokenizer.ggml.fim_suf_token_id", fim_suf);
    read_id("tokenizer.ggml.fim_mid_token_id", fim_mid);
    read_id("tokenizer.ggml.fim_pad_token_id", fim_pad);
    read_id("tokenizer.ggml.fim_rep_token_id", fim_rep);
    read_id("tokenizer.ggml.fim_sep_token_id", fim_sep);
    read_id("tokenizer.ggml.prefix_token_id", fim_pre);
    read_id("tokenizer.ggml.suffix_token_id", fim_suf);
    read_id("tokenizer.ggml.middle_token_id", fim_mid);

    if (auto b = f.get_opt<bool>("tokenizer.ggml.add_bos_token")) v.add_bos = *b;
    if (auto b = f.get_opt<bool>("tokenizer.ggml.add_eos_token")) v.add_eos = *b;
    if (auto b = f.get_opt<bool>("tokenizer.ggml.add_space_prefix")) v.add_space_prefix = *b;

    // llama.cpp finds end-of-turn and FIM tokens by their text when the keys are missing, and
    // forces such tokens to CONTROL (so they are not matched in text without parse_special).
    auto by_text = [&](TokenId& dst, std::initializer_list<std::string_view> names) {
        for (std::string_view name : names) {
            auto it = v.token_to_id.find(std::string(name));
            if (it == v.token_to_id.end()) continue;
            if (dst == -1) {
                dst = it->second;
                v.types[dst] = TOKEN_TYPE_CONTROL;
            }
        }
    };
    by_text(v.eot, {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                    "<EOT>", "_<EOT>", "<\xEF\xBD\x9C" "end\xE2\x96\x81" "of\xE2\x96\x81" "sentence\xEF\xBD\x9C>"});
    by_text(v.eom, {"<|eom_id|>"});
    by_text(fim_pre, {"<|fim_prefix|>", "<fim-prefix>", "<\xEF\xBD\x9C" "fim\xE2\x96\x81" "begin\xEF\xBD\x9C>", "<PRE>"});
    by_text(fim_suf, {"<|fim_suffix|>", "<fim-suffix>", "<\xEF\xBD\x9C" "fim\xE2\x96\x81" "hole\xEF\xBD\x9C>", "<SUF>"});
    by_text(fim_mid, {"<|fim_middle|>", "<fim-middle>", "<\xEF\xBD\x9C" "fim\xE2\x96\x81" "end\xEF\xBD\x9C>", "<MID>"});
    by_text(fim_pad, {"<|fim_pad|>", "<fim-pad>", "<PAD>"});
    by_text(fim_rep, {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>"});
    by_text(fim_sep, {"<|file_sep|>"});

    auto add_eog = [&](TokenId id) {
        if (id >= 0 && std::find(v.eog.begin(), v.eog.end(), id) == v.eog.end()) v.eog.push_back(id);
    };
    add_eog(fim_pad);
    add_eog(fim_rep);
    add_eog(fim_sep);
    for (std::string_view name : {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                  "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>"}) {
        auto it = v.token_to_id.find(std::string(name));
        if (it == v.token_to_id.end()) continue;
        add_eog(it->second);
        v.types[it->second] = TOKEN_TYPE_CONTROL;
    }
    add_eog(v.eos);
    add_eog(v.eot);
    add_eog(v.eom);
    std::sort(v.eog.begin(), v.eog.end());

    // Special tokens, longest text first (ties by id, so the order does not depend on the sort).
    for (int32_t i = 0; i < n_vocab; ++i)
        if (is_special_type(v.types[i])) v.special_by_length.push_back(i);
    // WordPiece drops whitespace and folds accents, so text length bounds nothing there.
    if (v.kind != TOKENIZER_KIND_WPM)
        for (const std::string& piece : v.tokens) v.max_token_bytes = std::max(v.max_token_bytes, piece.size());
    std::stable_sort(v.special_by_length.begin(), v.special_by_length.end(),
                     [&](TokenId a, TokenId b) { return v.tokens[a].size() > v.tokens[b].size(); });

    // Per-model whitespace stripping around special tokens (llama.cpp sets these by model name).
    {
        std::string name = f.get_opt<std::string>("general.name").value_or("");
        for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        auto set_strip = [&](TokenId id, uint8_t flag, bool on) {
            if (t.strip_.empty()) t.strip_.assign(v.tokens.size(), 0);
            t.strip_[id] = on ? (t.strip_[id] | flag) : (t.strip_[id] & ~flag);
        };
        auto set_strip_text = [&](const char* text, uint8_t flag, bool on) {
            auto it = v.token_to_id.find(text);
            if (it != v.token_to_id.end()) set_strip(it->second, flag, on);
        };
        auto contains = [](std::string_view s, std::initializer_list<std::string_view> subs) {
            for (auto sub : subs)
                if (s.find(sub) != std::string_view::npos) return true;
            return false;
        };
        if (contains(v.pre, {"jina-v2-de", "jina-v2-es", "jina-v2-code"})) {
            set_strip_text("<mask>", TOKEN_STRIP_LEFT, true);
        } else if (contains(name, {"phi-3", "phi3"})) {
            for (TokenId id : v.special_by_length) set_strip(id, TOKEN_STRIP_RIGHT, true);
            set_strip_text("</s>", TOKEN_STRIP_RIGHT, true);
            for (const char* s : {"<unk>", "<s>", "<|endoftext|>"})
                set_strip_text(s, TOKEN_STRIP_RIGHT, false);
        }
    }

    switch (v.kind) {
        case TOKENIZER_KIND_SPM: t.algo_ = make_spm_algo(v); break;
        case TOKENIZER_KIND_BPE: t.algo_ = make_bpe_algo(v); break;
        case TOKENIZER_KIND_WPM: t.algo_ = make_wpm_algo(v); break;
    }
    return t;
}

bool Tokenizer::is_eog(TokenId id) const {
    return id >= 0 && std::binary_search(vocab_->eog.begin(), vocab_->eog.end(), id);
}

bool Tokenizer::is_control(TokenId id) const {
    return vocab_->valid(id) && vocab_->types[id] == TOKEN_TYPE_CONTROL;
}

std::vector<TokenId> Tokenizer::encode(std::string_view text, bool add_special,
                                       bool parse_special) const {
    return encode(text, add_special, parse_special, {});
}

std::vector<TokenId> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special,
                                       std::span<const std::pair<size_t, size_t>> plain) const {
    // Split the text on special tokens: each fragment is raw text or one token.
    // (llama.cpp's tokenizer_st_partition: longest token first, leftmost matches.)
    struct Fragment {
        TokenId id;  // -1: raw text
        size_t offset, length;
        bool plain;  // raw text in which only user-defined tokens are matched
    };
    std::vector<Fragment> frags;
    {
        size_t at = 0;
        for (const auto& [off, len] : plain) {
            if (off < at || off > text.size() || len > text.size() - off)
                throw_error("encode: plain ranges must be ordered, disjoint and inside the text");
            if (off > at) frags.push_back({-1, at, off - at, false});
            if (len > 0) frags.push_back({-1, off, len, true});
            at = off + len;
        }
        if (at < text.size()) frags.push_back({-1, at, text.size() - at, false});
    }
    std::vector<Fragment> next;
    for (TokenId sid : vocab_->special_by_length) {
        const int32_t type = vocab_->types[sid];
        // Control and unknown tokens only with parse_special (and outside the plain ranges);
        // user-defined ones always.
        const bool user_defined = type == TOKEN_TYPE_USER_DEFINED;
        if (!parse_special && !user_defined) continue;
        const std::string& st = vocab_->tokens[sid];
        const uint8_t strip = strip_.empty() ? 0 : strip_[sid];
        bool any = false;
        next.clear();
        for (const Fragment& fr : frags) {
            if (fr.id >= 0 || (fr.plain && !user_defined)) {
                next.push_back(fr);
                continue;
            }
            size_t off = fr.offset, len = fr.length;
            while (len > 0) {
                const std::string_view view = text.substr(off, len);
                const size_t pos = view.find(st);
                if (pos == std::string_view::npos) break;
                any = true;
                size_t left_len = pos;
                if (strip & TOKEN_STRIP_LEFT)
                    while (left_len > 0 && std::isspace(static_cast<unsigned char>(view[left_len - 1])))
                        --left_len;
                if (left_len > 0) next.push_back({-1, off, left_len, fr.plain});
                next.push_back({sid, 0, 0, false});
                size_t r_off = off + pos + st.size();
                size_t r_len = len - pos - st.size();
                if (strip & TOKEN_STRIP_RIGHT)
                    while (r_len > 0 && std::isspace(static_cast<unsigned char>(text[r_off]))) {
                        ++r_off;
                        --r_len;
                    }
                off = r_off;
                len = r_len;
            }
            if (len > 0) next.push_back({-1, off, len, fr.plain});
        }
        if (any) frags.swap(next);
    }
    // Text on both sides of a plain range's edge is one piece of text again.
    if (!plain.empty()) {
        next.clear();
        for (const Fragment& fr : frags) {
            if (fr.id < 0 && !next.empty() && next.back().id < 0 && next.back().offset + next.back().length == fr.offset)
                next.back().length += fr.length;
            else
                next.push_back(fr);
        }
        frags.swap(next);
    }

    std::vector<TokenId> out;
    const Vocab& v = *vocab_;
    switch (v.kind) {
        case TOKENIZER_KIND_SPM: {
            if (add_special && v.add_bos && v.valid(v.bos)) out.push_back(v.bos);
            bool prev_special = true;  // the first raw fragment gets the dummy prefix too
            std::string buf;
            for (const Fragment& fr : frags) {
                if (fr.id >= 0) {
                    out.push_back(fr.id);
                    prev_special = true;
                    continue;
                }
                buf.clear();
                if (v.add_space_prefix && prev_special) buf += ' ';
                buf.append(text.substr(fr.offset, fr.length));
                algo_->encode(buf, out);
                prev_special = false;
            }
            if (add_special && v.add_eos && v.valid(v.eos)) out.push_back(v.eos);
            break;
        }
        case TOKENIZER_KIND_BPE:
        case TOKENIZER_KIND_WPM: {
            const bool wpm = v.kind == TOKENIZER_KIND_WPM;
            if (add_special && v.add_bos && v.valid(v.bos)) out.push_back(v.bos);
            for (const Fragment& fr : frags) {
                if (fr.id >= 0)
                    out.push_back(fr.id);
                else
                    algo_->encode(text.substr(fr.offset, fr.length), out);
            }
            if (add_special && v.add_eos && v.valid(v.eos)) out.push_back(v.eos);
            // BERT: [CLS] text [SEP]
            if (add_special && wpm && v.valid(v.sep)) out.push_back(v.sep);
            break;
        }
    }
    return out;
}

std::string Tokenizer::token_to_piece(TokenId id, bool render_special) const {
    if (!vocab_->valid(id))
        throw_error("token id {} is out of range (vocabulary has {} tokens)", id, n_vocab());
    switch (vocab_->types[id]) {
        case TOKEN_TYPE_CONTROL:
        case TOKEN_TYPE_UNKNOWN:
            return render_special ? vocab_->tokens[id] : std::string();
        case TOKEN_TYPE_USER_DEFINED:
            return vocab_->tokens[id];
        case TOKEN_TYPE_NORMAL:
        case TOKEN_TYPE_BYTE:
            return algo_->piece(id);
        default:  // unused and undefined tokens render as nothing, as in llama.cpp
            return {};
    }
}

std::string Tokenizer::decode(std::span<const TokenId> ids, bool render_special) const {
    std::string out;
    size_t i = 0;
    // A leading BOS does not count as the first piece: the dummy-prefix space is dropped from
    // the piece after it, so decode(encode(s)) == s.
    if (!ids.empty() && vocab_->valid(vocab_->bos) && ids[0] == vocab_->bos) {
        out += token_to_piece(ids[0], render_special);
        i = 1;
    }
    for (; i < ids.size(); ++i) {
        std::string piece = token_to_piece(ids[i], render_special);
        const bool first = i == 0 || (i == 1 && ids[0] == vocab_->bos);
        if (first && vocab_->add_space_prefix && !piece.empty() && piece[0] == ' ')
            out.append(piece, 1);
        else
            out += piece;
    }
    if (vocab_->clean_spaces) out = clean_spaces(out);
    return out;
}

std::string StreamDecoder::push(TokenId id) {
    const Vocab& v = tok_->vocab();
    std::string piece = tok_->token_to_piece(id, render_special_);
    bool strip = false;
    if (first_) {
        // A stream that starts with BOS is a whole text: its first piece loses the dummy-prefix
        // space. Any other stream continues a text, so its pieces are kept as they are.
        first_ = false;
        after_bos_ = v.valid(v.bos) && id == v.bos;
    } else if (after_bos_) {
        after_bos_ = false;
        strip = true;
    }
    if (strip && v.add_space_prefix && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
    pending_ += piece;
    const size_t n = utf8_complete_prefix(pending_);
    // Junk bytes can never become valid, so they go out now (as U+FFFD); only a truncated
    // tail is held back.
    std::string out = utf8_sanitize(std::string_view(pending_).substr(0, n));
    pending_.erase(0, n);
    return out;
}

std::string StreamDecoder::flush() {
    std::string out = utf8_sanitize(pending_);
    pending_.clear();
    return out;
}

}  // namespace coinfer
