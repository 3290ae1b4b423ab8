// OpenAI function tools: parsing tools / tool_choice, the forced-call schema (checked with the
// grammar engine), calls found in completions, and how calls and results go back into prompts.
#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/grammar.h"
#include "tools.h"

using namespace coinfer;
using namespace coinfer::server;
using json = nlohmann::json;

namespace {

const char* k_body = R"({"tools": [
  {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
   "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "city": {"type": "string"}},
                  "required": ["unit", "city"]}}},
  {"type": "function", "function": {"name": "now"}}]})";

Tools tools_of(const std::string& raw) { return parse_tools(json::parse(raw), raw); }

// k_body plus a tool_choice, keeping its key order (json::dump would sort the keys).
std::string with_choice(const std::string& choice) {
    std::string b = k_body;
    b.pop_back();
    return b + R"(, "tool_choice": )" + choice + "}";
}

// The whole document is in the grammar's language.
bool accepts(const std::string& schema, const std::string& doc) {
    static auto bytes = [] {  // a vocabulary of the 256 bytes
        std::vector<std::string> p;
        for (int b = 0; b < 256; ++b) p.push_back(std::string(1, char(b)));
        return std::make_shared<TokenTrie>(p, std::vector<TokenId>{});
    }();
    GrammarMatcher m(Grammar::cached_json_schema(schema), bytes);
    return m.accept_bytes(doc) && m.can_end();
}

}  // namespace

TEST_CASE("tools and tool_choice parse, defaults and refusals name the field") {
    const Tools t = tools_of(k_body);
    REQUIRE(t.functions.size() == 2);
    CHECK(t.choice == ToolChoice::automatic);
    CHECK(t.active());
    CHECK(!t.forced());
    // The parameters keep the body's key order (unit before city), as the model should write them.
    CHECK(t.functions[0].parameters["properties"].begin().key() == "unit");
    CHECK(t.functions[1].parameters == nlohmann::ordered_json{{"type", "object"}});
    CHECK(tools_of(with_choice(R"("none")")).choice == ToolChoice::none);
    CHECK(tools_of(with_choice(R"("required")")).forced());
    const Tools named = tools_of(with_choice(R"({"type": "function", "function": {"name": "now"}})"));
    CHECK(named.choice == ToolChoice::named);
    CHECK(named.named == "now");
    CHECK(tools_of("{}").choice == ToolChoice::none);

    auto refused = [](const std::string& raw) -> std::string {
        try {
            tools_of(raw);
        } catch (const ToolsError& e) {
            return e.param;
        }
        return "";
    };
    CHECK(refused(with_choice(R"("sometimes")")) == "tool_choice");
    CHECK(refused(with_choice(R"({"type": "function", "function": {"name": "missing"}})")) == "tool_choice");
    CHECK(refused(R"({"tool_choice": "required"})") == "tool_choice");
    CHECK(refused(R"({"tools": {}})") == "tools");
    CHECK(refused(R"({"tools": [{"type": "function", "function": {"name": "bad name"}}]})") == "tools");
    CHECK(refused(R"({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]})") == "tools");
    CHECK(refused(R"({"tools": [{"type": "function", "function": {"name": "a", "parameters": 3}}]})") == "tools");
    CHECK(refused(R"({"tools": [{"type": "retrieval"}]})") == "tools");
}

TEST_CASE("the forced-call schema admits exactly the calls of the chosen functions") {
    const Tools named = tools_of(with_choice(R"({"type": "function", "function": {"name": "get_weather"}})"));
    const std::string s = forced_call_schema(named);
    CHECK(accepts(s, R"({"name": "get_weather", "arguments": {"unit": "c", "city": "Oslo"}})"));
    CHECK(!accepts(s, R"({"name": "now", "arguments": {}})"));
    CHECK(!accepts(s, R"({"name": "get_weather", "arguments": {"unit": "k", "city": "Oslo"}})"));
    CHECK(!accepts(s, R"({"name": "get_weather", "arguments": {"city": "Oslo"}})"));
    CHECK(!accepts(s, R"({"name": "get_weather", "arguments": {"unit": "c", "city": "Oslo"}, "x": 1})"));
    const std::string any = forced_call_schema(tools_of(with_choice(R"("required")")));
    CHECK(accepts(any, R"({"name": "now", "arguments": {}})"));
    CHECK(accepts(any, R"({"name": "get_weather", "arguments": {"unit": "f", "city": "Rome"}})"));
    CHECK(!accepts(any, R"({"name": "later", "arguments": {}})"));
}

TEST_CASE("calls are found in completions; what is not a call stays content") {
    const Tools t = tools_of(k_body);
    ParsedCalls p = parse_tool_calls(
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"unit\": \"c\", \"city\": \"Oslo\"}}\n</tool_call>\n"
        "<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>",
        t);
    REQUIRE(p.calls.size() == 2);
    CHECK(p.calls[0].name == "get_weather");
    CHECK(json::parse(p.calls[0].arguments) == json{{"unit", "c"}, {"city", "Oslo"}});
    CHECK(p.calls[1].name == "now");
    CHECK(p.calls[1].arguments == "{}");
    CHECK(p.content == "Let me check.");

    // A forced call's output, Llama 3.1's "parameters", arguments given as a JSON string.
    p = parse_tool_calls(R"( {"name": "now", "arguments": {}} )", t);
    CHECK(p.calls.size() == 1);
    CHECK(p.content.empty());
    p = parse_tool_calls(R"({"name": "get_weather", "parameters": {"unit": "f", "city": "Rome"}})", t);
    REQUIRE(p.calls.size() == 1);
    CHECK(json::parse(p.calls[0].arguments)["city"] == "Rome");
    p = parse_tool_calls(R"(<tool_call>{"name": "now", "arguments": "{\"a\": 1}"}</tool_call>)", t);
    REQUIRE(p.calls.size() == 1);
    CHECK(p.calls[0].arguments == R"({"a":1})");
    // Mistral's and Llama 3.1's spellings.
    p = parse_tool_calls(R"(Sure. [TOOL_CALLS] [{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"unit": "c", "city": "Rome"}}])", t);
    REQUIRE(p.calls.size() == 2);
    CHECK(p.calls[1].name == "get_weather");
    CHECK(p.content == "Sure.");
    p = parse_tool_calls(R"(<|python_tag|>{"name": "now", "parameters": {}})", t);
    CHECK(p.calls.size() == 1);
    p = parse_tool_calls(R"([TOOL_CALLS] [{"name": "later", "arguments": {}}])", t);  // unknown: text
    CHECK(p.calls.empty());
    // The closing tag cut off by max_tokens: still a call if the JSON is whole.
    p = parse_tool_calls("<tool_call>{\"name\": \"now\", \"arguments\": {}}", t);
    CHECK(p.calls.size() == 1);

    // Not calls: unknown function, broken JSON, arguments not an object, plain text, JSON that
    // is not a call.
    for (const char* text : {R"(<tool_call>{"name": "later", "arguments": {}}</tool_call>)",
                             R"(<tool_call>{"name": "now", "arguments": </tool_call>)",
                             R"(<tool_call>{"name": "now", "arguments": 3}</tool_call>)", "It is sunny.",
                             R"({"answer": 42})"}) {
        p = parse_tool_calls(text, t);
        CHECK(p.calls.empty());
        CHECK(p.content == text);
    }
}

TEST_CASE("calls and results written back into the prompt") {
    const json calls = json::parse(R"([{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}])");
    CHECK(render_tool_calls(calls) == "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}\n</tool_call>");
    CHECK(render_tool_result("12 C") == "<tool_response>\n12 C\n</tool_response>");
    const std::string sys = tools_system_text(tools_of(with_choice(R"({"type": "function", "function": {"name": "now"}})")));
    CHECK(sys.find("<tools>") != std::string::npos);
    CHECK(sys.find("\"name\":\"get_weather\"") != std::string::npos);
    CHECK(sys.find("Call the function now now.") != std::string::npos);
}

TEST_CASE("with tool_choice auto the text before a call streams, a possible tag is held back") {
    auto streamed = [](std::vector<std::string> pieces) {
        ToolTextStream s;
        std::string text, out;
        for (const auto& p : pieces) {
            text += p;
            out += s.next(text);
        }
        return out;
    };
    CHECK(streamed({"Hello ", "wor", "ld <to", "ol_call>{\"name\": \"now\"}</tool_call> after"}) == "Hello world ");
    CHECK(streamed({"Let me ", "<", "tool_call>"}) == "Let me ");
    CHECK(streamed({"a <b", "> c <", "tool"}) == "a <b> c ");  // "<tool" could still become the tag
    CHECK(streamed({"  ", "{\"name\"", ": \"now\"}"}).empty());   // perhaps a bare call: nothing yet
    CHECK(streamed({"x = {1}"}) == "x = {1}");
    CHECK(streamed({"Sure. [TOOL", "_CALLS] [{}]"}) == "Sure. ");
    CHECK(streamed({"[", "x]"}) == "[x]");
    // After the stream, the text outside the calls that was not sent is what remains.
    const Tools t = tools_of(k_body);
    const std::string text = "Checking. <tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call> Done.";
    ToolTextStream s;
    const std::string sent(s.next(text));
    const ParsedCalls p = parse_tool_calls(text, t);
    CHECK(sent == "Checking. ");
    CHECK(p.outside.substr(s.sent()) == " Done.");
}
