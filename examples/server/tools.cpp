#include "tools.h"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

namespace coinfer::server {

namespace {

using ojson = nlohmann::ordered_json;

constexpr size_t k_max_tools = 128;
constexpr std::string_view k_open = "<tool_call>", k_close = "</tool_call>";

[[noreturn]] void bad(std::string param, std::string message) { throw ToolsError{std::move(param), std::move(message)}; }

bool valid_name(const std::string& n) {
    if (n.empty() || n.size() > 64) return false;
    return std::all_of(n.begin(), n.end(), [](unsigned char c) { return std::isalnum(c) || c == '_' || c == '-'; });
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
    return s;
}

const ToolFunction* find(const Tools& t, const std::string& name) {
    for (const auto& f : t.functions)
        if (f.name == name) return &f;
    return nullptr;
}

// {"name": known, "arguments" | "parameters": object} -> a call.
bool as_call(std::string_view text, const Tools& t, ToolCall& out) {
    const ojson j = ojson::parse(text, nullptr, false);
    if (!j.is_object()) return false;
    const auto name = j.find("name");
    if (name == j.end() || !name->is_string() || !find(t, name->get<std::string>())) return false;
    auto args = j.find("arguments");
    if (args == j.end()) args = j.find("parameters");
    if (args == j.end()) return false;
    if (args->is_string()) {  // arguments already as JSON text
        const ojson inner = ojson::parse(args->get<std::string>(), nullptr, false);
        if (!inner.is_object()) return false;
        out = {name->get<std::string>(), inner.dump()};
        return true;
    }
    if (!args->is_object()) return false;
    out = {name->get<std::string>(), args->dump()};
    return true;
}

}  // namespace

Tools parse_tools(const nlohmann::json& body, std::string_view raw) {
    Tools t;
    const auto tools = body.find("tools");
    const bool has_tools = tools != body.end() && !tools->is_null();
    if (has_tools) {
        if (!tools->is_array()) bad("tools", "'tools' must be an array");
        if (tools->size() > k_max_tools) bad("tools", fmt::format("at most {} tools", k_max_tools));
        // The parameters schemas in the body's own key order (the order the model writes them).
        const ojson ordered = ojson::parse(raw, nullptr, false);
        const ojson* otools = ordered.is_object() && ordered.contains("tools") ? &ordered["tools"] : nullptr;
        for (size_t i = 0; i < tools->size(); ++i) {
            const auto& tool = (*tools)[i];
            if (!tool.is_object() || tool.value("type", std::string()) != "function" || !tool.contains("function") ||
                !tool["function"].is_object())
                bad("tools", "each tool must be {\"type\": \"function\", \"function\": {...}}");
            const auto& fn = tool["function"];
            ToolFunction f;
            if (!fn.contains("name") || !fn["name"].is_string() || !valid_name(fn["name"].get<std::string>()))
                bad("tools", "a function's name must be 1 to 64 letters, digits, '_' or '-'");
            f.name = fn["name"].get<std::string>();
            if (find(t, f.name)) bad("tools", fmt::format("function '{}' is given twice", f.name));
            if (fn.contains("description")) {
                if (!fn["description"].is_string()) bad("tools", "a function's description must be a string");
                f.description = fn["description"].get<std::string>();
            }
            f.parameters = ojson{{"type", "object"}};
            if (fn.contains("parameters") && !fn["parameters"].is_null()) {
                if (!fn["parameters"].is_object()) bad("tools", fmt::format("function '{}': parameters must be a schema object", f.name));
                if (otools && otools->is_array() && i < otools->size()) {
                    const ojson& ot = (*otools)[i];
                    if (ot.is_object() && ot.contains("function") && ot["function"].is_object() &&
                        ot["function"].contains("parameters"))
                        f.parameters = ot["function"]["parameters"];
                }
            }
            t.functions.push_back(std::move(f));
        }
    }
    t.choice = t.functions.empty() ? ToolChoice::none : ToolChoice::automatic;
    const auto choice = body.find("tool_choice");
    if (choice != body.end() && !choice->is_null()) {
        if (choice->is_string()) {
            const std::string c = choice->get<std::string>();
            if (c == "none") t.choice = ToolChoice::none;
            else if (c == "auto") t.choice = ToolChoice::automatic;
            else if (c == "required") t.choice = ToolChoice::required;
            else bad("tool_choice", fmt::format("tool_choice '{}' is not one of none, auto, required", c));
        } else if (choice->is_object() && choice->value("type", std::string()) == "function" &&
                   choice->contains("function") && (*choice)["function"].is_object() &&
                   (*choice)["function"].contains("name") && (*choice)["function"]["name"].is_string()) {
            t.choice = ToolChoice::named;
            t.named = (*choice)["function"]["name"].get<std::string>();
            if (!find(t, t.named)) bad("tool_choice", fmt::format("tool_choice names '{}', which is not in tools", t.named));
        } else {
            bad("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}");
        }
        if (t.choice != ToolChoice::none && t.functions.empty())
            bad("tool_choice", "tool_choice needs a non-empty 'tools'");
    }
    return t;
}

std::string tools_system_text(const Tools& t) {
    std::string s =
        "# Tools\n\nYou can call functions to help answer. Their signatures are listed inside "
        "<tools></tools>:\n<tools>\n";
    for (const auto& f : t.functions) {
        ojson fn = {{"name", f.name}};
        if (!f.description.empty()) fn["description"] = f.description;
        fn["parameters"] = f.parameters;
        s += ojson{{"type", "function"}, {"function", std::move(fn)}}.dump() + "\n";
    }
    s += "</tools>\n\nTo call a function, answer with its name and arguments as one JSON object inside "
         "<tool_call></tool_call>, one block per call:\n<tool_call>\n{\"name\": <function name>, "
         "\"arguments\": <arguments as a JSON object>}\n</tool_call>";
    if (t.choice == ToolChoice::named) s += fmt::format("\n\nCall the function {} now.", t.named);
    else if (t.choice == ToolChoice::required) s += "\n\nCall one of the functions now.";
    return s;
}

std::string forced_call_schema(const Tools& t) {
    auto one = [](const ToolFunction& f) {
        return ojson{{"type", "object"},
                     {"properties", {{"name", {{"const", f.name}}}, {"arguments", f.parameters}}},
                     {"required", {"name", "arguments"}},
                     {"additionalProperties", false}};
    };
    if (t.choice == ToolChoice::named) return one(*find(t, t.named)).dump();
    if (t.functions.size() == 1) return one(t.functions.front()).dump();
    ojson any = ojson::array();
    for (const auto& f : t.functions) any.push_back(one(f));
    return ojson{{"anyOf", std::move(any)}}.dump();
}

ParsedCalls parse_tool_calls(std::string_view text, const Tools& t) {
    ParsedCalls r;
    std::string rest;
    size_t at = 0;
    bool any_block = false;
    while (at < text.size()) {
        const size_t open = text.find(k_open, at);
        if (open == std::string_view::npos) break;
        any_block = true;
        const size_t body = open + k_open.size();
        size_t close = text.find(k_close, body);
        const size_t end = close == std::string_view::npos ? text.size() : close + k_close.size();
        if (close == std::string_view::npos) close = text.size();
        ToolCall c;
        if (as_call(trim(text.substr(body, close - body)), t, c)) {
            rest += text.substr(at, open - at);
            r.calls.push_back(std::move(c));
        } else {
            rest += text.substr(at, end - at);  // not a call: it stays text
        }
        at = end;
    }
    rest += text.substr(std::min(at, text.size()));
    // Mistral's syntax: [TOOL_CALLS] then a JSON array of calls, to the end of the text.
    if (!any_block) {
        constexpr std::string_view k_mistral = "[TOOL_CALLS]";
        if (const size_t m = text.find(k_mistral); m != std::string_view::npos) {
            const ojson arr = ojson::parse(trim(text.substr(m + k_mistral.size())), nullptr, false);
            std::vector<ToolCall> calls;
            bool all = arr.is_array() && !arr.empty();
            for (size_t k = 0; all && k < arr.size(); ++k) {
                ToolCall c;
                all = as_call(arr[k].dump(), t, c);
                calls.push_back(std::move(c));
            }
            if (all) {
                r.calls = std::move(calls);
                r.outside = std::string(text.substr(0, m));
                r.content = std::string(trim(r.outside));
                return r;
            }
        }
    }
    if (!any_block) {
        ToolCall c;
        std::string_view whole = trim(text);
        if (whole.starts_with("<|python_tag|>")) whole = trim(whole.substr(14));  // Llama 3.1's prefix
        if (!whole.empty() && whole.front() == '{' && as_call(whole, t, c)) {
            r.calls.push_back(std::move(c));
            rest.clear();
        }
    }
    r.content = std::string(trim(rest));
    r.outside = std::move(rest);
    return r;
}

std::string_view ToolTextStream::next(const std::string& text) {
    if (stopped_) return {};
    const std::string_view t(text);
    const size_t first = t.find_first_not_of(" \t\r\n");
    if (first == std::string_view::npos) return {};  // only blanks so far
    if (t[first] == '{') {  // perhaps a bare call: hold it all (nothing was sent: the text only grows)
        stopped_ = true;
        return {};
    }
    // The tags that open calls (Hermes / Qwen, Mistral, Llama 3.1). Searched from just before
    // what was sent, so a tag split over two pieces is found.
    static constexpr std::string_view k_tags[] = {k_open, "[TOOL_CALLS]", "<|python_tag|>"};
    size_t end = t.size();
    for (const std::string_view tag : k_tags) {
        const size_t from = sent_ > tag.size() ? sent_ - tag.size() : 0;
        if (const size_t open = t.find(tag, from); open != std::string_view::npos && open < end) {
            end = open;
            stopped_ = true;
        }
    }
    if (!stopped_) {
        // Hold back a tail that could be the start of a tag.
        for (const std::string_view tag : k_tags)
            for (size_t n = std::min(tag.size() - 1, t.size()); n > 0; --n)
                if (tag.substr(0, n) == t.substr(t.size() - n)) {
                    end = std::min(end, t.size() - n);
                    break;
                }
    }
    if (end <= sent_) return {};
    const std::string_view out = t.substr(sent_, end - sent_);
    sent_ = end;
    return out;
}

std::string render_tool_calls(const nlohmann::json& tool_calls) {
    std::string s;
    for (const auto& c : tool_calls) {
        if (!c.is_object() || !c.contains("function") || !c["function"].is_object()) continue;
        const auto& fn = c["function"];
        ojson call = {{"name", fn.value("name", std::string())}};
        const std::string args = fn.contains("arguments") && fn["arguments"].is_string() ? fn["arguments"].get<std::string>() : "{}";
        ojson parsed = ojson::parse(args, nullptr, false);
        call["arguments"] = parsed.is_discarded() ? ojson(args) : std::move(parsed);
        if (!s.empty()) s += "\n";
        s += std::string(k_open) + "\n" + call.dump() + "\n" + std::string(k_close);
    }
    return s;
}

std::string render_tool_result(std::string_view content) {
    return "<tool_response>\n" + std::string(content) + "\n</tool_response>";
}

}  // namespace coinfer::server
