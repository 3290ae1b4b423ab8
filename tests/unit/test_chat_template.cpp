// Chat templates: detection from real Jinja sources and rendering. The conversation, the template
// sources and the expected prompts are llama.cpp's test vectors (tests/test-chat-template.cpp,
// llama_chat_apply_template's expected_output), plus the published tokenizer_config.json
// templates of a few well-known models.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "chat_template.h"
#include "jinja.h"
#include "error.h"
#include "gguf.h"
#include "test_models.h"

using namespace coinfer;

namespace {

const std::vector<ChatMessage> kConversation = {
    {"system", "You are a helpful assistant"},
    {"user", "Hello"},
    {"assistant", "Hi there"},
    {"user", "Who are you"},
    {"assistant", "   I am an assistant   "},
    {"user", "Another question"},
};

struct Vector {
    const char* model;
    const char* source;    // tokenizer.chat_template
    const char* name;      // what detect() must call it
    const char* expected;  // apply(kConversation, true)
};

// ---- Jinja sources (verbatim) ----

const char* kOpenHermes =  // teknium/OpenHermes-2.5-Mistral-7B
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const char* kQwen2 =  // Qwen/Qwen2-7B-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const char* kMistralV02Old =  // mistralai/Mistral-7B-Instruct-v0.2 (the first, pre-v1 template)
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are "
    "supported!') }}{% endif %}{% endfor %}";

const char* kFusionNet =  // TheBloke/FusionNet_34Bx2_MoE-AWQ
    "{%- for idx in range(0, messages|length) -%}\n{%- if messages[idx]['role'] == 'user' -%}\n{%- if idx > 1 -%}\n"
    "{{- bos_token + '[INST] ' + messages[idx]['content'] + ' [/INST]' -}}\n{%- else -%}\n"
    "{{- messages[idx]['content'] + ' [/INST]' -}}\n{%- endif -%}\n{% elif messages[idx]['role'] == 'system' %}\n"
    "{{- '[INST] <<SYS>>\\n' + messages[idx]['content'] + '\\n<</SYS>>\\n\\n' -}}\n"
    "{%- elif messages[idx]['role'] == 'assistant' -%}\n{{- ' '  + messages[idx]['content'] + ' ' + eos_token -}}\n"
    "{% endif %}\n{% endfor %}";

const char* kVigogne =  // bofenghuang/vigogne-2-70b-chat
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% elif true == true and not '<<SYS>>' in messages[0]['content'] %}"
    "{% set loop_messages = messages %}{% set system_message = 'Vous êtes Vigogne, un assistant IA créé par Zaion "
    "Lab. Vous suivez extrêmement bien les instructions. Aidez autant que vous le pouvez.' %}{% else %}{% set "
    "loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set "
    "content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' "
    "}}{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + content.strip() + '\\n<</SYS>>\\n\\n' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

const char* kLlama2Chat =  // meta-llama/Llama-2-7b-chat-hf
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

const char* kMistralV1 =  // mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system prompt)
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n"
    "{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n";

// Mistral-Large-Instruct-2407 'v3' template: the user-turn part (the tool-call branches are left
// out; detection only looks at the user turn and the tool markers).
const char* kMistralV3 =
    "{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- \"[AVAILABLE_TOOLS] [\" }}\n            {{- \"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n"
    "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n    {%- endif %}\n{%- endfor %}\n";

// Mistral-Nemo-Instruct-2407 'v3-tekken' template: the same part.
const char* kMistralV3Tekken =
    "{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- \"[AVAILABLE_TOOLS][\" }}\n            {{- \"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST]\" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST]\" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n        {{- message[\"content\"] + eos_token}}\n"
    "    {%- endif %}\n{%- endfor %}\n";

const char* kMistralV7 =  // mistralai/Mistral-Large-Instruct-2411
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ '[/INST]' }}{% elif message['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' + message['content'] + "
    "'[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% "
    "else %}{{ raise_exception('Only user, system and assistant roles are supported!') }}{% endif %}{% endfor %}";

const char* kLlama3 =  // meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}";

const char* kPhi3Mini =  // microsoft/Phi-3-mini-4k-instruct
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') "
    "%}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}";

const char* kPhi3Small =  // microsoft/Phi-3-small-8k-instruct
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

const char* kPhi3Vision =  // microsoft/Phi-3-vision-128k-instruct
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}{% "
    "endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}";

const char* kZephyr =  // HuggingFaceH4/zephyr-7b-beta (TinyLlama-1.1B-Chat-v1.0 has the same template)
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

const char* kStableLmZephyr =  // stabilityai/stablelm-2-zephyr-1_6b: EOS spelled out
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "'<|endoftext|>' }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
    "'<|endoftext|>' }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
    "'<|endoftext|>' }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
    "{% endif %}\n{% endfor %}";

// ---- expected prompts ----

const char* kExpChatml =
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
    "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
    "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n"
    "<|im_start|>assistant\n";
const char* kExpLlama2NoSys =
    "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   "
    "</s>[INST] Another question [/INST]";
const char* kExpLlama2SysBos =
    "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s><s>[INST] Who are you "
    "[/INST]   I am an assistant   </s><s>[INST] Another question [/INST]";
const char* kExpLlama2SysStrip =
    "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who are you "
    "[/INST]I am an assistant</s>[INST] Another question [/INST]";
const char* kExpMistralV1 =
    " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST]    I am an "
    "assistant   </s> [INST] Another question [/INST]";
const char* kExpMistralV3 =
    "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST] I am an "
    "assistant</s>[INST] Another question[/INST]";
const char* kExpMistralV3Tekken =
    "[INST]You are a helpful assistant\n\nHello[/INST]Hi there</s>[INST]Who are you[/INST]   I am an assistant   "
    "</s>[INST]Another question[/INST]";
const char* kExpMistralV7 =
    "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi there</s>[INST] Who are "
    "you[/INST]    I am an assistant   </s>[INST] Another question[/INST]";
const char* kExpLlama3 =
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother "
    "question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
const char* kExpPhi3 =
    "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
    "<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother "
    "question<|end|>\n<|assistant|>\n";
const char* kExpZephyrEos =
    "<|system|>\nYou are a helpful assistant</s>\n<|user|>\nHello</s>\n<|assistant|>\nHi there</s>\n"
    "<|user|>\nWho are you</s>\n<|assistant|>\n   I am an assistant   </s>\n<|user|>\nAnother question</s>\n"
    "<|assistant|>\n";
const char* kExpZephyrEndoftext =
    "<|system|>\nYou are a helpful assistant<|endoftext|>\n<|user|>\nHello<|endoftext|>\n<|assistant|>\nHi "
    "there<|endoftext|>\n<|user|>\nWho are you<|endoftext|>\n<|assistant|>\n   I am an assistant   "
    "<|endoftext|>\n<|user|>\nAnother question<|endoftext|>\n<|assistant|>\n";

// Phi-3-mini's own template drops system messages (llama.cpp's phi3 format keeps them).
const char* kOwnPhi3Mini =
    "<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n"
    "   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n";

const Vector kVectors[] = {
    {"OpenHermes-2.5-Mistral-7B", kOpenHermes, "chatml", kExpChatml},
    {"Qwen2-7B-Instruct", kQwen2, "chatml", kExpChatml},
    {"Mistral-7B-Instruct-v0.2 (old)", kMistralV02Old, "llama2-nosys", kExpLlama2NoSys},
    {"FusionNet_34Bx2_MoE", kFusionNet, "llama2-sys-bos", kExpLlama2SysBos},
    {"vigogne-2-70b-chat", kVigogne, "llama2-sys-strip", kExpLlama2SysStrip},
    {"Llama-2-7b-chat", kLlama2Chat, "llama2-sys-strip", kExpLlama2SysStrip},
    {"Mistral-7B-Instruct-v0.2 (v1)", kMistralV1, "mistral-v1", kExpMistralV1},
    {"Mistral-Large-Instruct-2407 (v3)", kMistralV3, "mistral-v3", kExpMistralV3},
    {"Mistral-Nemo-Instruct-2407 (v3-tekken)", kMistralV3Tekken, "mistral-v3-tekken", kExpMistralV3Tekken},
    {"Mistral-Large-Instruct-2411 (v7)", kMistralV7, "mistral-v7", kExpMistralV7},
    {"Meta-Llama-3-8B-Instruct", kLlama3, "llama3", kExpLlama3},
    {"Phi-3-mini", kPhi3Mini, "phi3", kExpPhi3},
    {"Phi-3-small", kPhi3Small, "phi3", kExpPhi3},
    {"Phi-3-vision", kPhi3Vision, "phi3", kExpPhi3},
    {"zephyr-7b-beta", kZephyr, "zephyr", kExpZephyrEos},
    {"stablelm-2-zephyr-1_6b", kStableLmZephyr, "zephyr", kExpZephyrEndoftext},
};

std::string error_of(auto&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

}  // namespace

TEST_CASE("real templates are detected and render llama.cpp's expected prompts") {
    for (const auto& v : kVectors) {
        CAPTURE(v.model);
        ChatTemplate t = ChatTemplate::detect(v.source);
        CHECK(t.name() == v.name);
        CHECK(t.apply(kConversation, true) == v.expected);
    }
}

TEST_CASE("from_name renders the same as the detected template") {
    CHECK(ChatTemplate::from_name("chatml").apply(kConversation) == kExpChatml);
    CHECK(ChatTemplate::from_name("qwen").name() == "chatml");
    CHECK(ChatTemplate::from_name("llama3").apply(kConversation) == kExpLlama3);
    CHECK(ChatTemplate::from_name("phi3").apply(kConversation) == kExpPhi3);
    CHECK(ChatTemplate::from_name("zephyr").apply(kConversation) == kExpZephyrEos);
    CHECK(ChatTemplate::from_name("mistral").name() == "mistral-v1");
    CHECK(ChatTemplate::from_name("mistral").apply(kConversation) == kExpMistralV1);
    CHECK(ChatTemplate::from_name("mistral-v3").apply(kConversation) == kExpMistralV3);
    CHECK(ChatTemplate::from_name("mistral-v7").apply(kConversation) == kExpMistralV7);
    CHECK(ChatTemplate::from_name("llama2-nosys").apply(kConversation) == kExpLlama2NoSys);
    // llama2: Meta's format with <<SYS>> (llama.cpp's "llama2-sys").
    CHECK(ChatTemplate::from_name("llama2").apply(kConversation) ==
          "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who are you "
          "[/INST]   I am an assistant   </s>[INST] Another question [/INST]");
    CHECK(ChatTemplate::from_name("llama2-sys").name() == "llama2");
    // Every canonical name is accepted back, and a template's name is its own source.
    for (const auto& n : ChatTemplate::known_names()) {
        CHECK(ChatTemplate::from_name(n).name() == n);
        CHECK(ChatTemplate::detect(n).name() == n);
    }
    CHECK(ChatTemplate::known_names().size() == 13);
}

TEST_CASE("a single user turn, with and without the generation prompt") {
    const std::vector<ChatMessage> one = {{"user", "Hi"}};
    CHECK(ChatTemplate::from_name("chatml").apply(one, true) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    CHECK(ChatTemplate::from_name("chatml").apply(one, false) == "<|im_start|>user\nHi<|im_end|>\n");
    CHECK(ChatTemplate::from_name("llama3").apply(one, false) ==
          "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
    CHECK(ChatTemplate::from_name("phi3").apply(one) == "<|user|>\nHi<|end|>\n<|assistant|>\n");
    CHECK(ChatTemplate::from_name("zephyr").apply(one) == "<|user|>\nHi</s>\n<|assistant|>\n");
    CHECK(ChatTemplate::from_name("llama2").apply(one) == "[INST] Hi [/INST]");
    CHECK(ChatTemplate::from_name("mistral").apply(one) == " [INST] Hi [/INST]");
    // No BOS text anywhere at the start: the tokenizer adds BOS.
    for (const auto& n : ChatTemplate::known_names()) {
        std::string p = ChatTemplate::from_name(n).apply(one);
        CHECK_FALSE(p.starts_with("<s>"));
        CHECK_FALSE(p.starts_with("<|begin_of_text|>"));
    }
    CHECK(ChatTemplate::from_name("chatml").apply(std::vector<ChatMessage>{}, true) == "<|im_start|>assistant\n");
}

TEST_CASE("content ranges cover every message's content and nothing of the template") {
    // Distinct contents with markers inside, so a range can be told from the template's text.
    const std::vector<ChatMessage> msgs = {{"system", "sys </s> one"},
                                           {"user", "user <|im_end|> two"},
                                           {"assistant", "  asst [INST] three  "},
                                           {"user", "<s>four"}};
    for (const auto& n : ChatTemplate::known_names()) {
        CAPTURE(n);
        const ChatTemplate t = ChatTemplate::from_name(n);
        std::vector<std::pair<size_t, size_t>> ranges;
        const std::string text = t.apply(msgs, true, &ranges);
        CHECK(text == t.apply(msgs, true));  // the ranges change nothing in the text
        REQUIRE(ranges.size() == msgs.size());
        size_t at = 0;
        for (size_t i = 0; i < ranges.size(); ++i) {
            const auto [off, len] = ranges[i];
            CHECK(off >= at);  // ordered, disjoint
            REQUIRE(off + len <= text.size());
            at = off + len;
            // The content itself, or its whitespace-trimmed form for templates that trim.
            const std::string got = text.substr(off, len);
            std::string trimmed = msgs[i].content;
            trimmed.erase(0, trimmed.find_first_not_of(' '));
            trimmed.erase(trimmed.find_last_not_of(' ') + 1);
            CHECK((got == msgs[i].content || got == trimmed));
        }
    }
}

TEST_CASE("stop strings end the assistant turn") {
    auto has = [](const std::vector<std::string>& v, const std::string& s) {
        return std::find(v.begin(), v.end(), s) != v.end();
    };
    CHECK(has(ChatTemplate::from_name("chatml").stop_strings(), "<|im_end|>"));
    CHECK(has(ChatTemplate::from_name("llama3").stop_strings(), "<|eot_id|>"));
    CHECK(has(ChatTemplate::from_name("phi3").stop_strings(), "<|end|>"));
    CHECK(has(ChatTemplate::from_name("llama2").stop_strings(), "</s>"));
    CHECK(has(ChatTemplate::from_name("mistral").stop_strings(), "[INST]"));
    CHECK(has(ChatTemplate::detect(kStableLmZephyr).stop_strings(), "<|endoftext|>"));
    CHECK(has(ChatTemplate::from_name("zephyr").stop_strings(), "</s>"));
}

TEST_CASE("unknown names and unrecognised sources are errors that list the known templates") {
    std::string e = error_of([] { ChatTemplate::from_name("vicuna"); });
    CHECK(e.find("vicuna") != std::string::npos);
    for (const char* n : {"chatml", "llama2", "llama3", "mistral", "zephyr", "phi3", "qwen"})
        CHECK(e.find(n) != std::string::npos);
    CHECK(!error_of([] { ChatTemplate::from_name(""); }).empty());

    // google/gemma-7b-it: a real template of a family we do not render.
    const char* gemma =
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for "
        "message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
        "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
        "(message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% "
        "endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% "
        "if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}";
    e = error_of([&] { ChatTemplate::detect(gemma); });
    CHECK(e.find("unrecognised chat template") != std::string::npos);
    CHECK(e.find("chatml") != std::string::npos);
    // phi-4 uses <|im_start|> but is not chatml.
    const char* phi4 =
        "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
        "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
        "message['content'] + '<|im_end|><|im_start|>assistant<|im_sep|>'}}{% elif (message['role'] == 'assistant') "
        "%}{{message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}";
    CHECK(error_of([&] { ChatTemplate::detect(phi4); }).find("phi4") != std::string::npos);
    CHECK(!error_of([] { ChatTemplate::detect(""); }).empty());
    CHECK(!error_of([] { ChatTemplate::detect(std::string(100000, '{')); }).empty());
    // Binary junk in the source never crashes, and the message stays short.
    std::string junk(5000, '\0');
    for (size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<char>(i * 131);
    e = error_of([&] { ChatTemplate::detect(junk); });
    CHECK(!e.empty());
    CHECK(e.size() < 600);
}

TEST_CASE("for_model: the override, else the file's template, else chatml") {
    GgufWriter w;
    w.set("general.architecture", std::string("llama"));
    auto plain = GgufFile::from_bytes(w.to_bytes(), "plain.gguf");
    CHECK(ChatTemplate::for_model(plain, std::nullopt).name() == "chatml");
    CHECK(ChatTemplate::for_model(plain, std::string("llama3")).name() == "llama3");
    CHECK(!error_of([&] { ChatTemplate::for_model(plain, std::string("nope")); }).empty());

    // A zephyr template takes its end-of-turn text from the vocabulary's EOS token.
    GgufWriter wz;
    wz.set("general.architecture", std::string("llama"));
    wz.set("tokenizer.chat_template", std::string(kZephyr));
    wz.set("tokenizer.ggml.tokens", GgufArray{std::vector<std::string>{"<unk>", "<s>", "<|eos|>"}});
    wz.set("tokenizer.ggml.eos_token_id", uint32_t{2});
    auto zf = GgufFile::from_bytes(wz.to_bytes(), "zephyr.gguf");
    auto zt = ChatTemplate::for_model(zf, std::nullopt);
    CHECK(zt.name() == "zephyr");
    CHECK(zt.eos_text() == "<|eos|>");
    CHECK(zt.apply(std::vector<ChatMessage>{{"user", "Hi"}}) == "<|user|>\nHi<|eos|>\n<|assistant|>\n");

    // An unrecognised template names the file and the key.
    GgufWriter wg;
    wg.set("tokenizer.chat_template", std::string("{{ '<start_of_turn>' }}"));
    auto gf = GgufFile::from_bytes(wg.to_bytes(), "gemma.gguf");
    std::string e = error_of([&] { ChatTemplate::for_model(gf, std::nullopt); });
    CHECK(e.find("gemma.gguf") != std::string::npos);
    CHECK(e.find("tokenizer.chat_template") != std::string::npos);
    CHECK(ChatTemplate::for_model(gf, std::string("chatml")).name() == "chatml");
}

TEST_CASE("for_model on a real GGUF: phi-3's vocabulary carries its chat template") {
    auto path = coinfer::test::model_file("vocab/ggml-vocab-phi-3.gguf");
    if (!path) return;
    auto f = GgufFile::open(*path);
    auto t = ChatTemplate::for_model(f, std::nullopt);
    CHECK(t.name() == "phi3");
    CHECK(t.apply(kConversation) == kExpPhi3);
}

TEST_CASE("for_model with Jinja: the file's own template renders, with content ranges and tools") {
    auto path = coinfer::test::model_file("vocab/ggml-vocab-phi-3.gguf");
    if (!path) return;
    auto f = GgufFile::open(*path);
    auto t = ChatTemplate::for_model(f, std::nullopt, true);
    CHECK(t.uses_jinja());
    CHECK(t.name() == "phi3");  // its family's stop strings
    std::vector<std::pair<size_t, size_t>> ranges;
    const std::string text = t.apply(kConversation, true, &ranges);
    // The file's template (Phi-3-mini's) drops the system turn; {{ bos_token }} is left to the tokenizer.
    CHECK(text == kOwnPhi3Mini);
    REQUIRE(ranges.size() == kConversation.size() - 1);
    for (size_t k = 0; k < ranges.size(); ++k)
        CHECK(text.substr(ranges[k].first, ranges[k].second) == kConversation[k + 1].content);
    // Tool calls and results reach the template as OpenAI sends them.
    const std::vector<ChatMessage> with_tools = {
        {"user", "Weather?"},
        {"assistant", "", R"([{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Oslo\"}"}}])"},
        {"tool", "12 C", "", "c1"}};
    CHECK_NOTHROW(t.apply(with_tools, true, &ranges));
    CHECK(!ChatTemplate::for_model(f, std::nullopt).uses_jinja());
    // Without a template in the file, --jinja has nothing to render.
    auto stories = coinfer::test::model_file("stories260K.gguf");
    if (stories) {
        auto g = GgufFile::open(*stories);
        CHECK(error_of([&] { ChatTemplate::for_model(g, std::nullopt, true); }).find("no tokenizer.chat_template") !=
              std::string::npos);
    }
}

TEST_CASE("from_jinja: a template that reads tools gets them, and calls with their arguments as a mapping") {
    // Hermes-style, in the way Qwen2.5's template writes tools, calls and results.
    const char* src =
        "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters | tojson }}\n"
        "{% endfor %}<|im_end|>\n{% endif %}"
        "{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response>"
        "<|im_end|>\n{%- elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>"
        "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>"
        "{% endfor %}<|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    const ChatTemplate t = ChatTemplate::from_jinja(src, "", "<|im_end|>");
    CHECK(t.renders_tools());
    CHECK(t.name() == "chatml");
    const std::vector<ChatMessage> msgs = {
        {"user", "Weather?"},
        {"assistant", "", R"([{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Oslo\"}"}}])"},
        {"tool", "12 C", "", "c1"}};
    const std::string tools = R"([{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])";
    std::vector<std::pair<size_t, size_t>> ranges;
    const std::string text = t.apply(msgs, true, &ranges, &tools);
    // ('{%-' takes the newline before it, as in Jinja: Qwen's template writes its newlines in {{ }}.)
    CHECK(text ==
          "<|im_start|>system\nw:{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}\n<|im_end|>\n"
          "<|im_start|>user\nWeather?<|im_end|><|im_start|>assistant\n<tool_call>{\"name\": \"w\", \"arguments\": "
          "{\"city\": \"Oslo\"}}</tool_call><|im_end|><|im_start|>user\n<tool_response>12 C</tool_response><|im_end|>"
          "<|im_start|>assistant\n");
    REQUIRE(ranges.size() == 2);
    CHECK(text.substr(ranges[0].first, ranges[0].second) == "Weather?");
    CHECK(text.substr(ranges[1].first, ranges[1].second) == "12 C");
    // raise_exception in a template is the request's error.
    const ChatTemplate strict = ChatTemplate::from_jinja(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be the user') }}{% endif %}ok", "", "");
    CHECK(error_of([&] { strict.apply(kConversation); }) == "chat template: first turn must be the user");
    CHECK(error_of([] { ChatTemplate::from_jinja("{% for %}", "", ""); }).find("jinja: line 1") != std::string::npos);
}

TEST_CASE("the Jinja interpreter renders the real templates as transformers does") {
    // Where llama.cpp's hand-written formats follow the template exactly, its expected prompt is
    // the template's output; where they do not, the template's own output is written out here.
    const std::map<std::string, std::string> own = {
        {"FusionNet_34Bx2_MoE",  // ' ' + content + ' ' + eos_token, bos_token before later turns
         "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s><s>[INST] Who are "
         "you [/INST]    I am an assistant    </s><s>[INST] Another question [/INST]"},
        {"vigogne-2-70b-chat",
         "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s>[INST] Who are you "
         "[/INST] I am an assistant </s>[INST] Another question [/INST]"},
        {"Llama-2-7b-chat",  // bos_token + '[INST] ' + content.strip() ... ' ' + content.strip() + ' ' + eos_token
         "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s><s>[INST] Who are "
         "you [/INST] I am an assistant </s><s>[INST] Another question [/INST]"},
        {"Phi-3-mini", kOwnPhi3Mini},
    };
    jinja::Value msgs = jinja::Value::array();
    for (const auto& m : kConversation)
        msgs.a->push_back(jinja::Value::object({{"role", jinja::Value::string(m.role)}, {"content", jinja::Value::string(m.content)}}));
    int n_llama_cpp = 0;
    for (const Vector& v : kVectors) {
        const std::string model = v.model;
        CAPTURE(model);
        const jinja::Value ctx = jinja::Value::object({{"messages", msgs},
                                                       {"add_generation_prompt", jinja::Value::boolean(true)},
                                                       {"bos_token", jinja::Value::string("<s>")},
                                                       {"eos_token", jinja::Value::string("</s>")}});
        std::string got;
        const std::string err = error_of([&] { got = jinja::Template(v.source).render(ctx); });
        if (got.rfind("<s>", 0) == 0) got.erase(0, 3);  // the tokenizer adds BOS itself
        if (model == "Mistral-7B-Instruct-v0.2 (old)") {  // it refuses a system message
            CHECK(err == "chat template: Conversation roles must alternate user/assistant/user/assistant/...");
        } else if (model.find("(v3") != std::string::npos) {  // these vectors hold only part of the template
            CHECK(err == "");
        } else if (own.count(model)) {
            CHECK(err == "");
            CHECK(got == own.at(model));
        } else {
            CHECK(err == "");
            CHECK(got == std::string(v.expected));
            ++n_llama_cpp;
        }
    }
    CHECK(n_llama_cpp == 9);
}

TEST_CASE("jinja: expressions, filters, loops, macros and namespaces as Python's Jinja") {
    auto render = [](const std::string& src, const std::string& ctx_json = "{}") {
        return jinja::Template(src).render(jinja::Value::from_json(nlohmann::ordered_json::parse(ctx_json)));
    };
    CHECK(render("{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 2 ** 10 }} {{ 1 / 2 }}") == "7 3 -4 1 1024 0.5");
    CHECK(render("{{ 'a' ~ 1 ~ none }} {{ 'x' * 3 }} {{ [1, 2] + [3] }}") == "a1None xxx [1, 2, 3]");
    CHECK(render("{{ x | tojson }}", R"({"x": {"b": [1, 2.5, "q\""], "a": null, "t": true}})") ==
          R"({"b": [1, 2.5, "q\""], "a": null, "t": true})");
    CHECK(render("{{ x | tojson(indent=2) }}", R"({"x": {"a": [1]}})") == "{\n  \"a\": [\n    1\n  ]\n}");
    CHECK(render("{{ '  hi  ' | trim }}|{{ 'Hello' | upper }}|{{ 'ab' | length }}|{{ [3, 4] | first }}") == "hi|HELLO|2|3");
    CHECK(render("{{ xs | join(', ') }}|{{ xs | map('upper') | join }}", R"({"xs": ["a", "b"]})") == "a, b|AB");
    CHECK(render("{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='c') | list }}",
                 R"({"ms": [{"role": "user", "c": 1}, {"role": "x", "c": 2}, {"role": "user", "c": 3}]})") == "[1, 3]");
    CHECK(render("{{ y | default('d') }} {{ x.missing is defined }} {{ x['a'] }} {{ x.get('z', 5) }}", R"({"x": {"a": 1}})") ==
          "d False 1 5");
    CHECK(render("{% for k, v in d.items() %}{{ k }}={{ v }}{% if not loop.last %},{% endif %}{% endfor %}",
                 R"({"d": {"b": 1, "a": 2}})") == "b=1,a=2");
    CHECK(render("{% for i in range(5) if i is odd %}{{ loop.index }}:{{ i }} {% else %}none{% endfor %}") == "1:1 2:3 ");
    CHECK(render("{% for i in [] %}x{% else %}empty{% endfor %}") == "empty");
    CHECK(render("{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}") ==
          "02");
    CHECK(render("{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}") == "6");
    CHECK(render("{% set n = 1 %}{% for i in range(3) %}{% set n = n + 1 %}{% endfor %}{{ n }}") == "1");  // loop scope
    CHECK(render("{% macro greet(who, p='Hi') %}{{ p }} {{ who }}{% endmacro %}{{ greet('A') }}/{{ greet('B', p='Yo') }}") ==
          "Hi A/Yo B");
    CHECK(render("{% set t %}in{{ 1 }}{% endset %}[{{ t }}]") == "[in1]");
    CHECK(render("{{ 'a,b,,c'.split(',') }} {{ ' x y '.split() }} {{ 'abc'.startswith('ab') }} {{ 'Tom'[1:] }} {{ [1,2,3][::-1] }}") ==
          "['a', 'b', '', 'c'] ['x', 'y'] True om [3, 2, 1]");
    CHECK(render("{{ 'yes' if x else 'no' }} {{ 'in' if 'b' in 'abc' }} {{ 2 in [1, 2] and 3 not in [1] }}", R"({"x": 0})") ==
          "no in True");
    // trim_blocks and lstrip_blocks, as transformers renders chat templates; '-' control.
    CHECK(render("a\n  {% if true %}\nb\n  {% endif %}\nc") == "a\nb\nc");
    CHECK(render("a  {{- ' b ' -}}  c {# note #}d") == "a b c d");
    CHECK(render("{% raw %}{{ not rendered }}{% endraw %}") == "{{ not rendered }}");
}

TEST_CASE("jinja: bad and hostile templates are errors with a line, never a hang") {
    auto err = [](const std::string& src) {
        return error_of([&] { jinja::Template(src).render(jinja::Value::object()); });
    };
    CHECK(err("{% if x %}") .find("missing 'endif'") != std::string::npos);
    CHECK(err("line1\n{{ x | nosuchfilter }}").find("line 2: unknown filter 'nosuchfilter'") != std::string::npos);
    CHECK(err("{% include 'x' %}").find("unsupported statement 'include'") != std::string::npos);
    CHECK(err("{{ 1 +* 2 }}") != "");
    CHECK(err("{{ 'open }}") != "");
    CHECK(err("{{ raise_exception('no system role') }}") == "chat template: no system role");
    CHECK(err("{{ " + std::string(200, '(') + "1" + std::string(200, ')') + " }}").find("nested too deeply") != std::string::npos);
    CHECK(err("{% for i in range(100000000) %}{% endfor %}").find("range() too long") != std::string::npos);
    CHECK(err("{% for i in range(200000) %}{% for j in range(200000) %}{% endfor %}{% endfor %}")
              .find("too many loop iterations") != std::string::npos);
    CHECK(err("{% set s = 'x' * 1000 %}{% for i in range(200000) %}{{ s }}{% endfor %}").find("output passed") !=
          std::string::npos);
    CHECK(err("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").find("nested too deeply") != std::string::npos);
}
