// sse.js: the SSE parser, comments included, across any chunking.
import { SSEParser, readEvents } from "../ui/sse.js";
import { assertEqual, test } from "./harness.js";

const S = "sse";

function parseAll(chunks) {
  const p = new SSEParser();
  const out = [];
  for (const c of chunks) out.push(...p.push(c));
  p.end();
  return out;
}

const STREAM =
  ": queued 2\n\n" +
  ": prefill 1024/3641\n\n" +
  'data: {"a":1}\n\n' +
  "event: error\ndata: line one\ndata: line two\n\n" +
  "id: 7\ndata: [DONE]\n\n";

const EXPECTED = [
  { type: "comment", text: "queued 2" },
  { type: "comment", text: "prefill 1024/3641" },
  { type: "event", event: "message", data: '{"a":1}', id: "" },
  { type: "event", event: "error", data: "line one\nline two", id: "" },
  { type: "event", event: "message", data: "[DONE]", id: "7" },
];

test(S, "a whole stream: comments, events, multi-line data, event names, ids", () => {
  assertEqual(parseAll([STREAM]), EXPECTED);
});

test(S, "the same stream split at every possible point", () => {
  for (let i = 0; i <= STREAM.length; i++) {
    assertEqual(parseAll([STREAM.slice(0, i), STREAM.slice(i)]), EXPECTED, `split at ${i}`);
  }
});

test(S, "the same stream one character at a time", () => {
  assertEqual(parseAll([...STREAM]), EXPECTED);
});

test(S, "CRLF and CR line ends, even a CR and its LF in two chunks", () => {
  assertEqual(parseAll([STREAM.replaceAll("\n", "\r\n")]), EXPECTED);
  assertEqual(parseAll([STREAM.replaceAll("\n", "\r")]), EXPECTED);
  // Were the LF taken for a second line end, "a" and "b" would be two events.
  assertEqual(parseAll(["data: a\r", "\ndata: b\r\n\r\n"]), [
    { type: "event", event: "message", data: "a\nb", id: "" },
  ]);
});

test(S, "a comment needs no space, and only one space is dropped", () => {
  assertEqual(parseAll([":decode\n:  two\n:\n\n"]), [
    { type: "comment", text: "decode" },
    { type: "comment", text: " two" },
    { type: "comment", text: "" },
  ]);
});

test(S, "a leading BOM is dropped; a blank line with no data dispatches nothing", () => {
  assertEqual(parseAll(["\ufeffdata: x\n\n\n\nevent: lonely\n\n"]), [
    { type: "event", event: "message", data: "x", id: "" },
  ]);
});

test(S, "an event without its blank line at the end of the stream is dropped", () => {
  assertEqual(parseAll(['data: {"cut": "here"}\n']), []);
});

test(S, "a field without a colon, and unknown fields", () => {
  assertEqual(parseAll(["data\nretry: 10\nfoo: bar\n\n"]), [
    { type: "event", event: "message", data: "", id: "" },
  ]);
});

function streamOf(chunks) {
  return new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(c);
      controller.close();
    },
  });
}

test(S, "readEvents: UTF-8 split inside a character, CRLF split across chunks", async () => {
  const bytes = new TextEncoder().encode(": decode\r\n\r\ndata: 5 €\r\n\r\n");
  const euro = bytes.indexOf(0xe2);
  const crlf = bytes.indexOf(0x0d);
  const cuts = [crlf + 1, euro + 1, euro + 2];
  const chunks = [];
  let from = 0;
  for (const cut of cuts) {
    chunks.push(bytes.slice(from, cut));
    from = cut;
  }
  chunks.push(bytes.slice(from));
  const got = [];
  for await (const item of readEvents(streamOf(chunks))) got.push(item);
  assertEqual(got, [
    { type: "comment", text: "decode" },
    { type: "event", event: "message", data: "5 €", id: "" },
  ]);
});
