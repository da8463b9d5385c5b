// A very small test harness for the page's modules, run in Chromium by
// tests/browser/test_js_units.py, which reads window.__results.

const tests = [];

/** Register a test of suite `suite` (the pytest parameter that reports it). */
export function test(suite, name, fn) {
  tests.push({ suite, name, fn });
}

export class AssertionError extends Error {
  name = "AssertionError";
}

export function assert(condition, message = "assertion failed") {
  if (!condition) throw new AssertionError(message);
}

function show(value) {
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

export function assertEqual(actual, expected, message = "") {
  const a = show(actual);
  const e = show(expected);
  if (a !== e) throw new AssertionError(`${message ? message + ": " : ""}${a} !== ${e}`);
}

export async function assertRejects(promise, check, message = "expected a rejection") {
  try {
    await promise;
  } catch (e) {
    check(e);
    return;
  }
  throw new AssertionError(message);
}

/** Run every registered test; returns [{suite, name, ok, error}]. */
export async function runAll() {
  const results = [];
  for (const t of tests) {
    try {
      await t.fn();
      results.push({ suite: t.suite, name: t.name, ok: true, error: null });
    } catch (e) {
      results.push({ suite: t.suite, name: t.name, ok: false, error: `${e.name}: ${e.message}` });
    }
  }
  return results;
}
