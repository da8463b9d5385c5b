"""
Ollama's routes beyond turns and embeddings: what the server runs
(C{GET /api/tags}, C{POST /api/show}, C{GET /api/ps}), its version
(C{GET /api/version}), and the model management it does not do.

C{/api/version} answers L{OLLAMA_VERSION}: the last Ollama release whose
C{api/types.go} and C{server/routes.go} this dialect follows (v0.32.15,
2026-08-19; the reading was of the commit after it, v0.33.0-rc2). A real
version, not ds4tw's own, because clients gate on it: VS Code Copilot
(C{ollamaProvider.ts}) refuses a server below 0.6.4, comparing each dotted
part with C{parseInt}, so it must be a bare C{MAJOR.MINOR.PATCH}. llama.cpp's
server has no C{/api/version} at all (its PRs #15177 and #16733 were
closed), which is why Copilot cannot use it without a proxy.

C{/api/tags} lists every model and every exact alias, as C{/v1/models}
does, in Ollama's shape. What Ollama reads from its model store comes
here from the GGUF file (L{ds4tw._engine.gguf}, read once per model off
the reactor): C{modified_at} is the file's mtime, C{size} its bytes (all
shards of a split file), C{details} its architecture, parameter count
(Ollama's C{format.HumanNumber} of the tensors' elements, C{134.52M}) and
file type (C{Q4_1}). C{digest} is the SHA-256 of the file's size and its
first and last MiB: what L{ds4tw._engine.llama.model_identity} already
trusts to tell model files apart, read in milliseconds where hashing the
whole file (Ollama's blob digest) would read gigabytes at start; a model
and its aliases share it, as an Ollama model and its copies do.

C{/api/show} gives, as Ollama's C{GetModelInfo} does, C{model_info}: the
GGUF's metadata typed, every non-empty array C{null} unless C{verbose}
(Ollama reads arrays with a maximum size of 0), without C{general.name}
and C{tokenizer.chat_template}; C{template}: the chat template in use;
C{capabilities}: C{completion} for a chat model, C{tools} when its
template takes tools, C{thinking} when it reasons (its reasoning parser
is not C{none}, or its template writes C{<think>...</think>}),
C{embedding} when it embeds (alone, or beside the chat engine). One
difference, on purpose: C{<arch>.context_length} is the context the
model is served with (its C{n_ctx}), not the GGUF's trained length, as
llama.cpp's C{/api/show} answers: VS Code Copilot sizes its prompts from
it, and ds4tw refuses a prompt longer than its context where Ollama
would silently cut it. And as Ollama does for Copilot (its user agent
starts C{GitHubCopilotChat/}), C{general.basename}, the name Copilot
shows, is the name the client asked for.

C{/api/ps} lists the models loaded now: C{size} is what they take
(L{ds4tw._runtime.fleet.Model.memory}), C{size_vram} the part on a GPU
(the share of layers llama.cpp offloaded, of everything but the prompt
cache, which is host memory; 0 on a CPU), C{expires_at} when the idle
unload will fire (now plus the idle time while the model works, as
Ollama says of a busy runner; Ollama's "forever", now plus the largest
Go duration, when the model is never unloaded).

C{/api/pull}, C{/api/push}, C{/api/create}, C{/api/copy} and
C{DELETE /api/delete} answer 403 with Ollama's C{{"error": ...}} saying
that this server serves the GGUF files it was started with. 403 because
it is what Ollama itself answers for an operation its configuration
forbids (C{OLLAMA_NO_CLOUD}: C{internalcloud.DisabledError}); every
Ollama client (the Go CLI's C{checkError}, the Python and JS libraries'
C{ResponseError}) shows the message of any 4xx but 401 (which starts a
sign-in), and a 4xx is not retried where a 5xx may be.

Covered by tests/unit/test_ollama_models.py.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from twisted.internet.defer import Deferred
from twisted.web.server import Request

from ..._engine.gguf import ModelFile, file_type_name, read_header
from ..._engine.interface import ReportsSettings
from ..._engine.llama import model_files
from ..._errors import APIError, invalid, model_not_found
from ..._formats.reasoning import ReasoningParser
from ..._runtime.fleet import Model
from ..._runtime.worker import NotReady, QueueFull
from ..dialect import Api, Operation
from ..host import Host
from ..openapi import described
from ..prompt import admission_error
from ..routing import json_response, parse
from .render import rfc3339

__all__ = ["OLLAMA_VERSION", "OPERATIONS", "ShowRequest", "add_routes", "human_number"]

#: What C{/api/version} answers (see the module docstring).
OLLAMA_VERSION = "0.32.15"

#: Ollama's C{copilotChatUserAgentPrefix} (server/routes.go).
COPILOT_USER_AGENT = "GitHubCopilotChat/"

#: Ollama's "never unload" is now plus the largest Go duration.
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)

#: The bytes at each end of the file that the digest reads.
_DIGEST_SPAN = 1 << 20

#: Ollama's model management routes, and their methods: all refused here.
MANAGEMENT = (
    ("pull", "post"),
    ("push", "post"),
    ("create", "post"),
    ("copy", "post"),
    ("delete", "delete"),
)

MANAGED = (
    "this server serves the GGUF files it was started with and does not manage models: "
    "/api/{what} is not available (give ds4tw a model file or a models file instead)"
)


class ShowRequest(BaseModel):
    """The body of C{POST /api/show} (C{name} is the older spelling of C{model})."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None
    verbose: bool = False
    #: Accepted and ignored, as the Modelfile overrides Ollama applies.
    system: str | None = None
    template: str | None = None
    options: dict[str, Any] | None = None

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise invalid("model is required", "model")
        return name


@dataclass(frozen=True)
class Facts:
    """What Ollama's model routes say of one model's file (read once, off the reactor)."""

    size: int
    modified_at: str
    digest: str
    #: The GGUF's metadata, typed (L{ds4tw._engine.gguf.GGUFHeader.metadata});
    #: empty for an engine with no model file (the scripted one).
    metadata: dict[str, Any]
    path: Path | None


def posix_time(seconds: float) -> str:
    """A POSIX time as Ollama writes times (RFC 3339, UTC)."""
    return rfc3339(datetime.fromtimestamp(seconds, UTC))


def human_number(n: int) -> str:
    """Ollama's C{format.HumanNumber}: C{134.52M}, C{7B}, C{8.2B}, C{500K}."""
    for size, suffix, decimals in ((10**9, "B", 1), (10**6, "M", 2)):
        if n >= size:
            value = n / size
            return (
                f"{value:.0f}{suffix}"
                if value == math.floor(value)
                else f"{value:.{decimals}f}{suffix}"
            )
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def file_digest(path: Path, size: int) -> str:
    """SHA-256 of the size and the first and last MiB of the file (hex)."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_DIGEST_SPAN))
        f.seek(max(0, size - _DIGEST_SPAN))
        h.update(f.read(_DIGEST_SPAN))
    return h.hexdigest()


def _file_of(model: Model) -> Path | None:
    for part in (model.engine, model.embedder):
        if isinstance(part, ModelFile):
            return Path(part.model_path)
    return None


def read_facts(model_id: str, path: Path | None, verbose: bool = False) -> Facts:
    """C{path}'s facts (any thread: reads the file's header and two MiB)."""
    if path is None:
        # No file (the scripted engine): a stable digest of its name.
        digest = hashlib.sha256(f"ds4tw-scripted:{model_id}".encode()).hexdigest()
        return Facts(0, posix_time(0), digest, {}, None)
    files = model_files(path)
    stats = [p.stat() for p in files]
    size = sum(s.st_size for s in stats)
    header = read_header(files, max_array=None if verbose else 0)
    return Facts(
        size,
        posix_time(max(s.st_mtime for s in stats)),
        file_digest(files[0], stats[0].st_size),
        header.metadata,
        path,
    )


def details(facts: Facts) -> dict[str, Any]:
    """Ollama's C{ModelDetails} from the GGUF's metadata."""
    meta = facts.metadata
    family = meta.get("general.architecture")
    count = meta.get("general.parameter_count")
    label = meta.get("general.size_label")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family if isinstance(family, str) else "",
        "families": [family] if isinstance(family, str) and family else None,
        "parameter_size": (
            human_number(count)
            if isinstance(count, int) and count > 0
            else label
            if isinstance(label, str)
            else ""
        ),
        "quantization_level": file_type_name(meta.get("general.file_type")) if meta else "",
    }


def _thinks(parser: ReasoningParser) -> bool:
    # Not the <think> fallback of a template that names no syntax
    # (ds4tw._formats.reasoning.detect): that one is a guess, not a claim.
    return parser.name != "none" and getattr(parser, "thinks", True) is not False


def _thinks_by_template(source: str) -> bool:
    # Ollama's chatTemplateHasThinkingSupport, its first and main rule.
    return "<think>" in source and "</think>" in source


class _Models:
    """The routes' state: each model's facts, read once."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self._facts: dict[str, Facts] = {}

    async def facts(self, model: Model, verbose: bool = False) -> Facts:
        """C{model}'s facts, read off the reactor once it is prepared (verbose: every time)."""
        cached = self._facts.get(model.name)
        if cached is not None and not verbose:
            return cached
        try:
            await self.server.fleet.prepared(model)
            d: Deferred[Facts] = model.runner.offload(
                read_facts, model.name, _file_of(model), verbose
            )
            facts = await d
        except (QueueFull, NotReady) as e:
            raise admission_error(e) from e
        except APIError:
            raise
        except Exception as e:
            raise APIError(500, f"the model {model.name} cannot be read: {e}") from e
        if not verbose:
            self._facts[model.name] = facts
        return facts

    async def capabilities(self, model: Model) -> tuple[list[str], str]:
        """C{model}'s capabilities in Ollama's words, and its chat template's source."""
        caps: list[str] = []
        source = ""
        if model.engine is not None:
            host = await self.server.for_model(model.name)
            template = host.chat_template()
            source = template.source
            caps.append("completion")
            if template.takes_tools:
                caps.append("tools")
            if _thinks(host.reasoning_parser()) or _thinks_by_template(source):
                caps.append("thinking")
        if model.embedder is not None:
            caps.append("embedding")
        return caps, source

    def model_info(self, model: Model, facts: Facts) -> dict[str, Any]:
        info = {
            k: v
            for k, v in facts.metadata.items()
            if k not in ("general.name", "tokenizer.chat_template")
        }
        arch = info.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            arch = info["general.architecture"] = "scripted"
        info[f"{arch}.context_length"] = model.n_ctx
        return info

    def loaded(self) -> list[Model]:
        """The models with a unit loaded and ready now, in the fleet's order."""
        ready = {id(u.model) for u in self.server.fleet.units if u.runner.ready}
        return [m for m in self.server.fleet.models.values() if id(m) in ready]

    def memory(self, model: Model) -> tuple[int, int]:
        """Bytes the model's loaded units take, and the part of it on a GPU."""
        size = vram = 0
        for unit in self.server.fleet.units:
            if unit.model is not model or not unit.runner.ready:
                continue
            size += unit.memory()
            part = unit.runner.engine if hasattr(unit.runner, "engine") else None
            settings = part.settings if isinstance(part, ReportsSettings) else {}
            layers = settings.get("layers") or 0
            offloaded = settings.get("layers_offloaded") or 0
            if layers and offloaded:
                use = unit.memory_of()
                vram += round((use.total - use.cache) * min(1.0, offloaded / layers))
        return size, vram

    def expires_at(self, model: Model) -> str:
        """When the idle unload will fire (L{ds4tw._runtime.fleet.Fleet.unload_due})."""
        fleet = self.server.fleet
        now = datetime.now(UTC)
        due = fleet.unload_due(model)
        if due is None:
            return rfc3339(now + FOREVER)
        return rfc3339(now + timedelta(seconds=max(0.0, due - fleet.clock.seconds())))


def add_routes(server: Host, api: Api) -> None:
    """Add Ollama's model routes to C{server.app}, each wrapped by C{api}."""
    app = server.app
    state = _Models(server)

    @app.route("/api/version", methods=["GET", "HEAD"])
    @api
    async def version(request: Request) -> bytes:
        return json_response(request, {"version": OLLAMA_VERSION})

    @app.route("/api/tags", methods=["GET"])
    @api
    async def tags(request: Request) -> bytes:
        entries = []
        for name, model in server.fleet.listed():
            facts = await state.facts(model)
            caps, _ = await state.capabilities(model)
            entries.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": facts.modified_at,
                    "size": facts.size,
                    "digest": facts.digest,
                    "details": details(facts),
                    "capabilities": caps,
                }
            )
        return json_response(request, {"models": entries})

    @app.route("/api/show", methods=["POST"])
    @api
    async def show(request: Request) -> bytes:
        req = parse(request, ShowRequest, server.config.max_body_bytes)
        name = req.model_name()
        model = server.fleet.find(name, fallback=False)
        if model is None:
            raise model_not_found(name)
        facts = await state.facts(model, req.verbose)
        caps, template = await state.capabilities(model)
        info = state.model_info(model, facts)
        agent = (request.getHeader("user-agent") or "").startswith(COPILOT_USER_AGENT)
        if agent:
            # Copilot shows general.basename; Ollama echoes the name asked for.
            info["general.basename"] = name
        body: dict[str, Any] = {
            "parameters": f"{'num_ctx':<30} {model.n_ctx}",
            "details": details(facts),
            "model_info": info,
            "capabilities": caps,
            "modified_at": facts.modified_at,
        }
        if template:
            body["template"] = template
        return json_response(request, body)

    @app.route("/api/ps", methods=["GET"])
    @api
    async def ps(request: Request) -> bytes:
        entries = []
        for model in state.loaded():
            facts = await state.facts(model)
            size, vram = state.memory(model)
            entries.append(
                {
                    "name": model.name,
                    "model": model.name,
                    "size": size,
                    "digest": facts.digest,
                    "details": details(facts),
                    "expires_at": state.expires_at(model),
                    "size_vram": vram,
                    "context_length": model.n_ctx,
                }
            )
        # Ollama lists the longest time left first.
        entries.sort(key=lambda e: str(e["expires_at"]), reverse=True)
        return json_response(request, {"models": entries})

    def refuse(what: str, method: str) -> None:
        async def managed(request: Request) -> bytes:
            raise APIError(403, MANAGED.format(what=what), code="not_managed")

        # Named before Klein sees it: Klein's endpoints are named after the function.
        managed.__name__ = f"api_{what}"
        app.route(f"/api/{what}", methods=[method])(api(managed))

    for what, method in MANAGEMENT:
        refuse(what, method.upper())


_MANAGEMENT = tuple(
    Operation(
        f"/api/{what}",
        method,
        f"api_{what}",
        f"Refused: this server does not manage models (Ollama's /api/{what})",
        responses={"403": described("Ollama's error: this server does not manage models.")},
    )
    for what, method in MANAGEMENT
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/api/version",
        "get",
        "api_version",
        "The Ollama version this server's API follows",
        responses={"200": described("{version}.")},
    ),
    Operation(
        "/api/tags",
        "get",
        "api_tags",
        "Every model and exact alias, in Ollama's shape",
        responses={"200": described("An Ollama model list.")},
    ),
    Operation(
        "/api/show",
        "post",
        "api_show",
        "A model's details, GGUF metadata, template and capabilities",
        body=ShowRequest,
        responses={"200": described("An Ollama show response.")},
        errors=("400", "404"),
    ),
    Operation(
        "/api/ps",
        "get",
        "api_ps",
        "The models loaded now, with their memory and when they unload",
        responses={"200": described("An Ollama process list.")},
    ),
    *_MANAGEMENT,
)
