"""
The prompt cache: saved prefix states in memory and on disk,
so that a conversation's next turn, after other conversations took its
slot or after a restart, prefills only what is new.

  - L{_index}: one tier, its lookup by longest token prefix, its budget
    and its eviction score;
  - L{_file}: the on-disk format (atomic writes, identity header,
    checksums);
  - L{_cache}: L{PromptCache}, both tiers, the reader and writer threads,
    the counters /metrics shows;
  - L{_prefixes}: L{Prefixes}, the engines' shared decision of where a
    new sequence's prefix comes from.

docs/cache.md is the user's guide.

Covered by tests/unit/test_kvcache.py, tests/unit/test_kvcache_file.py,
tests/unit/test_kvcache_index.py and tests/integration/test_prompt_cache.py.
"""

from ._cache import DEFAULT_MIN_TOKENS, CacheStats, PromptCache, Restore
from ._prefixes import Prefixes, States, template_opening

__all__ = [
    "DEFAULT_MIN_TOKENS",
    "CacheStats",
    "Prefixes",
    "PromptCache",
    "Restore",
    "States",
    "template_opening",
]
