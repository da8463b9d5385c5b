// Imports every suite, runs them, and publishes the results for pytest.
import { runAll } from "./harness.js";
import "./test_sse.js";
import "./test_stage.js";
import "./test_markdown.js";
import "./test_chat.js";
import "./test_models.js";

const results = await runAll();
document.getElementById("results").textContent = results
  .map((r) => `${r.ok ? "ok  " : "FAIL"} ${r.suite}: ${r.name}${r.ok ? "" : " — " + r.error}`)
  .join("\n");
window.__results = results;
