// The life of one streamed answer, as the page shows it: which stage it
// is in now, what the server said about it, and how long each stage took.
//
// The server's part comes from SSE comments (docs/ui.md): "loading 40%"
// (the model the request asked for is being loaded), "queued 2" (place in
// the queue, 1 is next), "prefill 1024/3641" (prompt tokens processed, of
// all), "decode"; without numbers too, as every ds4tw keepalive says them.
// The rest comes from the chunks themselves: reasoning deltas mean
// thinking, content deltas writing, tool-call deltas a tool call; then the
// end, however it came.
// Tested in the browser by tests/browser/js/test_stage.js.

/** Stages after which nothing changes any more. */
export const FINAL = new Set(["done", "stopped", "cancelled", "error"]);

/** Stages of generation (after the prompt), in which a "decode" comment changes nothing. */
const GENERATING = new Set(["generating", "thinking", "writing", "tool"]);

/** Stages the timeline shows only when they lasted. */
const BRIEF = new Set(["loading", "queued", "generating"]);

const ORDER = [
  "connecting", "loading", "queued", "prefill", "generating", "thinking", "writing", "tool",
];

/**
 * A stage comment's meaning, or null for a comment that is not one.
 * @param {string} text the comment, without its colon
 * @returns {{stage: "loading", percent: number | null}
 *   | {stage: "queued", position: number | null}
 *   | {stage: "prefill", done: number | null, total: number | null}
 *   | {stage: "decode"} | null}
 */
export function parseComment(text) {
  const loading = /^loading(?: +(\d+)%)? *$/.exec(text);
  if (loading !== null) {
    const percent = loading[1] === undefined ? null : Math.min(100, Number(loading[1]));
    return { stage: "loading", percent };
  }
  const m = /^(queued|prefill|decode)(?: +(\d+)(?:\/(\d+))?)? *$/.exec(text);
  if (m === null) return null;
  const [, stage, a, b] = m;
  if (stage === "queued") {
    return { stage, position: a !== undefined && b === undefined ? Number(a) : null };
  }
  if (stage === "prefill") {
    if (a === undefined || b === undefined) return { stage, done: null, total: null };
    return { stage, done: Number(a), total: Number(b) };
  }
  return a === undefined ? { stage } : null;
}

/** 1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st. */
export function ordinal(n) {
  const teen = n % 100 >= 11 && n % 100 <= 13;
  const suffix = teen ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] ?? "th");
  return `${n}${suffix}`;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}

export class Life {
  /** @param {() => number} now milliseconds (performance.now by default) */
  constructor(now = () => performance.now()) {
    this.now = now;
    /** @type {{stage: string, start: number, end: number | null, detail: object}[]} */
    this.history = [];
    this.enter("connecting", {});
  }

  get current() {
    return this.history[this.history.length - 1];
  }

  get stage() {
    return this.current.stage;
  }

  get final() {
    return FINAL.has(this.stage);
  }

  /**
   * Move to a stage (or update the current one's detail). Returns whether
   * anything changed.
   */
  enter(stage, detail = {}) {
    const last = this.history.length ? this.current : null;
    if (last !== null && FINAL.has(last.stage)) return false;
    const t = this.now();
    if (last !== null && last.stage === stage) {
      last.detail = { ...last.detail, ...detail };
      return true;
    }
    if (last !== null) last.end = t;
    this.history.push({ stage, start: t, end: FINAL.has(stage) ? t : null, detail });
    return true;
  }

  /** The response's headers arrived: the request is in; wait for what the server says. */
  accepted() {
    return this.stage === "connecting" ? this.enter("queued", { position: null }) : false;
  }

  /** A comment line of the stream. */
  comment(text) {
    const said = parseComment(text);
    if (said === null) return false;
    // A late word about an earlier stage never moves the page backwards.
    const at = ORDER.indexOf(this.stage);
    if (said.stage === "decode") {
      if (GENERATING.has(this.stage) || at === -1) return false;
      return this.enter("generating");
    }
    const { stage, ...detail } = said;
    if (stage === "loading" && this.stage === "queued" && !this.current.detail.position) {
      // "queued" was the page's guess when the headers came (accepted());
      // the server's first word says the wait is for the model instead.
      Object.assign(this.current, { stage, detail });
      return true;
    }
    if (at === -1 || at > ORDER.indexOf(said.stage)) return false;
    return this.enter(stage, detail);
  }

  /** One chunk's delta (OpenAI chat shape). */
  delta(delta) {
    if (delta.tool_calls && delta.tool_calls.length) return this.enter("tool");
    if (delta.reasoning_content) return this.enter("thinking");
    if (delta.content) return this.enter("writing");
    if (delta.role && ORDER.indexOf(this.stage) < ORDER.indexOf("generating")) {
      return this.enter("generating");
    }
    return false;
  }

  /** The finish chunk: why the model stopped (stop, length, tool_calls). */
  finish(reason) {
    return this.enter("done", { reason });
  }

  /** The user pressed Stop: the page aborted the request. */
  stopped() {
    return this.enter("stopped", { during: this.stage });
  }

  /**
   * The stream ended with an error. The server ending a turn itself (it is
   * shutting down) is "cancelled"; anything else an "error".
   */
  failed(message, code = null) {
    const cancelled = code === "server_shutting_down";
    return this.enter(cancelled ? "cancelled" : "error", { message, code, during: this.stage });
  }

  /** What the status line says now. */
  get label() {
    const { stage, detail } = this.current;
    switch (stage) {
      case "connecting":
        return "sending…";
      case "loading":
        return detail.percent === null || detail.percent === undefined
          ? "loading the model"
          : `loading the model ${detail.percent}%`;
      case "queued":
        return detail.position ? `queued: ${ordinal(detail.position)} in line` : "queued";
      case "prefill": {
        if (detail.total === null || detail.total === undefined) return "prefill";
        const pct = detail.total > 0 ? Math.floor((100 * detail.done) / detail.total) : 0;
        return `prefill ${detail.done}/${detail.total} (${pct}%)`;
      }
      case "generating":
        return "generating";
      case "thinking":
        return "thinking";
      case "writing":
        return "writing";
      case "tool":
        return "calling a tool";
      case "done":
        return detail.reason && detail.reason !== "stop" ? `done (${detail.reason})` : "done";
      case "stopped":
        return `stopped during ${STAGE_WORDS[detail.during] ?? detail.during}`;
      case "cancelled":
        return `cancelled by the server: ${detail.message}`;
      default:
        return `error: ${detail.message}`;
    }
  }

  /**
   * The stages so far with their durations, for the timeline under an
   * answer. A wait of a moment is left out: a model load that was over at
   * once, "queued" when a slot was free,
   * "generating" when the first token was text at once (a long one is
   * hidden reasoning, worth showing).
   */
  get timeline() {
    const now = this.now();
    return this.history
      .filter((h) => h.stage !== "connecting" && !FINAL.has(h.stage))
      .filter((h) => !BRIEF.has(h.stage) || (h.end ?? now) - h.start >= 100)
      .map((h) => {
        let what = STAGE_WORDS[h.stage] ?? h.stage;
        if (h.stage === "prefill" && h.detail.total) what = `prefill ${h.detail.total} tokens`;
        return { stage: h.stage, text: `${what} ${seconds((h.end ?? now) - h.start)}` };
      });
  }
}

/**
 * "55 tokens · 72 tok/s": the answer's completion tokens (from the usage
 * chunk) over the time from the end of prefill to the end.
 */
export function speed(life, usage) {
  if (!usage || !usage.completion_tokens) return "";
  const from = life.history.find((h) => GENERATING.has(h.stage));
  const to = life.final ? life.current.start : life.now();
  const n = usage.completion_tokens;
  const text = `${n} token${n === 1 ? "" : "s"}`;
  if (!from || to - from.start < 50) return text;
  return `${text} · ${((1000 * n) / (to - from.start)).toFixed(0)} tok/s`;
}

const STAGE_WORDS = {
  connecting: "sending",
  loading: "model load",
  queued: "queued",
  prefill: "prefill",
  generating: "generating",
  thinking: "thinking",
  writing: "writing",
  tool: "tool call",
};
