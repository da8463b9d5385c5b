// Server-sent events, parsed by hand from a fetch() body.
//
// EventSource cannot POST, and it drops comment lines; ds4tw's stage
// reports (": queued 2", ": prefill 1024/3641", ": decode") are comments,
// so the page reads the stream itself. This follows the WHATWG "event
// stream interpretation": lines end in CRLF, LF or CR (a CR may end one
// network chunk and its LF start the next), a leading BOM is dropped, one
// space after a colon is dropped, data lines join with "\n", an empty line
// dispatches, and an event still open when the stream ends is discarded.
// Tested in the browser by tests/browser/js/test_sse.js.

/**
 * @typedef {{type: "comment", text: string}} Comment
 * @typedef {{type: "event", event: string, data: string, id: string}} Event
 */

export class SSEParser {
  constructor() {
    this._buffer = "";
    this._first = true;
    this._skipLF = false;
    this._data = [];
    this._event = "";
    this.lastEventId = "";
  }

  /**
   * Feed decoded text; get back the comments and events it completed.
   * @param {string} text
   * @returns {(Comment | Event)[]}
   */
  push(text) {
    if (this._first && text.length > 0) {
      this._first = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this._skipLF && text.length > 0) {
      this._skipLF = false;
      if (text[0] === "\n") text = text.slice(1);
    }
    this._buffer += text;
    const out = [];
    let start = 0;
    for (;;) {
      const cr = this._buffer.indexOf("\r", start);
      const lf = this._buffer.indexOf("\n", start);
      let end;
      if (cr === -1 && lf === -1) break;
      if (cr === -1 || (lf !== -1 && lf < cr)) end = lf;
      else end = cr;
      const line = this._buffer.slice(start, end);
      start = end + 1;
      if (this._buffer[end] === "\r") {
        if (start === this._buffer.length) this._skipLF = true;
        else if (this._buffer[start] === "\n") start += 1;
      }
      this._line(line, out);
    }
    this._buffer = this._buffer.slice(start);
    return out;
  }

  /** The stream ended: an event without its blank line is dropped, as the spec says. */
  end() {
    this._buffer = "";
    this._data = [];
    this._event = "";
  }

  _line(line, out) {
    if (line === "") {
      if (this._data.length > 0) {
        out.push({
          type: "event",
          event: this._event || "message",
          data: this._data.join("\n"),
          id: this.lastEventId,
        });
      }
      this._data = [];
      this._event = "";
      return;
    }
    if (line[0] === ":") {
      out.push({ type: "comment", text: dropSpace(line.slice(1)) });
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    const value = colon === -1 ? "" : dropSpace(line.slice(colon + 1));
    if (field === "data") this._data.push(value);
    else if (field === "event") this._event = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    // "retry" and unknown fields: nothing this page needs.
  }
}

function dropSpace(s) {
  return s[0] === " " ? s.slice(1) : s;
}

/**
 * The comments and events of a response body, as they arrive. UTF-8 is
 * decoded in streaming mode: a character split across two network chunks
 * is held until its last byte.
 * @param {ReadableStream<Uint8Array>} body
 * @returns {AsyncGenerator<Comment | Event>}
 */
export async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  const parser = new SSEParser();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    yield* parser.push(decoder.decode());
    parser.end();
  } finally {
    reader.releaseLock();
  }
}
