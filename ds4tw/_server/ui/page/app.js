// The chat page: the conversation (kept in the page only), one streamed
// answer at a time, its life on screen, Stop, and the API key prompt.
//
// The logic worth unit-testing lives in sse.js, stage.js, markdown.js and
// chat.js (tests/browser/js/); this module wires them to the DOM, and
// tests/browser/test_page.py drives it against a real server.

import { HTTPError, mergeToolCalls, streamChat } from "./chat.js";
import { renderMarkdown } from "./markdown.js";
import { Life, speed } from "./stage.js";

const KEY_STORAGE = "ds4tw.apiKey";

const $ = (id) => document.getElementById(id);

/** A new element with text (never HTML) and properties. */
function el(tag, props = {}, text = "") {
  const node = document.createElement(tag);
  Object.assign(node, props);
  if (text) node.textContent = text;
  return node;
}

/** The turns sent with each request: {role, content}, user and assistant. */
const conversation = [];

/** The answer streaming now: {controller, view}, or null. */
let running = null;

/** Bumped by New chat: an answer from before it must not come back. */
let epoch = 0;

/** One assistant answer on screen. */
class AnswerView {
  constructor(log) {
    this.epoch = epoch;
    this.life = new Life();
    this.root = el("article", { className: "msg assistant" });
    this.stage = el("p", { className: "stage" });
    this.stageText = el("span", { className: "stage-text" });
    this.bar = el("progress", { hidden: true });
    this.stage.append(this.stageText, this.bar);
    this.body = el("div", { className: "content md" });
    this.timeline = el("ol", { className: "life" });
    this.stats = el("p", { className: "stats" });
    this.root.append(this.stage, this.body, this.timeline, this.stats);
    log.append(this.root);
    this.content = "";
    this.usage = null;
    this.reasoning = "";
    this.reasoningBox = null;
    this.calls = [];
    this.callBoxes = [];
    this._pending = false;
    this.show();
  }

  /** Show the life's current stage (label, progress bar, timeline, status line). */
  show() {
    this.showAnswer();
    if (this.epoch === epoch) {
      const status = $("status");
      status.dataset.stage = this.life.stage;
      status.textContent = this.life.label;
    }
  }

  showAnswer() {
    const life = this.life;
    const { stage, detail } = life.current;
    this.root.dataset.stage = stage;
    this.stageText.textContent = life.label;
    const prefill = stage === "prefill" && detail.total;
    this.bar.hidden = !prefill;
    if (prefill) {
      this.bar.max = detail.total;
      this.bar.value = detail.done;
    }
    this.timeline.replaceChildren(
      ...life.timeline.map(({ stage: s, text }) => {
        const li = el("li", {}, text);
        li.dataset.stage = s;
        return li;
      }),
    );
    this.stats.textContent = speed(life, this.usage);
    if (this.reasoningBox !== null && stage !== "thinking") {
      const thought = life.timeline.find((t) => t.stage === "thinking");
      const took = thought ? ` (${thought.text.replace(/^thinking /, "")})` : "";
      this.reasoningSummary.textContent = `Reasoning${took}`;
    }
  }

  addReasoning(text) {
    if (this.reasoningBox === null) {
      // Folded: the answer is what matters; the reasoning is there to open.
      this.reasoningBox = el("details", { className: "reasoning" });
      this.reasoningSummary = el("summary", {}, "Thinking…");
      this.reasoningText = el("div", { className: "reasoning-text" });
      this.reasoningBox.append(this.reasoningSummary, this.reasoningText);
      this.root.insertBefore(this.reasoningBox, this.body);
    }
    this.reasoning += text;
    // Shown as plain text: reasoning is raw model output too.
    this.reasoningText.textContent = this.reasoning;
  }

  addContent(text) {
    this.content += text;
    this._render();
  }

  addToolCalls(deltas) {
    mergeToolCalls(this.calls, deltas);
    this.calls.forEach((call, i) => {
      if (!call) return;
      if (!this.callBoxes[i]) {
        const box = el("details", { className: "tool-call" });
        box.append(el("summary"), el("pre"));
        this.root.insertBefore(box, this.body);
        this.callBoxes[i] = box;
      }
      const [summary, pre] = this.callBoxes[i].children;
      summary.textContent = `tool call: ${call.name || "…"}`;
      pre.textContent = call.arguments;
    });
  }

  /** Re-render the Markdown at most once a frame, however fast tokens come. */
  _render() {
    if (this._pending) return;
    this._pending = true;
    requestAnimationFrame(() => this.flush());
  }

  flush() {
    this._pending = false;
    this.body.innerHTML = renderMarkdown(this.content);
  }
}

function addUserMessage(text) {
  $("log").append(el("article", { className: "msg user" }, text));
}

function scrollToEnd() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  if (!busy) $("prompt").focus();
}

/** Ask for the API key; resolves with it, or null when cancelled. */
function askKey(rejected) {
  const dialog = $("key-dialog");
  $("key-error").hidden = !rejected;
  $("api-key").value = "";
  dialog.showModal();
  return new Promise((resolve) => {
    const done = (value) => {
      $("key-form").onsubmit = null;
      $("key-cancel").onclick = null;
      dialog.onclose = null;
      dialog.close();
      resolve(value);
    };
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      done($("api-key").value.trim() || null);
    };
    $("key-cancel").onclick = () => done(null);
    dialog.onclose = () => done(null);
  });
}

/** streamChat, asking for the key on 401 and retrying with it. */
async function withKey(request, view) {
  for (;;) {
    try {
      return await streamChat({ ...request, apiKey: sessionStorage.getItem(KEY_STORAGE) });
    } catch (e) {
      if (!(e instanceof HTTPError) || e.status !== 401) throw e;
      view.stageText.textContent = "waiting for an API key";
      const key = await askKey(sessionStorage.getItem(KEY_STORAGE) !== null);
      if (key === null) throw e;
      sessionStorage.setItem(KEY_STORAGE, key);
    }
  }
}

function settings() {
  const body = {};
  const max = parseInt($("max-tokens").value, 10);
  if (max > 0) body.max_tokens = max;
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  return body;
}

async function send(text) {
  $("empty")?.remove();
  conversation.push({ role: "user", content: text });
  addUserMessage(text);
  const view = new AnswerView($("log"));
  const life = view.life;
  const controller = new AbortController();
  running = { controller, view };
  setBusy(true);
  scrollToEnd();
  const update = (changed) => {
    if (changed) view.show();
  };
  // Durations on the timeline go on counting between events.
  const ticker = setInterval(() => view.show(), 500);
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
  try {
    const complete = await withKey(
      {
        body: { messages, stream_options: { include_usage: true }, ...settings() },
        signal: controller.signal,
        on: {
          accepted: () => update(life.accepted()),
          comment: (text) => update(life.comment(text)),
          delta: (delta) => {
            if (delta.reasoning_content) view.addReasoning(delta.reasoning_content);
            if (delta.content) view.addContent(delta.content);
            if (delta.tool_calls) view.addToolCalls(delta.tool_calls);
            update(life.delta(delta));
            scrollToEnd();
          },
          finish: (reason) => update(life.finish(reason)),
          usage: (usage) => {
            view.usage = usage;
            view.show();
          },
          error: (message, code) => update(life.failed(message, code)),
        },
      },
      view,
    );
    if (!complete && !life.final) update(life.failed("the stream ended before it was complete"));
    else if (!life.final) update(life.finish(null));
  } catch (e) {
    if (e.name === "AbortError") update(life.stopped());
    else update(life.failed(e.message || String(e), e.code ?? null));
  } finally {
    clearInterval(ticker);
    view.flush();
    view.show();
    // What was written stays in the conversation, stopped or not (unless
    // New chat threw the conversation away meanwhile).
    if (view.content && view.epoch === epoch) {
      conversation.push({ role: "assistant", content: view.content });
    }
    running = null;
    setBusy(false);
    scrollToEnd();
    refreshServer();
  }
}

/** The model's name and the server's slots, from /health (no key needed). */
async function refreshServer() {
  try {
    const health = await (await fetch("health", { cache: "no-store" })).json();
    $("model").textContent = health.model ?? "";
    const slots = health.slots === 1 ? "1 slot" : `${health.slots} slots`;
    $("server").textContent = `${slots} · ${health.status}`;
  } catch {
    $("server").textContent = "server unreachable";
  }
}

function main() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running !== null) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  // Stop: abort the fetch. The server sees the connection close and
  // cancels the job at whatever stage it is in.
  $("stop").addEventListener("click", () => running?.controller.abort());
  $("new-chat").addEventListener("click", () => {
    epoch += 1;
    running?.controller.abort();
    conversation.length = 0;
    $("log").replaceChildren();
    $("status").textContent = "ready";
    $("status").dataset.stage = "idle";
  });
  refreshServer();
  $("prompt").focus();
}

main();
