// Byte-level BPE against llama.cpp's tokenizer test vectors (models/vocab/ggml-vocab-X.gguf with
// X.gguf.inp / X.gguf.out, produced with add_special = false, parse_special = false).
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "io/error.h"
#include "io/gguf.h"
#include "io/tokenizer.h"
#include "test_models.h"

using namespace coinfer;

namespace {

std::string read_all(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

struct VocabCase {
    std::string text;
    std::vector<TokenId> ids;
};

std::vector<VocabCase> load_cases(const std::string& inp_path, const std::string& out_path) {
    const std::string inp = read_all(inp_path);
    const std::string out = read_all(out_path);
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> texts;
    for (size_t pos = 0;;) {
        const size_t next = inp.find(sep, pos);
        if (next == std::string::npos) break;  // what follows the last separator is no case
        texts.push_back(inp.substr(pos, next - pos));
        pos = next + sep.size();
    }
    std::vector<VocabCase> cases;
    std::istringstream lines(out);
    std::string line;
    for (const auto& t : texts) {
        if (!std::getline(lines, line)) break;
        VocabCase c{t, {}};
        std::istringstream ids(line);
        for (TokenId id; ids >> id;) c.ids.push_back(id);
        cases.push_back(std::move(c));
    }
    REQUIRE(cases.size() == texts.size());
    return cases;
}

// A Vocab built straight from the file, so the algorithm can be tested on its own.
Vocab vocab_from_gguf(const GgufFile& f) {
    Vocab v;
    v.kind = TOKENIZER_KIND_BPE;
    v.model = f.get<std::string>("tokenizer.ggml.model");
    v.pre = f.get_opt<std::string>("tokenizer.ggml.pre").value_or("default");
    v.tokens = f.get_array<std::string>("tokenizer.ggml.tokens");
    if (f.has("tokenizer.ggml.token_type")) {
        v.types = f.get_array<int32_t>("tokenizer.ggml.token_type");
    } else {
        v.types.assign(v.tokens.size(), TOKEN_TYPE_NORMAL);
    }
    v.scores.assign(v.tokens.size(), 0.0f);
    for (size_t i = 0; i < v.tokens.size(); ++i) {
        v.token_to_id[v.tokens[i]] = static_cast<TokenId>(i);
    }
    for (const auto& m : f.get_array<std::string>("tokenizer.ggml.merges")) {
        const size_t sp = m.find(' ', 1);
        if (sp == std::string::npos) {
            v.merges.emplace_back();
        } else {
            v.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
        }
    }
    return v;
}

// What Tokenizer does around the algorithm with parse_special = false, after llama.cpp's
// tokenizer_st_partition: user-defined tokens (longest first) are cut out of the raw text and
// stand for themselves; the fragments between them go to the algorithm.
std::vector<TokenId> encode_fragments(const TokenizerAlgo& algo, const Vocab& vocab,
                                      const std::string& text) {
    std::vector<TokenId> user;
    for (TokenId id = 0; id < vocab.n_vocab(); ++id) {
        if (vocab.types[id] == TOKEN_TYPE_USER_DEFINED && !vocab.tokens[id].empty()) {
            user.push_back(id);
        }
    }
    std::stable_sort(user.begin(), user.end(), [&](TokenId a, TokenId b) {
        return vocab.tokens[a].size() > vocab.tokens[b].size();
    });
    struct Frag {
        TokenId id;  // -1: raw text
        std::string text;
    };
    std::vector<Frag> frags{{-1, text}};
    for (TokenId id : user) {
        const std::string& t = vocab.tokens[id];
        std::vector<Frag> next;
        for (auto& f : frags) {
            if (f.id >= 0) {
                next.push_back(std::move(f));
                continue;
            }
            size_t pos = 0;
            for (size_t hit; (hit = f.text.find(t, pos)) != std::string::npos;) {
                if (hit > pos) next.push_back({-1, f.text.substr(pos, hit - pos)});
                next.push_back({id, {}});
                pos = hit + t.size();
            }
            if (pos < f.text.size()) next.push_back({-1, f.text.substr(pos)});
        }
        frags = std::move(next);
    }
    std::vector<TokenId> ids;
    for (const auto& f : frags) {
        if (f.id >= 0) {
            ids.push_back(f.id);
        } else {
            algo.encode(f.text, ids);
        }
    }
    return ids;
}

std::string show_ids(const std::vector<TokenId>& ids) {
    std::string s;
    for (auto id : ids) s += fmt::format("{} ", id);
    return s;
}

const char* const k_bpe_vocabs[] = {"gpt-2", "deepseek-llm", "deepseek-coder", "falcon",
                                    "starcoder", "refact", "mpt"};

}  // namespace

TEST_CASE("bpe algo matches llama.cpp test vectors") {
    for (const char* name : k_bpe_vocabs) {
        CAPTURE(name);
        const std::string base = fmt::format("vocab/ggml-vocab-{}.gguf", name);
        auto gguf = test::model_file(base);
        auto inp = test::model_file(base + ".inp");
        auto out = test::model_file(base + ".out");
        if (!gguf || !inp || !out) continue;

        const Vocab vocab = vocab_from_gguf(GgufFile::open(*gguf));
        const auto algo = make_bpe_algo(vocab);
        const auto cases = load_cases(*inp, *out);
        int n_pass = 0;
        for (const auto& c : cases) {
            const std::vector<TokenId> ids = encode_fragments(*algo, vocab, c.text);
            if (ids == c.ids) {
                ++n_pass;
            } else {
                FAIL_CHECK(fmt::format("{}: text {:?}\n  got      {}\n  expected {}", name, c.text,
                                       show_ids(ids), show_ids(c.ids)));
            }
            // Pieces concatenate back to the text (all these vocabularies are lossless).
            std::string back;
            for (auto id : ids) back += algo->piece(id);
            CHECK_MESSAGE(back == c.text, name, ": round trip of ", c.text);
        }
        MESSAGE(fmt::format("{}: {}/{} cases pass", name, n_pass, cases.size()));
        CHECK(n_pass == static_cast<int>(cases.size()));
    }
}

TEST_CASE("Tokenizer (gpt2 vocabularies) matches llama.cpp test vectors") {
    for (const char* name : k_bpe_vocabs) {
        CAPTURE(name);
        const std::string base = fmt::format("vocab/ggml-vocab-{}.gguf", name);
        auto gguf = test::model_file(base);
        auto inp = test::model_file(base + ".inp");
        auto out = test::model_file(base + ".out");
        if (!gguf || !inp || !out) continue;

        const Tokenizer tok = Tokenizer::from_gguf(GgufFile::open(*gguf));
        const auto cases = load_cases(*inp, *out);
        int n_pass = 0;
        for (const auto& c : cases) {
            const std::vector<TokenId> ids = tok.encode(c.text, false, false);
            if (ids == c.ids) {
                ++n_pass;
            } else {
                FAIL_CHECK(fmt::format("{}: text {:?}\n  got      {}\n  expected {}", name, c.text,
                                       show_ids(ids), show_ids(c.ids)));
            }
            // decode() may clean up spaces (clean_up_tokenization_spaces) the way llama.cpp does;
            // the pieces themselves must give back the text.
            std::string back;
            for (auto id : ids) back += tok.token_to_piece(id);
            CHECK_MESSAGE(back == c.text, name, ": pieces of ", c.text);
        }
        MESSAGE(fmt::format("{} (Tokenizer): {}/{} cases pass", name, n_pass, cases.size()));
        CHECK(n_pass == static_cast<int>(cases.size()));
    }
}

TEST_CASE("Tokenizer: gpt-neox vocabulary (no pre key) uses the default pre-tokenizer") {
    auto gguf = test::model_file("vocab/ggml-vocab-gpt-neox.gguf");
    if (!gguf) return;
    const Tokenizer tok = Tokenizer::from_gguf(GgufFile::open(*gguf));
    const std::string text = "Hello world! 12345 ½ нещо\n\n  x";
    const auto ids = tok.encode(text, false, false);
    CHECK(!ids.empty());
    CHECK(tok.decode(ids) == text);
}

TEST_CASE("bpe algo: unknown pre-tokenizer is an Error naming it") {
    Vocab v;
    v.kind = TOKENIZER_KIND_BPE;
    v.pre = "no-such-pre";
    v.tokens = {"a"};
    v.types = {TOKEN_TYPE_NORMAL};
    v.token_to_id = {{"a", 0}};
    try {
        make_bpe_algo(v);
        FAIL("expected an Error");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("no-such-pre") != std::string::npos);
    }
}

TEST_CASE("bpe algo: every supported pre-tokenizer compiles and splits") {
    auto gguf = test::model_file("vocab/ggml-vocab-gpt-2.gguf");
    if (!gguf) return;
    Vocab vocab = vocab_from_gguf(GgufFile::open(*gguf));
    const std::string text =
        "Hello, y'all! 3333 ½ нещо 我想在apple工作 \t\n  x\xC0\x80\xFF\xED\xA0\x80!";
    for (const char* pre : {"default", "llama-bpe", "llama3", "dbrx", "smaug-bpe", "deepseek-llm",
                            "deepseek-coder", "falcon", "starcoder", "refact", "mpt", "gpt-2",
                            "qwen2", "gpt-4o", "tekken", "bloom", "command-r", "olmo"}) {
        CAPTURE(pre);
        vocab.pre = pre;
        const auto algo = make_bpe_algo(vocab);
        std::vector<TokenId> ids;
        algo->encode(text, ids);
        CHECK(!ids.empty());
        for (auto id : ids) CHECK(vocab.valid(id));
    }
}

TEST_CASE("bpe algo: malformed UTF-8 is handled like llama.cpp") {
    auto gguf = test::model_file("vocab/ggml-vocab-gpt-2.gguf");
    if (!gguf) return;
    const Vocab vocab = vocab_from_gguf(GgufFile::open(*gguf));
    const auto algo = make_bpe_algo(vocab);
    const auto enc = [&](std::string_view s) {
        std::vector<TokenId> ids;
        algo->encode(s, ids);
        std::string back;
        for (auto id : ids) back += algo->piece(id);
        return back;
    };
    // A stray byte becomes U+FFFD; an overlong form is re-encoded shortest.
    CHECK(enc("a\xFF" "b") == "a\xEF\xBF\xBD" "b");
    CHECK(enc("\xC1\x81") == "A");
    CHECK(enc("x\xE2\x82") == "x\xEF\xBF\xBD\xEF\xBF\xBD");
    // Surrogates pass through as their 3-byte form.
    CHECK(enc("\xED\xA0\x80") == "\xED\xA0\x80");
}

TEST_CASE("bpe algo: long inputs are fast enough and stable") {
    auto gguf = test::model_file("vocab/ggml-vocab-gpt-2.gguf");
    if (!gguf) return;
    const Vocab vocab = vocab_from_gguf(GgufFile::open(*gguf));
    const auto algo = make_bpe_algo(vocab);
    std::string text;
    for (int i = 0; i < 2000; ++i) text += "The quick brown fox jumps over the lazy dog 12345. ";
    text += std::string(20000, ' ') + std::string(5000, '!') + std::string(3000, 'a');
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<TokenId> ids;
    algo->encode(text, ids);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MESSAGE(fmt::format("{} bytes -> {} tokens in {:.1f} ms ({:.1f} MB/s)", text.size(), ids.size(),
                        secs * 1e3, text.size() / secs / 1e6));
    std::string back;
    for (auto id : ids) back += algo->piece(id);
    CHECK(back == text);
}

TEST_CASE("bpe algo: random bytes never crash and give valid ids") {
    auto gguf = test::model_file("vocab/ggml-vocab-deepseek-llm.gguf");
    if (!gguf) return;
    Vocab vocab = vocab_from_gguf(GgufFile::open(*gguf));
    const std::string alphabet[] = {"a", "Z", " ", "  ", "\n", "\t", "3", "'s", "!", "\xC3\xBC",
                                    "\xE4\xB8\x80", "\xE3\x80\x80", "\xF0\x9F\x98\x81", "\xFF",
                                    "\xC0", "\x80", "\xED\xA0\x80", "\xE2\x80\x83", "\x00"};
    uint64_t rng = 0x9E3779B97F4A7C15ULL;
    const auto next = [&] {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        return rng;
    };
    for (const char* pre : {"deepseek-llm", "deepseek-coder", "gpt-2", "falcon", "default",
                            "llama-bpe", "qwen2", "starcoder", "gpt-4o"}) {
        CAPTURE(pre);
        vocab.pre = pre;
        const auto algo = make_bpe_algo(vocab);
        for (int iter = 0; iter < 200; ++iter) {
            std::string text;
            const int n = static_cast<int>(next() % 40);
            for (int i = 0; i < n; ++i) {
                const auto& a = alphabet[next() % std::size(alphabet)];
                text.append(a.empty() ? std::string(1, '\0') : a);
            }
            std::vector<TokenId> ids;
            algo->encode(text, ids);
            for (auto id : ids) REQUIRE(vocab.valid(id));
        }
    }
}
