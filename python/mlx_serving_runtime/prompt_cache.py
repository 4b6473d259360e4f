"""Prompt (KV) cache: finished requests' caches, reused for a new request's longest cached prefix.

Entries are keyed per model and scope by the exact tokens their KV cache covers (a finished
row's prompt plus what it generated, as BatchGenerator reports them), held in mlx-lm's own
``PromptTrie`` for prefix search and in an LRU bounded by bytes (the sum of the entries'
``nbytes``; the trie's own dicts are not counted). A lookup reuses, of every entry:

- one whose tokens are a prefix of the request's, as it is;
- one that shares a longer common prefix with the request (the same prompt asked again,
  or a chat that grew by a turn), copied and trimmed to the common prefix with mlx-lm's
  ``trim_prompt_cache`` (only caches that ``can_trim_prompt_cache``);

and always leaves at least one prompt token to compute, since the row's first logits
come from prefilling it. Entries are copied out, never handed to a batch, so a stored
cache is never written by the generation that reuses it.

A scope (the request's ``cache_scope``; the worker passes the job's tenant) sees only the
entries stored under it. Shared across scopes, a cache tells one caller what another sent
and received: ``cached_tokens`` (and the time to the first token) grows when a guessed
prefix matches, and the red team read another tenant's secret out of a prompt that way
(F1). Two scopes asking the same prompt therefore each compute and keep it.

Only the generation thread calls ``fetch``, ``store`` and the trimming methods; ``stats``
may be read from any thread (plain ints, read under the GIL).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import KVCache, PromptTrie, can_trim_prompt_cache, trim_prompt_cache

GiB = 1 << 30
DEFAULT_FRACTION = 8  # of physical memory
DEFAULT_CAP = 16 * GiB
DEFAULT_UNKNOWN_MEMORY = 1 * GiB
PRESSURE_FRACTION = 0.9  # of the memory limit: above it, entries are dropped


def default_max_bytes(total_memory: int) -> int:
    """The default bound: 1/8 of the machine's memory, at most 16 GiB (1 GiB when unknown)."""
    if total_memory <= 0:
        return DEFAULT_UNKNOWN_MEMORY
    return min(total_memory // DEFAULT_FRACTION, DEFAULT_CAP)


def cache_nbytes(cache: list[Any]) -> int:
    return int(sum(c.nbytes for c in cache))


@dataclass
class _Entry:
    cache: list[Any]
    nbytes: int


def _copy_prefix(cache: list[Any], have: int, n: int) -> list[Any]:
    """A copy of cache (covering `have` tokens) cut to its first n tokens."""
    if all(type(c) is KVCache for c in cache):
        # A plain KV cache: slicing copies only what is reused, not the whole entry.
        out = []
        for c in cache:
            k = KVCache()
            k.keys = c.keys[..., :n, :]
            k.values = c.values[..., :n, :]
            k.offset = n
            out.append(k)
        return out
    out = copy.deepcopy(cache)
    if have > n:
        trim_prompt_cache(out, have - n)
    return out


class PromptCache:
    def __init__(
        self,
        max_bytes: int,
        memory_limit: int = 0,
        active_memory: Callable[[], int] | None = None,
    ) -> None:
        self.max_bytes = max(0, int(max_bytes))
        # Above PRESSURE_FRACTION of memory_limit (bytes; 0: never), entries are dropped.
        self.memory_limit = max(0, int(memory_limit))
        self._active = active_memory
        self._trie = PromptTrie()
        # ((model, scope), tokens) -> entry; the trie's "model" is (model, scope) too.
        self._lru: OrderedDict[tuple[tuple[str, str], tuple[int, ...]], _Entry] = OrderedDict()
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.hit_tokens = 0
        self.prompt_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._lru),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_tokens": self.hit_tokens,
            "prompt_tokens": self.prompt_tokens,
        }

    # ---- lookup ----

    def _best(self, space: tuple[str, str], tokens: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """(tokens reusable, key of the entry to reuse them from) within space (model, scope)."""
        limit = len(tokens) - 1  # one token is always computed
        if limit <= 0:
            return 0, None
        r = self._trie.search(space, tokens)
        best, key = 0, None
        if r.exact is not None:
            e = self._trie.get(space, r.exact)
            if can_trim_prompt_cache(e.cache):
                return limit, tuple(r.exact)
        if r.shorter is not None and len(r.shorter) > best:
            best, key = len(r.shorter), tuple(r.shorter)
        if r.longer is not None:
            n = min(r.common_prefix, limit)
            if n > best and can_trim_prompt_cache(self._trie.get(space, r.longer).cache):
                best, key = n, tuple(r.longer)
        return best, key

    def fetch(self, model: str, tokens: list[int], scope: str = "") -> tuple[list[Any] | None, int]:
        """A private copy of the cache of tokens' longest prefix cached in scope, and its length.

        (None, 0) when nothing is reusable or caching is off. The caller computes
        tokens[n:] on top of the copy.
        """
        if not self.enabled:
            return None, 0
        self.lookups += 1
        self.prompt_tokens += len(tokens)
        space = (model, scope)
        n, key = self._best(space, tokens)
        if n <= 0 or key is None:
            return None, 0
        lkey = (space, key)
        entry = self._lru[lkey]
        self._lru.move_to_end(lkey)
        cache = _copy_prefix(entry.cache, len(key), n)
        self.hits += 1
        self.hit_tokens += n
        return cache, n

    # ---- storing and dropping ----

    def store(self, model: str, tokens: list[int], cache: list[Any], scope: str = "") -> bool:
        """Keep cache, which covers exactly tokens, in scope; False when off or when it cannot fit."""
        if not self.enabled or not tokens or not cache:
            return False
        nbytes = cache_nbytes(cache)
        if nbytes > self.max_bytes:
            return False
        tokens = list(tokens)
        space = (model, scope)
        key = (space, tuple(tokens))
        entry = _Entry(cache, nbytes)
        prev = self._trie.add(space, tokens, entry)
        if prev is not None:
            self.bytes -= prev.nbytes
            self._lru.pop(key, None)
        self._lru[key] = entry
        self.bytes += nbytes
        if can_trim_prompt_cache(cache):
            # Entries that are prefixes of this one are covered by it (trimmed on reuse).
            for n, old in self._trie.pop_prefixes(space, tokens):
                self.bytes -= old.nbytes
                self._lru.pop((space, tuple(tokens[:n])), None)
        while self.bytes > self.max_bytes and self._lru:
            self._pop_oldest()
        return True

    def _pop_oldest(self) -> None:
        (space, key), entry = self._lru.popitem(last=False)
        self._trie.pop(space, list(key))
        self.bytes -= entry.nbytes

    def drop_model(self, model: str) -> None:
        """Drop the model's entries, in every scope."""
        spaces = {k[0] for k in self._lru if k[0][0] == model}
        for key in [k for k in self._lru if k[0] in spaces]:
            self.bytes -= self._lru.pop(key).nbytes
        for space in spaces:
            self._trie._trie.pop(space, None)

    def clear(self) -> int:
        """Drop every entry (memory ran out); returns how many there were."""
        n = len(self._lru)
        self._lru.clear()
        self._trie = PromptTrie()
        self.bytes = 0
        return n

    def relieve(self) -> int:
        """Drop least recently used entries while active memory is above the pressure line."""
        if not self.memory_limit or self._active is None:
            return 0
        line = int(self.memory_limit * PRESSURE_FRACTION)
        n = 0
        while self._lru and self._active() > line:
            self._pop_oldest()
            n += 1
        return n
