"""
The model set: the models file, a models directory, one --model, and how
a request's model name resolves. Placeholder .gguf files stand in for
models: nothing here loads one, so a file's content never matters, only
that it exists.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from ds4tw._runtime.modelset import (
    ModelSet,
    ModelSetError,
    ModelSpec,
    load_models_file,
    merge,
    models_from_dir,
    single,
)

EXAMPLE = """\
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
"""

EXAMPLE_FILES = (
    "Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf",
    "Qwen3-4B-Instruct-2507-Q4_K_M.gguf",
    "nomic-embed-text-v1.5.Q8_0.gguf",
)

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def gguf(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(b"GGUF")


def models_file(tmp_path: Path, text: str, *files: str) -> Path:
    gguf(tmp_path, *files)
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def example(tmp_path: Path) -> ModelSet:
    return load_models_file(models_file(tmp_path, EXAMPLE, *EXAMPLE_FILES))


def fails(tmp_path: Path, text: str, *files: str) -> str:
    """The error message loading C{text} as a models file gives."""
    path = models_file(tmp_path, text, *files)
    with pytest.raises(ModelSetError) as info:
        load_models_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


def one(table: str) -> str:
    """A models file of one model, C{m}, with the keys C{table} adds."""
    return f'[models.m]\npath = "m.gguf"\n{table}\n'


# The example file


def test_example_file_field_by_field(tmp_path: Path) -> None:
    models = example(tmp_path)
    assert models.names() == ("coder", "small", "embed")
    assert models.default == "coder"
    coder, small, embed = models.specs
    assert coder == ModelSpec(
        name="coder",
        path=tmp_path / "Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf",
        aliases=("claude-sonnet-*", "claude-opus-*", "gpt-*"),
        ctx=32768,
        parallel=2,
        gpu_layers="all",
    )
    assert coder.kind == "chat"
    assert (coder.batch, coder.threads, coder.cache_ram_mb, coder.memory_mb) == (None,) * 4
    assert (coder.chat_template, coder.chat_template_text, coder.pooling) == (None,) * 3
    assert (coder.tool_call_parser, coder.reasoning_parser, coder.idle_unload) == (None,) * 3
    assert coder.embeddings is False
    assert small == ModelSpec(
        name="small",
        path=tmp_path / "Qwen3-4B-Instruct-2507-Q4_K_M.gguf",
        aliases=("claude-haiku-*", "claude-3-5-haiku-*"),
    )
    assert small.ctx is None and small.gpu_layers is None
    assert embed == ModelSpec(
        name="embed",
        path=tmp_path / "nomic-embed-text-v1.5.Q8_0.gguf",
        kind="embedding",
        pooling="mean",
        aliases=("text-embedding-*",),
    )
    assert models.aliases() == (
        ("claude-sonnet-*", "coder"),
        ("claude-opus-*", "coder"),
        ("gpt-*", "coder"),
        ("claude-haiku-*", "small"),
        ("claude-3-5-haiku-*", "small"),
        ("text-embedding-*", "embed"),
    )
    assert models.source_of("small") == str(tmp_path / "models.toml")


def test_example_file_resolves_agents_names(tmp_path: Path) -> None:
    models = example(tmp_path)
    coder, small, embed = models.specs
    assert models.match("claude-sonnet-4-5-20250929") == (coder, "alias claude-sonnet-*")
    assert models.match("claude-haiku-4-5-20251001") == (small, "alias claude-haiku-*")
    assert models.match("claude-3-5-haiku-latest") == (small, "alias claude-3-5-haiku-*")
    assert models.match("text-embedding-3-small") == (embed, "alias text-embedding-*")
    assert models.match("small") == (small, "name")
    assert models.match("llama3") == (coder, "default")
    assert models.match(None) == (coder, "default")
    assert models.match("") == (coder, "default")
    assert models.resolve("gpt-4o") is coder


def test_get_and_lookup_by_exact_name_only(tmp_path: Path) -> None:
    models = example(tmp_path)
    assert models.get("embed") is models["embed"] is models.specs[2]
    assert "embed" in models and "text-embedding-3-small" not in models
    assert models.get("text-embedding-3-small") is None
    with pytest.raises(KeyError):
        models["gpt-4o"]
    assert len(models) == 3 and list(models) == list(models.specs)


# Resolution order


def test_name_beats_exact_alias_beats_glob(tmp_path: Path) -> None:
    text = """
        [models.wide]
        path = "wide.gguf"
        aliases = ["*"]
        [models.exact]
        path = "exact.gguf"
        aliases = ["gpt-4o"]
        [models.named]
        path = "named.gguf"
    """
    models = load_models_file(models_file(tmp_path, text, "wide.gguf", "exact.gguf", "named.gguf"))
    wide, exact, named = models.specs
    # "*" comes first in the file and matches both, but a name and an
    # exact alias are looked up before any pattern.
    assert models.match("named") == (named, "name")
    assert models.match("gpt-4o") == (exact, "alias gpt-4o")
    assert models.match("gpt-4o-mini") == (wide, "alias *")
    assert models.match("wide") == (wide, "name")


def test_first_glob_in_file_order_wins(tmp_path: Path) -> None:
    gguf(tmp_path, "big.gguf", "small.gguf")
    broad_first = """
        [models.big]
        path = "big.gguf"
        aliases = ["claude-*"]
        [models.small]
        path = "small.gguf"
        aliases = ["claude-haiku-*"]
    """
    models = load_models_file(models_file(tmp_path, broad_first))
    assert models.match("claude-haiku-4-5") == (models["big"], "alias claude-*")
    narrow_first = """
        [models.small]
        path = "small.gguf"
        aliases = ["claude-haiku-*"]
        [models.big]
        path = "big.gguf"
        aliases = ["claude-*"]
    """
    models = load_models_file(models_file(tmp_path, narrow_first))
    assert models.match("claude-haiku-4-5") == (models["small"], "alias claude-haiku-*")
    assert models.match("claude-opus-4-1") == (models["big"], "alias claude-*")


def test_globs_within_one_model_keep_their_order(tmp_path: Path) -> None:
    text = one('aliases = ["gpt-4o*", "gpt-*", "o?-mini", "[cd]ode"]')
    models = load_models_file(models_file(tmp_path, text, "m.gguf"))
    assert models.match("gpt-4o-mini") == (models["m"], "alias gpt-4o*")
    assert models.match("gpt-5") == (models["m"], "alias gpt-*")
    assert models.match("o3-mini") == (models["m"], "alias o?-mini")
    assert models.match("code") == (models["m"], "alias [cd]ode")
    # The only model is no default: a name that matches nothing is unknown.
    assert models.match("mode") is None
    assert models["m"].matches("gpt-5") == "gpt-*" and models["m"].matches("x") is None


def test_no_default_resolves_unknown_names_to_nothing(tmp_path: Path) -> None:
    text = """
        [models.a]
        path = "a.gguf"
        aliases = ["claude-haiku-*"]
        [models.b]
        path = "b.gguf"
    """
    models = load_models_file(models_file(tmp_path, text, "a.gguf", "b.gguf"))
    assert models.default is None
    assert models.resolve("gpt-4o") is None
    assert models.match("gpt-4o") is None
    # With two models and no default, no name picks neither.
    assert models.resolve(None) is None
    assert models.resolve("") is None
    # Case-sensitive, as model ids are.
    assert models.resolve("Claude-Haiku-4-5") is None
    assert models.resolve("A") is None
    assert models.resolve("claude-haiku-4-5") is models["a"]


def test_only_model_serves_an_empty_name_but_not_an_unknown_one(tmp_path: Path) -> None:
    models = load_models_file(models_file(tmp_path, one(""), "m.gguf"))
    assert models.match(None) == (models["m"], "only model")
    assert models.match("") == (models["m"], "only model")
    assert models.match("gpt-4o") is None


# Paths


def test_relative_paths_are_the_files_directory_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    gguf(tmp_path / "sub", "m.gguf")
    (tmp_path / "sub" / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = models_file(tmp_path, '[models.m]\npath = "sub/m.gguf"\nchat_template = "sub/t.jinja"\n')
    (spec,) = load_models_file(path)
    assert spec.path == tmp_path / "sub" / "m.gguf"
    assert spec.chat_template == tmp_path / "sub" / "t.jinja"
    assert spec.chat_template_text == TEMPLATE


def test_relative_models_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models_file(tmp_path, one(""), "m.gguf")
    monkeypatch.chdir(tmp_path)
    (spec,) = load_models_file("models.toml")
    assert spec.path == tmp_path / "m.gguf"


def test_home_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    gguf(home, "h.gguf")
    gguf(tmp_path, "abs.gguf")
    (home / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    conf = tmp_path / "conf"
    conf.mkdir()
    text = f"""
        [models.h]
        path = "~/h.gguf"
        chat_template = "~/t.jinja"
        [models.abs]
        path = "{tmp_path / "abs.gguf"}"
    """
    (conf / "models.toml").write_text(text, encoding="utf-8")
    models = load_models_file("~/../conf/models.toml")
    assert models["h"].path == home / "h.gguf"
    assert models["h"].chat_template_text == TEMPLATE
    assert models["abs"].path == tmp_path / "abs.gguf"


# Errors: each names the file and the model


def test_toml_syntax_error_carries_line_and_column(tmp_path: Path) -> None:
    message = fails(tmp_path, '[models.m]\npath = "m.gguf"\nctx = = 4\n')
    assert "not valid TOML" in message
    assert "line 3" in message and "column" in message


def test_missing_models_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSetError, match=r"models file .*nope\.toml: No such file"):
        load_models_file(tmp_path / "nope.toml")


def test_missing_model_file_names_model_and_path(tmp_path: Path) -> None:
    message = fails(tmp_path, one(""))
    assert message.endswith(f"model 'm': model file {tmp_path / 'm.gguf'}: no such file")
    (tmp_path / "d.gguf").mkdir()
    message = fails(tmp_path, '[models.m]\npath = "d.gguf"\n')
    assert message.endswith(f"model 'm': model file {tmp_path / 'd.gguf'}: not a file")


def test_file_shape_errors(tmp_path: Path) -> None:
    assert "no models" in fails(tmp_path, 'default = "m"\n')
    assert "no models" in fails(tmp_path, "[models]\n")
    assert "unknown key 'model' at the top level" in fails(tmp_path, '[model.m]\npath = "m"\n')
    assert "models.m must be a table" in fails(tmp_path, 'models = { m = "m.gguf" }\n')
    assert "default must be a model's name" in fails(tmp_path, "default = 1\n" + one(""), "m.gguf")
    assert fails(tmp_path, "[models.m]\nctx = 4\n").endswith(
        "model 'm': no path (the model's .gguf file)"
    )


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    message = fails(tmp_path, one("gpu-layers = 3"), "m.gguf")
    assert message.endswith("model 'm': unknown key 'gpu-layers' (did you mean 'gpu_layers'?)")
    message = fails(tmp_path, one("colour = 3"), "m.gguf")
    assert "model 'm': unknown key 'colour' (known: path, kind, aliases, ctx," in message
    message = fails(tmp_path, one('name = "other"'), "m.gguf")
    assert "model 'm': 'name' is not a key" in message
    message = fails(tmp_path, one('chat_template_text = "x"'), "m.gguf")
    assert "model 'm': 'chat_template_text' is not a key" in message


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("ctx = 0", "ctx: Input should be greater than or equal to 1 (got 0)"),
        ("parallel = 0", "parallel: Input should be greater than or equal to 1"),
        ("batch = -5", "batch: Input should be greater than or equal to 1"),
        ("threads = 0", "threads: Input should be greater than or equal to 1"),
        ("memory_mb = 0", "memory_mb: Input should be greater than or equal to 1"),
        ("cache_ram_mb = -1", "cache_ram_mb: Input should be greater than or equal to 0"),
        ("idle_unload = -0.5", "idle_unload: Input should be greater than or equal to 0"),
        ("idle_unload = nan", "idle_unload: Input should be a finite number"),
        ('ctx = "4096"', "ctx: Input should be a valid integer (got '4096')"),
        ("parallel = 2.0", "parallel: Input should be a valid integer"),
        ("ctx = true", "ctx: Input should be a valid integer"),
        ('embeddings = "yes"', "embeddings: Input should be a valid boolean"),
        ('kind = "rerank"', "kind: Input should be 'chat' or 'embedding'"),
        ('pooling = "max"\nembeddings = true', "pooling: Input should be 'mean', 'cls'"),
        ("gpu_layers = -1", 'gpu_layers: -1 is not a number >= 0, "all" or "auto"'),
        ('gpu_layers = "most"', "gpu_layers: 'most' is not a number >= 0"),
        ("gpu_layers = true", "gpu_layers: True is not a number >= 0"),
        ("aliases = [1]", "aliases.0: Input should be a valid string"),
        ('aliases = "gpt-*"', "aliases: Input should be a valid tuple"),
        ('aliases = [""]', "aliases: invalid alias ''"),
        ('aliases = ["gpt 4"]', "aliases: invalid alias 'gpt 4'"),
        ('aliases = ["gpt-*", "gpt-*"]', "aliases: alias 'gpt-*' is listed twice"),
        ('reasoning_parser = "nope"', "reasoning_parser: unknown reasoning parser 'nope'"),
        ('tool_call_parser = "nope"', "tool_call_parser: unknown tool-call parser 'nope'"),
        (
            'kind = "embedding"\ntool_call_parser = "hermes"',
            "an embedding model does not chat: tool_call_parser only apply",
        ),
        (
            'kind = "embedding"\nreasoning_parser = "think"',
            "an embedding model does not chat: reasoning_parser only apply",
        ),
        (
            'kind = "embedding"\nembeddings = true',
            "an embedding model does not chat: embeddings only apply",
        ),
        ('pooling = "mean"', 'pooling applies to embeddings: set kind = "embedding"'),
    ],
)
def test_invalid_values(tmp_path: Path, table: str, expected: str) -> None:
    message = fails(tmp_path, one(table), "m.gguf")
    assert f"model 'm': {expected}" in message


def test_valid_edge_values(tmp_path: Path) -> None:
    text = one(
        'gpu_layers = 0\ncache_ram_mb = 0\nidle_unload = 0\nreasoning_parser = "<a>,</a>"\n'
        'tool_call_parser = "qwen3_coder"\nembeddings = true\npooling = "last"\nthreads = 1'
    )
    (spec,) = load_models_file(models_file(tmp_path, text, "m.gguf"))
    assert (spec.gpu_layers, spec.cache_ram_mb, spec.idle_unload) == (0, 0, 0.0)
    assert (spec.reasoning_parser, spec.tool_call_parser) == ("<a>,</a>", "qwen3_coder")
    assert (spec.embeddings, spec.pooling, spec.threads) == (True, "last", 1)
    (spec,) = load_models_file(models_file(tmp_path, one("idle_unload = 90.5"), "m.gguf"))
    assert spec.idle_unload == 90.5


def test_chat_template_errors(tmp_path: Path) -> None:
    message = fails(tmp_path, one('chat_template = "t.jinja"'), "m.gguf")
    assert f"model 'm': chat_template {tmp_path / 't.jinja'}: No such file" in message
    (tmp_path / "t.jinja").write_text("{% for m in messages %}", encoding="utf-8")
    message = fails(tmp_path, one('chat_template = "t.jinja"'), "m.gguf")
    assert f"model 'm': chat_template {tmp_path / 't.jinja'}: the chat template does not" in message
    (tmp_path / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    message = fails(tmp_path, one('kind = "embedding"\nchat_template = "t.jinja"'), "m.gguf")
    assert "an embedding model does not chat: chat_template only apply" in message


@pytest.mark.parametrize("name", ['"a b"', '"gpt-*"', '"o?"', '"x[1]"', '""', '"tab\\t"'])
def test_invalid_model_names(tmp_path: Path, name: str) -> None:
    message = fails(tmp_path, f'[models.{name}]\npath = "m.gguf"\n', "m.gguf")
    assert re.search(r"model '.*': invalid model name '.*': a name is not empty", message)


def test_alias_equal_to_another_models_name(tmp_path: Path) -> None:
    text = """
        [models.big]
        path = "big.gguf"
        aliases = ["small"]
        [models.small]
        path = "small.gguf"
    """
    message = fails(tmp_path, text, "big.gguf", "small.gguf")
    assert message.endswith("model 'big': alias 'small' is the name of model 'small'")


def test_alias_naming_its_own_model_is_harmless(tmp_path: Path) -> None:
    models = load_models_file(models_file(tmp_path, one('aliases = ["m", "n"]'), "m.gguf"))
    assert models.match("m") == (models["m"], "name")
    assert models.match("n") == (models["m"], "alias n")


def test_same_alias_on_two_models(tmp_path: Path) -> None:
    text = """
        [models.a]
        path = "a.gguf"
        aliases = ["gpt-*"]
        [models.b]
        path = "b.gguf"
        aliases = ["x", "gpt-*"]
    """
    message = fails(tmp_path, text, "a.gguf", "b.gguf")
    assert message.endswith("model 'b': alias 'gpt-*' is also an alias of model 'a'")


def test_default_naming_no_model(tmp_path: Path) -> None:
    text = 'default = "gpt-*"\n[models.a]\npath = "a.gguf"\naliases = ["gpt-*"]\n'
    message = fails(tmp_path, text, "a.gguf")
    assert message.endswith("default 'gpt-*' names no model (models: a)")


def test_duplicate_names_in_a_set() -> None:
    spec = ModelSpec(name="a", path=Path("a.gguf"))
    with pytest.raises(ModelSetError, match=r"^model 'a' is defined twice: in conf$"):
        ModelSet([spec, dataclasses.replace(spec, ctx=8)], source="conf")


# A models directory


def test_models_dir_names_files_and_skips_projectors_and_later_shards(tmp_path: Path) -> None:
    gguf(
        tmp_path,
        "b.gguf",
        "a.Q4_K_M.gguf",
        "mmproj-a-f16.gguf",
        "Qwen2.5-VL-7B-mmproj-f16.gguf",
        "big-00001-of-00003.gguf",
        "big-00002-of-00003.gguf",
        "big-00003-of-00003.gguf",
        "UPPER.GGUF",
        ".hidden.gguf",
        "notes.txt",
        "a.gguf.part",
    )
    (tmp_path / "sub").mkdir()
    gguf(tmp_path / "sub", "deep.gguf")
    (tmp_path / "dir.gguf").mkdir()
    models = models_from_dir(tmp_path)
    assert models.names() == ("UPPER", "a.Q4_K_M", "b", "big")
    assert models["big"].path == tmp_path / "big-00001-of-00003.gguf"
    assert models["b"].path == tmp_path / "b.gguf"
    assert all(spec.aliases == () and spec.kind == "chat" for spec in models)
    assert models.default is None
    assert models.resolve("big-00002-of-00003") is None
    assert models.source_of("b") == str(tmp_path)


def test_models_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSetError, match=r"models directory .*missing: not a directory"):
        models_from_dir(tmp_path / "missing")
    gguf(tmp_path, "mmproj-f16.gguf", "m-00002-of-00002.gguf", "readme.md")
    with pytest.raises(ModelSetError, match=r"models directory .*: no \.gguf model files"):
        models_from_dir(tmp_path)
    gguf(tmp_path, "my model.gguf")
    with pytest.raises(ModelSetError, match=r": model 'my model': invalid model name"):
        models_from_dir(tmp_path)


def test_models_dir_shard_and_whole_file_of_one_name_clash(tmp_path: Path) -> None:
    gguf(tmp_path, "m.gguf", "m-00001-of-00002.gguf")
    with pytest.raises(ModelSetError, match=rf"^model 'm' is defined twice: in {tmp_path}$"):
        models_from_dir(tmp_path)


# Merging a file with a directory


def test_merge_file_and_dir(tmp_path: Path) -> None:
    models_dir = tmp_path / "more"
    models_dir.mkdir()
    gguf(models_dir, "llama.gguf")
    models = merge(example(tmp_path), models_from_dir(models_dir))
    assert models.names() == ("coder", "small", "embed", "llama")
    assert models.default == "coder"
    assert models.resolve("llama") is models["llama"]
    assert models.match("claude-haiku-4-5") == (models["small"], "alias claude-haiku-*")
    assert models.match("mistral") == (models["coder"], "default")
    assert models.source_of("llama") == str(models_dir)
    assert models.source_of("coder") == str(tmp_path / "models.toml")
    # The default survives whichever order the sets come in.
    assert merge(models_from_dir(models_dir), example(tmp_path)).default == "coder"


def test_merge_name_clash_names_both_sources(tmp_path: Path) -> None:
    models_dir = tmp_path / "more"
    models_dir.mkdir()
    gguf(models_dir, "small.gguf")
    file = tmp_path / "models.toml"
    with pytest.raises(ModelSetError) as info:
        merge(example(tmp_path), models_from_dir(models_dir))
    assert str(info.value) == f"model 'small' is defined twice: in {file} and in {models_dir}"


def test_merge_alias_clash_names_both_sources(tmp_path: Path) -> None:
    models_dir = tmp_path / "more"
    models_dir.mkdir()
    gguf(models_dir, "gpt-4o.gguf")
    text = '[models.m]\npath = "m.gguf"\naliases = ["gpt-4o"]\n'
    file = models_file(tmp_path, text, "m.gguf")
    with pytest.raises(ModelSetError) as info:
        merge(load_models_file(file), models_from_dir(models_dir))
    assert str(info.value) == (
        f"{file}: model 'm': alias 'gpt-4o' is the name of model 'gpt-4o' (in {models_dir})"
    )
    # A pattern may match another model's name: the name wins.
    file.write_text('[models.m]\npath = "m.gguf"\naliases = ["gpt-*"]\n', encoding="utf-8")
    models = merge(load_models_file(file), models_from_dir(models_dir))
    assert models.match("gpt-4o") == (models["gpt-4o"], "name")
    assert models.match("gpt-5") == (models["m"], "alias gpt-*")


def test_merge_two_defaults(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = load_models_file(
        models_file(a, 'default = "x"\n[models.x]\npath = "x.gguf"\n', "x.gguf")
    )
    second = load_models_file(
        models_file(b, 'default = "y"\n[models.y]\npath = "y.gguf"\n', "y.gguf")
    )
    with pytest.raises(ModelSetError) as info:
        merge(first, second)
    assert str(info.value) == (
        f"more than one default model: 'x' ({a / 'models.toml'}), 'y' ({b / 'models.toml'})"
    )


# One --model


def test_single_model_is_named_after_its_file_and_is_the_default(tmp_path: Path) -> None:
    gguf(tmp_path, "SmolLM2-135M-Instruct.Q4_1.gguf")
    models = single(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf", ctx=2048, gpu_layers=0)
    (spec,) = models
    assert spec.name == "SmolLM2-135M-Instruct.Q4_1"
    assert (spec.ctx, spec.gpu_layers) == (2048, 0)
    assert models.default == spec.name
    # Every name still reaches the one model, as before model sets.
    assert models.match("claude-sonnet-4-5") == (spec, "default")
    assert models.match(spec.name) == (spec, "name")
    assert single(spec.path, "smol").names() == ("smol",)


def test_single_model_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ModelSetError, match=r"^--model: model 'nope': model file .*: no such file$"
    ):
        single(tmp_path / "nope.gguf")
    gguf(tmp_path, "m.gguf")
    with pytest.raises(ModelSetError, match=r"^--model: model 'm': ctx: Input should be greater"):
        single(tmp_path / "m.gguf", ctx=0)
    with pytest.raises(ModelSetError, match=r"^--model: model 'm': unknown key 'ctxx'"):
        single(tmp_path / "m.gguf", ctxx=4)


# ModelSpec on its own


def test_spec_validates_on_construction_without_touching_the_model_file() -> None:
    # No file: a scripted engine's spec, or a test's.
    spec = ModelSpec(name="scripted", path=Path("~/not-there.gguf"))
    assert spec.path == Path.home() / "not-there.gguf"
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        ModelSpec(name="x", path=Path("x"), ctx=0)
    with pytest.raises(ValidationError, match="invalid model name"):
        ModelSpec(name="x*", path=Path("x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ctx = 5  # type: ignore[misc]


def test_spec_copy_reads_its_new_template(tmp_path: Path) -> None:
    (tmp_path / "a.jinja").write_text(TEMPLATE, encoding="utf-8")
    (tmp_path / "b.jinja").write_text(TEMPLATE + "!", encoding="utf-8")
    spec = ModelSpec(name="m", path=Path("m.gguf"), chat_template=tmp_path / "a.jinja")
    assert spec.chat_template_text == TEMPLATE
    assert "chat_template_text" not in repr(spec)
    other = dataclasses.replace(spec, chat_template=tmp_path / "b.jinja")
    assert other.chat_template_text == TEMPLATE + "!"
    assert dataclasses.replace(spec, chat_template=None).chat_template_text is None
