// chat.js: the request it makes and how it reads the stream (a scripted fetch).
import { CHAT_URL, HTTPError, mergeToolCalls, streamChat } from "../ui/chat.js";
import { assert, assertEqual, assertRejects, test } from "./harness.js";

const S = "chat";

/** A fetch that records its call and answers with `chunks` (strings or bytes). */
function scriptedFetch(chunks, { status = 200, json = null } = {}) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    if (status !== 200) {
      return new Response(JSON.stringify(json), {
        status,
        headers: { "content-type": "application/json" },
      });
    }
    const encoder = new TextEncoder();
    const body = new ReadableStream({
      start(controller) {
        for (const c of chunks) controller.enqueue(typeof c === "string" ? encoder.encode(c) : c);
        controller.close();
      },
    });
    return new Response(body, { headers: { "content-type": "text/event-stream" } });
  };
  return { fetch, calls };
}

function recorder() {
  const seen = [];
  const on = {};
  for (const name of ["accepted", "comment", "delta", "finish", "usage", "error"]) {
    on[name] = (...args) => seen.push([name, ...args]);
  }
  return { seen, on };
}

const chunk = (delta, finish = null) =>
  `data: ${JSON.stringify({ choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;

test(S, "the request: relative URL, POST, stream forced on, progress asked, key as Bearer", async () => {
  const { fetch, calls } = scriptedFetch(["data: [DONE]\n\n"]);
  const { on } = recorder();
  await streamChat({ body: { messages: [], stream: false }, apiKey: "k1", on, fetch });
  assertEqual(calls.length, 1);
  const { url, init } = calls[0];
  assertEqual(url, "v1/chat/completions");
  assertEqual(CHAT_URL, url);
  assertEqual(init.method, "POST");
  assertEqual(init.headers["X-DS4TW-Progress"], "1");
  assertEqual(init.headers.Authorization, "Bearer k1");
  assertEqual(JSON.parse(init.body), { messages: [], stream: true });
});

test(S, "no key, no Authorization header", async () => {
  const { fetch, calls } = scriptedFetch(["data: [DONE]\n\n"]);
  await streamChat({ body: {}, on: {}, fetch });
  assertEqual("Authorization" in calls[0].init.headers, false);
});

test(S, "comments, deltas, finish and usage, in order, from awkward chunks", async () => {
  const stream =
    ": queued 1\n\n: prefill 0/40\n\n: prefill 40/40\n\n: decode\n\n" +
    chunk({ role: "assistant", content: "" }) +
    chunk({ reasoning_content: "hm" }) +
    chunk({ content: "Hé" }) +
    chunk({}, "stop") +
    `data: ${JSON.stringify({ choices: [], usage: { total_tokens: 3 } })}\n\n` +
    "data: [DONE]\n\n";
  const bytes = new TextEncoder().encode(stream);
  const chunks = [];
  for (let i = 0; i < bytes.length; i += 7) chunks.push(bytes.slice(i, i + 7));
  const { fetch } = scriptedFetch(chunks);
  const { seen, on } = recorder();
  const complete = await streamChat({ body: {}, on, fetch });
  assertEqual(complete, true);
  assertEqual(seen, [
    ["accepted"],
    ["comment", "queued 1"],
    ["comment", "prefill 0/40"],
    ["comment", "prefill 40/40"],
    ["comment", "decode"],
    ["delta", { role: "assistant", content: "" }],
    ["delta", { reasoning_content: "hm" }],
    ["delta", { content: "Hé" }],
    ["delta", {}],
    ["finish", "stop"],
    ["usage", { total_tokens: 3 }],
  ]);
});

test(S, "an error event after the headers", async () => {
  const { fetch } = scriptedFetch([
    'event: error\ndata: {"error":{"message":"cut off","code":"server_shutting_down"}}\n\n',
    "data: [DONE]\n\n",
  ]);
  const { seen, on } = recorder();
  await streamChat({ body: {}, on, fetch });
  assertEqual(seen, [["accepted"], ["error", "cut off", "server_shutting_down"]]);
});

test(S, "a body that ends before [DONE] says so", async () => {
  const { fetch } = scriptedFetch([chunk({ content: "half" })]);
  assertEqual(await streamChat({ body: {}, on: {}, fetch }), false);
});

test(S, "a non-200 answer is an HTTPError with the API's message", async () => {
  const { fetch } = scriptedFetch([], {
    status: 401,
    json: { error: { message: "invalid API key", code: "invalid_api_key" } },
  });
  await assertRejects(streamChat({ body: {}, on: {}, fetch }), (e) => {
    assert(e instanceof HTTPError, String(e));
    assertEqual([e.status, e.message, e.code], [401, "invalid API key", "invalid_api_key"]);
  });
});

test(S, "Stop: aborting the signal rejects with AbortError (real fetch, a stream that never ends)", async () => {
  // A same-origin URL that answers slowly is not needed: aborting before
  // the answer rejects the same way, from the browser's own fetch.
  const controller = new AbortController();
  controller.abort();
  await assertRejects(streamChat({ body: {}, on: {}, signal: controller.signal }), (e) => {
    assertEqual(e.name, "AbortError");
  });
});

test(S, "mergeToolCalls joins argument fragments by index", () => {
  const calls = [];
  mergeToolCalls(calls, [{ index: 0, id: "call_1", function: { name: "get_weather", arguments: "" } }]);
  mergeToolCalls(calls, [{ index: 0, function: { arguments: '{"city":' } }]);
  mergeToolCalls(calls, [{ index: 0, function: { arguments: '"Paris"}' } }]);
  assertEqual(calls, [{ id: "call_1", name: "get_weather", arguments: '{"city":"Paris"}' }]);
});
