#pragma once
// OpenAI function tools for /v1/chat/completions: the request's `tools` and `tool_choice`, the
// text that tells the model about them, the schema that forces a call, and the calls found in
// a completion.
//
// The prompt side follows the Hermes convention that Qwen2.5, Hermes and many fine-tunes use:
// the tools go into the system turn as JSON inside <tools></tools>, the model answers a call as
// <tool_call>{"name": ..., "arguments": {...}}</tool_call>, and a tool's result comes back as a
// user turn wrapped in <tool_response></tool_response>. Models trained on another syntax still
// get the description; a forced call (tool_choice "required" or a named function) does not
// depend on the syntax at all: the output is constrained to {"name": ..., "arguments": ...}
// with the function's parameters schema.
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace coinfer::server {

struct ToolFunction {
    std::string name;
    std::string description;
    nlohmann::ordered_json parameters;  // a JSON Schema object ({"type": "object"} when absent)
};

enum class ToolChoice { none, automatic, required, named };

struct Tools {
    std::vector<ToolFunction> functions;
    ToolChoice choice = ToolChoice::none;
    std::string named;  // the function tool_choice names

    bool active() const { return choice != ToolChoice::none && !functions.empty(); }
    bool forced() const { return choice == ToolChoice::required || choice == ToolChoice::named; }
};

// Thrown for a malformed `tools` / `tool_choice` (the server answers 400 naming `param`).
struct ToolsError {
    std::string param;
    std::string message;
};

// `tools` and `tool_choice` of a request body (raw: the body's text, whose key order the
// parameters schemas keep). Default choice: "auto" with tools, "none" without.
Tools parse_tools(const nlohmann::json& body, std::string_view raw);

// The system text that describes the functions and how to call them.
std::string tools_system_text(const Tools& t);

// A JSON Schema for the call a forced choice must produce: {"name": const, "arguments": the
// function's parameters}, one of the functions for "required".
std::string forced_call_schema(const Tools& t);

struct ToolCall {
    std::string name;
    std::string arguments;  // JSON text, as OpenAI's function.arguments
};

struct ParsedCalls {
    std::vector<ToolCall> calls;
    std::string content;  // the text outside the calls, trimmed
    std::string outside;  // the same, untrimmed
};

// The calls in a completion: every <tool_call>...</tool_call> block (Hermes / Qwen; the closing
// tag may be missing at the end) whose body is an object with a known "name" and an object
// "arguments" (or "parameters", Llama 3.1's spelling); else Mistral's "[TOOL_CALLS] [...]";
// else the whole text when it is one such object (after Llama 3.1's <|python_tag|>). Text that
// is none of these stays content.
ParsedCalls parse_tool_calls(std::string_view text, const Tools& t);

// What of a growing completion may be streamed as content while tool_choice is "auto": the text
// up to a tag that opens calls (<tool_call>, [TOOL_CALLS], <|python_tag|>; not a tail that could
// begin one); nothing once a call has begun or when the text opens with '{' (it may be a bare
// call). next() gives the newly streamable text.
class ToolTextStream {
public:
    std::string_view next(const std::string& text);
    size_t sent() const { return sent_; }

private:
    size_t sent_ = 0;
    bool stopped_ = false;
};

// How an assistant turn that made calls is written back into the prompt.
std::string render_tool_calls(const nlohmann::json& tool_calls);
// How a tool's result is written back (as a user turn's content).
std::string render_tool_result(std::string_view content);

}  // namespace coinfer::server
