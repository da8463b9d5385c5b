// Drive ds4tw's Ollama API with the real ollama-js library (npm `ollama`,
// pinned in scripts/install-agents.sh) and print what the library gave back
// as one JSON object per step, one per line, for tests/clients/test_ollama_js.py.
//
//   node ollama_js.mjs PACKAGE_DIR HOST MODEL STEP...
//
// PACKAGE_DIR is the npm prefix the library is installed under (outside the
// checkout). Each STEP runs in order; a step that throws reports the error's
// class, message and status_code instead of failing the script, so the test
// sees what a program using the library would catch.
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const [packageDir, host, model, ...steps] = process.argv.slice(2)

// The ESM build, as `import { Ollama } from 'ollama'` gets it: resolved
// through the package's own exports map from where it is installed.
const require = createRequire(join(packageDir, 'package.json'))
const manifest = require('ollama/package.json')
const entry = join(packageDir, 'node_modules', 'ollama', manifest.exports['.'].import)
const { Ollama } = await import(pathToFileURL(entry).href)
const ollama = new Ollama({ host })

// A stream's chunks as the library yields them, each with the seconds
// since the request was made (the first wait counts too).
async function collect(request) {
  const t0 = performance.now()
  const chunks = []
  for await (const chunk of await request()) {
    chunks.push({ t: (performance.now() - t0) / 1000, chunk })
  }
  return chunks
}

const STEPS = {
  version: () => ollama.version(),
  list: () => ollama.list(),
  ps: () => ollama.ps(),
  show: () => ollama.show({ model }),
  show_missing: () => ollama.show({ model: 'no-such-model:latest' }),
  chat_stream: () =>
    collect(() =>
      ollama.chat({
        model,
        // Prompts of their own, so the prefix cache cannot shorten the
        // paced prefill (the test needs it to last seconds).
        messages: [{ role: 'user', content: 'Please greet everyone in the room, one by one, kindly.' }],
        stream: true,
      }),
    ),
  chat: () => ollama.chat({ model, messages: [{ role: 'user', content: 'Say hello.' }] }),
  generate_stream: () =>
    collect(() =>
      ollama.generate({ model, prompt: 'Write one greeting for the whole team, short and warm.', stream: true }),
    ),
  generate: () => ollama.generate({ model, prompt: 'Say hello.' }),
  pull: () => ollama.pull({ model: 'llama3.2' }),
  // A stream the server breaks off: the test stops the server once this
  // prints its first chunk (stdout line {"step": "first_chunk"}).
  chat_interrupted: async () => {
    const chunks = []
    const iterator = await ollama.chat({
      model,
      messages: [{ role: 'user', content: 'Count to a thousand.' }],
      stream: true,
    })
    for await (const chunk of iterator) {
      if (chunks.length === 0) {
        console.log(JSON.stringify({ step: 'first_chunk' }))
      }
      chunks.push(chunk)
    }
    return chunks
  },
}

for (const step of steps) {
  let out
  try {
    out = { step, ok: true, value: await STEPS[step]() }
  } catch (error) {
    out = {
      step,
      ok: false,
      error: {
        name: error.name,
        message: error.message,
        status_code: error.status_code ?? null,
        // ResponseError is not exported by 0.6.4; its name tells it apart.
        response_error: error.name === 'ResponseError',
      },
    }
  }
  console.log(JSON.stringify(out))
}
