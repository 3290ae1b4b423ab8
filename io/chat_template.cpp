#include "chat_template.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "error.h"
#include "jinja.h"

namespace coinfer {
namespace {

struct NameEntry {
    std::string_view name;       // what the user may type
    std::string_view canonical;  // what ChatTemplate::name() reports
};

// Canonical names first; aliases map onto them.
constexpr std::array<NameEntry, 16> kNames{{
    {"chatml", "chatml"},
    {"llama2", "llama2"},
    {"llama2-nosys", "llama2-nosys"},
    {"llama2-sys-bos", "llama2-sys-bos"},
    {"llama2-sys-strip", "llama2-sys-strip"},
    {"mistral-v1", "mistral-v1"},
    {"mistral-v3", "mistral-v3"},
    {"mistral-v3-tekken", "mistral-v3-tekken"},
    {"mistral-v7", "mistral-v7"},
    {"mistral-v7-tekken", "mistral-v7-tekken"},
    {"llama3", "llama3"},
    {"phi3", "phi3"},
    {"zephyr", "zephyr"},
    {"qwen", "chatml"},
    {"llama2-sys", "llama2"},
    {"mistral", "mistral-v1"},
}};

std::optional<std::string_view> canonical_name(std::string_view name) {
    for (const auto& e : kNames)
        if (e.name == name) return e.canonical;
    return std::nullopt;
}

std::string all_names() {
    std::vector<std::string_view> names;
    for (const auto& e : kNames) names.push_back(e.name);
    return fmt::format("{}", fmt::join(names, ", "));
}

bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// Jinja's |trim and Python's str.strip() on ASCII whitespace.
std::string_view trim(std::string_view s) {
    size_t b = 0, e = s.size();
    while (b < e && is_space(s[b])) ++b;
    while (e > b && is_space(s[e - 1])) --e;
    return s.substr(b, e - b);
}

// Short, printable excerpt of an untrusted template source for error messages.
std::string excerpt(std::string_view s) {
    std::string out;
    for (char c : s.substr(0, 60)) out += (c == '\n' || c == '\r') ? ' ' : c;
    if (s.size() > 60) out += "...";
    return out;
}

// The rendered text, and where each message's content sits in it (to be tokenized as plain text).
struct Prompt {
    std::string& text;
    std::vector<std::pair<size_t, size_t>>* ranges;
    Prompt& operator+=(std::string_view s) {
        text += s;
        return *this;
    }
    Prompt& content(std::string_view c) {
        if (ranges && !c.empty()) ranges->emplace_back(text.size(), c.size());
        text += c;
        return *this;
    }
};

void render_chatml(Prompt& out, std::span<const ChatMessage> msgs, bool add_ass) {
    for (const auto& m : msgs) {
        out += "<|im_start|>";
        out += m.role;
        (out += "\n").content(m.content) += "<|im_end|>\n";
    }
    if (add_ass) out += "<|im_start|>assistant\n";
}

// The Llama 2 family. The first [INST] is opened up front; BOS before it is the tokenizer's.
void render_llama2(Prompt& out, std::span<const ChatMessage> msgs, bool with_sys_tags,
                   bool bos_between_turns, bool strip) {
    bool inside_turn = true;
    out += "[INST] ";
    for (const auto& m : msgs) {
        std::string_view content = strip ? trim(m.content) : std::string_view(m.content);
        if (!inside_turn) {
            inside_turn = true;
            out += bos_between_turns ? "<s>[INST] " : "[INST] ";
        }
        if (m.role == "system") {
            if (with_sys_tags)
                (out += "<<SYS>>\n").content(content) += "\n<</SYS>>\n\n";
            else
                out.content(content) += "\n";
        } else if (m.role == "user") {
            out.content(content) += " [/INST]";
        } else {
            out.content(content) += "</s>";
            inside_turn = false;
        }
    }
}

// Mistral v1 / v3 / v3-tekken: they differ only in spaces around [INST] and in trimming.
void render_mistral_v1_v3(Prompt& out, std::span<const ChatMessage> msgs, std::string_view lead,
                          std::string_view trail, bool trim_assistant) {
    bool inside_turn = false;
    for (const auto& m : msgs) {
        if (!inside_turn) {
            ((out += lead) += "[INST]") += trail;
            inside_turn = true;
        }
        if (m.role == "system") {
            out.content(m.content) += "\n\n";
        } else if (m.role == "user") {
            (out.content(m.content) += lead) += "[/INST]";
        } else {
            std::string_view content = trim_assistant ? trim(m.content) : std::string_view(m.content);
            (out += trail).content(content) += "</s>";
            inside_turn = false;
        }
    }
}

void render_mistral_v7(Prompt& out, std::span<const ChatMessage> msgs, std::string_view sp) {
    for (const auto& m : msgs) {
        if (m.role == "system")
            ((out += "[SYSTEM_PROMPT]") += sp).content(m.content) += "[/SYSTEM_PROMPT]";
        else if (m.role == "user")
            ((out += "[INST]") += sp).content(m.content) += "[/INST]";
        else
            (out += sp).content(m.content) += "</s>";
    }
}

void render_llama3(Prompt& out, std::span<const ChatMessage> msgs, bool add_ass) {
    for (const auto& m : msgs)
        (((out += "<|start_header_id|>") += m.role) += "<|end_header_id|>\n\n").content(trim(m.content)) += "<|eot_id|>";
    if (add_ass) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
}

// phi3 and zephyr share the shape <|role|>\ncontent END\n.
void render_role_bars(Prompt& out, std::span<const ChatMessage> msgs, bool add_ass, std::string_view end) {
    for (const auto& m : msgs) ((((out += "<|") += m.role) += "|>\n").content(m.content) += end) += "\n";
    if (add_ass) out += "<|assistant|>\n";
}

}  // namespace

std::vector<std::string> ChatTemplate::known_names() {
    std::vector<std::string> names;
    for (const auto& e : kNames)
        if (e.name == e.canonical) names.emplace_back(e.name);
    return names;
}

ChatTemplate ChatTemplate::from_name(std::string_view name) {
    auto canonical = canonical_name(name);
    if (!canonical)
        throw_error("unknown chat template '{}'; known templates: {}", excerpt(name), all_names());
    return ChatTemplate(std::string(*canonical));
}

ChatTemplate ChatTemplate::detect(std::string_view src) {
    if (canonical_name(src)) return from_name(src);
    auto has = [src](std::string_view s) { return src.find(s) != std::string_view::npos; };
    auto unsupported = [&](std::string_view family) -> ChatTemplate {
        throw_error("chat template looks like {}, which is not supported (template starts '{}'); "
                    "choose one with --chat-template: {}", family, excerpt(src), all_names());
    };

    if (has("<|im_start|>")) {
        if (has("<|im_sep|>")) return unsupported("phi4");
        if (has("<end_of_utterance>")) return unsupported("smolvlm");
        return ChatTemplate("chatml");
    }
    if (src.starts_with("mistral") || has("[INST]")) {
        if (has("[SYSTEM_PROMPT]")) return ChatTemplate("mistral-v7");
        // Mistral's official v1 spells "' [INST] ' + system_message"; v3 has tool markers.
        if (has("' [INST] ' + system_message") || has("[AVAILABLE_TOOLS]")) {
            if (has(" [INST]")) return ChatTemplate("mistral-v1");
            if (has("\"[INST]\"")) return ChatTemplate("mistral-v3-tekken");
            return ChatTemplate("mistral-v3");
        }
        if (has("content.strip()")) return ChatTemplate("llama2-sys-strip");
        if (has("bos_token + '[INST]")) return ChatTemplate("llama2-sys-bos");
        if (has("<<SYS>>")) return ChatTemplate("llama2");
        return ChatTemplate("llama2-nosys");
    }
    if (has("<|assistant|>") && has("<|end|>")) return ChatTemplate("phi3");
    if (has("[gMASK]")) return unsupported("chatglm");
    if (has("<|user|>") && (has("<|assistant|>") || has("<|endoftext|>"))) {
        // Zephyr ends each turn with EOS. Templates without any EOS are GLM-Edge-like.
        ChatTemplate t("zephyr");
        if (has("<|endoftext|>"))
            t.eos_text_ = "<|endoftext|>";
        else if (!has("eos_token") && !has("</s>"))
            return unsupported("glm-edge");
        return t;
    }
    if (has("<|start_header_id|>") && has("<|end_header_id|>")) return ChatTemplate("llama3");
    throw_error("unrecognised chat template (starts '{}'); choose one with --chat-template: {}",
                excerpt(src), all_names());
}

namespace {

// The text of a special token named by its id key (tokenizer.ggml.bos_token_id ...), or "".
std::string token_text(const GgufFile& file, const char* id_key) {
    auto id = file.get_int_opt(id_key);
    if (!id || !file.has("tokenizer.ggml.tokens")) return "";
    try {
        const auto& tokens = file.get_array<std::string>("tokenizer.ggml.tokens");
        if (*id >= 0 && static_cast<uint64_t>(*id) < tokens.size()) return tokens[*id];
    } catch (const Error&) {
        // a malformed vocabulary is the tokenizer's to report
    }
    return "";
}

}  // namespace

ChatTemplate ChatTemplate::from_jinja(std::string_view src, std::string bos_text, std::string eos_text) {
    ChatTemplate t("jinja");  // a known family gives the stop strings
    try {
        t = detect(src);
    } catch (const Error&) {
    }
    t.jinja_ = std::make_shared<const jinja::Template>(src);
    t.jinja_renders_tools_ = src.find("tools") != std::string_view::npos;
    t.bos_text_ = std::move(bos_text);
    t.jinja_eos_text_ = std::move(eos_text);
    if (t.name_ == "zephyr" && !t.jinja_eos_text_.empty() && src.find("<|endoftext|>") == std::string_view::npos)
        t.eos_text_ = t.jinja_eos_text_;
    return t;
}

ChatTemplate ChatTemplate::for_model(const GgufFile& file, const std::optional<std::string>& override_name,
                                     bool use_jinja) {
    if (override_name) return from_name(*override_name);
    auto src = file.get_opt<std::string>("tokenizer.chat_template");
    if (use_jinja) {
        if (!src) throw_error("{}: no tokenizer.chat_template for --jinja", file.path());
        try {
            return from_jinja(*src, token_text(file, "tokenizer.ggml.bos_token_id"),
                              token_text(file, "tokenizer.ggml.eos_token_id"));
        } catch (const Error& e) {
            throw_error("{}: tokenizer.chat_template: {}", file.path(), e.what());
        }
    }
    if (!src) return ChatTemplate("chatml");
    ChatTemplate t = [&] {
        try {
            return detect(*src);
        } catch (const Error& e) {
            throw_error("{}: tokenizer.chat_template: {}", file.path(), e.what());
        }
    }();
    // Zephyr's {{ eos_token }} is the model's own EOS text.
    if (t.name_ == "zephyr" && src->find("<|endoftext|>") == std::string::npos) {
        auto eos = file.get_int_opt("tokenizer.ggml.eos_token_id");
        if (eos && file.has("tokenizer.ggml.tokens")) {
            try {
                const auto& tokens = file.get_array<std::string>("tokenizer.ggml.tokens");
                if (*eos >= 0 && static_cast<uint64_t>(*eos) < tokens.size()) t.eos_text_ = tokens[*eos];
            } catch (const Error&) {
                // a malformed vocabulary is the tokenizer's to report; keep "</s>"
            }
        }
    }
    return t;
}

std::string ChatTemplate::apply(std::span<const ChatMessage> msgs, bool add_ass,
                                std::vector<std::pair<size_t, size_t>>* content_ranges,
                                const std::string* tools_json) const {
    if (content_ranges) content_ranges->clear();
    if (jinja_) {
        using J = nlohmann::ordered_json;
        jinja::Value messages = jinja::Value::array();
        for (const ChatMessage& m : msgs) {
            jinja::Value v = jinja::Value::object({{"role", jinja::Value::string(m.role)},
                                                   {"content", jinja::Value::string(m.content)}});
            if (!m.tool_calls.empty()) {
                // Templates read function.arguments as a mapping (transformers' convention).
                J calls = J::parse(m.tool_calls, nullptr, false);
                if (calls.is_array())
                    for (J& c : calls)
                        if (c.is_object() && c.contains("function") && c["function"].is_object() &&
                            c["function"].contains("arguments") && c["function"]["arguments"].is_string()) {
                            J args = J::parse(c["function"]["arguments"].get<std::string>(), nullptr, false);
                            if (!args.is_discarded()) c["function"]["arguments"] = std::move(args);
                        }
                v.set("tool_calls", jinja::Value::from_json(calls.is_discarded() ? J::array() : calls));
            }
            if (!m.tool_call_id.empty()) v.set("tool_call_id", jinja::Value::string(m.tool_call_id));
            messages.a->push_back(std::move(v));
        }
        jinja::Value ctx = jinja::Value::object({{"messages", messages},
                                                 {"add_generation_prompt", jinja::Value::boolean(add_ass)},
                                                 {"bos_token", jinja::Value::string(bos_text_)},
                                                 {"eos_token", jinja::Value::string(jinja_eos_text_)}});
        if (tools_json) {
            const J tools = J::parse(*tools_json, nullptr, false);
            if (tools.is_array()) ctx.set("tools", jinja::Value::from_json(tools));
        }
        std::string text = jinja_->render(ctx);
        // The tokenizer adds BOS itself.
        if (!bos_text_.empty() && text.starts_with(bos_text_)) text.erase(0, bos_text_.size());
        if (content_ranges) {
            // Each message's content, in order (trimmed if the template trims it), so that only
            // the template's own text is tokenized with special tokens on.
            size_t at = 0;
            for (size_t k = 0; k < msgs.size(); ++k) {
                std::string_view c = msgs[k].content;
                if (c.empty()) continue;
                size_t found = text.find(c, at);
                if (found == std::string::npos) {
                    while (!c.empty() && std::isspace(static_cast<unsigned char>(c.front()))) c.remove_prefix(1);
                    while (!c.empty() && std::isspace(static_cast<unsigned char>(c.back()))) c.remove_suffix(1);
                    if (c.empty()) continue;
                    found = text.find(c, at);
                }
                if (found == std::string::npos) {
                    // Not rendered at all (a template that drops system or tool turns) is fine;
                    // rewritten text that can still hold control tokens is not.
                    if (text.find(c.substr(0, std::min<size_t>(c.size(), 16))) == std::string::npos) continue;
                    throw_error("the chat template rewrites message {}'s content, which then cannot be kept apart "
                                "from the template's markers", k);
                }
                content_ranges->emplace_back(found, c.size());
                at = found + c.size();
            }
        }
        return text;
    }
    std::string text;
    Prompt out{text, content_ranges};
    const std::string& n = name_;
    if (n == "chatml") render_chatml(out, msgs, add_ass);
    else if (n == "llama2") render_llama2(out, msgs, true, false, false);
    else if (n == "llama2-nosys") render_llama2(out, msgs, false, false, false);
    else if (n == "llama2-sys-bos") render_llama2(out, msgs, true, true, false);
    else if (n == "llama2-sys-strip") render_llama2(out, msgs, true, false, true);
    else if (n == "mistral-v1") render_mistral_v1_v3(out, msgs, " ", " ", false);
    else if (n == "mistral-v3") render_mistral_v1_v3(out, msgs, "", " ", true);
    else if (n == "mistral-v3-tekken") render_mistral_v1_v3(out, msgs, "", "", false);
    else if (n == "mistral-v7") render_mistral_v7(out, msgs, " ");
    else if (n == "mistral-v7-tekken") render_mistral_v7(out, msgs, "");
    else if (n == "llama3") render_llama3(out, msgs, add_ass);
    else if (n == "phi3") render_role_bars(out, msgs, add_ass, "<|end|>");
    else if (n == "zephyr") render_role_bars(out, msgs, add_ass, eos_text_);
    else throw_error("chat template '{}' has no renderer", n);  // unreachable: names are checked
    return text;
}

std::vector<std::string> ChatTemplate::stop_strings() const {
    const std::string& n = name_;
    if (n == "chatml") return {"<|im_end|>", "<|im_start|>"};
    if (n.starts_with("llama2") || n.starts_with("mistral")) return {"</s>", "[INST]"};
    if (n == "llama3") return {"<|eot_id|>", "<|start_header_id|>"};
    if (n == "phi3") return {"<|end|>", "<|user|>"};
    if (n == "zephyr") return {eos_text_, "<|user|>"};
    return {};
}

}  // namespace coinfer
