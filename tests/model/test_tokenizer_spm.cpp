// SentencePiece (and WordPiece) tokenizer against llama.cpp's own test vectors and outputs.
#include <doctest/doctest.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/gguf.h"
#include "io/tokenizer.h"
#include "test_models.h"

using namespace coinfer;

namespace {

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    REQUIRE(in.good());
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

struct VocabCase {
    std::string text;
    std::vector<TokenId> ids;
};

// X.gguf.inp: cases separated by "\n__ggml_vocab_test__\n", the file ends with one (so the last
// split part is empty and not a case). X.gguf.out: one line of ids per case.
std::vector<VocabCase> read_vocab_cases(const std::string& gguf_path) {
    const std::string inp = read_text(gguf_path + ".inp");
    const std::string out = read_text(gguf_path + ".out");
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> texts;
    size_t pos = 0;
    while (true) {
        const size_t next = inp.find(sep, pos);
        if (next == std::string::npos) {
            REQUIRE(pos == inp.size());  // trailing separator
            break;
        }
        texts.push_back(inp.substr(pos, next - pos));
        pos = next + sep.size();
    }
    std::vector<VocabCase> cases;
    std::istringstream lines(out);
    std::string line;
    for (const std::string& text : texts) {
        REQUIRE(std::getline(lines, line));
        VocabCase c{text, {}};
        std::istringstream ids(line);
        TokenId id;
        while (ids >> id) c.ids.push_back(id);
        cases.push_back(std::move(c));
    }
    REQUIRE(!std::getline(lines, line));
    return cases;
}

std::string ids_str(const std::vector<TokenId>& ids) {
    std::string s;
    for (TokenId id : ids) s += fmt::format("{} ", id);
    return s;
}

// Runs every vector; returns {passed, total}.
std::pair<int, int> run_vocab_vectors(const std::string& name, bool check_round_trip) {
    auto path = test::model_file("vocab/ggml-vocab-" + name + ".gguf");
    if (!path) return {0, 0};
    const GgufFile f = GgufFile::open(*path);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    const auto cases = read_vocab_cases(*path);
    int n_pass = 0;
    for (const auto& c : cases) {
        const auto ids = tok.encode(c.text, /*add_special=*/false, /*parse_special=*/false);
        const bool ok = ids == c.ids;
        CHECK_MESSAGE(ok, name, ": text '", c.text, "' gives [", ids_str(ids), "] expected [",
                      ids_str(c.ids), "]");
        n_pass += ok;
        if (check_round_trip) CHECK(tok.decode(ids) == c.text);
    }
    MESSAGE(name, ": ", n_pass, "/", cases.size(), " vectors pass");
    return {n_pass, static_cast<int>(cases.size())};
}

}  // namespace

TEST_CASE("llama-spm vocab vectors") {
    auto [n_pass, n] = run_vocab_vectors("llama-spm", true);
    CHECK(n_pass == n);
}

TEST_CASE("phi-3 vocab vectors") {
    auto [n_pass, n] = run_vocab_vectors("phi-3", true);
    CHECK(n_pass == n);
}

TEST_CASE("bert-bge vocab vectors (WordPiece)") {
    auto path = test::model_file("vocab/ggml-vocab-bert-bge.gguf");
    if (!path) return;
    const GgufFile f = GgufFile::open(*path);
    try {
        Tokenizer::from_gguf(f);
    } catch (const Error& e) {
        // Not implemented: it must say so rather than give wrong ids.
        MESSAGE("bert-bge skipped: ", std::string(e.what()));
        CHECK(std::string(e.what()).find("WordPiece") != std::string::npos);
        return;
    }
    auto [n_pass, n] = run_vocab_vectors("bert-bge", false);
    CHECK(n_pass == n);
}

TEST_CASE("stories260K: prompts and greedy continuations tokenize like llama.cpp") {
    auto model = test::model_file("stories260K.gguf");
    auto refs = test::model_file("refs/stories260K-greedy.json");
    if (!model || !refs) return;
    const GgufFile f = GgufFile::open(*model);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    CHECK(tok.n_vocab() == 512);
    CHECK(tok.vocab().bos == 1);
    CHECK(tok.vocab().eos == 2);
    CHECK(tok.vocab().unk == 0);
    CHECK(tok.vocab().sep == -1);
    CHECK(tok.vocab().pad == -1);
    CHECK(tok.vocab().add_bos);
    CHECK(!tok.vocab().add_eos);
    CHECK(tok.is_eog(2));
    CHECK(!tok.is_eog(1));
    CHECK(tok.is_control(1));

    const auto j = nlohmann::json::parse(read_text(*refs));
    int n_results = 0;
    for (const auto& r : j.at("results")) {
        const std::string prompt = r.at("prompt");
        const std::string generated = r.at("generated_text");
        const auto prompt_ids = r.at("prompt_ids").get<std::vector<TokenId>>();
        const auto gen_ids = r.at("generated_ids").get<std::vector<TokenId>>();
        const auto pieces = r.at("generated_pieces").get<std::vector<std::string>>();
        CHECK(tok.encode(prompt, true, true) == prompt_ids);

        std::vector<TokenId> all = prompt_ids;
        all.insert(all.end(), gen_ids.begin(), gen_ids.end());
        CHECK(tok.decode(all) == prompt + generated);
        CHECK(tok.encode(prompt + generated, true, true) == all);

        REQUIRE(pieces.size() == gen_ids.size());
        for (size_t i = 0; i < gen_ids.size(); ++i) CHECK(tok.token_to_piece(gen_ids[i]) == pieces[i]);

        // Streaming gives the same text.
        StreamDecoder sd(tok);
        std::string streamed;
        for (TokenId id : all) streamed += sd.push(id);
        streamed += sd.flush();
        CHECK(streamed == prompt + generated);
        ++n_results;
    }
    CHECK(n_results == 3);
}

TEST_CASE("llama-2-tiny-random: 32k vocab loads and round-trips") {
    auto model = test::model_file("llama-2-tiny-random.gguf");
    if (!model) return;
    const GgufFile f = GgufFile::open(*model);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    CHECK(tok.n_vocab() == 32000);
    for (const std::string text :
         {"Hello world", " leading space", "Grüße aus Köln, naïve café", "日本語のテキスト",
          "emoji 🦙🚀 and 😶‍🌫️", "tabs\tand\nnewlines\n\n", "<s> is text here", "a  b   c"}) {
        const auto ids = tok.encode(text, true, false);
        REQUIRE(!ids.empty());
        CHECK(ids[0] == 1);
        CHECK(tok.decode(ids) == text);
        const auto ids2 = tok.encode(text, false, false);
        CHECK(std::vector<TokenId>(ids.begin() + 1, ids.end()) == ids2);
        CHECK(tok.decode(ids2) == text);
    }
    CHECK(tok.encode("", true, false) == std::vector<TokenId>{1});
    CHECK(tok.encode("", false, false).empty());
    // "Hello world" is the classic [15043, 3186] in the Llama-2 vocab.
    CHECK(tok.encode("Hello world", false, false) == std::vector<TokenId>{15043, 3186});
    CHECK(tok.token_to_piece(1).empty());
    CHECK(tok.token_to_piece(1, true) == "<s>");
    CHECK_THROWS_AS(tok.token_to_piece(32000), Error);
    CHECK_THROWS_AS(tok.token_to_piece(-1), Error);
}

TEST_CASE("parse_special: <s> is BOS only when asked") {
    auto model = test::model_file("llama-2-tiny-random.gguf");
    if (!model) return;
    const GgufFile f = GgufFile::open(*model);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    CHECK(tok.encode("<s>", false, true) == std::vector<TokenId>{1});
    const auto plain = tok.encode("<s>", false, false);
    CHECK(std::find(plain.begin(), plain.end(), 1) == plain.end());
    CHECK(tok.decode(plain) == "<s>");

    // After a special token the raw text gets the dummy-prefix space again.
    const auto a = tok.encode("<s>Hello</s>", false, true);
    std::vector<TokenId> expected = {1};
    const auto hello = tok.encode("Hello", false, false);
    expected.insert(expected.end(), hello.begin(), hello.end());
    expected.push_back(2);
    CHECK(a == expected);
    CHECK(tok.decode(a) == "Hello");
    CHECK(tok.decode(a, true) == "<s>Hello</s>");
}

TEST_CASE("StreamDecoder holds a split character back and emits it once") {
    auto model = test::model_file("stories260K.gguf");
    if (!model) return;
    const GgufFile f = GgufFile::open(*model);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    // The 512-token vocab spells the llama emoji with byte-fallback tokens.
    const auto ids = tok.encode("a🦙b", true, false);
    int n_byte = 0;
    for (TokenId id : ids) n_byte += tok.vocab().types[id] == TOKEN_TYPE_BYTE;
    REQUIRE(n_byte == 4);
    StreamDecoder sd(tok);
    std::vector<std::string> outs;
    std::string all;
    for (TokenId id : ids) {
        outs.push_back(sd.push(id));
        all += outs.back();
    }
    all += sd.flush();
    CHECK(all == "a🦙b");
    int n_with_emoji = 0;
    for (const auto& o : outs) {
        n_with_emoji += o.find("🦙") != std::string::npos;
        CHECK(utf8_complete_prefix(o) == o.size());
    }
    CHECK(n_with_emoji == 1);

    // A truncated character at the end comes out as U+FFFD on flush.
    StreamDecoder sd2(tok);
    std::string s2;
    for (size_t i = 0; i + 2 < ids.size(); ++i) s2 += sd2.push(ids[i]);  // drop last byte + "b"
    CHECK(s2 == "a");
    CHECK(sd2.flush() == "\xEF\xBF\xBD");
}

TEST_CASE("utf8_complete_prefix") {
    CHECK(utf8_complete_prefix("") == 0);
    CHECK(utf8_complete_prefix("abc") == 3);
    CHECK(utf8_complete_prefix("a\xC3") == 1);
    CHECK(utf8_complete_prefix("a\xC3\xA9") == 3);
    CHECK(utf8_complete_prefix("\xF0\x9F\xA6") == 0);
    CHECK(utf8_complete_prefix("\xF0\x9F\xA6\x99") == 4);
    CHECK(utf8_complete_prefix("\xFF") == 1);       // junk is not held
    CHECK(utf8_complete_prefix("\x80" "a") == 2);   // stray continuation
    CHECK(utf8_complete_prefix("\xC3" "a") == 2);   // lead without continuation
}

namespace {

GgufWriter tiny_vocab_writer() {
    GgufWriter w;
    w.set("tokenizer.ggml.model", std::string("llama"));
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "\xE2\x96\x81" "a", "a", "b"};
    w.set("tokenizer.ggml.tokens", GgufArray{tokens});
    w.set("tokenizer.ggml.scores", GgufArray{std::vector<float>{0, 0, 0, -1, -2, -3}});
    w.set("tokenizer.ggml.token_type", GgufArray{std::vector<int32_t>{2, 3, 3, 1, 1, 1}});
    return w;
}

void expect_error(GgufWriter w, const char* needle) {
    const GgufFile f = GgufFile::from_bytes(w.to_bytes(), "tiny.gguf");
    try {
        Tokenizer::from_gguf(f);
        FAIL("expected an Error mentioning ", needle);
    } catch (const Error& e) {
        CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, std::string(e.what()));
    }
}

}  // namespace

TEST_CASE("malformed vocabularies are errors naming the key") {
    {
        const GgufFile f = GgufFile::from_bytes(tiny_vocab_writer().to_bytes(), "tiny.gguf");
        const Tokenizer tok = Tokenizer::from_gguf(f);
        CHECK(tok.encode("ab", false, false) == std::vector<TokenId>{3, 5});
        // No byte tokens: each byte of "\u2581c" that is not a token becomes unk.
        CHECK(tok.encode("c", false, false) == std::vector<TokenId>{0, 0, 0, 0});
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.model", std::string("t5"));
        expect_error(w, "'t5'");
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.scores", GgufArray{std::vector<float>{0, 0}});
        expect_error(w, "tokenizer.ggml.scores");
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.token_type", GgufArray{std::vector<int32_t>{1}});
        expect_error(w, "tokenizer.ggml.token_type");
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.bos_token_id", uint32_t(6));
        expect_error(w, "tokenizer.ggml.bos_token_id");
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.padding_token_id", uint32_t(0xFFFFFFFF));  // none
        const GgufFile f = GgufFile::from_bytes(w.to_bytes(), "tiny.gguf");
        CHECK(Tokenizer::from_gguf(f).vocab().pad == -1);
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.tokens", GgufArray{std::vector<std::string>{"a", "b", "a", "c", "d", "e"}});
        expect_error(w, "duplicates");
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.model", std::string("gpt2"));
        expect_error(w, "tokenizer.ggml.merges");
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.model", std::string("gpt2"));
        w.set("tokenizer.ggml.merges", GgufArray{std::vector<std::string>{"a b", "ab"}});
        expect_error(w, "tokenizer.ggml.merges[1]");
    }
    {
        auto w = tiny_vocab_writer();
        w.set("tokenizer.ggml.tokens", GgufArray{std::vector<float>{1, 2, 3, 4, 5, 6}});
        expect_error(w, "tokenizer.ggml.tokens");
    }
}

TEST_CASE("bert-bge: [CLS] text [SEP] with add_special") {
    auto path = test::model_file("vocab/ggml-vocab-bert-bge.gguf");
    if (!path) return;
    const GgufFile f = GgufFile::open(*path);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    const auto plain = tok.encode("Hello, world!", false, false);
    auto with = tok.encode("Hello, world!", true, false);
    REQUIRE(with.size() == plain.size() + 2);
    CHECK(with.front() == 101);
    CHECK(with.back() == 102);
    CHECK(std::vector<TokenId>(with.begin() + 1, with.end() - 1) == plain);
    CHECK(tok.encode("[CLS] hi", false, true)[0] == 101);
}

TEST_CASE("baichuan (SPM, 64k) loads and round-trips") {
    auto path = test::model_file("vocab/ggml-vocab-baichuan.gguf");
    if (!path) return;
    const GgufFile f = GgufFile::open(*path);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    for (const std::string text : {"Hello world", "我想在apple工作1314151天～", "🦙 emoji", "  two"}) {
        CHECK(tok.decode(tok.encode(text, true, false)) == text);
    }
}

TEST_CASE("arbitrary bytes never crash encode or decode") {
    uint64_t state = 0x9E3779B97F4A7C15ull;
    auto next = [&]() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return state;
    };
    for (const char* name : {"llama-spm", "phi-3", "bert-bge"}) {
        auto path = test::model_file(std::string("vocab/ggml-vocab-") + name + ".gguf");
        if (!path) continue;
        const GgufFile f = GgufFile::open(*path);
        const Tokenizer tok = Tokenizer::from_gguf(f);
        for (int iter = 0; iter < 300; ++iter) {
            std::string s(next() % 40, '\0');
            for (char& c : s) {
                const uint64_t r = next();
                // Mix raw bytes with pieces of special tokens and spaces.
                c = r % 4 == 0 ? " <s>/|"[r / 4 % 6] : static_cast<char>(r >> 8);
            }
            const bool parse = iter % 2;
            std::vector<TokenId> ids;
            REQUIRE_NOTHROW(ids = tok.encode(s, true, parse));
            std::string back;
            REQUIRE_NOTHROW(back = tok.decode(ids, iter % 3 == 0));
            StreamDecoder sd(tok);
            std::string streamed;
            for (TokenId id : ids) streamed += sd.push(id);
            streamed += sd.flush();
            CHECK(utf8_complete_prefix(streamed) == streamed.size());
        }
    }
}

TEST_CASE("SPM round-trips random valid text") {
    auto path = test::model_file("vocab/ggml-vocab-llama-spm.gguf");
    if (!path) return;
    const GgufFile f = GgufFile::open(*path);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    const char* pieces[] = {"a", "Z", " ", "  ", "\n", "\t", "é", "ß", "日本", "🦙", "😶‍🌫️", "<s>",
                            "</s>", "<unk>", "0x", "<0x41>", "!", "'s", "ий", "\x7f", "\x01"};
    uint64_t state = 12345;
    for (int iter = 0; iter < 300; ++iter) {
        std::string s;
        const int n = static_cast<int>(state % 12);
        for (int k = 0; k < n; ++k) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            s += pieces[(state >> 33) % std::size(pieces)];
        }
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        const auto ids = tok.encode(s, iter % 2 == 0, false);
        CHECK_MESSAGE(tok.decode(ids) == s, s);
    }
}

TEST_CASE("plain ranges keep control-token text as text and change nothing else") {
    auto path = test::model_file("vocab/ggml-vocab-llama-spm.gguf");
    if (!path) return;
    const GgufFile f = GgufFile::open(*path);
    const Tokenizer tok = Tokenizer::from_gguf(f);
    const TokenId bos = 1, eos = 2;
    // "[INST] " template, then a user's text that spells BOS and EOS, then " [/INST]".
    const std::string user = "hi </s><s> there";
    const std::string text = "[INST] " + user + " [/INST]</s>";
    const std::vector<std::pair<size_t, size_t>> plain = {{7, user.size()}};
    const auto with_ranges = tok.encode(text, true, true, plain);
    const auto parsed = tok.encode(text, true, true);
    // Parsing everything makes the user's </s> and <s> control tokens; the range keeps them text.
    CHECK(std::count(parsed.begin(), parsed.end(), eos) == 2);
    CHECK(std::count(with_ranges.begin(), with_ranges.end(), eos) == 1);  // the template's own
    CHECK(with_ranges.back() == eos);
    CHECK(std::count(with_ranges.begin(), with_ranges.end(), bos) == 1);  // add_special's
    CHECK(tok.decode(with_ranges) == text.substr(0, text.size() - 4));  // the last </s> is a control token
    // Without control text inside the range, the ids are exactly those of parsing everything
    // (the text on both sides of a range edge is tokenized as one piece).
    const std::string clean = "[INST] hello there [/INST]</s>";
    CHECK(tok.encode(clean, true, true, std::vector<std::pair<size_t, size_t>>{{7, 11}}) == tok.encode(clean, true, true));
    CHECK(tok.encode(clean, true, true, std::vector<std::pair<size_t, size_t>>{{0, clean.size()}}) ==
          tok.encode(clean, true, false));
    // Ranges out of order or past the text are errors.
    CHECK_THROWS_AS(tok.encode(clean, true, true, std::vector<std::pair<size_t, size_t>>{{5, 3}, {2, 1}}), Error);
    CHECK_THROWS_AS(tok.encode(clean, true, true, std::vector<std::pair<size_t, size_t>>{{20, 100}}), Error);
}
