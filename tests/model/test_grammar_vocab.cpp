// Constrained decoding with real vocabularies and a real model:
//  - with every shared vocabulary (SPM and byte-level BPE, up to 102k tokens), random walks
//    through the mask give only documents their schema accepts, and every valid document of a
//    small corpus, tokenized as the model would, is allowed token by token;
//  - the engine on stories260K and quant-base (COINFER_TEST_DEVICE, default cpu): 1,000 and 200 schema-constrained
//    requests with random seeds and temperatures all give JSON that parses and obeys its schema.
// Mask costs are printed (the figures live in docs/perf.md; nothing here is timed).
#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <random>

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "engine/grammar.h"
#include "io/gguf.h"
#include "json_validate.h"
#include "scheduler/engine.h"
#include "test_models.h"

using namespace coinfer;
using json = nlohmann::json;

namespace {

const char* const k_schemas[] = {
    R"({"type":"object","properties":{"name":{"type":"string","maxLength":12},"age":{"type":"integer","minimum":0},"tags":{"type":"array","items":{"enum":["red","green","blue"]},"maxItems":3}},"required":["name","age"]})",
    R"({"type":"array","items":{"type":"object","properties":{"id":{"type":"integer"},"ok":{"type":"boolean"},"note":{"type":["string","null"],"maxLength":10}},"required":["id","ok"]},"maxItems":3})",
    R"({"anyOf":[{"type":"object","properties":{"kind":{"const":"point"},"x":{"type":"number"},"y":{"type":"number"}},"required":["kind","x","y"]},{"type":"object","properties":{"kind":{"const":"label"},"text":{"type":"string","minLength":1,"maxLength":8}},"required":["kind","text"]}]})",
};

const char* const k_docs[] = {
    R"({"name":"Ann","age":31,"tags":["red","blue"]})",
    R"({"name": "Bob Smith", "age": 7})",
    R"({"name":"日本語","age":0,"tags":[]})",
    R"([{"id":1,"ok":true,"note":"fine"},{"id":-2,"ok":false,"note":null}])",
    R"({"kind":"point","x":1.5,"y":-2e3})",
    R"({"kind":"label","text":"héllo"})",
};
const int k_doc_schema[] = {0, 0, 0, 1, 2, 2};

struct Walk {
    int n_finished = 0, n_masks = 0;
    double mask_us = 0, max_mask_us = 0;
};

// Random tokens from the mask until the grammar completes (or EOS is drawn where allowed);
// later in the walk, pieces that close things are preferred so walks end.
Walk random_walks(const std::shared_ptr<const Grammar>& g, const std::shared_ptr<const TokenTrie>& trie,
                  const json& schema, int n_walks, uint32_t seed, const std::string& what) {
    Walk w;
    std::mt19937 rng(seed);
    std::vector<uint32_t> mask;
    // One context for all walks, as the engine shares one per schema: later walks find the
    // masks of states seen before.
    auto ctx = std::make_shared<GrammarContext>(g, trie);
    for (int k = 0; k < n_walks; ++k) {
        GrammarMatcher m(ctx);
        std::string text;
        bool ended = false;
        for (int step = 0; step < 400 && !ended; ++step) {
            const auto t0 = std::chrono::steady_clock::now();
            m.fill_mask(mask);
            const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
            w.mask_us += us;
            w.max_mask_us = std::max(w.max_mask_us, us);
            ++w.n_masks;
            std::vector<TokenId> allowed;
            for (TokenId id = 0; id < trie->n_vocab(); ++id)
                if (mask[size_t(id) >> 5] >> (id & 31) & 1) allowed.push_back(id);
            REQUIRE_MESSAGE(!allowed.empty(), what << ": no token allowed after '" << text << "'");
            bool eos_ok = false;
            for (TokenId id : trie->eog_ids()) eos_ok = eos_ok || (mask[size_t(id) >> 5] >> (id & 31) & 1);
            if (eos_ok && (step > 30 || rng() % 4 == 0)) {
                ended = true;
                break;
            }
            TokenId pick = allowed[rng() % allowed.size()];
            if (step > 60) {
                // Prefer the shortest allowed piece that starts with a closer or a quote.
                size_t best = SIZE_MAX;
                for (TokenId id : allowed) {
                    const std::string& p = trie->pieces[size_t(id)];
                    if (!p.empty() && (p[0] == '}' || p[0] == ']' || p[0] == '"') && p.size() < best) best = p.size(), pick = id;
                }
            }
            if (trie->pieces[size_t(pick)].empty()) {
                ended = true;  // EOS
                break;
            }
            REQUIRE(m.accept_token(pick));
            text += trie->pieces[size_t(pick)];
            ended = m.must_end();
        }
        if (!ended) continue;
        ++w.n_finished;
        json doc;
        try {
            doc = json::parse(text);
        } catch (const json::exception&) {
            FAIL_CHECK(what << ": not JSON: " << text);
            continue;
        }
        CHECK_MESSAGE(test::validate(doc, schema, schema).empty(), what << ": " << text);
    }
    return w;
}

}  // namespace

TEST_CASE("every shared vocabulary: masks admit every valid document token by token, and random walks stay valid") {
    const auto dir = test::models_dir() / "vocab";
    if (!std::filesystem::exists(dir)) {
        test::mark_skipped("no vocab folder");
        return;
    }
    std::vector<std::filesystem::path> files;
    for (const auto& e : std::filesystem::directory_iterator(dir))
        if (e.path().extension() == ".gguf") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    int n_vocabs = 0;
    for (const auto& f : files) {
        const std::string name = f.filename().string();
        std::optional<Tokenizer> tok;
        try {
            tok.emplace(Tokenizer::from_gguf(GgufFile::open(f.string())));
        } catch (const Error& e) {
            MESSAGE(name << ": not loadable here (" << e.what() << "), skipped");
            continue;
        }
        if (tok->vocab().kind == TOKENIZER_KIND_WPM) {
            MESSAGE(name << ": WordPiece (an encoder's vocabulary, no generation): skipped");
            continue;
        }
        ++n_vocabs;
        const auto t0 = std::chrono::steady_clock::now();
        auto trie = std::make_shared<TokenTrie>(*tok);
        const double trie_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        // Documents, tokenized as the model would write them, pass the mask token by token.
        for (size_t d = 0; d < std::size(k_docs); ++d) {
            auto g = Grammar::from_json_schema(k_schemas[k_doc_schema[d]]);
            GrammarMatcher m(g, trie);
            std::vector<uint32_t> mask;
            const std::vector<TokenId> ids = tok->encode(k_docs[d], false, false);
            bool ok = true;
            for (TokenId id : ids) {
                m.fill_mask(mask);
                if (!(mask[size_t(id) >> 5] >> (id & 31) & 1) || !m.accept_token(id)) {
                    FAIL_CHECK(name << ": token " << id << " '" << tok->token_to_piece(id) << "' of " << k_docs[d]
                                    << " is not allowed");
                    ok = false;
                    break;
                }
            }
            if (ok) CHECK_MESSAGE(m.can_end(), name << ": " << k_docs[d] << " did not complete");
        }
        // Random walks under each schema.
        Walk total;
        for (size_t s = 0; s < std::size(k_schemas); ++s) {
            const json schema = json::parse(k_schemas[s]);
            Walk w = random_walks(Grammar::from_json_schema(k_schemas[s]), trie, schema, 8, uint32_t(17 + s), name);
            total.n_finished += w.n_finished;
            total.n_masks += w.n_masks;
            total.mask_us += w.mask_us;
            total.max_mask_us = std::max(total.max_mask_us, w.max_mask_us);
        }
        CHECK_MESSAGE(total.n_finished >= 12, name << ": only " << total.n_finished << " of 24 walks finished");
        MESSAGE(name << ": " << trie->n_vocab() << " tokens, trie " << trie->nodes.size() << " nodes built in " << trie_ms
                     << " ms; " << total.n_masks << " masks, mean " << total.mask_us / std::max(1, total.n_masks)
                     << " us, worst " << total.max_mask_us << " us; " << total.n_finished << " walks finished");
    }
    CHECK(n_vocabs >= 8);
}

namespace {

// The engine's device: COINFER_TEST_DEVICE (default cpu; cuda on the device machine, where the
// masks reach the device sampler as bits).
std::string test_device() {
    const char* dev = std::getenv("COINFER_TEST_DEVICE");
    return dev && *dev ? dev : "cpu";
}

// n constrained requests on the model, random seeds, temperatures and schemas: every
// output must parse and obey its schema, and end because the grammar completed (or EOS).
void constrained_runs(const std::string& model_rel, int n) {
    auto path = test::model_file(model_rel);
    if (!path) return;
    asio::io_context io;
    EngineOptions o;
    o.model = *path;
    o.device = test_device();
    o.backend.n_blocks = 4096;
    o.planner.max_seqs = 128;
    Engine engine(io.get_executor(), o);
    std::mt19937 rng(5);
    int n_valid = 0, n_done = 0;
    std::vector<std::string> bad;
    for (int i = 0; i < n; ++i) {
        Request r;
        r.prompt = i % 2 ? "Once upon a time" : "The little dog";
        r.max_tokens = 400;
        r.sampling.temperature = std::uniform_real_distribution<float>(0.0f, 1.5f)(rng);
        r.sampling.top_p = i % 3 == 0 ? 0.9f : 1.0f;
        r.sampling.seed = rng();
        const size_t s = size_t(i) % std::size(k_schemas);
        r.json_schema = k_schemas[s];
        engine.async_complete(r, [&, s](std::error_code ec, Completion c) {
            ++n_done;
            if (ec) {
                bad.push_back("error: " + ec.message());
                return;
            }
            try {
                const json doc = json::parse(c.text);
                const json schema = json::parse(k_schemas[s]);
                const std::string why = test::validate(doc, schema, schema);
                if (why.empty() && c.finish_reason == FINISH_REASON_STOP) ++n_valid;
                else bad.push_back(c.text + " (" + why + ")");
            } catch (const json::exception&) {
                bad.push_back(fmt::format("{:?} finish {} after {} tokens", c.text, int(c.finish_reason), c.ids.size()));
            }
        });
    }
    io.run();
    CHECK(n_done == n);
    CHECK_MESSAGE(n_valid == n, model_rel << ": " << n_valid << " of " << n << " valid; first bad: "
                                          << (bad.empty() ? std::string() : bad.front()));
    MESSAGE(model_rel << ": " << n_valid << " of " << n << " constrained outputs parse and obey their schema");
}

}  // namespace

TEST_CASE("1,000 schema-constrained requests on stories260K all give valid JSON") { constrained_runs("stories260K.gguf", 1000); }

TEST_CASE("200 schema-constrained requests on quant-base (Q8_0) all give valid JSON") {
    constrained_runs("quant/quant-base-Q8_0.gguf", 200);
}

TEST_CASE("ignore_eos with a grammar: a complete document still ends the request, with stop") {
    auto path = test::model_file("stories260K.gguf");
    if (!path) return;
    asio::io_context io;
    EngineOptions o;
    o.model = *path;
    o.device = test_device();
    o.backend.n_blocks = 256;
    Engine engine(io.get_executor(), o);
    int n_ok = 0;
    for (int i = 0; i < 20; ++i) {
        Request r;
        r.prompt = "Once upon a time";
        r.max_tokens = 50;
        r.ignore_eos = true;
        r.sampling.temperature = 1.0f;
        r.sampling.seed = uint64_t(i);
        // After "yes" only a blank may follow, and the vocabulary may have no such token: then
        // the end of generation is the only way on, whatever ignore_eos says.
        r.grammar = R"(root ::= " yes" " "? | " no" " "?)";
        engine.async_complete(r, [&](std::error_code ec, Completion c) {
            const bool ok = !ec && c.finish_reason == FINISH_REASON_STOP &&
                            (c.text == " yes" || c.text == " yes " || c.text == " no" || c.text == " no ");
            if (!ok) MESSAGE("got '" << c.text << "' finish " << int(c.finish_reason) << " " << ec.message());
            n_ok += ok;
        });
    }
    io.run();
    CHECK(n_ok == 20);
}
