// Model output to safe HTML: Markdown by marked, then DOMPurify.
//
// Model output is untrusted text. Raw HTML in it is shown as text (the
// renderer escapes it: a model that writes "<script>" means the word), and
// DOMPurify cleans whatever Markdown itself produces (javascript: links and
// the like) against an allow-list. The page's Content-Security-Policy
// forbids inline script and enforces Trusted Types as well, so a gap here
// would still not run code; the tests check this layer on its own.
// Tested in the browser by tests/browser/js/test_markdown.js.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const marked = new Marked({
  gfm: true,
  breaks: false,
  renderer: {
    // Block and inline HTML alike: shown, never parsed.
    html({ text }) {
      return escapeHtml(text);
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true },
  // No images, forms, styles or frames from model output: nothing that
  // loads, submits or restyles the page.
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOW_DATA_ATTR: false,
  RETURN_TRUSTED_TYPE: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  // Links open elsewhere and tell the target nothing about this page.
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/**
 * Markdown to sanitised HTML, as a TrustedHTML where the browser has
 * Trusted Types (assign it to innerHTML as is).
 * @param {string} text
 */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text, { async: false }), PURIFY);
}
