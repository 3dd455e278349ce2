// OpenAI compatibility with the official openai Node SDK (the version pinned in package.json).
//
//   BASE_URL=http://127.0.0.1:8000 MODEL=tiny node tests/node/conformance.mjs
//
// BASE_URL is the gateway's root (with or without /v1). Prints one line per check and a final
// "N passed, M failed" line; exits 1 when any check fails, 2 when it cannot start.
// tests/conformance/test_openai_node.py runs it against a real stack.

import assert from "node:assert/strict";
import OpenAI from "openai";

const rawBase = process.env.BASE_URL;
const MODEL = process.env.MODEL;
if (!rawBase || !MODEL) {
  console.error("conformance.mjs: set BASE_URL (the gateway, e.g. http://127.0.0.1:8000) and MODEL");
  process.exit(2);
}
const baseURL = rawBase.replace(/\/+$/, "").replace(/\/v1$/, "") + "/v1";
const client = new OpenAI({ baseURL, apiKey: "x", maxRetries: 0, timeout: 60_000 });
const HELLO = [{ role: "user", content: "Hello world! How are you today?" }];
const GREEDY = { temperature: 0 };

let passed = 0;
let failed = 0;

async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok   ${name}`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL ${name}: ${err?.stack ?? err}`);
  }
}

async function rejects(promise, cls) {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${err?.constructor?.name}: ${err?.message}`);
    return err;
  }
  assert.fail(`expected ${cls.name}, the request succeeded`);
}

async function collect(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  const texts = {};
  const finish = {};
  const roles = {};
  for (const chunk of chunks) {
    for (const c of chunk.choices) {
      texts[c.index] = (texts[c.index] ?? "") + (c.delta?.content ?? c.text ?? "");
      if (c.delta?.role) roles[c.index] = c.delta.role;
      if (c.finish_reason) finish[c.index] = c.finish_reason;
    }
  }
  return { chunks, texts, finish, roles };
}

const chat = (params) => client.chat.completions.create({ model: MODEL, messages: HELLO, ...params });

await check("chat non-stream: shape, usage", async () => {
  const r = await chat({ max_tokens: 12, ...GREEDY });
  assert.equal(r.object, "chat.completion");
  assert.match(r.id, /^chatcmpl-/);
  assert.equal(r.model, MODEL);
  assert.equal(r.choices.length, 1);
  const [c] = r.choices;
  assert.equal(c.index, 0);
  assert.equal(c.message.role, "assistant");
  assert.equal(typeof c.message.content, "string");
  assert.ok(["stop", "length"].includes(c.finish_reason));
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);
  assert.ok(r.usage.completion_tokens >= 1 && r.usage.completion_tokens <= 12);
});

await check("chat stream: role delta, text equals non-stream, finish_reason, include_usage chunk", async () => {
  const params = { max_tokens: 16, ...GREEDY };
  const whole = await chat(params);
  const s = await collect(await chat({ ...params, stream: true, stream_options: { include_usage: true } }));
  assert.equal(s.chunks[0].object, "chat.completion.chunk");
  assert.equal(s.chunks[0].choices[0].delta.role, "assistant");
  assert.equal(s.texts[0], whole.choices[0].message.content);
  assert.equal(s.finish[0], whole.choices[0].finish_reason);
  const last = s.chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.completion_tokens, whole.usage.completion_tokens);
  assert.equal(last.usage.prompt_tokens, whole.usage.prompt_tokens);
  assert.ok(s.chunks.slice(0, -1).every((c) => c.usage == null));
  assert.equal(new Set(s.chunks.map((c) => c.id)).size, 1);
});

await check("chat stream n=2: both indexes, each with a role, text and finish_reason", async () => {
  const params = { n: 2, max_tokens: 8, temperature: 1.0, seed: 3 };
  const whole = await chat(params);
  assert.deepEqual(whole.choices.map((c) => c.index), [0, 1]);
  const s = await collect(await chat({ ...params, stream: true }));
  assert.deepEqual(Object.keys(s.texts).sort(), ["0", "1"]);
  assert.deepEqual(s.roles, { 0: "assistant", 1: "assistant" });
  assert.deepEqual(Object.keys(s.finish).sort(), ["0", "1"]);
  assert.deepEqual([s.texts[0], s.texts[1]], whole.choices.map((c) => c.message.content));
});

await check("stop: the stop text is cut and never sent (stream and not)", async () => {
  const full = (await chat({ max_tokens: 40, ignore_eos: true, ...GREEDY })).choices[0].message.content;
  const stop = full.slice(10, 12);
  const expected = full.slice(0, full.indexOf(stop));
  const r = await chat({ max_tokens: 40, stop: [stop, "never-appears"], ignore_eos: true, ...GREEDY });
  assert.equal(r.choices[0].message.content, expected);
  assert.equal(r.choices[0].finish_reason, "stop");
  const s = await collect(await chat({ max_tokens: 40, stop, ignore_eos: true, stream: true, ...GREEDY }));
  assert.equal(s.texts[0], expected);
  assert.equal(s.finish[0], "stop");
});

await check("max_completion_tokens: finish_reason length, exact usage", async () => {
  const r = await chat({ max_completion_tokens: 5, ignore_eos: true, ...GREEDY });
  assert.equal(r.choices[0].finish_reason, "length");
  assert.equal(r.usage.completion_tokens, 5);
  const s = await collect(
    await chat({ max_completion_tokens: 5, ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
  );
  assert.equal(s.finish[0], "length");
  assert.equal(s.chunks.at(-1).usage.completion_tokens, 5);
});

await check("chat logprobs + top_logprobs (stream and not)", async () => {
  const params = { max_tokens: 6, logprobs: true, top_logprobs: 2, ignore_eos: true, ...GREEDY };
  const r = await chat(params);
  const content = r.choices[0].logprobs.content;
  assert.equal(content.length, 6);
  for (const e of content) {
    assert.equal(typeof e.token, "string");
    assert.ok(e.logprob <= 0);
    // the token's own bytes: its text's UTF-8, or U+FFFD's decoding for part of a character
    assert.equal(Buffer.from(e.bytes).toString("utf8"), e.token);
    assert.equal(e.top_logprobs.length, 2);
    assert.ok(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob);
    assert.equal(e.logprob, e.top_logprobs[0].logprob); // greedy: the chosen token is the top one
  }
  const s = await collect(await chat({ ...params, stream: true }));
  const streamed = s.chunks.flatMap((c) => c.choices.flatMap((x) => x.logprobs?.content ?? []));
  assert.deepEqual(streamed, content);
});

await check("completions non-stream and stream: list prompt, n, logprobs", async () => {
  const params = { model: MODEL, prompt: ["The capital", "Numbers: 1 2"], n: 2, max_tokens: 6, ...GREEDY };
  const r = await client.completions.create(params);
  assert.equal(r.object, "text_completion");
  assert.match(r.id, /^cmpl-/);
  assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2, 3]);
  const s = await collect(await client.completions.create({ ...params, stream: true }));
  assert.deepEqual([0, 1, 2, 3].map((i) => s.texts[i]), r.choices.map((c) => c.text));
  const lp = await client.completions.create({ model: MODEL, prompt: "The capital", max_tokens: 4, logprobs: 2 });
  const l = lp.choices[0].logprobs;
  assert.equal(l.tokens.length, 4);
  assert.equal(l.token_logprobs.length, 4);
  assert.equal(l.text_offset.length, 4);
  assert.ok(l.top_logprobs.every((t) => typeof t === "object" && Object.keys(t).length <= 2));
  const ids = await client.completions.create({ model: MODEL, prompt: [5, 6, 7], max_tokens: 2 });
  assert.equal(ids.usage.prompt_tokens, 3);
});

await check("400 -> OpenAI.BadRequestError with param", async () => {
  const err = await rejects(chat({ temperature: 3 }), OpenAI.BadRequestError);
  assert.equal(err.status, 400);
  assert.equal(err.param, "temperature");
  assert.equal(err.type, "invalid_request_error");
  const suffix = await rejects(
    client.completions.create({ model: MODEL, prompt: "x", suffix: "y" }),
    OpenAI.BadRequestError,
  );
  assert.equal(suffix.param, "suffix");
  assert.equal(suffix.code, "unsupported_parameter");
  const streamed = await rejects(chat({ top_k: -2, stream: true }), OpenAI.BadRequestError);
  assert.equal(streamed.param, "top_k");
});

await check("404 -> OpenAI.NotFoundError, code model_not_found", async () => {
  const err = await rejects(chat({ model: "no-such-model" }), OpenAI.NotFoundError);
  assert.equal(err.status, 404);
  assert.equal(err.code, "model_not_found");
  await rejects(client.models.retrieve("no-such-model"), OpenAI.NotFoundError);
});

await check("unknown and ignored fields are accepted", async () => {
  const plain = await chat({ max_tokens: 6, ...GREEDY });
  const r = await chat({
    max_tokens: 6,
    ...GREEDY,
    user: "u-1",
    metadata: { k: "v" },
    store: false,
    service_tier: "auto",
    some_unknown_field: { nested: [1, 2] },
  });
  assert.equal(r.choices[0].message.content, plain.choices[0].message.content);
});

await check("models.list includes the model", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes(MODEL), `${MODEL} not in ${ids}`);
});

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
