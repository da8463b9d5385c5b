// The models the page offers: which of the server's models can chat,
// whether each is loaded now, and which one the user picked.
//
// The list comes from v1/models (OpenAI's shape with ds4tw's "meta":
// kind, state, aliases, alias_of). An alias entry is another name of a
// model already listed, and an embedding model cannot chat: neither is a
// choice. A server that refuses v1/models (it wants an API key the page
// does not have yet) still says its models in /health, which needs none;
// an older server there names its one model only. URLs are relative, so
// the page works wherever ds4tw is mounted.
// Tested in the browser by tests/browser/js/test_models.js (a scripted
// fetch) and, against a multi-model server, tests/browser/test_models.py.

import { HTTPError } from "./chat.js";

export const MODELS_URL = "v1/models";
export const HEALTH_URL = "health";

/** Where the picked model is remembered, per mount point (two servers on one origin differ). */
export function storageKey(path) {
  return `ds4tw.model:${path}`;
}

/**
 * @typedef {{id: string, state: string, loaded: boolean, nCtx: number | null,
 *   aliases: string[]}} ChatModel
 */

function chatModel(id, meta) {
  const state = meta.state ?? (meta.loaded === false ? "unloaded" : "ready");
  return {
    id,
    state,
    loaded: meta.loaded ?? state === "ready",
    nCtx: Number.isInteger(meta.n_ctx) ? meta.n_ctx : null,
    aliases: Array.isArray(meta.aliases) ? meta.aliases.map(String) : [],
  };
}

/**
 * The chat models of a v1/models answer, in the server's order: not the
 * aliases, not the embedding models. A card without ds4tw's meta (another
 * server's) is a chat model that is there.
 * @returns {ChatModel[]}
 */
export function chatModels(body) {
  const seen = new Set();
  const out = [];
  for (const card of body?.data ?? []) {
    if (typeof card?.id !== "string" || card.id === "" || seen.has(card.id)) continue;
    const meta = card.meta ?? {};
    if (meta.alias_of || (meta.kind ?? "chat") !== "chat") continue;
    seen.add(card.id);
    out.push(chatModel(card.id, meta));
  }
  return out;
}

/** The same, from /health: its "models" entries, or its one "model". */
export function modelsFromHealth(health) {
  if (Array.isArray(health?.models)) {
    return chatModels({
      data: health.models.map((m) => ({
        id: m.name,
        meta: { kind: m.kind, state: m.state, aliases: m.aliases },
      })),
    });
  }
  if (typeof health?.model === "string" && health.model !== "") {
    return [chatModel(health.model, { state: health.status === "ok" ? "ready" : "loading" })];
  }
  return [];
}

/** What the option says: the name, and whether a turn would wait for a load. */
export function optionLabel(model) {
  const now = {
    ready: "loaded",
    loading: "loading now",
  }[model.state] ?? "loads on first use";
  return `${model.id} · ${now}`;
}

/** The option's tooltip: its context size and the other names that reach it. */
export function optionTitle(model) {
  const parts = [];
  if (model.nCtx) parts.push(`context ${model.nCtx} tokens`);
  if (model.aliases.length) parts.push(`also answers to ${model.aliases.join(", ")}`);
  return parts.join("; ");
}

/**
 * The model to select: the one remembered if the server still has it,
 * else the server's first (a models file's first entry, its main model).
 */
export function choose(models, remembered) {
  if (models.some((m) => m.id === remembered)) return remembered;
  return models.length ? models[0].id : null;
}

/**
 * The server's chat models: v1/models (with the key, when the page has
 * one), or /health when v1/models is refused.
 * @returns {Promise<ChatModel[]>} rejects only when neither answers
 */
export async function listModels({ apiKey = null, fetch = globalThis.fetch } = {}) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  try {
    const response = await fetch(MODELS_URL, { headers, cache: "no-store" });
    if (response.ok) return chatModels(await response.json());
  } catch {
    // Unreachable or not JSON: /health decides.
  }
  const response = await fetch(HEALTH_URL, { cache: "no-store" });
  // /health answers 503 (with its body) while a single model loads.
  if (!response.ok && response.status !== 503) {
    throw new HTTPError(response.status, `${HEALTH_URL}: ${response.status}`);
  }
  return modelsFromHealth(await response.json());
}
