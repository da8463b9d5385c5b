"""
Prompts and request bodies: the same workload for every stack.

Every trial gets its own prompt, starting with different words, because
both servers (and a careful raw loop) reuse the KV cache for a common
prefix: sending the same prompt twice would measure a cache hit, not a
prefill. The prompts are drawn from a seeded generator, so raw, ds4tw and
the peer see exactly the same texts in the same order.

Sampling is greedy (temperature 0) with repeat penalty 1.0 everywhere
(llama_cpp.server's default is 1.1, ds4tw's 1.0), and the output length
is fixed: ds4tw takes C{ignore_eos}; llama_cpp.server has no such field,
so end-of-generation tokens get a C{logit_bias} of -1e9 there (applied
by a Python logits processor on every token: that is the peer's cost for
a fixed length, and the benchmark also measures it without).

Covered by tests/unit/test_bench.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._settings import Settings

Stack = Literal["ds4tw", "peer"]

_VOCAB = [
    "river",
    "stone",
    "cloud",
    "amber",
    "forest",
    "lantern",
    "copper",
    "meadow",
    "signal",
    "harbor",
    "violet",
    "garden",
    "window",
    "silver",
    "market",
    "bridge",
    "morning",
    "winter",
    "candle",
    "journey",
    "orchard",
    "thunder",
    "pebble",
    "compass",
    "velvet",
    "granite",
    "willow",
    "beacon",
    "canyon",
    "ember",
    "lagoon",
    "saddle",
    "quartz",
    "tundra",
    "meadowlark",
    "ferry",
    "summit",
    "glacier",
    "cobalt",
]

#: ChatML with the generation prompt opening a <think> block: with the
#: default C{think} reasoning parser every generated token is reasoning,
#: and with C{reasoning_effort: "none"} it is hidden. On the
#: non-thinking demo model that makes a decode that sends no bytes at all
#: (only keepalive comments), which is what the keepalive probe needs.
THINK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)


class Prompts:
    """A seeded supply of fresh prompts (no two start alike)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._n = 0

    def words(self, n: int) -> str:
        self._n += 1
        # The trial number first: distinct from the first token on.
        head = f"Note {self._n}:"
        return head + " " + " ".join(self._rng.choice(_VOCAB) for _ in range(max(0, n - 2)))


@dataclass(frozen=True)
class Plan:
    """
    The prompts of the throughput part, fixed before any stack runs, so
    that raw, ds4tw and the peer measure exactly the same texts in the
    same order.
    """

    warmup: str
    decode: tuple[str, ...]
    ttft: tuple[str, ...]
    long: tuple[str, ...]


def plan(settings: Settings) -> Plan:
    p = Prompts(settings.seed)
    return Plan(
        warmup=p.words(settings.short_words),
        decode=tuple(p.words(settings.short_words) for _ in range(settings.decode_trials)),
        ttft=tuple(p.words(settings.short_words) for _ in range(settings.ttft_trials)),
        long=tuple(p.words(settings.long_words) for _ in range(settings.long_trials)),
    )


def completion_body(
    stack: Stack,
    prompt: str,
    max_tokens: int,
    *,
    fixed_length: bool = True,
    eog_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """A streaming C{/v1/completions} body for C{stack}, greedy."""
    body: dict[str, Any] = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
        "stream": True,
    }
    if stack == "ds4tw":
        body["stream_options"] = {"include_usage": True}
        if fixed_length:
            body["ignore_eos"] = True
    elif fixed_length:
        body["logit_bias"] = {str(t): -1e9 for t in eog_ids}
    return body


def silent_chat_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    """
    A ds4tw chat stream whose decode sends nothing: with L{THINK_TEMPLATE}
    every token is reasoning and C{reasoning_effort: "none"} hides it.
    """
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "reasoning_effort": "none",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
