#pragma once
// Chat templates: turning OpenAI-style messages into the prompt text a chat model was trained on.
// The common templates are recognised from the GGUF's tokenizer.chat_template (a Jinja source)
// and rendered by hand-written code, the way llama.cpp's llama_chat_apply_template does: there is
// no Jinja engine here. The rendered text matches llama.cpp's for the same template, so its test
// vectors (tests/test-chat-template.cpp) are ours too.
//
// Names (what --chat-template accepts):
//   chatml (alias qwen)   <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
//   llama2 (alias llama2-sys)
//                         [INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST]assistant</s>[INST] ...
//                         (Meta's Llama 2 chat format; llama.cpp calls this one "llama2-sys")
//   llama2-nosys          as llama2 but the system text is "sys\n" without <<SYS>>
//                         (llama.cpp's plain "llama2": Mistral 7B v0.1/v0.2's first template)
//   llama2-sys-bos, llama2-sys-strip   llama.cpp's two other Llama 2 variants
//   mistral (= mistral-v1) " [INST] sys\n\nuser [/INST] assistant</s>": Mistral's official v1
//                         format, the one for Mistral 7B v0.1/v0.2 and Mixtral 8x7B
//   mistral-v3, mistral-v3-tekken, mistral-v7, mistral-v7-tekken   the later Mistral formats
//   llama3                <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> (trimmed)
//   phi3                  <|role|>\ncontent<|end|>\n ... <|assistant|>\n
//   zephyr                <|role|>\ncontent EOS \n ... <|assistant|>\n  where EOS is the model's
//                         end-of-sequence text ("</s>" for Zephyr-7B and TinyLlama-Chat; a source
//                         that spells "<|endoftext|>" literally, as StableLM-Zephyr's does, gets that)
//
// BOS: the rendered prompt never starts with the BOS token text. The tokenizer adds BOS itself
// (add_special), so a template's leading {{ bos_token }} is left out, as llama.cpp does. Markers
// inside the text (<|im_start|>, [INST], </s> between turns, ...) must be tokenized with special
// token parsing on, and the messages' contents (apply's content_ranges) with it off.
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gguf.h"

namespace coinfer {

struct ChatMessage {
    std::string role;     // "system", "user", "assistant" ("tool" for a Jinja template)
    std::string content;
    // For a Jinja template (the built-in formats take none of these): an assistant turn's
    // OpenAI tool_calls as JSON text, and a tool result's tool_call_id.
    std::string tool_calls{};
    std::string tool_call_id{};
};

namespace jinja {
class Template;
}

class ChatTemplate {
public:
    // Names above. Unknown: Error listing them.
    static ChatTemplate from_name(std::string_view name);
    // Recognises a Jinja template source by distinctive substrings (a known name is accepted too).
    // Unrecognised: Error.
    static ChatTemplate detect(std::string_view jinja_source);
    // The override name if given, else tokenizer.chat_template of the file, else chatml. With
    // use_jinja (and no override) the file's template itself renders the prompts, through the
    // Jinja interpreter (jinja.h), with its family's stop strings where it has a known one;
    // Error if the file has none or the interpreter cannot parse it.
    static ChatTemplate for_model(const GgufFile& file, const std::optional<std::string>& override_name,
                                  bool use_jinja = false);
    // A Jinja template source rendered by the interpreter, with the model's BOS and EOS texts
    // (bos_token / eos_token in the template). Error if it cannot be parsed.
    static ChatTemplate from_jinja(std::string_view source, std::string bos_text, std::string eos_text);
    // The canonical names from_name accepts (aliases left out).
    static std::vector<std::string> known_names();

    // The prompt text; with add_generation_prompt the assistant's turn is opened at the end
    // (the [INST] formats have no opener: their user turn ends with [/INST]).
    // Does not include the BOS token text: the tokenizer adds BOS (add_special) itself.
    // content_ranges, when given: (offset, length) of every message's content in the text, for
    // Tokenizer::encode to keep control-token text typed by a user as plain text.
    // tools_json: the request's OpenAI tools (a JSON array) for a Jinja template that renders
    // them (the built-in formats ignore it). A Jinja template that raises, or that rewrites a
    // message's content so that it cannot be found in the text, is an Error.
    std::string apply(std::span<const ChatMessage> messages, bool add_generation_prompt = true,
                      std::vector<std::pair<size_t, size_t>>* content_ranges = nullptr,
                      const std::string* tools_json = nullptr) const;
    const std::string& name() const { return name_; }
    bool uses_jinja() const { return jinja_ != nullptr; }
    // Whether the Jinja template reads `tools` (then it describes them itself).
    bool renders_tools() const { return jinja_ && jinja_renders_tools_; }
    // Strings that end an assistant turn in this format (used as extra stop strings).
    std::vector<std::string> stop_strings() const;
    // The end-of-sequence text zephyr puts after each turn.
    const std::string& eos_text() const { return eos_text_; }

private:
    explicit ChatTemplate(std::string name) : name_(std::move(name)) {}
    std::string name_;
    std::string eos_text_ = "</s>";
    std::shared_ptr<const jinja::Template> jinja_;
    bool jinja_renders_tools_ = false;
    std::string bos_text_, jinja_eos_text_;  // the model's BOS and EOS texts, for the Jinja context
};

}  // namespace coinfer
