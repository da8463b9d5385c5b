// The page's one API call: a streamed chat completion, read chunk by
// chunk, with ds4tw's progress comments asked for.
//
// Every URL is relative to the page, so the page works wherever ds4tw is
// mounted (/, /llm/, ...). Tested in the browser by
// tests/browser/js/test_chat.js (with a scripted fetch) and, against a
// real server, by tests/browser/test_page.py.

import { readEvents } from "./sse.js";

export const CHAT_URL = "v1/chat/completions";

/** The header that asks ds4tw for stage comments on every change (docs/ui.md). */
export const PROGRESS_HEADER = "X-DS4TW-Progress";

/** An answer other than 200: the status, and the API's own error message. */
export class HTTPError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.name = "HTTPError";
    this.status = status;
    this.code = code;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code ?? null;
    }
  } catch {
    // Not JSON (a proxy's page, say): the status line says enough.
  }
  return new HTTPError(response.status, message, code);
}

/**
 * POST a streamed chat completion and report what arrives.
 *
 * @param {object} options
 * @param {object} options.body the request (messages, max_tokens, ...); stream is forced on
 * @param {string | null} options.apiKey sent as a Bearer token when set
 * @param {AbortSignal} options.signal Stop aborts the request: ds4tw cancels the job
 * @param {object} options.on callbacks: accepted(), comment(text), delta(delta),
 *   finish(reason), usage(usage), error(message, code)
 * @param {typeof fetch} options.fetch for tests
 * @returns {Promise<boolean>} true at [DONE], false if the body ended
 *   without it; rejects with HTTPError for a non-200 answer, AbortError on Stop
 */
export async function streamChat({ body, apiKey = null, signal, on, fetch = globalThis.fetch }) {
  const headers = {
    "Content-Type": "application/json",
    Accept: "text/event-stream",
    [PROGRESS_HEADER]: "1",
  };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(CHAT_URL, {
    method: "POST",
    headers,
    body: JSON.stringify({ ...body, stream: true }),
    signal,
    cache: "no-store",
  });
  if (!response.ok) throw await errorOf(response);
  on.accepted?.();
  for await (const item of readEvents(response.body)) {
    if (item.type === "comment") {
      on.comment?.(item.text);
      continue;
    }
    if (item.data === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(item.data);
    } catch {
      continue; // not ours to understand
    }
    if (item.event === "error" || chunk.error) {
      const error = chunk.error ?? {};
      on.error?.(error.message ?? "the server reported an error", error.code ?? null);
      continue; // [DONE] follows
    }
    if (chunk.usage) on.usage?.(chunk.usage);
    for (const choice of chunk.choices ?? []) {
      if (choice.delta) on.delta?.(choice.delta);
      if (choice.finish_reason) on.finish?.(choice.finish_reason);
    }
  }
  return false;
}

/** Merge streamed tool-call deltas into whole calls, by index. */
export function mergeToolCalls(calls, deltas) {
  for (const d of deltas) {
    const call = (calls[d.index] ??= { id: "", name: "", arguments: "" });
    if (d.id) call.id = d.id;
    if (d.function?.name) call.name += d.function.name;
    if (d.function?.arguments) call.arguments += d.function.arguments;
  }
  return calls;
}
