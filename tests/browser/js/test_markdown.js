// markdown.js: Markdown rendered, model-written HTML shown as text, nothing unsafe left.
import { escapeHtml, renderMarkdown } from "../ui/markdown.js";
import { assert, assertEqual, test } from "./harness.js";

const S = "markdown";

/** Render into a detached element, as the page does (innerHTML, TrustedHTML). */
function render(text) {
  const div = document.createElement("div");
  div.innerHTML = renderMarkdown(text);
  return div;
}

test(S, "Markdown: emphasis, lists, code blocks with their language", () => {
  const div = render("**bold** and `x`\n\n- one\n- two\n\n```python\nprint('<b>')\n```\n");
  assertEqual(div.querySelector("strong").textContent, "bold");
  assertEqual(div.querySelectorAll("li").length, 2);
  const code = div.querySelector("pre > code.language-python");
  assert(code !== null, div.innerHTML);
  assertEqual(code.textContent, "print('<b>')\n");
  assertEqual(div.querySelector("b"), null);
});

test(S, "a script the model writes is text on the page, never an element", () => {
  window.__pwned = undefined;
  for (const text of [
    "<script>window.__pwned = 1</script>",
    "Here: <script>window.__pwned = 1</script> done",
    "<SCRIPT SRC=x></SCRIPT>",
  ]) {
    const div = render(text);
    document.body.append(div); // connected, so a script would run if one were there
    assertEqual(div.querySelector("script"), null, text);
    assert(div.textContent.toLowerCase().includes("<script"), div.textContent);
    div.remove();
  }
  assertEqual(window.__pwned, undefined);
});

test(S, "HTML tags and event handlers are shown, not parsed", () => {
  const div = render('<img src=x onerror="window.__pwned = 2"> <b>bold?</b>\n\n<div onclick="x()">d</div>');
  assertEqual(div.querySelector("img, b, div"), null, div.innerHTML);
  assert(div.textContent.includes("<img src=x onerror="), div.textContent);
  assert(div.textContent.includes("<b>bold?</b>"), div.textContent);
  assertEqual(div.querySelector("[onerror], [onclick]"), null);
});

test(S, "javascript: links lose their href; images never load", () => {
  const div = render("[click](javascript:alert(1)) [data](data:text/html,hi) ![i](http://192.0.2.1/x.png)");
  for (const a of div.querySelectorAll("a")) {
    const href = a.getAttribute("href") ?? "";
    assert(!/^\s*(javascript|data):/i.test(href), href);
  }
  assertEqual(div.querySelector("img"), null, div.innerHTML);
});

test(S, "links open elsewhere and leak nothing", () => {
  const a = render("[ds4tw](https://example.org/ds4tw)").querySelector("a");
  assertEqual(a.getAttribute("href"), "https://example.org/ds4tw");
  assertEqual(a.getAttribute("target"), "_blank");
  assertEqual(a.getAttribute("rel"), "noopener noreferrer");
});

test(S, "a half-written answer renders (an open code fence mid-stream)", () => {
  const div = render("Try this:\n\n```js\nconst x = '<script>';");
  assertEqual(div.querySelector("script"), null);
  assert(div.querySelector("pre > code") !== null, div.innerHTML);
});

test(S, "the page's CSP enforces Trusted Types: a plain string cannot reach innerHTML", () => {
  const div = document.createElement("div");
  let threw = false;
  try {
    div.innerHTML = "<b>x</b>";
  } catch (e) {
    threw = e instanceof TypeError;
  }
  assert(threw, "assigning a string to innerHTML should throw under require-trusted-types-for");
  assert(window.trustedTypes.isHTML(renderMarkdown("x")), "renderMarkdown returns TrustedHTML");
});

test(S, "escapeHtml", () => {
  assertEqual(escapeHtml(`<a href="x">'&'</a>`), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
});
