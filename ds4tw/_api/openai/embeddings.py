"""
C{POST /v1/embeddings} in OpenAI's shape: the request model, the route,
and the answer.

The input is a string, a list of strings, one token array (a list of
ints) or a list of token arrays; every input becomes one vector. Strings
are tokenized off the reactor (the worker's offload pool), all of a
request's in one hop; token arrays are taken as they are, once their ids
are checked against the vocabulary. An input longer than the model embeds
is refused (400, naming its index), never truncated silently. The
vectors come from the model's L{ds4tw._runtime.embedding.EmbeddingWorker},
batched with other requests' inputs; a client that leaves cancels the
route's Deferred, which stops the request's work there.

C{encoding_format} is C{float} (JSON numbers) or C{base64}: the vector
as little-endian float32 bytes, base64-encoded, which is what OpenAI
sends and what the C{openai} SDK asks for by default (it decodes the
bytes itself). C{dimensions} (shortening the vectors) needs a model
trained for it (OpenAI's text-embedding-3); none served here is, so any
other value than the model's own size is a 400 that says so.

L{embed} (tokenize, check, batch, wait) is shared with Ollama's
C{/api/embed} (L{ds4tw._api.ollama.embed}), which may also cut inputs
to fit (L{fit}).

Which model answers is the server's business (L{Embedders}): a name it
does not know is a 404 C{model_not_found}, a chat model's name a 400.
The server adds the route with L{add_routes}; L{OPERATION} describes it
in C{/openapi.json}.

Covered by tests/unit/test_embeddings_api.py and
tests/integration/test_embeddings_engine.py (the C{openai} SDK on a real
port).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, field_validator
from twisted.web.server import Request

from ..._errors import APIError, invalid
from ..._runtime.embedding import EmbeddingWorker
from ..._runtime.worker import NotReady, QueueFull
from ..dialect import Api, Operation
from ..host import EmbeddingTarget
from ..openapi import described
from ..prompt import admission_error
from ..routing import json_response, parse

if TYPE_CHECKING:
    from klein import Klein

    from ..host import ServerConfig

__all__ = [
    "MAX_INPUTS",
    "OPERATION",
    "Embedders",
    "EmbeddingTarget",
    "EmbeddingsRequest",
    "WorkerTarget",
    "add_routes",
    "embed",
    "embeddings_body",
    "encode",
    "fit",
]

#: Inputs per request, as OpenAI allows.
MAX_INPUTS = 2048


class EmbeddingsRequest(BaseModel):
    """The body of C{POST /v1/embeddings} (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    #: Accepted and ignored (OpenAI uses it to watch for abuse).
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("the input is an empty string")
            return value
        if not value:
            raise ValueError("the input is an empty list")
        if len(value) > MAX_INPUTS and not isinstance(value[0], int):
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        for i, item in enumerate(value):
            if isinstance(item, str | list) and not item:
                raise ValueError(f"input {i} is empty")
        return value

    def texts_or_tokens(self) -> list[str] | list[list[int]]:
        """The inputs: strings to tokenize, or token arrays."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if isinstance(value[0], str):
            return [str(x) for x in value]
        if isinstance(value[0], int):
            return [[int(t) for t in value]]
        return [[int(t) for t in x] for x in value if isinstance(x, list)]


class Embedders(Protocol):
    """What the server offers the route: the embedding model for a name."""

    async def embedding_target(self, name: str | None) -> EmbeddingTarget:
        """
        The model that serves C{name} (None: the default one), its
        vocabulary ready (L{ds4tw._engine.embed.Embedder.prepare} may read
        a file: done off the reactor); or an L{APIError}: 404
        C{model_not_found} for a name not served, 400 for a model that
        serves no embeddings.
        """
        ...


@dataclass(frozen=True)
class WorkerTarget:
    """An L{EmbeddingTarget} that is simply an embedding worker's model."""

    worker: EmbeddingWorker

    @property
    def model_id(self) -> str:
        return self.worker.embedder.model_id

    @property
    def n_ctx(self) -> int:
        return self.worker.embedder.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.worker.embedder.n_vocab

    @property
    def n_embd(self) -> int:
        return self.worker.embedder.n_embd

    def tokenize(self, text: str) -> list[int]:
        return self.worker.embedder.tokenize(text)


class _Server(Protocol):
    """What the route needs of the server (L{ds4tw._api.host.Host} has it)."""

    @property
    def app(self) -> Klein: ...

    @property
    def config(self) -> ServerConfig: ...


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: numbers, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _tokenize_all(tokenize: Callable[[str], list[int]], texts: list[str]) -> list[list[int]]:
    return [tokenize(t) for t in texts]


def _checked(target: EmbeddingTarget, inputs: list[list[int]]) -> list[list[int]]:
    """C{inputs}, or a 400 naming the first one the model cannot embed."""
    n_ctx, n_vocab = target.n_ctx, target.n_vocab
    for i, tokens in enumerate(inputs):
        if not tokens:
            raise invalid(f"input[{i}] has no tokens", "input")
        if len(tokens) > n_ctx:
            raise APIError(
                400,
                f"input[{i}] is {len(tokens)} tokens long; this model embeds at most {n_ctx} "
                "tokens per input",
                param="input",
                code="context_length_exceeded",
            )
        if n_vocab and (min(tokens) < 0 or max(tokens) >= n_vocab):
            raise invalid(
                f"input[{i}] has a token id outside this model's vocabulary (0 to {n_vocab - 1})",
                "input",
            )
    return inputs


def fit(tokens: list[int], n_ctx: int, added: list[int]) -> list[int]:
    """
    C{tokens} cut to C{n_ctx}, keeping the special tokens the tokenizer
    adds at the end (C{added} is what it makes of an empty text: BOS,
    or CLS and SEP), as Ollama's C{truncate} keeps them when it
    re-tokenizes the cut text.
    """
    if len(tokens) <= n_ctx:
        return tokens
    tail = len(added) - (1 if added and tokens[0] == added[0] else 0)
    if tail <= 0 or tail >= n_ctx or tokens[-tail:] != added[-tail:]:
        return tokens[:n_ctx]
    return tokens[: n_ctx - tail] + tokens[-tail:]


async def embed(
    target: EmbeddingTarget, given: list[str] | list[list[int]], *, truncate: bool = False
) -> tuple[list[list[int]], list[list[float]]]:
    """
    C{given}'s token arrays and vectors, from C{target}'s worker: strings
    tokenized off the reactor, all in one hop; with C{truncate}, inputs
    longer than the model embeds cut to fit (L{fit}), else refused (400).
    """
    worker = target.worker
    try:
        if given and isinstance(given[0], str):
            texts = [str(t) for t in given]
            if truncate:
                texts.append("")
            inputs = await worker.offload(_tokenize_all, target.tokenize, texts)
            if truncate:
                added = inputs.pop()
                inputs = [fit(x, target.n_ctx, added) for x in inputs]
        else:
            inputs = [list(x) for x in given if isinstance(x, list)]
            if truncate:
                inputs = [x[: target.n_ctx] for x in inputs]
        pending = worker.submit(_checked(target, inputs))
    except (QueueFull, NotReady) as e:
        raise admission_error(e) from e
    return inputs, await pending


async def embeddings_body(target: EmbeddingTarget, req: EmbeddingsRequest) -> dict[str, Any]:
    """The answer to C{req}, from C{target}'s worker."""
    if req.dimensions is not None and req.dimensions != target.n_embd:
        raise invalid(
            f"dimensions: the model {target.model_id} does not support shortening its "
            f"vectors; they have {target.n_embd} dimensions (leave dimensions out)",
            "dimensions",
            "unsupported_parameter",
        )
    inputs, vectors = await embed(target, req.texts_or_tokens())
    tokens = sum(len(x) for x in inputs)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": req.model or target.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def add_routes(server: _Server, api: Api, embedders: Embedders) -> None:
    """Add C{POST /v1/embeddings} to C{server.app}, wrapped by C{api}."""

    @server.app.route("/v1/embeddings", methods=["POST"])
    @api
    async def embeddings(request: Request) -> bytes:
        req = parse(request, EmbeddingsRequest, server.config.max_body_bytes)
        target = await embedders.embedding_target(req.model)
        return json_response(request, await embeddings_body(target, req))


OPERATION = Operation(
    "/v1/embeddings",
    "post",
    "v1_embeddings",
    "OpenAI embeddings",
    body=EmbeddingsRequest,
    responses={"200": described("An OpenAI embedding list.")},
    errors=("400", "404", "503"),
)
