// models.js: which models the picker offers, what each option says, the
// choice kept, and where the list comes from (a scripted fetch).
import { HTTPError } from "../ui/chat.js";
import {
  HEALTH_URL,
  MODELS_URL,
  chatModels,
  choose,
  listModels,
  modelsFromHealth,
  optionLabel,
  optionTitle,
  storageKey,
} from "../ui/models.js";
import { assert, assertEqual, assertRejects, test } from "./harness.js";

const S = "models";

const card = (id, meta) => ({ id, object: "model", created: 1, owned_by: "ds4tw", meta });

/** What a ds4tw server with two chat models, an alias and an embedder lists. */
const FLEET = {
  object: "list",
  data: [
    card("big", { n_ctx: 8192, kind: "chat", loaded: true, state: "ready",
      aliases: ["claude-*", "gpt-big"] }),
    card("gpt-big", { n_ctx: 8192, kind: "chat", loaded: true, state: "ready",
      aliases: ["claude-*", "gpt-big"], alias_of: "big" }),
    card("small", { n_ctx: 4096, kind: "chat", loaded: false, state: "unloaded", aliases: [] }),
    card("embed", { n_ctx: 512, kind: "embedding", loaded: false, state: "unloaded", aliases: [] }),
    card("mid", { n_ctx: 4096, kind: "chat", loaded: false, state: "loading", aliases: [] }),
  ],
};

/** A fetch answering each URL from `answers` ({status, json} or an Error to throw). */
function scriptedFetch(answers) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    const answer = answers[url];
    if (answer === undefined) throw new TypeError(`unexpected fetch of ${url}`);
    if (answer instanceof Error) throw answer;
    return new Response(JSON.stringify(answer.json), {
      status: answer.status ?? 200,
      headers: { "content-type": "application/json" },
    });
  };
  return { fetch, calls };
}

test(S, "chatModels: chat models only, in the server's order; no aliases, no embedders", () => {
  const models = chatModels(FLEET);
  assertEqual(models.map((m) => m.id), ["big", "small", "mid"]);
  assertEqual(models[0], {
    id: "big", state: "ready", loaded: true, nCtx: 8192, aliases: ["claude-*", "gpt-big"],
  });
  assertEqual(models.map((m) => [m.state, m.loaded]), [
    ["ready", true], ["unloaded", false], ["loading", false],
  ]);
});

test(S, "chatModels: one model, another server's cards, and nonsense", () => {
  const one = chatModels({ data: [card("SmolLM2", { n_ctx: 2048, kind: "chat", loaded: true,
    state: "ready", aliases: [] })] });
  assertEqual(one.map((m) => m.id), ["SmolLM2"]);
  // No ds4tw meta: a chat model that is there.
  assertEqual(chatModels({ data: [{ id: "gpt-x", object: "model" }] }),
    [{ id: "gpt-x", state: "ready", loaded: true, nCtx: null, aliases: [] }]);
  assertEqual(chatModels({ data: [{ id: "" }, { nope: 1 }, null, { id: "a" }, { id: "a" }] })
    .map((m) => m.id), ["a"]);
  assertEqual(chatModels(null), []);
  assertEqual(chatModels({ error: { message: "no" } }), []);
});

test(S, "optionLabel: the name and whether a turn would wait for a load", () => {
  const [big, small, mid] = chatModels(FLEET);
  assertEqual(optionLabel(big), "big · loaded");
  assertEqual(optionLabel(small), "small · loads on first use");
  assertEqual(optionLabel(mid), "mid · loading now");
  assertEqual(optionLabel({ ...small, state: "unloading" }), "small · loads on first use");
  assertEqual(optionTitle(big), "context 8192 tokens; also answers to claude-*, gpt-big");
  assertEqual(optionTitle(small), "context 4096 tokens");
});

test(S, "choose: the remembered model while the server has it, else the first", () => {
  const models = chatModels(FLEET);
  assertEqual(choose(models, "small"), "small");
  assertEqual(choose(models, "gone"), "big");
  assertEqual(choose(models, null), "big");
  assertEqual(choose(models, "gpt-big"), "big", "an alias is not an option");
  assertEqual(choose([], "small"), null);
  assert(storageKey("/llm/") !== storageKey("/"), "each mount point remembers its own");
});

test(S, "modelsFromHealth: its models entries, or its one model", () => {
  const health = {
    status: "ok",
    model: "big",
    models: [
      { name: "big", aliases: ["claude-*"], kind: "chat", state: "ready", slots: 2 },
      { name: "embed", aliases: [], kind: "embedding", state: "unloaded", slots: 1 },
      { name: "small", aliases: [], kind: "chat", state: "unloaded", slots: 1 },
    ],
  };
  assertEqual(modelsFromHealth(health).map((m) => [m.id, m.loaded]),
    [["big", true], ["small", false]]);
  const loading = modelsFromHealth({ status: "loading", model: "SmolLM2" });
  assertEqual(loading.map((m) => [m.id, m.state]), [["SmolLM2", "loading"]]);
  assertEqual(modelsFromHealth({ status: "ok" }), []);
});

test(S, "listModels: v1/models, relative, with the key as Bearer when the page has one", async () => {
  const { fetch, calls } = scriptedFetch({ [MODELS_URL]: { json: FLEET } });
  const models = await listModels({ apiKey: "k1", fetch });
  assertEqual(models.map((m) => m.id), ["big", "small", "mid"]);
  assertEqual(calls.map((c) => c.url), ["v1/models"]);
  assertEqual(calls[0].init.headers.Authorization, "Bearer k1");
  await listModels({ fetch });
  assertEqual("Authorization" in calls[1].init.headers, false);
});

test(S, "listModels: refused (no key yet), /health says the models instead", async () => {
  const { fetch, calls } = scriptedFetch({
    [MODELS_URL]: { status: 401, json: { error: { message: "invalid API key" } } },
    [HEALTH_URL]: { json: { status: "ok", model: "big",
      models: [{ name: "big", kind: "chat", state: "unloaded", aliases: [] }] } },
  });
  const models = await listModels({ fetch });
  assertEqual(models.map((m) => optionLabel(m)), ["big · loads on first use"]);
  assertEqual(calls.map((c) => c.url), ["v1/models", "health"]);
  assertEqual(calls[1].init.headers?.Authorization, undefined, "health needs no key");
});

test(S, "listModels: a single model still loading (/health 503) is still named", async () => {
  const { fetch } = scriptedFetch({
    [MODELS_URL]: new TypeError("Failed to fetch"),
    [HEALTH_URL]: { status: 503, json: { status: "loading", model: "SmolLM2" } },
  });
  assertEqual((await listModels({ fetch })).map((m) => m.id), ["SmolLM2"]);
});

test(S, "listModels: a server that answers neither rejects", async () => {
  const { fetch } = scriptedFetch({
    [MODELS_URL]: { status: 502, json: null },
    [HEALTH_URL]: { status: 502, json: null },
  });
  await assertRejects(listModels({ fetch }), (e) => {
    assert(e instanceof HTTPError, String(e));
    assertEqual(e.status, 502);
  });
});
