// SentencePiece-style BPE over scores (tokenizer.ggml.model = "llama"), as llama.cpp does it:
// spaces become U+2581, the text starts as one symbol per UTF-8 character, and the adjacent
// pair whose merged text is the highest-scoring vocabulary entry is merged until none is left.
// Symbols that are not tokens fall back to <0xXX> byte tokens.
#include <queue>

#include "error.h"
#include "tokenizer.h"

namespace coinfer {

namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// Length of a UTF-8 sequence judged from its first byte only (llama.cpp's unicode_len_utf8);
// stray continuation bytes count as one.
size_t utf8_len_from_lead(uint8_t b) {
    static constexpr uint8_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[b >> 4];
}

int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

class SpmAlgo final : public TokenizerAlgo {
public:
    explicit SpmAlgo(const Vocab& vocab) : vocab_(vocab) {
        static constexpr char hex[] = "0123456789ABCDEF";
        for (int b = 0; b < 256; ++b) {
            const std::string name = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>'};
            auto it = vocab.token_to_id.find(name);
            if (it == vocab.token_to_id.end()) it = vocab.token_to_id.find(std::string(1, char(b)));
            byte_token_[b] = it != vocab.token_to_id.end() ? it->second : -1;
        }
        // Byte value of each BYTE token ("<0xXX>"); -1 where the text is not of that form.
        token_byte_.assign(vocab.tokens.size(), -1);
        for (size_t i = 0; i < vocab.tokens.size(); ++i) {
            const std::string& s = vocab.tokens[i];
            if (vocab.types[i] != TOKEN_TYPE_BYTE || s.size() != 6 || s.compare(0, 3, "<0x") != 0 ||
                s[5] != '>')
                continue;
            const int hi = hex_digit(s[3]), lo = hex_digit(s[4]);
            if (hi >= 0 && lo >= 0) token_byte_[i] = hi * 16 + lo;
        }
    }

    void encode(std::string_view raw, std::vector<TokenId>& out) const override {
        // Escape spaces.
        std::string text;
        text.reserve(raw.size() + raw.size() / 2);
        for (char c : raw) {
            if (c == ' ')
                text += kSpace;
            else
                text += c;
        }
        if (text.empty()) return;

        // One symbol per UTF-8 character, in a doubly linked list.
        struct Symbol {
            int prev, next;
            size_t offset, n;  // bytes of text; n == 0 once merged into its left neighbour
        };
        std::vector<Symbol> symbols;
        symbols.reserve(text.size());
        for (size_t offs = 0; offs < text.size();) {
            const size_t n = std::min(utf8_len_from_lead(uint8_t(text[offs])), text.size() - offs);
            const int index = static_cast<int>(symbols.size());
            symbols.push_back({index - 1, offs + n == text.size() ? -1 : index + 1, offs, n});
            offs += n;
        }

        struct Bigram {
            int left, right;
            float score;
            size_t size;
        };
        // Highest score first; on equal scores the leftmost pair.
        auto lower = [](const Bigram& l, const Bigram& r) {
            return l.score < r.score || (l.score == r.score && l.left > r.left);
        };
        std::priority_queue<Bigram, std::vector<Bigram>, decltype(lower)> queue(lower);
        std::string key;
        auto try_add = [&](int left, int right) {
            if (left < 0 || right < 0) return;
            const size_t size = symbols[left].n + symbols[right].n;
            key.assign(text, symbols[left].offset, size);
            auto it = vocab_.token_to_id.find(key);
            if (it == vocab_.token_to_id.end()) return;
            queue.push({left, right, vocab_.scores[it->second], size});
        };
        for (int i = 1; i < static_cast<int>(symbols.size()); ++i) try_add(i - 1, i);

        while (!queue.empty()) {
            const Bigram b = queue.top();
            queue.pop();
            Symbol& l = symbols[b.left];
            Symbol& r = symbols[b.right];
            // Stale: one side was merged away or grew since this pair was queued.
            if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
            l.n += r.n;
            r.n = 0;
            l.next = r.next;
            if (r.next >= 0) symbols[r.next].prev = b.left;
            try_add(l.prev, b.left);
            try_add(b.left, l.next);
        }

        for (int i = 0; i != -1; i = symbols[i].next) {
            const Symbol& s = symbols[i];
            key.assign(text, s.offset, s.n);
            auto it = vocab_.token_to_id.find(key);
            if (it != vocab_.token_to_id.end()) {
                out.push_back(it->second);
                continue;
            }
            // Not a token (merged symbols always are): spell it as bytes.
            for (size_t j = 0; j < s.n; ++j) {
                const TokenId id = byte_token_[uint8_t(text[s.offset + j])];
                if (id >= 0) {
                    out.push_back(id);
                } else if (vocab_.valid(vocab_.unk)) {
                    out.push_back(vocab_.unk);
                } else {
                    throw_error("SentencePiece vocabulary has no byte token for 0x{:02X} and no unknown "
                                "token", uint8_t(text[s.offset + j]));
                }
            }
        }
    }

    std::string piece(TokenId id) const override {
        if (!vocab_.valid(id)) throw_error("token id {} is out of range", id);
        if (vocab_.types[id] == TOKEN_TYPE_BYTE && token_byte_[id] >= 0)
            return std::string(1, static_cast<char>(token_byte_[id]));
        // Unescape spaces.
        const std::string& s = vocab_.tokens[id];
        std::string out;
        out.reserve(s.size());
        for (size_t i = 0; i < s.size();) {
            if (s.compare(i, kSpace.size(), kSpace) == 0) {
                out += ' ';
                i += kSpace.size();
            } else {
                out += s[i++];
            }
        }
        return out;
    }

private:
    const Vocab& vocab_;
    TokenId byte_token_[256];
    std::vector<int16_t> token_byte_;  // [n_vocab]
};

}  // namespace

std::unique_ptr<TokenizerAlgo> make_spm_algo(const Vocab& vocab) {
    return std::make_unique<SpmAlgo>(vocab);
}

}  // namespace coinfer
