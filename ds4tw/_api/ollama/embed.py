"""
Ollama's embedding routes: C{POST /api/embed} and the older
C{POST /api/embeddings}, on the same machinery as C{/v1/embeddings}
(L{ds4tw._api.openai.embeddings.embed}: the server's embedding target
for the name, strings tokenized off the reactor, the model's embedding
worker batching them with other requests' inputs).

C{/api/embed} takes C{input} as a string or a list of strings and
answers one L2-normalised vector per input, as Ollama's C{EmbedHandler}
does (it normalises whatever its runner gives), with Ollama's counters:
C{total_duration} and C{load_duration} in nanoseconds (the load: the
part of the last load this request waited for) and C{prompt_eval_count},
the tokens embedded. C{truncate} (true unless given false) cuts an input
longer than the model embeds to fit, keeping the special tokens the
tokenizer adds at its end (L{ds4tw._api.openai.embeddings.fit}), as
Ollama does by re-tokenizing the cut text; C{truncate: false} makes such
an input a 400. C{dimensions}, when smaller than the model's vectors,
keeps that many leading values and normalises them again (Ollama's
rule, whatever the model). An empty input (absent, C{""} or C{[]}) is
answered at once with no vectors, as Ollama answers it (Ollama also loads
the model for it; here the model loads at its first real input).
C{options} and C{keep_alive} are accepted and ignored.

C{/api/embeddings} takes one C{prompt} and answers C{{"embedding": [...]}}.
Ollama's handler passes its runner's vector on without normalising it;
ds4tw's embedders only give normalised vectors
(L{ds4tw._engine.embed.Embedder.embed}), so these are unit length: the
same direction, and so the same cosine similarities, which is what the
vectors are compared by. It does not truncate (neither does Ollama's: an
input too long is an error there too).

A model not served is a 404 (C{model 'NAME' not found} in the Ollama
dialect's error shape), a chat model that does not embed a 400.

Covered by tests/unit/test_ollama_models.py.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr
from twisted.web.server import Request

from ..._errors import APIError
from ..dialect import Api, Operation
from ..host import EmbeddingTarget, Host
from ..openai.embeddings import MAX_INPUTS, embed
from ..openapi import described
from ..routing import json_response, parse
from .render import nanoseconds

__all__ = ["OPERATIONS", "EmbedRequest", "EmbeddingsRequest", "add_routes", "normalised"]


class EmbedRequest(BaseModel):
    """The body of C{POST /api/embed} (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: StrictStr | list[StrictStr] | None = None
    truncate: bool | None = None
    dimensions: StrictInt | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None

    def texts(self) -> list[str]:
        value = self.input
        if value is None or value == "":
            return []
        texts = [value] if isinstance(value, str) else list(value)
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
        return texts


class EmbeddingsRequest(BaseModel):
    """The body of C{POST /api/embeddings} (Ollama's older embedding route)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: StrictStr = ""
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


def normalised(vector: list[float]) -> list[float]:
    """C{vector} at unit length (Ollama's C{normalize}); a 500 for NaN or infinite values."""
    total = math.fsum(v * v for v in vector)
    if not math.isfinite(total):
        raise APIError(500, "the model gave an embedding with NaN or infinite values")
    scale = 1.0 / max(math.sqrt(total), 1e-12)
    return [v * scale for v in vector]


async def embed_body(target: EmbeddingTarget, req: EmbedRequest, started: float) -> dict[str, Any]:
    """The answer to C{req} from C{target}, C{started} being when the request began (monotonic)."""
    texts = req.texts()
    name = req.model or target.model_id
    if not texts:
        return {"model": name, "embeddings": []}
    worker = target.worker
    was_ready = worker.ready
    inputs, vectors = await embed(target, texts, truncate=req.truncate is not False)
    elapsed = time.monotonic() - started
    dims = req.dimensions
    out = []
    for v in vectors:
        v = normalised(v)
        if dims is not None and 0 < dims < len(v):
            v = normalised(v[:dims])
        out.append(v)
    return {
        "model": name,
        "embeddings": out,
        "total_duration": nanoseconds(elapsed),
        "load_duration": 0 if was_ready else nanoseconds(min(worker.load_seconds, elapsed)),
        "prompt_eval_count": sum(len(x) for x in inputs),
    }


def add_routes(server: Host, api: Api) -> None:
    """Add C{/api/embed} and C{/api/embeddings} to C{server.app}, each wrapped by C{api}."""
    app = server.app

    @app.route("/api/embed", methods=["POST"])
    @api
    async def embed_route(request: Request) -> bytes:
        started = time.monotonic()
        req = parse(request, EmbedRequest, server.config.max_body_bytes)
        target = await server.embedding_target(req.model)
        return json_response(request, await embed_body(target, req, started))

    @app.route("/api/embeddings", methods=["POST"])
    @api
    async def embeddings_route(request: Request) -> bytes:
        req = parse(request, EmbeddingsRequest, server.config.max_body_bytes)
        target = await server.embedding_target(req.model)
        if not req.prompt:
            return json_response(request, {"embedding": []})
        _, [vector] = await embed(target, [req.prompt])
        return json_response(request, {"embedding": vector})


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/api/embed",
        "post",
        "api_embed",
        "Ollama embeddings: one normalised vector per input",
        body=EmbedRequest,
        responses={"200": described("{model, embeddings, total_duration, ...}.")},
        errors=("400", "404", "503"),
    ),
    Operation(
        "/api/embeddings",
        "post",
        "api_embeddings",
        "Ollama's older embedding route: one vector for one prompt",
        body=EmbeddingsRequest,
        responses={"200": described("{embedding}.")},
        errors=("400", "404", "503"),
    ),
)
