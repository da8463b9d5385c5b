"""
The model set: which models a server can serve, under which names, with
which options. Configuration only: nothing here loads a model or knows
Twisted. The fleet reads a L{ModelSet} to decide which model a request's
C{model} field means (L{ModelSet.resolve}) and how to load it
(L{ModelSpec}); C{/v1/models} lists L{ModelSet.names} and
L{ModelSet.aliases}.

Three sources make a set, so that one model and many are served alike:

  - C{--model PATH}: L{single}, one model named after its file (or
    C{--model-id}), which is also the default, so every name a client
    sends reaches it as before;
  - C{--models FILE}: L{load_models_file}, a TOML file;
  - C{--models-dir DIR}: L{models_from_dir}, every GGUF in a directory
    under its file name. L{merge} combines the last two.

The models file::

    # Requests naming no configured model or alias go to this one (optional).
    default = "coder"

    [models.coder]
    path = "Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf"
    aliases = ["claude-sonnet-*", "claude-opus-*", "gpt-*"]
    ctx = 32768
    parallel = 2
    gpu_layers = "all"

    [models.small]
    path = "Qwen3-4B-Instruct-2507-Q4_K_M.gguf"
    aliases = ["claude-haiku-*", "claude-3-5-haiku-*"]

    [models.embed]
    path = "nomic-embed-text-v1.5.Q8_0.gguf"
    kind = "embedding"
    pooling = "mean"
    aliases = ["text-embedding-*"]

Each C{[models.NAME]} table is one model; NAME is the id clients send
(no whitespace, no C{*?[}). Its keys are L{ModelSpec}'s fields: C{path}
(required; C{~} expanded, relative to the file's own directory), C{kind}
(C{"chat"}, the default, or C{"embedding"}), C{aliases}, and the options
that override the server-wide command line for this model when given:
C{ctx}, C{parallel}, C{batch}, C{threads}, C{gpu_layers} (N, C{"all"} or
C{"auto"}), C{chat_template} (a Jinja file), C{tool_call_parser},
C{reasoning_parser}, C{cache_ram_mb} (the prompt cache's budget; 0:
none), C{pooling}, C{embeddings} (a chat model that also serves
C{/v1/embeddings}), C{memory_mb} (what the memory budget counts for this
model instead of its estimate) and C{idle_unload} (seconds). An unknown
key is an error that names it, never ignored: a misspelt option would
otherwise be silently the default.

Aliases are C{fnmatch} patterns, matched case-sensitively. A name
resolves to the model of that name, else the model with that exact
alias, else the first glob alias that matches, in file order (so put
C{claude-haiku-*} before a catch-all C{claude-*}), else the default.
With no default, an unknown name resolves to nothing (the API answers
404 C{model_not_found}).

Every mistake in a set is a L{ModelSetError} naming the file (or
directory, or C{--model}) and the model.

Covered by tests/unit/test_modelset.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from .._engine.template import ChatTemplate, TemplateError
from .._formats.reasoning import reasoning_parser
from .._formats.tools.parsers import tool_call_parser

#: The characters that make an alias a pattern (fnmatch's); a model's
#: name may hold none of them, so a name is never mistaken for one.
GLOB_CHARS = frozenset("*?[")

#: Keys a models file's table may not set: the name is the table's own,
#: the template's text is read from C{chat_template}.
_DERIVED = ("name", "chat_template_text")

#: llama.cpp's split GGUF: C{NAME-00001-of-00003.gguf}.
_SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


class ModelSetError(ValueError):
    """A model set that cannot be served; the message names where and which model."""


def is_glob(alias: str) -> bool:
    """Whether C{alias} is a pattern rather than one exact name."""
    return not GLOB_CHARS.isdisjoint(alias)


#: Ollama's tag for an untagged name (C{llama3} is C{llama3:latest}).
LATEST = ":latest"


class Names:
    """
    Which model a request's C{model} field means: the model of that name,
    else the model with that exact alias, else the first glob alias that
    matches in configured order, else the default; no name at all means
    the default, or the only model. Shared by the configuration
    (L{ModelSet}) and the running fleet (L{ds4tw._runtime.fleet.Fleet}),
    so the two never disagree.
    """

    def __init__(
        self, models: Iterable[tuple[str, Iterable[str]]], default: str | None = None
    ) -> None:
        self._names: list[str] = []
        self._exact: dict[str, str] = {}
        self._globs: list[tuple[str, str]] = []
        for model, aliases in models:
            self._names.append(model)
            for alias in aliases:
                if is_glob(alias):
                    self._globs.append((alias, model))
                elif alias != model:
                    self._exact.setdefault(alias, model)
        self._known = set(self._names)
        self.default = default

    def _named(self, name: str) -> tuple[str, str] | None:
        if name in self._known:
            return name, "name"
        model = self._exact.get(name)
        if model is not None:
            return model, f"alias {name}"
        for pattern, model in self._globs:
            if fnmatchcase(name, pattern):
                return model, f"alias {pattern}"
        return None

    def match(self, name: str | None, *, fallback: bool = True) -> tuple[str, str] | None:
        """
        The model's name and how it was matched, for the log: C{"name"},
        C{"alias PATTERN"}, C{"default"} or C{"only model"}; None when
        nothing matches (or only the fallback would, without C{fallback}).
        A name ending in Ollama's default tag C{:latest} that matches
        nothing is read without it, as Ollama reads an untagged name with
        it (people copy names from C{ollama list}).
        """
        if name:
            found = self._named(name)
            if found is None and name.endswith(LATEST):
                found = self._named(name.removesuffix(LATEST))
            if found is not None:
                return found
        if not fallback:
            return None
        if self.default is not None:
            return self.default, "default"
        if not name and len(self._names) == 1:
            return self._names[0], "only model"
        return None


# strict: TOML has types, so a quoted number or a boolean where a number
# belongs is a mistake to report, not to coerce.
@dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class ModelSpec:
    """
    One model of a set: where its file is, what it serves, the names that
    reach it, and the options it overrides (C{None}: the command line's).

    Validated on construction (ranges, kind, parser names; the chat
    template is read and compiled). The model file itself is checked by
    the loaders, not here, so a spec can name a model that is not a file
    (the scripted engine's, in tests).

    @ivar chat_template_text: the text of C{chat_template}, read when the
        spec is made, so a template that cannot render fails at startup.
    """

    name: str
    path: Path = Field(strict=False)
    kind: Literal["chat", "embedding"] = "chat"
    aliases: tuple[str, ...] = Field(default=(), strict=False)
    ctx: int | None = Field(default=None, ge=1)
    parallel: int | None = Field(default=None, ge=1)
    batch: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    gpu_layers: int | Literal["all", "auto"] | None = None
    chat_template: Path | None = Field(default=None, strict=False)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    cache_ram_mb: int | None = Field(default=None, ge=0)
    pooling: Literal["mean", "cls", "last", "none", "rank"] | None = None
    embeddings: bool = False
    memory_mb: int | None = Field(default=None, ge=1)
    idle_unload: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # Not an argument: always read from chat_template, so that a spec
    # copied with another template (dataclasses.replace) reads the new one.
    chat_template_text: str | None = Field(default=None, init=False, repr=False)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not name or any(c.isspace() or c in GLOB_CHARS for c in name):
            raise ValueError(
                f"invalid model name {name!r}: a name is not empty and has no "
                "whitespace or glob characters (*?[)"
            )
        return name

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, aliases: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for alias in aliases:
            if not alias or any(c.isspace() for c in alias):
                raise ValueError(f"invalid alias {alias!r}: not empty, no whitespace")
            if alias in seen:
                raise ValueError(f"alias {alias!r} is listed twice")
            seen.add(alias)
        return aliases

    @field_validator("path", "chat_template")
    @classmethod
    def _expand(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser()

    # plain: a union of int and literals would report one error per
    # member; one sentence says it better.
    @field_validator("gpu_layers", mode="plain")
    @classmethod
    def _gpu_layers(cls, value: object) -> int | Literal["all", "auto"] | None:
        if value is None or value == "all" or value == "auto":
            return value
        if type(value) is int and value >= 0:
            return value
        raise ValueError(f'{value!r} is not a number >= 0, "all" or "auto"')

    @field_validator("reasoning_parser")
    @classmethod
    def _reasoning_parser(cls, name: str | None) -> str | None:
        if name is not None:
            reasoning_parser(name)
        return name

    @field_validator("tool_call_parser")
    @classmethod
    def _tool_call_parser(cls, name: str | None) -> str | None:
        if name is not None:
            tool_call_parser(name)
        return name

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.kind == "embedding":
            chat_only = [
                key
                for key in ("tool_call_parser", "reasoning_parser", "chat_template")
                if getattr(self, key) is not None
            ]
            if self.embeddings:
                chat_only.append("embeddings")
            if chat_only:
                raise ValueError(
                    f"an embedding model does not chat: {', '.join(chat_only)} "
                    'only apply to kind = "chat"'
                )
        elif self.pooling is not None and not self.embeddings:
            raise ValueError(
                'pooling applies to embeddings: set kind = "embedding" or embeddings = true'
            )
        if self.chat_template is not None:
            try:
                text = self.chat_template.read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"chat_template {self.chat_template}: {e.strerror or e}") from e
            try:
                ChatTemplate(text)
            except TemplateError as e:
                raise ValueError(f"chat_template {self.chat_template}: {e}") from e
            # Frozen: the derived field is filled once, while validating.
            object.__setattr__(self, "chat_template_text", text)
        return self

    def matches(self, name: str) -> str | None:
        """The first of this model's aliases that C{name} matches, if any."""
        for alias in self.aliases:
            if fnmatchcase(name, alias):
                return alias
        return None


#: The keys a models file's table may set.
FILE_KEYS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name not in _DERIVED)


class ModelSet:
    """
    The models a server serves, in the order they were configured, with
    an optional default. Immutable once made; a set that could not be
    served (two models of one name, an alias given twice or equal to
    another model's name, a default naming no model) raises
    L{ModelSetError} here.

    @param source: where the specs came from (a file, a directory,
        C{--model}), named in errors and in L{source_of}.
    """

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        *,
        default: str | None = None,
        source: str = "models",
    ) -> None:
        specs = tuple(specs)
        self._init([(spec, source) for spec in specs], default, source)

    def _init(
        self, placed: list[tuple[ModelSpec, str]], default: str | None, default_source: str
    ) -> None:
        self._specs = tuple(spec for spec, _ in placed)
        self._sources: dict[str, str] = {}
        self._by_name: dict[str, ModelSpec] = {}
        for spec, source in placed:
            if spec.name in self._by_name:
                first = self._sources[spec.name]
                where = f"in {first}" if first == source else f"in {first} and in {source}"
                raise ModelSetError(f"model {spec.name!r} is defined twice: {where}")
            self._by_name[spec.name] = spec
            self._sources[spec.name] = source
        owner: dict[str, ModelSpec] = {}
        for spec in self._specs:
            for alias in spec.aliases:
                other = self._by_name.get(alias)
                if other is not None and other is not spec:
                    raise ModelSetError(
                        f"{self._at(spec)}: alias {alias!r} is the name of "
                        f"{self._other(other, spec)}"
                    )
                if alias in owner:
                    raise ModelSetError(
                        f"{self._at(spec)}: alias {alias!r} is also an alias of "
                        f"{self._other(owner[alias], spec)}"
                    )
                owner[alias] = spec
        if default is not None and default not in self._by_name:
            raise ModelSetError(
                f"{default_source}: default {default!r} names no model "
                f"(models: {', '.join(self._by_name) or 'none'})"
            )
        self._default = default
        self._names = Names(((spec.name, spec.aliases) for spec in self._specs), default)

    def _at(self, spec: ModelSpec) -> str:
        return f"{self._sources[spec.name]}: model {spec.name!r}"

    def _other(self, other: ModelSpec, spec: ModelSpec) -> str:
        """Another model, with its source when it is not C{spec}'s."""
        source = self._sources[other.name]
        there = "" if source == self._sources[spec.name] else f" (in {source})"
        return f"model {other.name!r}{there}"

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        return self._specs

    @property
    def default(self) -> str | None:
        """The model a request naming no known model goes to, if any."""
        return self._default

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> ModelSpec:
        return self._by_name[name]

    def __repr__(self) -> str:
        return f"<ModelSet {', '.join(self._by_name)} default={self._default!r}>"

    def get(self, name: str) -> ModelSpec | None:
        """The model of exactly this name (aliases are not consulted)."""
        return self._by_name.get(name)

    def source_of(self, name: str) -> str:
        """Where the model of this name was configured."""
        return self._sources[name]

    def names(self) -> tuple[str, ...]:
        """The models' names, in configured order."""
        return tuple(self._by_name)

    def aliases(self) -> tuple[tuple[str, str], ...]:
        """Every alias as written (patterns included) with its model's name."""
        return tuple((alias, spec.name) for spec in self._specs for alias in spec.aliases)

    def match(self, name: str | None) -> tuple[ModelSpec, str] | None:
        """
        The model C{name} means and how it was matched, for the log:
        C{"name"}, C{"alias PATTERN"}, C{"default"} or C{"only model"}
        (no name, one model). C{None}: no model, and no default.
        """
        found = self._names.match(name)
        if found is None:
            return None
        model, how = found
        return self._by_name[model], how

    def resolve(self, name: str | None) -> ModelSpec | None:
        """
        The model a request's C{model} field means: a model's name, else
        an exact alias, else the first glob alias that matches in
        configured order, else the default; no name at all means the
        default (or the only model). C{None} when nothing matches.
        """
        found = self.match(name)
        return None if found is None else found[0]


def merge(*sets: ModelSet) -> ModelSet:
    """
    One set serving every model of C{sets} (C{--models} with
    C{--models-dir}), in order. Names and aliases stay unique across them
    (a clash names both sources); the default is the one set's that has
    one (two different defaults are an error).
    """
    defaults = [(s.default, s) for s in sets if s.default is not None]
    if len({d for d, _ in defaults}) > 1:
        listed = ", ".join(f"{d!r} ({s.source_of(d)})" for d, s in defaults)
        raise ModelSetError(f"more than one default model: {listed}")
    default, source = None, ""
    if defaults:
        default, source = defaults[0][0], defaults[0][1].source_of(defaults[0][0])
    merged = ModelSet.__new__(ModelSet)
    merged._init([(spec, s.source_of(spec.name)) for s in sets for spec in s], default, source)
    return merged


def load_models_file(path: str | Path) -> ModelSet:
    """The set a TOML models file describes (the format: this module's docstring)."""
    path = Path(path).expanduser()
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelSetError(f"models file {source}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ModelSetError(f"{source}: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        # tomllib's message carries the line and column.
        raise ModelSetError(f"{source}: not valid TOML: {e}") from e
    unknown = sorted(set(data) - {"default", "models"})
    if unknown:
        raise ModelSetError(
            f"{source}: unknown key {unknown[0]!r} at the top level "
            "(known: default, models; a model is a [models.NAME] table)"
        )
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise ModelSetError(f"{source}: default must be a model's name (a string)")
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ModelSetError(f"{source}: no models (add a [models.NAME] table with a path)")
    base = path.absolute().parent
    specs = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ModelSetError(f"{source}: models.{name} must be a table ([models.{name}])")
        specs.append(_spec_from_table(name, table, base, source))
    return ModelSet(specs, default=default, source=source)


def models_from_dir(path: str | Path) -> ModelSet:
    """
    Every C{*.gguf} file in the directory C{path} (not its subdirectories),
    sorted, each named after its file name without C{.gguf}. Multimodal
    projectors (names containing C{mmproj}) are not models and are left
    out; a split model is served from its first shard, named without the
    shard suffix (C{M-00001-of-00002.gguf} is C{M}).
    """
    path = Path(path).expanduser()
    source = str(path)
    if not path.is_dir():
        raise ModelSetError(f"models directory {source}: not a directory")
    specs = []
    for file in sorted(path.iterdir()):
        # Dot files include macOS's "._NAME.gguf" metadata twins.
        if file.suffix.lower() != ".gguf" or file.name.startswith(".") or not file.is_file():
            continue
        if "mmproj" in file.name.lower():
            continue
        name = file.name[: -len(file.suffix)]
        shard = _SHARD.match(name)
        if shard is not None:
            if int(shard["index"]) != 1:
                continue
            name = shard["base"]
        specs.append(_checked(name, {"path": file}, source))
    if not specs:
        raise ModelSetError(f"models directory {source}: no .gguf model files")
    return ModelSet(specs, source=source)


def single(path: str | Path, name: str | None = None, **options: Any) -> ModelSet:
    """
    The set of one model (C{--model}): named C{name} or after its file,
    with C{options} as L{ModelSpec}'s. It is the default, so any name a
    client sends reaches it, as a one-model server always did.
    """
    path = Path(path).expanduser()
    spec = _checked(name or path.stem, {"path": path, **options}, "--model")
    return ModelSet([spec], default=spec.name, source="--model")


def _spec_from_table(name: str, table: dict[str, Any], base: Path, source: str) -> ModelSpec:
    for key in table:
        if key not in FILE_KEYS:
            raise ModelSetError(f"{source}: model {name!r}: {_unknown_key(key)}")
    if "path" not in table:
        raise ModelSetError(f"{source}: model {name!r}: no path (the model's .gguf file)")
    values = dict(table)
    for key in ("path", "chat_template"):
        if isinstance(values.get(key), str):
            # Relative to the file, so a models file works from any cwd.
            values[key] = base / Path(values[key]).expanduser()
    return _checked(name, values, source)


def _checked(name: str, values: Mapping[str, Any], source: str) -> ModelSpec:
    """A spec from C{values}, its model file checked, any error a L{ModelSetError}."""
    try:
        spec = ModelSpec(name=name, **values)
    except ValidationError as e:
        raise ModelSetError(f"{source}: model {name!r}: {_explain(e)}") from e
    except TypeError as e:
        # A keyword the dataclass does not take, from single()'s options.
        raise ModelSetError(f"{source}: model {name!r}: {e}") from e
    if not spec.path.is_file():
        what = "not a file" if spec.path.exists() else "no such file"
        raise ModelSetError(f"{source}: model {name!r}: model file {spec.path}: {what}")
    return spec


def _unknown_key(key: str) -> str:
    if key in _DERIVED:
        if key == "name":
            return "'name' is not a key: a model's name is its table's, [models.NAME]"
        return "'chat_template_text' is not a key: give chat_template, a file"
    close = difflib.get_close_matches(key.replace("-", "_"), FILE_KEYS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(FILE_KEYS)}"
    return f"unknown key {key!r} ({hint})"


def _explain(error: ValidationError) -> str:
    """pydantic's errors as one line that names each key."""
    parts = []
    for e in error.errors(include_url=False):
        loc = e["loc"]
        key = str(loc[0]) if loc else ""
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parts.append(_unknown_key(key))
        elif key in ("", "name"):
            parts.append(msg)
        elif e["type"] == "value_error":
            parts.append(f"{key}: {msg}")
        else:
            at = ".".join(str(part) for part in loc)
            parts.append(f"{at}: {msg} (got {e['input']!r})")
    return "; ".join(parts)
