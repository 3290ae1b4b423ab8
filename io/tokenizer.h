#pragma once
// Tokenizers built from GGUF metadata, matching llama.cpp's ids exactly:
//   tokenizer.ggml.model = llama  -> SentencePiece BPE (scores, byte fallback, dummy prefix)
//   tokenizer.ggml.model = gpt2   -> byte-level BPE (merges, pre-tokenizer by tokenizer.ggml.pre)
//   tokenizer.ggml.model = bert   -> WordPiece
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "gguf.h"

namespace coinfer {

using TokenId = int32_t;

// tokenizer.ggml.token_type values.
enum TokenType : int32_t {
    TOKEN_TYPE_UNDEFINED = 0,
    TOKEN_TYPE_NORMAL = 1,
    TOKEN_TYPE_UNKNOWN = 2,
    TOKEN_TYPE_CONTROL = 3,
    TOKEN_TYPE_USER_DEFINED = 4,
    TOKEN_TYPE_UNUSED = 5,
    TOKEN_TYPE_BYTE = 6,
};

enum TokenizerKind {
    TOKENIZER_KIND_SPM,  // "llama"
    TOKENIZER_KIND_BPE,  // "gpt2"
    TOKENIZER_KIND_WPM,  // "bert"
};

// The vocabulary as read (and validated) from the file. Plain data shared by the algorithms.
struct Vocab {
    TokenizerKind kind = TOKENIZER_KIND_SPM;
    std::string model;  // tokenizer.ggml.model
    std::string pre;    // tokenizer.ggml.pre ("default" when absent)
    std::vector<std::string> tokens;     // [n_vocab]
    std::vector<float> scores;           // [n_vocab], 0 when absent
    std::vector<int32_t> types;          // [n_vocab], TokenType; NORMAL when absent
    std::unordered_map<std::string, TokenId> token_to_id;
    std::vector<std::pair<std::string, std::string>> merges;  // BPE only, rank = index

    TokenId bos = -1, eos = -1, unk = -1, sep = -1, pad = -1, eot = -1, eom = -1;
    bool add_bos = false;
    bool add_eos = false;
    bool add_space_prefix = true;  // SPM dummy prefix (tokenizer.ggml.add_space_prefix)
    bool clean_spaces = false;     // decode drops spaces before ?!., and some contractions
    std::vector<TokenId> eog;      // end-of-generation ids: eos, eot, eom and known <|...|> enders
    // Tokens matched in text when parse_special is on: control and user-defined tokens,
    // longest first.
    std::vector<TokenId> special_by_length;
    // The longest token string: no SentencePiece or byte-level BPE token stands for more bytes
    // of text (a piece's spelling is never shorter than the text it covers), so text of n bytes
    // needs n / this tokens at least. 0 for WordPiece (it drops whitespace): no bound.
    size_t max_token_bytes = 0;

    int32_t n_vocab() const { return static_cast<int32_t>(tokens.size()); }
    bool valid(TokenId id) const { return id >= 0 && id < n_vocab(); }
};

// One tokenizer algorithm: turns one fragment of raw text (no special tokens in it) into ids,
// and renders one token as the bytes it stands for.
class TokenizerAlgo {
public:
    virtual ~TokenizerAlgo() = default;
    // `text` is the raw fragment; SPM's dummy-prefix space is already prepended when due.
    virtual void encode(std::string_view text, std::vector<TokenId>& out) const = 0;
    // Bytes of a normal/byte/user-defined token (control tokens are handled by Tokenizer).
    virtual std::string piece(TokenId id) const = 0;
};

std::unique_ptr<TokenizerAlgo> make_spm_algo(const Vocab& vocab);
std::unique_ptr<TokenizerAlgo> make_bpe_algo(const Vocab& vocab);  // Error: unknown pre-tokenizer
std::unique_ptr<TokenizerAlgo> make_wpm_algo(const Vocab& vocab);

class Tokenizer {
public:
    // Reads tokenizer.ggml.* from the file. A malformed vocabulary is an Error naming the key.
    static Tokenizer from_gguf(const GgufFile& file);

    Tokenizer(Tokenizer&&) noexcept;
    Tokenizer& operator=(Tokenizer&&) noexcept;
    ~Tokenizer();

    // add_special: BOS/EOS per add_bos_token/add_eos_token. parse_special: control and
    // user-defined tokens written in the text are recognised as single tokens.
    std::vector<TokenId> encode(std::string_view text, bool add_special = true,
                                bool parse_special = false) const;
    // The same, with control tokens left as text inside the plain ranges ((offset, length),
    // ordered and disjoint): chat message contents, so that "</s>" typed by a user is not EOS.
    std::vector<TokenId> encode(std::string_view text, bool add_special, bool parse_special,
                                std::span<const std::pair<size_t, size_t>> plain) const;

    // Bytes of one token. Control tokens (BOS, EOS, ...) give "" unless render_special.
    std::string token_to_piece(TokenId id, bool render_special = false) const;
    // Concatenated bytes of the tokens. SPM drops the dummy-prefix space after a leading BOS
    // the way llama.cpp does (remove_leading_space when the first piece follows BOS).
    std::string decode(std::span<const TokenId> ids, bool render_special = false) const;

    const Vocab& vocab() const { return *vocab_; }
    int32_t n_vocab() const { return vocab_->n_vocab(); }
    bool is_eog(TokenId id) const;
    bool is_control(TokenId id) const;

private:
    Tokenizer() = default;
    // On the heap so that the algorithm's reference to it survives moves of the Tokenizer.
    std::unique_ptr<Vocab> vocab_;
    std::unique_ptr<TokenizerAlgo> algo_;
    // Per-token TOKEN_STRIP_* flags for special tokens (whitespace eaten beside a matched
    // special token); empty when no token has any.
    std::vector<uint8_t> strip_;
};

// Streaming detokenizer: holds back the bytes of a UTF-8 character split across tokens, so each
// push returns only whole characters. A stream that starts with BOS decodes like decode(); one
// that starts elsewhere (a generated continuation) keeps every piece's leading space.
class StreamDecoder {
public:
    explicit StreamDecoder(const Tokenizer& tok, bool render_special = false)
        : tok_(&tok), render_special_(render_special) {}
    // Text that became complete with this token (may be empty).
    std::string push(TokenId id);
    // Whatever is held back (invalid or truncated UTF-8 comes out as U+FFFD).
    std::string flush();

private:
    const Tokenizer* tok_;
    bool render_special_;
    bool first_ = true;
    bool after_bos_ = false;
    std::string pending_;
};

// Length of the longest prefix of `s` made of whole UTF-8 characters (an incomplete trailing
// sequence is left out; invalid bytes count as whole so they are not held forever).
size_t utf8_complete_prefix(std::string_view s);

}  // namespace coinfer
