// The official `openai` npm client against `coinfer serve` (CPU backend, stories260K):
// completions and chat completions, streaming and not, usage, models.list(), and errors
// surfacing as the client's APIError with the right status.
//   node tests/server/test_openai_client.mjs COINFER_EXE [NODE_DIR]
// Exits 77 (skip) when node_modules/openai or the model is missing.
import { execFile } from "node:child_process";
import { promisify } from "node:util";

import { Runner, check, check_eq, model_path, parse_args, require_package, start_server } from "./serve_util.mjs";

const { exe, node_dir } = parse_args();
const OpenAI = require_package(node_dir, "openai");
const model = model_path("stories260K.gguf");

const PROMPT = "Once upon a time, there was a little girl named Lily.";
const MAX_TOKENS = 24;
const API_KEY = "coinfer-test-key";

// Greedy text from `coinfer generate`, the reference the server must match.
async function generate_reference(prompt, n) {
  const { stdout } = await promisify(execFile)(
    exe, ["generate", "-m", model, "-p", prompt, "-n", String(n), "--temp", "0", "--json", "--device", "cpu"],
    { maxBuffer: 1 << 24 });
  const lines = stdout.trim().split("\n");
  return JSON.parse(lines[lines.length - 1]);
}

async function collect(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

function expect_api_error(e, status) {
  check(e instanceof OpenAI.APIError, `expected an OpenAI.APIError, got ${e && e.constructor && e.constructor.name}: ${e}`);
  check_eq(e.status, status, "APIError.status");
  check(typeof e.message === "string" && e.message.length > 0, "APIError has a message");
}

async function main() {
  const t = new Runner();
  let server, keyed;
  try {
    server = await start_server(exe, model);
  } catch (e) {
    console.log(`FAIL start coinfer serve: ${e.message}`);
    console.log("0 passed, 1 failed");
    return 1;
  }
  const client = new OpenAI({ apiKey: "unused", baseURL: server.url + "/v1", maxRetries: 0, timeout: 60000 });
  let model_id = "stories260K";

  try {
    await t.run("models.list()", async () => {
      const page = await client.models.list();
      const ids = [];
      for await (const m of page) {
        check(typeof m.id === "string" && m.id.length > 0, "model id is a non-empty string");
        check_eq(m.object, "model", "model.object");
        ids.push(m.id);
      }
      check(ids.length >= 1, "at least one model listed");
      model_id = ids[0];
    });

    let plain = null;  // the non-streamed greedy completion
    await t.run("completions.create (non-streaming, greedy)", async () => {
      const r = await client.completions.create({ model: model_id, prompt: PROMPT, max_tokens: MAX_TOKENS, temperature: 0 });
      check_eq(r.object, "text_completion", "object");
      check(typeof r.id === "string" && r.id.length > 0, "id");
      check_eq(r.choices.length, 1, "choices.length");
      const c = r.choices[0];
      check_eq(c.index, 0, "choices[0].index");
      check(typeof c.text === "string" && c.text.length > 0, "choices[0].text is non-empty");
      check(["length", "stop"].includes(c.finish_reason), `finish_reason is length or stop, got ${c.finish_reason}`);
      const u = r.usage;
      check(u && u.prompt_tokens > 0, "usage.prompt_tokens > 0");
      check(u.completion_tokens >= 1 && u.completion_tokens <= MAX_TOKENS, `usage.completion_tokens in 1..${MAX_TOKENS}`);
      if (c.finish_reason === "length") check_eq(u.completion_tokens, MAX_TOKENS, "completion_tokens at finish length");
      check_eq(u.total_tokens, u.prompt_tokens + u.completion_tokens, "usage.total_tokens");
      plain = r;
    });

    await t.run("greedy completion equals `coinfer generate` and usage counts its tokens", async () => {
      check(plain, "the non-streaming completion ran");
      const ref = await generate_reference(PROMPT, MAX_TOKENS);
      check_eq(plain.choices[0].text, ref.text, "text vs coinfer generate");
      check_eq(plain.choices[0].finish_reason, ref.finish_reason, "finish_reason vs coinfer generate");
      check_eq(plain.usage.prompt_tokens, ref.prompt_ids.length, "usage.prompt_tokens vs generate's prompt_ids");
      check_eq(plain.usage.completion_tokens, ref.ids.length, "usage.completion_tokens vs generate's ids");
    });

    await t.run("completions.create (streaming) concatenates to the greedy text, with usage", async () => {
      check(plain, "the non-streaming completion ran");
      const stream = await client.completions.create({
        model: model_id, prompt: PROMPT, max_tokens: MAX_TOKENS, temperature: 0,
        stream: true, stream_options: { include_usage: true },
      });
      const chunks = await collect(stream);
      const with_choice = chunks.filter((c) => c.choices && c.choices.length > 0);
      check(with_choice.length >= 2, `several chunks arrive (got ${with_choice.length})`);
      for (const c of chunks) check_eq(c.object, "text_completion", "chunk.object");
      const text = with_choice.map((c) => c.choices[0].text || "").join("");
      check_eq(text, plain.choices[0].text, "streamed text vs non-streamed");
      const last = with_choice[with_choice.length - 1];
      check_eq(last.choices[0].finish_reason, plain.choices[0].finish_reason, "last chunk's finish_reason");
      for (const c of with_choice.slice(0, -1)) check(!c.choices[0].finish_reason, "only the last chunk has finish_reason");
      const usage_chunk = chunks[chunks.length - 1];
      check(usage_chunk.usage, "the final chunk carries usage (stream_options.include_usage)");
      check_eq(usage_chunk.usage, plain.usage, "streamed usage vs non-streamed");
    });

    await t.run("completions.create (streaming) without include_usage has no usage", async () => {
      const stream = await client.completions.create({ model: model_id, prompt: PROMPT, max_tokens: 4, temperature: 0, stream: true });
      const chunks = await collect(stream);
      check(chunks.length >= 1, "chunks arrive");
      for (const c of chunks) check(!c.usage, "no usage without include_usage");
    });

    const messages = [{ role: "user", content: "Tell me a story about a cat." }];
    let chat = null;
    await t.run("chat.completions.create (non-streaming)", async () => {
      const r = await client.chat.completions.create({ model: model_id, messages, max_tokens: 16, temperature: 0 });
      check_eq(r.object, "chat.completion", "object");
      check_eq(r.choices.length, 1, "choices.length");
      const c = r.choices[0];
      check_eq(c.message.role, "assistant", "message.role");
      check(typeof c.message.content === "string" && c.message.content.length > 0, "message.content is non-empty");
      check(["length", "stop"].includes(c.finish_reason), `finish_reason, got ${c.finish_reason}`);
      const u = r.usage;
      check(u.prompt_tokens > 0 && u.completion_tokens >= 1 && u.completion_tokens <= 16, "usage in range");
      check_eq(u.total_tokens, u.prompt_tokens + u.completion_tokens, "usage.total_tokens");
      chat = r;
    });

    await t.run("chat.completions.create (streaming) matches the non-streamed reply", async () => {
      check(chat, "the non-streaming chat completion ran");
      const stream = await client.chat.completions.create({
        model: model_id, messages, max_tokens: 16, temperature: 0,
        stream: true, stream_options: { include_usage: true },
      });
      const chunks = await collect(stream);
      for (const c of chunks) check_eq(c.object, "chat.completion.chunk", "chunk.object");
      const with_choice = chunks.filter((c) => c.choices && c.choices.length > 0);
      check(with_choice.length >= 2, "several chunks arrive");
      check(with_choice.some((c) => c.choices[0].delta && c.choices[0].delta.role === "assistant"), "a delta names the assistant role");
      const text = with_choice.map((c) => (c.choices[0].delta && c.choices[0].delta.content) || "").join("");
      check_eq(text, chat.choices[0].message.content, "streamed content vs non-streamed");
      check_eq(with_choice[with_choice.length - 1].choices[0].finish_reason, chat.choices[0].finish_reason, "last finish_reason");
      const usage_chunk = chunks[chunks.length - 1];
      check(usage_chunk.usage, "the final chunk carries usage");
      check_eq(usage_chunk.usage, chat.usage, "streamed usage vs non-streamed");
    });

    await t.run("the stream helper (chat.completions.stream) assembles the same message", async () => {
      check(chat, "the non-streaming chat completion ran");
      const runner = client.chat.completions.stream({ model: model_id, messages, max_tokens: 16, temperature: 0 });
      const final = await runner.finalChatCompletion();
      check_eq(final.choices[0].message.content, chat.choices[0].message.content, "assembled content");
    });

    const schema = {
      type: "object",
      properties: { title: { type: "string", maxLength: 16 }, stars: { type: "integer", minimum: 1 } },
      required: ["title", "stars"], additionalProperties: false,
    };
    const response_format = { type: "json_schema", json_schema: { name: "review", schema, strict: true } };
    await t.run("chat with response_format json_schema gives a document of the schema", async () => {
      const r = await client.chat.completions.create({
        model: model_id, messages, max_tokens: 120, temperature: 0.8, seed: 7, response_format });
      const c = r.choices[0];
      check_eq(c.finish_reason, "stop", "finish_reason");
      const doc = JSON.parse(c.message.content);
      check_eq(Object.keys(doc).join(","), "title,stars", "members in the schema's order");
      check(typeof doc.title === "string" && [...doc.title].length <= 16, "title obeys maxLength");
      check(Number.isInteger(doc.stars) && doc.stars >= 1, "stars is an integer >= 1");
    });

    await t.run("the same, streamed: the deltas join into a document of the schema", async () => {
      const stream = await client.chat.completions.create({
        model: model_id, messages, max_tokens: 120, temperature: 0.8, seed: 8, response_format, stream: true });
      const chunks = await collect(stream);
      const text = chunks.filter((c) => c.choices && c.choices.length > 0)
        .map((c) => (c.choices[0].delta && c.choices[0].delta.content) || "").join("");
      const doc = JSON.parse(text);
      check(typeof doc.title === "string" && Number.isInteger(doc.stars), "members of the schema");
    });

    const tools = [{
      type: "function",
      function: {
        name: "get_weather", description: "Current weather in a city",
        parameters: {
          type: "object", properties: { city: { type: "string", maxLength: 16 }, unit: { enum: ["c", "f"] } },
          required: ["city", "unit"], additionalProperties: false,
        },
      },
    }];
    const ask = [{ role: "user", content: "What is the weather in Oslo?" }];
    const forced = { type: "function", function: { name: "get_weather" } };
    const check_args = (args) => {
      const a = JSON.parse(args);
      check_eq(Object.keys(a).join(","), "city,unit", "arguments in the schema's order");
      check(typeof a.city === "string" && [...a.city].length <= 16 && ["c", "f"].includes(a.unit), "arguments obey the schema");
    };
    await t.run("a tool call round trip: the call, the tool's result, then an answer", async () => {
      const r = await client.chat.completions.create({
        model: model_id, messages: ask, tools, tool_choice: forced, max_tokens: 120, seed: 11 });
      const c = r.choices[0];
      check_eq(c.finish_reason, "tool_calls", "finish_reason");
      check(c.message.content === null, "no content beside the call");
      check_eq(c.message.tool_calls.length, 1, "one call");
      const call = c.message.tool_calls[0];
      check_eq(call.type, "function", "call type");
      check_eq(call.function.name, "get_weather", "function name");
      check_args(call.function.arguments);
      const r2 = await client.chat.completions.create({
        model: model_id, tools, max_tokens: 16, seed: 12,
        messages: [...ask, c.message, { role: "tool", tool_call_id: call.id, content: '{"temp": 12, "unit": "c"}' }] });
      check(typeof r2.choices[0].message.content === "string", "the answer after the result is text");
      check(r2.usage.prompt_tokens > r.usage.prompt_tokens, "the call and the result are in the prompt");
    });

    await t.run("the same call streamed: tool_calls deltas and finish_reason tool_calls", async () => {
      const stream = await client.chat.completions.create({
        model: model_id, messages: ask, tools, tool_choice: "required", max_tokens: 120, seed: 13, stream: true });
      const chunks = await collect(stream);
      const deltas = chunks.filter((c) => c.choices && c.choices.length > 0 && c.choices[0].delta.tool_calls)
        .flatMap((c) => c.choices[0].delta.tool_calls);
      check(deltas.length >= 1, "tool_calls deltas arrive");
      const name = deltas.map((d) => (d.function && d.function.name) || "").join("");
      const args = deltas.map((d) => (d.function && d.function.arguments) || "").join("");
      check_eq(name, "get_weather", "the streamed function name");
      check_args(args);
      const finish = chunks.filter((c) => c.choices && c.choices.length > 0 && c.choices[0].finish_reason);
      check_eq(finish.length, 1, "one finish chunk");
      check_eq(finish[0].choices[0].finish_reason, "tool_calls", "finish_reason");
    });

    await t.run("an unsupported schema keyword is a 400 APIError naming response_format", async () => {
      try {
        await client.chat.completions.create({
          model: model_id, messages, max_tokens: 8,
          response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "string", pattern: "a+" } } },
        });
      } catch (e) {
        expect_api_error(e, 400);
        check_eq(e.param, "response_format", "error.param");
        return;
      }
      throw new Error("no error for an unsupported schema");
    });

    await t.run("max_tokens -1 is a 400 APIError (BadRequestError)", async () => {
      try {
        await client.completions.create({ model: model_id, prompt: PROMPT, max_tokens: -1 });
      } catch (e) {
        expect_api_error(e, 400);
        check(e instanceof OpenAI.BadRequestError, "BadRequestError");
        check(e.error && typeof e.error.message === "string", "OpenAI error body {error: {message}}");
        return;
      }
      throw new Error("no error for max_tokens -1");
    });

    await t.run("chat with messages of the wrong type is a 400 APIError", async () => {
      try {
        await client.chat.completions.create({ model: model_id, messages: "hello", max_tokens: 4 });
      } catch (e) {
        expect_api_error(e, 400);
        return;
      }
      throw new Error("no error for messages: \"hello\"");
    });

    await t.run("the server still serves after bad requests", async () => {
      const r = await client.completions.create({ model: model_id, prompt: PROMPT, max_tokens: 4, temperature: 0 });
      check(r.choices[0].text.length > 0, "text");
    });

    try {
      keyed = await start_server(exe, model, ["--api-key", API_KEY]);
    } catch (e) {
      await t.run("start coinfer serve --api-key", async () => { throw e; });
    }
    if (keyed) {
      await t.run("a wrong API key is a 401 APIError (AuthenticationError)", async () => {
        const bad = new OpenAI({ apiKey: "wrong-key", baseURL: keyed.url + "/v1", maxRetries: 0 });
        try {
          await bad.completions.create({ model: model_id, prompt: PROMPT, max_tokens: 4 });
        } catch (e) {
          expect_api_error(e, 401);
          check(e instanceof OpenAI.AuthenticationError, "AuthenticationError");
          return;
        }
        throw new Error("no error with a wrong key");
      });
      await t.run("the right API key is accepted", async () => {
        const good = new OpenAI({ apiKey: API_KEY, baseURL: keyed.url + "/v1", maxRetries: 0 });
        const r = await good.completions.create({ model: model_id, prompt: PROMPT, max_tokens: 4, temperature: 0 });
        check(r.choices[0].text.length > 0, "text");
        const list = await good.models.list();
        check(list.data.length >= 1, "models listed");
      });
    }
  } finally {
    if (server) await server.stop();
    if (keyed) await keyed.stop();
  }
  return t.finish();
}

main().then((rc) => process.exit(rc), (e) => {
  console.log(`FAIL ${e && e.stack ? e.stack : e}`);
  console.log("0 passed, 1 failed");
  process.exit(1);
});
