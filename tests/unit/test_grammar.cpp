// The grammar engine without a model: GBNF parsing and its errors, byte-level matching (UTF-8
// classes included), a corpus of JSON schemas each with documents it must accept and reject,
// hostile grammars and schemas, and the next-token mask against a brute-force check on a
// vocabulary of single bytes and multi-byte pieces (tokens that split UTF-8 characters too).
#include <doctest/doctest.h>

#include <chrono>
#include <random>

#include <nlohmann/json.hpp>

#include "engine/grammar.h"
#include "json_validate.h"

using namespace coinfer;
using json = nlohmann::json;

namespace {

bool accepts(const std::shared_ptr<const Grammar>& g, std::string_view text) {
    static auto bytes = [] {
        std::vector<std::string> p;
        for (int b = 0; b < 256; ++b) p.push_back(std::string(1, char(b)));
        return std::make_shared<TokenTrie>(p, std::vector<TokenId>{});
    }();
    GrammarMatcher m(g, bytes);
    return m.accept_bytes(text) && m.can_end();
}

std::string error_of(std::string_view gbnf) {
    try {
        Grammar::parse(gbnf);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

std::string schema_error_of(std::string_view schema) {
    try {
        Grammar::from_json_schema(schema);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// A vocabulary of every single byte plus pieces of JSON and UTF-8 (some split characters);
// the last id is the end-of-generation token.
std::shared_ptr<TokenTrie> test_vocab() {
    std::vector<std::string> p;
    for (int b = 1; b < 256; ++b) p.push_back(std::string(1, char(b)));
    for (const char* s : {"{\"", "\":", "\": ", "\",", ",\"", "\"}", "true", "tr", "ue", "false", "null", "nu", "ll",
                          "  ", "    ", "\n", "\n  ", "[1", "2]", "], ", "}}", "\xC3", "\xA9", "\xC3\xA9", "\xE6\x97",
                          "\xA5\xE6\x9C\xAC", "日本", "é\"", "\\u00", "e9", "\\\"", "12", "-3", ".5", "e+1", "name",
                          "\"name\"", "age", "2024-", "01-", "31", "T12:", "00:00Z", "abc", "x\"}", " \"", "red", "\"red\"",
                          "0", "00", "1.0", "[]", "{}", "\"\"", "},{\"", "\":[", "]}"})
        p.push_back(s);
    p.push_back("");  // EOS
    return std::make_shared<TokenTrie>(p, std::vector<TokenId>{TokenId(p.size() - 1)});
}

struct Case {
    const char* schema;
    std::vector<const char*> good, bad;
};

const std::vector<Case>& corpus() {
    static const std::vector<Case> cases = {
        {R"({"type":"string"})", {R"("hi")", R"("a\"b")", R"("\u00e9t\u00e9")", "\"日本\"", R"("")"}, {"hi", "\"a\nb\"", "12", R"("a)"}},
        {R"({"type":"integer"})", {"0", "-12", "123"}, {"01", "1.5", "abc", "-"}},
        {R"({"type":"number"})", {"1.5", "-0.25e10", "3", "0.0"}, {".5", "1.", "+1", "1e"}},
        {R"({"type":"boolean"})", {"true", "false"}, {"True", "1", "tru"}},
        {R"({"type":"null"})", {"null"}, {"nul", "None"}},
        {R"({"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]})",
         {R"({"name":"Al","age":3})", R"({ "name" : "Al" , "age" : 3 })"},
         {R"({"age":3,"name":"Al"})", R"({"name":"Al"})", R"({"name":"Al","age":3,"x":1})", R"({"name":"Al","age":"3"})"}},
        {R"({"properties":{"a":{"type":"integer"},"b":{"type":"string"},"c":{"type":"boolean"}},"required":["b"]})",
         {R"({"b":"x"})", R"({"a":1,"b":"x"})", R"({"b":"x","c":true})", R"({"a":1,"b":"x","c":false})"},
         {"{}", R"({"a":1})", R"({"c":true,"b":"x"})", R"({"b":"x",})"}},
        {R"({"properties":{"a":{"type":"integer"},"b":{"type":"integer"}}})",
         {"{}", R"({"a":1})", R"({"b":2})", R"({"a":1,"b":2})"},
         {R"({"a":1,})", R"({,"b":2})", R"({"b":2,"a":1})", R"({"c":1})"}},
        {R"({"enum":["red","green","blue"]})", {R"("red")", R"("blue")"}, {R"("yellow")", "red"}},
        {R"({"enum":[1,"two",null,true]})", {"1", R"("two")", "null", "true"}, {"2", "false"}},
        {R"({"const":{"a":[1,2]}})", {R"({"a":[1,2]})"}, {R"({"a":[1,3]})", R"({"a":[1,2],"b":1})"}},
        {R"({"type":"array","items":{"type":"integer"}})", {"[]", "[1]", "[1, 2, 3]"}, {"[1,]", R"(["a"])", "[", "[1 2]"}},
        {R"({"type":"array","items":{"type":"string"},"minItems":2,"maxItems":3})",
         {R"(["a","b"])", R"(["a","b","c"])"}, {R"(["a"])", R"(["a","b","c","d"])", "[]"}},
        {R"({"type":"array","maxItems":0})", {"[]"}, {"[1]"}},
        {R"({"type":"object","properties":{"user":{"type":"object","properties":{"id":{"type":"integer"},"tags":{"type":"array","items":{"type":"string"}}},"required":["id","tags"]}},"required":["user"]})",
         {R"({"user":{"id":7,"tags":["a","b"]}})", R"({"user":{"id":7,"tags":[]}})"},
         {R"({"user":{"id":7}})", R"({"user":{"tags":[],"id":7}})", R"({"user":null})"}},
        {R"({"anyOf":[{"type":"integer"},{"type":"string"}]})", {"5", R"("x")"}, {"true", "[5]"}},
        {R"({"type":["string","null"]})", {"null", R"("x")"}, {"1", "{}"}},
        {R"({"oneOf":[{"type":"object","properties":{"kind":{"const":"a"},"x":{"type":"integer"}},"required":["kind","x"]},{"type":"object","properties":{"kind":{"const":"b"},"y":{"type":"string"}},"required":["kind","y"]}]})",
         {R"({"kind":"a","x":1})", R"({"kind":"b","y":"s"})"}, {R"({"kind":"a","y":"s"})", R"({"kind":"c","x":1})"}},
        {R"({"$defs":{"pt":{"type":"object","properties":{"x":{"type":"number"},"y":{"type":"number"}},"required":["x","y"]}},"type":"array","items":{"$ref":"#/$defs/pt"}})",
         {R"([{"x":1,"y":2.5},{"x":-1,"y":0}])", "[]"}, {R"([{"x":1}])", R"([{"y":1,"x":2}])"}},
        {R"({"$defs":{"node":{"type":"object","properties":{"v":{"type":"integer"},"kids":{"type":"array","items":{"$ref":"#/$defs/node"}}},"required":["v","kids"]}},"$ref":"#/$defs/node"})",
         {R"({"v":1,"kids":[{"v":2,"kids":[]},{"v":3,"kids":[{"v":4,"kids":[]}]}]})"}, {R"({"v":1,"kids":[{"v":2}]})"}},
        {R"({"definitions":{"s":{"type":"string"}},"properties":{"a":{"$ref":"#/definitions/s"}},"required":["a"]})",
         {R"({"a":"q"})"}, {R"({"a":1})", "{}"}},
        {R"({"type":"object","additionalProperties":{"type":"integer"}})", {"{}", R"({"a":1,"b":2})"}, {R"({"a":"x"})", "[]"}},
        {R"({"properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":true})",
         {R"({"a":1,"z":[1]})", R"({"a":1})"}, {R"({"z":1})", R"({"a":"x"})"}},
        {R"({"type":"object"})", {R"({"any":[1,{"b":null}]})", "{}"}, {"[]", "1"}},
        {R"({"type":"string","minLength":2,"maxLength":4})", {R"("ab")", R"("abcd")", "\"éé\""}, {R"("a")", R"("abcde")"}},
        {R"({"type":"string","format":"date"})", {R"("2024-02-29")"}, {R"("2024-13-01")", R"("24-01-01")"}},
        {R"({"type":"string","format":"time"})", {R"("12:30:00Z")", R"("23:59:59.123+02:00")"}, {R"("24:00:00Z")", R"("12:30")"}},
        {R"({"type":"string","format":"date-time"})", {R"("2026-11-27T17:08:00Z")"}, {R"("2026-11-27 17:08:00Z")"}},
        {R"({"type":"string","format":"uuid"})", {R"("123e4567-e89b-12d3-a456-426614174000")"}, {R"("123e4567e89b")"}},
        {R"({"type":"integer","minimum":0})", {"0", "7", "120"}, {"-1", "07"}},
        {R"({"type":"integer","minimum":1})", {"1", "10"}, {"0", "-3"}},
        {R"({"allOf":[{"properties":{"a":{"type":"integer"}},"required":["a"]},{"properties":{"b":{"type":"string"}},"required":["b"]}]})",
         {R"({"a":1,"b":"x"})"}, {R"({"a":1})", R"({"b":"x"})"}},
        {R"({"const":"a\"b\\c\u00e9"})", {"\"a\\\"b\\\\cé\""}, {R"("a\"b\\c")"}},
        {R"({"prefixItems":[{"type":"integer"},{"type":"string"}]})", {R"([1,"a"])"}, {"[1]", R"(["a",1])", R"([1,"a",2])"}},
        {R"({"type":"object","properties":{"tags":{"type":"array","items":{"enum":["x","y"]},"maxItems":2}},"required":["tags"]})",
         {R"({ "tags" : [ "x" , "y" ] })", R"({"tags":[]})"}, {R"({"tags":["z"]})", R"({"tags":["x","y","x"]})"}},
    };
    return cases;
}

}  // namespace

TEST_CASE("GBNF: literals, classes, UTF-8 ranges, groups, repetition counts, comments") {
    auto g = Grammar::parse(R"(# a comment
root ::= "a" [b-d]+ ( "x" | "yz" )? [^a-z] tail  # trailing comment
tail ::= [α-ω]{2,3} . "\x41\u00e9\n"
)");
    CHECK(accepts(g, "abx1αβzAé\n"));
    CHECK(accepts(g, "abcdyz#αωω日Aé\n"));
    CHECK(accepts(g, "ab1αβzAé\n"));  // the group is optional
    CHECK(!accepts(g, "a1αβzAé\n"));             // + needs one
    CHECK(!accepts(g, "abxqαβzAé\n"));           // [^a-z]
    CHECK(!accepts(g, "abx1αzAé\n"));            // {2,3}: α then z is no Greek letter... z is '.', then 'A' must be \x41
    CHECK(!accepts(g, "abx1αβγδzAé\n"));         // more than 3
    auto nested = Grammar::parse("root ::= (\n  \"a\"\n  | \"b\" ( \"c\" )*\n)\n");
    CHECK(accepts(nested, "a"));
    CHECK(accepts(nested, "bccc"));
    CHECK(!accepts(nested, "ac"));
    // Every code point of a negated class, in each UTF-8 length, and none of the excluded.
    auto neg = Grammar::parse("root ::= [^\"\\\\]");
    for (const char* s : {"a", "é", "日", "😀", "\x7f"}) CHECK_MESSAGE(accepts(neg, s), s);
    for (const char* s : {"\"", "\\", "\xC3", "\xED\xA0\x80"}) CHECK_MESSAGE(!accepts(neg, s), s);
}

TEST_CASE("GBNF errors say where and why") {
    CHECK(error_of("root ::= foo").find("rule 'foo' is used but never defined") != std::string::npos);
    CHECK(error_of("main ::= \"a\"").find("no 'root' rule") != std::string::npos);
    CHECK(error_of("root ::= \"abc").find("1:") != std::string::npos);
    CHECK(error_of("root ::= \"a\"\nx ::= [a-").find("2:") != std::string::npos);
    CHECK(error_of("root ::= \"\\q\"").find("unknown escape") != std::string::npos);
    CHECK(error_of("root \"a\"").find("'::='") != std::string::npos);
    CHECK(error_of("root ::= \"a\"\nroot ::= \"b\"").find("defined twice") != std::string::npos);
    CHECK(error_of("root ::= [z-a]").find("backwards") != std::string::npos);
    CHECK(error_of("root ::= \"a\"{2,1}").find("below its minimum") != std::string::npos);
    CHECK(error_of("root ::= \"a\"{0,5000}").find("above 1000") != std::string::npos);
    CHECK(error_of("root ::= )").find("unexpected") != std::string::npos);
}

TEST_CASE("hostile grammars: left recursion, empty languages, deep nesting, huge alternations") {
    CHECK(error_of("root ::= root \"a\" | \"a\"").find("left-recursive") != std::string::npos);
    CHECK(error_of("root ::= a\na ::= b \"x\"\nb ::= a | \"y\"").find("left-recursive") != std::string::npos);
    CHECK(error_of("root ::= x root \"a\" | \"b\"\nx ::= \"c\"?").find("left-recursive") != std::string::npos);
    CHECK(error_of("root ::= (\"a\"?)*").find("left-recursive") != std::string::npos);
    CHECK(error_of("root ::= a\na ::= \"x\" a").find("language is empty") != std::string::npos);
    CHECK(error_of("root ::= " + std::string(200, '(') + "\"a\"" + std::string(200, ')')).find("nest deeper") != std::string::npos);
    CHECK(error_of(std::string("root ::= ") + std::string(2 << 20, 'a')).find("bytes") != std::string::npos);
    // 10,000 alternatives compile and match in bounded time.
    std::string big = "root ::= \"w0\"";
    for (int i = 1; i < 10000; ++i) big += " | \"w" + std::to_string(i) + "\"";
    const auto t0 = std::chrono::steady_clock::now();
    auto g = Grammar::parse(big);
    CHECK(accepts(g, "w9999"));
    CHECK(!accepts(g, "w10000"));
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
    // Unreachable dead ends are dropped, the rest works.
    CHECK(accepts(Grammar::parse("root ::= \"a\" | \"b\" dead\ndead ::= \"x\" dead"), "a"));
}

TEST_CASE("a corpus of 35 JSON schemas: each accepts its valid documents and rejects the others") {
    REQUIRE(corpus().size() >= 30);
    int n_docs = 0;
    for (const Case& c : corpus()) {
        std::shared_ptr<const Grammar> g;
        try {
            g = Grammar::from_json_schema(c.schema);
        } catch (const Error& e) {
            FAIL_CHECK("schema " << c.schema << " failed to compile: " << e.what());
            continue;
        }
        const json schema = json::parse(c.schema);
        for (const char* d : c.good) {
            CHECK_MESSAGE(accepts(g, d), "schema " << std::string(c.schema) << " should accept " << std::string(d));
            CHECK_MESSAGE(test::validate(json::parse(d), schema, schema).empty(), "the validator disagrees on " << std::string(d));
            ++n_docs;
        }
        for (const char* d : c.bad) {
            CHECK_MESSAGE(!accepts(g, d), "schema " << std::string(c.schema) << " should reject " << std::string(d));
            ++n_docs;
        }
    }
    MESSAGE(n_docs << " documents checked");
}

TEST_CASE("schemas that would constrain what the grammar cannot are refused by name") {
    CHECK(schema_error_of(R"({"type":"string","pattern":"^a+$"})").find("'pattern' is not supported") != std::string::npos);
    CHECK(schema_error_of(R"({"not":{"type":"string"}})").find("'not'") != std::string::npos);
    CHECK(schema_error_of(R"({"type":"number","multipleOf":2})").find("multipleOf") != std::string::npos);
    CHECK(schema_error_of(R"({"type":"string","format":"email"})").find("'email' is not supported") != std::string::npos);
    CHECK(schema_error_of("false").find("admits no value") != std::string::npos);
    CHECK(schema_error_of(R"({"$ref":"https://x/y.json"})").find("only local $ref") != std::string::npos);
    CHECK(schema_error_of(R"({"$ref":"#/$defs/none"})").find("points at nothing") != std::string::npos);
    CHECK(schema_error_of(R"({"type":"object",)").find("not valid JSON") != std::string::npos);
    CHECK(schema_error_of(R"({"type":"array","minItems":5000})").find("refused") != std::string::npos);
    CHECK(schema_error_of(R"({"type":"wat"})").find("unknown type") != std::string::npos);
    CHECK(schema_error_of(R"({"properties":{"a":{}},"required":["b"]})").find("'b'") != std::string::npos);
    std::string deep = R"({"type":"string"})";
    for (int i = 0; i < 100; ++i) deep = R"({"type":"array","items":)" + deep + "}";
    CHECK(schema_error_of(deep).find("nests deeper") != std::string::npos);
    std::string nested(100000, '[');
    CHECK(!schema_error_of(nested).empty());
}

TEST_CASE("the mask is exact: each token allowed iff the grammar takes its bytes, on random walks") {
    auto vocab = test_vocab();
    const TokenId eos = vocab->eog_ids()[0];
    std::vector<std::shared_ptr<const Grammar>> grammars = {Grammar::json_object()};
    for (size_t i : {5, 6, 14, 18, 24, 33}) grammars.push_back(Grammar::from_json_schema(corpus()[i].schema));
    std::mt19937 rng(11);
    std::vector<uint32_t> mask;
    int n_finished = 0, n_steps = 0;
    for (size_t gi = 0; gi < grammars.size(); ++gi) {
        for (int walk = 0; walk < 12; ++walk) {
            GrammarMatcher m(grammars[gi], vocab);
            std::string text;
            bool ended = false;
            for (int step = 0; step < 120 && !ended; ++step) {
                m.fill_mask(mask);
                std::vector<TokenId> allowed;
                for (TokenId id = 0; id < vocab->n_vocab(); ++id) {
                    const bool bit = mask[size_t(id) >> 5] >> (id & 31) & 1;
                    const bool takes = m.allows(id);
                    if (bit != takes) FAIL_CHECK("grammar " << gi << " token " << id << " mask " << bit << " but accept " << takes
                                                            << " after '" << text << "'");
                    if (bit) allowed.push_back(id);
                }
                ++n_steps;
                REQUIRE_MESSAGE(!allowed.empty(), "no token allowed after '" << text << "'");
                // Close when possible; later in the walk, prefer short pieces that end things.
                const bool can_end = std::find(allowed.begin(), allowed.end(), eos) != allowed.end();
                if (can_end && (step > 20 || rng() % 3 == 0)) {
                    ended = true;
                    break;
                }
                TokenId pick = allowed[rng() % allowed.size()];
                if (step > 40) {
                    for (TokenId id : allowed)
                        if (vocab->pieces[size_t(id)] == "}" || vocab->pieces[size_t(id)] == "]" || vocab->pieces[size_t(id)] == "\"")
                            pick = id;
                }
                if (pick == eos) {
                    ended = true;
                    break;
                }
                REQUIRE(m.accept_token(pick));
                text += vocab->pieces[size_t(pick)];
                if (m.must_end()) ended = true;
            }
            if (!ended) continue;
            ++n_finished;
            CHECK_MESSAGE(accepts(grammars[gi], text), text);
            json doc;
            try {
                doc = json::parse(text);
            } catch (const json::exception& e) {
                FAIL_CHECK("not JSON: " << text << " (" << e.what() << ")");
                continue;
            }
            if (gi > 0) {
                const json schema = json::parse(corpus()[std::vector<size_t>{5, 6, 14, 18, 24, 33}[gi - 1]].schema);
                CHECK_MESSAGE(test::validate(doc, schema, schema).empty(), text);
            } else {
                CHECK(doc.is_object());
            }
        }
    }
    MESSAGE(n_finished << " walks finished, " << n_steps << " masks checked token by token");
    CHECK(n_finished > 40);
}
