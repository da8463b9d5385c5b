// The chat page: the conversation (kept in the page only), one streamed
// answer at a time, its life on screen, Stop, the API key prompt, and the
// model picker.
//
// The logic worth unit-testing lives in sse.js, stage.js, markdown.js,
// chat.js and models.js (tests/browser/js/); this module wires them to
// the DOM, and tests/browser/test_page.py and test_models.py drive it
// against real servers.

import { HTTPError, mergeToolCalls, streamChat } from "./chat.js";
import { renderMarkdown } from "./markdown.js";
import { choose, listModels, optionLabel, optionTitle, storageKey } from "./models.js";
import { Life, speed } from "./stage.js";

const KEY_STORAGE = "ds4tw.apiKey";
/** The picked model, remembered across reloads: a choice, not a secret. */
const MODEL_STORAGE = storageKey(location.pathname);

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

/** The server's chat models, as last listed: [{id, state, ...}]. */
let models = [];

/** The model the next turn goes to (null when the server named none). */
function currentModel() {
  return $("model-select").value || models[0]?.id || null;
}

/** One assistant answer on screen. */
class AnswerView {
  constructor(log) {
    this.epoch = epoch;
    /** Said under the answer when the server has several models. */
    this.model = null;
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
    const loading = stage === "loading" && Number.isFinite(detail.percent);
    this.bar.hidden = !prefill && !loading;
    if (prefill) {
      this.bar.max = detail.total;
      this.bar.value = detail.done;
    } else if (loading) {
      this.bar.max = 100;
      this.bar.value = detail.percent;
    }
    this.timeline.replaceChildren(
      ...life.timeline.map(({ stage: s, text }) => {
        const li = el("li", {}, text);
        li.dataset.stage = s;
        return li;
      }),
    );
    this.stats.textContent = [this.model, speed(life, this.usage)].filter(Boolean).join(" · ");
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
      refreshModels(); // v1/models answers now: the picker learns what /health did not say
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
  // A server with several models answers only a request that names one;
  // one with a single model is sent its name too.
  if (currentModel() === null) await refreshModels();
  const model = currentModel();
  if (models.length > 1) view.model = model;
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
        body: {
          ...(model === null ? {} : { model }),
          messages,
          stream_options: { include_usage: true },
          ...settings(),
        },
        signal: controller.signal,
        on: {
          accepted: () => update(life.accepted()),
          comment: (text) => {
            const before = life.stage;
            update(life.comment(text));
            // The picker says "loading now" while this turn waits for the load.
            if (life.stage === "loading" && before !== "loading") refreshModels();
          },
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
    refreshModels(); // the model that answered is loaded now; another may be gone
  }
}

/** The picked model's slots and the server's status, from /health (no key needed). */
async function refreshServer() {
  try {
    const health = await (await fetch("health", { cache: "no-store" })).json();
    const mine = (health.models ?? []).find((m) => m.name === currentModel());
    const n = mine?.slots ?? health.slots;
    const slots = n === 1 ? "1 slot" : `${n} slots`;
    $("server").textContent = `${slots} · ${health.status}`;
  } catch {
    $("server").textContent = "server unreachable";
  }
}

/** Fill the picker: one option per chat model, saying whether it is loaded now. */
function showModels(list) {
  const select = $("model-select");
  const remembered = localStorage.getItem(MODEL_STORAGE);
  const picked = choose(list, select.value || remembered);
  const byId = new Map([...select.options].map((o) => [o.value, o]));
  const options = list.map((m) => {
    const option = byId.get(m.id) ?? el("option", { value: m.id });
    option.textContent = optionLabel(m);
    option.title = optionTitle(m);
    option.dataset.state = m.state;
    return option;
  });
  // Updated in place when the set is the same: an open picker stays open.
  const same =
    options.length === select.options.length && options.every((o, i) => select.options[i] === o);
  if (!same) select.replaceChildren(...options);
  if (picked !== null) select.value = picked;
  models = list;
  // One model: nothing to pick; its name is shown as before the picker.
  const several = list.length > 1;
  $("model-picker").hidden = !several;
  $("model").hidden = several;
  $("model").textContent = several ? "" : (list[0]?.id ?? "");
}

/** The listing in flight, and whether another was asked for meanwhile. */
let listing = null;
let listAgain = false;

/**
 * Ask the server for its models again: one request at a time, and one
 * more after it when asked meanwhile (the answer in flight may be older
 * than what the caller knows changed).
 */
function refreshModels() {
  if (listing !== null) {
    listAgain = true;
    return listing;
  }
  listing = listModels({ apiKey: sessionStorage.getItem(KEY_STORAGE) })
    .then(showModels)
    .catch(() => {
      // The server is unreachable: /health's line says so; keep what the picker shows.
    })
    .finally(() => {
      listing = null;
      if (listAgain) {
        listAgain = false;
        refreshModels();
      }
    });
  return listing;
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
  const select = $("model-select");
  // Whether each model is loaded changes under the page: ask again when
  // the user comes to choose.
  select.addEventListener("focus", () => refreshModels());
  select.addEventListener("change", () => {
    localStorage.setItem(MODEL_STORAGE, select.value);
    refreshServer();
  });
  refreshModels().then(refreshServer);
  $("prompt").focus();
}

main();
