// stage.js: what the status line says, from comments and deltas.
import { Life, ordinal, parseComment, speed } from "../ui/stage.js";
import { assert, assertEqual, test } from "./harness.js";

const S = "stage";

/** A Life on a clock the test moves. */
function lifeAt() {
  const clock = { t: 0 };
  const life = new Life(() => clock.t);
  return { life, clock };
}

test(S, "parseComment: ds4tw's stage comments, with and without numbers", () => {
  assertEqual(parseComment("queued"), { stage: "queued", position: null });
  assertEqual(parseComment("queued 2"), { stage: "queued", position: 2 });
  assertEqual(parseComment("prefill"), { stage: "prefill", done: null, total: null });
  assertEqual(parseComment("prefill 1024/3641"), { stage: "prefill", done: 1024, total: 3641 });
  assertEqual(parseComment("decode"), { stage: "decode" });
});

test(S, "parseComment: other comments are not stages", () => {
  for (const text of ["", "keep-alive", "ping", "decode 3", "queued two", "prefilling", " queued"]) {
    assertEqual(parseComment(text), null, JSON.stringify(text));
  }
});

test(S, "ordinal", () => {
  const got = [1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112].map(ordinal);
  assertEqual(got, ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd",
    "101st", "111th", "112th"]);
});

test(S, "a whole life: queued, prefill with progress, thinking, writing, done", () => {
  const { life, clock } = lifeAt();
  assertEqual(life.label, "sending…");
  life.accepted();
  assertEqual(life.label, "queued");
  life.comment("queued 2");
  assertEqual(life.label, "queued: 2nd in line");
  clock.t = 1000;
  life.comment("queued 1");
  assertEqual(life.label, "queued: 1st in line");
  clock.t = 2500;
  life.comment("prefill 0/3641");
  assertEqual(life.label, "prefill 0/3641 (0%)");
  life.comment("prefill 1024/3641");
  assertEqual(life.label, "prefill 1024/3641 (28%)");
  assertEqual(life.stage, "prefill");
  clock.t = 4000;
  life.comment("decode");
  assertEqual(life.label, "generating");
  life.delta({ role: "assistant", content: "" });
  assertEqual(life.stage, "generating");
  life.delta({ reasoning_content: "hmm" });
  assertEqual(life.label, "thinking");
  clock.t = 5000;
  life.comment("decode"); // a keepalive while thinking changes nothing
  assertEqual(life.label, "thinking");
  life.delta({ content: "Hello" });
  assertEqual(life.label, "writing");
  clock.t = 6000;
  life.finish("stop");
  assertEqual(life.label, "done");
  assert(life.final);
  assertEqual(life.timeline, [
    { stage: "queued", text: "queued 2.5 s" },
    { stage: "prefill", text: "prefill 3641 tokens 1.5 s" },
    // no "generating": the first token came at once
    { stage: "thinking", text: "thinking 1.0 s" },
    { stage: "writing", text: "writing 1.0 s" },
  ]);
  assertEqual(speed(life, { completion_tokens: 40 }), "40 tokens · 20 tok/s");
  assertEqual(speed(life, { completion_tokens: 1 }), "1 token · 1 tok/s");
  assertEqual(speed(life, null), "");
});

test(S, "hidden reasoning: a long 'generating' is on the timeline", () => {
  const { life, clock } = lifeAt();
  life.accepted();
  life.comment("prefill 0/10");
  clock.t = 100;
  life.comment("decode");
  clock.t = 3100;
  life.delta({ content: "x" });
  // No "queued" either: a slot was free at once.
  assertEqual(life.timeline.map((t) => t.text), ["prefill 10 tokens 0.1 s", "generating 3.0 s",
    "writing 0.0 s"]);
});

test(S, "a late or repeated word never moves the page backwards", () => {
  const { life } = lifeAt();
  life.accepted();
  life.comment("prefill 10/20");
  assertEqual(life.comment("queued 1"), false);
  assertEqual(life.label, "prefill 10/20 (50%)");
  life.delta({ content: "x" });
  assertEqual(life.comment("prefill 20/20"), false);
  assertEqual(life.comment("decode"), false);
  assertEqual(life.label, "writing");
});

test(S, "a plain keepalive (no numbers) still names the stage", () => {
  const { life } = lifeAt();
  life.accepted();
  life.comment("prefill");
  assertEqual(life.label, "prefill");
});

test(S, "nothing changes after the end", () => {
  const { life } = lifeAt();
  life.accepted();
  life.finish("length");
  assertEqual(life.label, "done (length)");
  assertEqual(life.comment("decode"), false);
  assertEqual(life.delta({ content: "late" }), false);
  assertEqual(life.stopped(), false);
  assertEqual(life.label, "done (length)");
});

test(S, "Stop says where it stopped", () => {
  const { life } = lifeAt();
  life.accepted();
  life.comment("prefill 5/100");
  life.stopped();
  assertEqual(life.stage, "stopped");
  assertEqual(life.label, "stopped during prefill");
  const queued = lifeAt().life;
  queued.accepted();
  queued.comment("queued 3");
  queued.stopped();
  assertEqual(queued.label, "stopped during queued");
});

test(S, "the server cutting a turn off is 'cancelled'; other errors are errors", () => {
  const a = lifeAt().life;
  a.accepted();
  a.failed("the server shut down before this response was complete; retry", "server_shutting_down");
  assertEqual(a.stage, "cancelled");
  assert(a.label.startsWith("cancelled by the server: the server shut down"), a.label);
  const b = lifeAt().life;
  b.failed("generation failed: boom", "engine_error");
  assertEqual(b.stage, "error");
  assertEqual(b.label, "error: generation failed: boom");
});

test(S, "tool-call deltas", () => {
  const { life } = lifeAt();
  life.accepted();
  life.delta({ tool_calls: [{ index: 0, function: { name: "f", arguments: "" } }] });
  assertEqual(life.label, "calling a tool");
});

test(S, "parseComment: a model being loaded, with and without its progress", () => {
  assertEqual(parseComment("loading"), { stage: "loading", percent: null });
  assertEqual(parseComment("loading 40%"), { stage: "loading", percent: 40 });
  assertEqual(parseComment("loading 0%"), { stage: "loading", percent: 0 });
  for (const text of ["loading 40", "loading %", "loading 4/10", "loading forty%", "loaded"]) {
    assertEqual(parseComment(text), null, JSON.stringify(text));
  }
});

test(S, "a model loaded on demand: loading N%, then prefill, then text", () => {
  const { life, clock } = lifeAt();
  life.accepted();
  assertEqual(life.label, "queued");
  life.comment("loading 0%");
  // The page's guess ("queued" at the headers) gives way: no queued stage left behind.
  assertEqual([life.stage, life.label], ["loading", "loading the model 0%"]);
  clock.t = 1200;
  life.comment("loading 40%");
  assertEqual(life.label, "loading the model 40%");
  assertEqual(life.current.detail, { percent: 40 });
  clock.t = 2500;
  life.comment("prefill 0/12");
  assertEqual(life.label, "prefill 0/12 (0%)");
  assertEqual(life.comment("loading 90%"), false, "a late load report");
  clock.t = 2600;
  life.comment("decode");
  life.delta({ content: "Hi" });
  clock.t = 3000;
  life.finish("stop");
  assertEqual(life.timeline.map((t) => t.text), [
    "model load 2.5 s", "prefill 12 tokens 0.1 s", "writing 0.4 s",
  ]);
});

test(S, "loading, then queued behind the requests that waited with it", () => {
  const { life } = lifeAt();
  life.accepted();
  life.comment("loading 70%");
  life.comment("queued 2");
  assertEqual(life.label, "queued: 2nd in line");
  assertEqual(life.comment("loading 100%"), false);
  life.stopped();
  assertEqual(life.label, "stopped during queued");
  const early = lifeAt().life;
  early.accepted();
  early.comment("loading");
  assertEqual(early.label, "loading the model");
  early.stopped();
  assertEqual(early.label, "stopped during model load");
});

test(S, "a load over at once is left off the timeline", () => {
  const { life, clock } = lifeAt();
  life.accepted();
  life.comment("loading 100%");
  clock.t = 20;
  life.comment("decode");
  clock.t = 500;
  life.delta({ content: "x" });
  assertEqual(life.timeline.map((t) => t.stage), ["generating", "writing"]);
});
