// coinfer bench --mode grammar: what constrained decoding costs the host per step. Compiles a
// JSON schema (or a GBNF grammar), builds the vocabulary trie of a GGUF's tokenizer (a model or
// a vocab-only file), then walks random documents through the mask, timing every mask: the
// first walk on a fresh context (cold: every state is new), the rest on the same context (warm:
// a server sees the same schema again).
#include <algorithm>
#include <chrono>
#include <random>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "engine/grammar.h"
#include "io/gguf.h"
#include "io/tokenizer.h"

namespace coinfer::cli {

namespace {

using Clock = std::chrono::steady_clock;

const char* const k_default_schema =
    R"({"type":"object","properties":{"name":{"type":"string","maxLength":24},"age":{"type":"integer","minimum":0},)"
    R"("email":{"type":"string"},"tags":{"type":"array","items":{"enum":["red","green","blue"]},"maxItems":4},)"
    R"("address":{"type":"object","properties":{"street":{"type":"string"},"city":{"type":"string"},)"
    R"("zip":{"type":"string","maxLength":10}},"required":["street","city"]}},"required":["name","age","address"]})";

double pct(std::vector<double> v, double p) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, size_t(p / 100.0 * double(v.size())))];
}

}  // namespace

nlohmann::json bench_grammar(Args& args, const std::string& path, FILE* out) {
    const auto schema_file = args.value("--schema");
    const auto grammar_file = args.value("--grammar");
    const int64_t n_walks = args.int_value("--walks").value_or(20);
    if (path.empty()) throw UsageError("--mode grammar needs -m MODEL.gguf (a model or a vocab-only GGUF)");
    if (n_walks < 2 || n_walks > 100000) throw UsageError("--walks must be in 2..100000");
    if (schema_file && grammar_file) throw UsageError("give --schema or --grammar, not both");
    if (auto pos = args.positionals(); !pos.empty()) throw UsageError(fmt::format("unexpected argument '{}'", pos[0]));

    const Tokenizer tok = Tokenizer::from_gguf(GgufFile::open(path));
    auto t0 = Clock::now();
    auto trie = std::make_shared<TokenTrie>(tok);
    const double trie_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    const std::string source = grammar_file ? read_file(*grammar_file) : schema_file ? read_file(*schema_file) : k_default_schema;
    t0 = Clock::now();
    auto grammar = grammar_file ? Grammar::parse(source) : Grammar::from_json_schema(source);
    const double compile_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();

    auto ctx = std::make_shared<GrammarContext>(grammar, trie);
    std::mt19937 rng(1);
    std::vector<uint32_t> mask;
    std::vector<double> cold, warm;
    int64_t n_tokens = 0, n_finished = 0;
    for (int64_t w = 0; w < n_walks; ++w) {
        GrammarMatcher m(ctx);
        for (int step = 0; step < 512; ++step) {
            const auto s0 = Clock::now();
            m.fill_mask(mask);
            (w == 0 ? cold : warm).push_back(std::chrono::duration<double, std::micro>(Clock::now() - s0).count());
            std::vector<TokenId> allowed;
            for (TokenId id = 0; id < trie->n_vocab(); ++id)
                if (mask[size_t(id) >> 5] >> (id & 31) & 1) allowed.push_back(id);
            if (allowed.empty()) break;
            TokenId pick = allowed[rng() % allowed.size()];
            if (step > 60) {  // steer long walks to an end: the shortest piece that closes something
                size_t best = SIZE_MAX;
                for (TokenId id : allowed) {
                    const std::string& p = trie->pieces[size_t(id)];
                    if (!p.empty() && (p[0] == '}' || p[0] == ']' || p[0] == '"') && p.size() < best) best = p.size(), pick = id;
                }
            }
            if (trie->pieces[size_t(pick)].empty() || !m.accept_token(pick)) {
                ++n_finished;
                break;
            }
            ++n_tokens;
            if (m.must_end()) {
                ++n_finished;
                break;
            }
        }
    }
    auto mean = [](const std::vector<double>& v) {
        double s = 0;
        for (double x : v) s += x;
        return v.empty() ? 0.0 : s / double(v.size());
    };
    fmt::print(out, "grammar: {} ({} elements, compiled in {:.0f} us); vocabulary {} tokens, trie of {} nodes in {:.1f} ms\n",
               grammar_file ? *grammar_file : schema_file ? *schema_file : std::string("built-in schema"),
               grammar->elems.size(), compile_us, trie->n_vocab(), trie->nodes.size(), trie_ms);
    fmt::print(out, "{} random walks, {} tokens, {} finished; mask per step, us:\n", n_walks, n_tokens, n_finished);
    fmt::print(out, "| context | masks | mean | p50 | p99 | max |\n| --- | ---: | ---: | ---: | ---: | ---: |\n");
    fmt::print(out, "| cold (first walk) | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |\n", cold.size(), mean(cold), pct(cold, 50),
               pct(cold, 99), pct(cold, 100));
    fmt::print(out, "| warm (later walks) | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |\n", warm.size(), mean(warm), pct(warm, 50),
               pct(warm, 99), pct(warm, 100));
    return {{"mode", "grammar"},          {"vocab", trie->n_vocab()},      {"trie_ms", trie_ms},
            {"compile_us", compile_us},   {"cold_mean_us", mean(cold)},    {"cold_p99_us", pct(cold, 99)},
            {"warm_mean_us", mean(warm)}, {"warm_p99_us", pct(warm, 99)}, {"warm_max_us", pct(warm, 100)}};
}

}  // namespace coinfer::cli
