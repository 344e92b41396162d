"""Paged KV cache bookkeeping: fixed-size blocks, block tables, and automatic prefix caching.

The runner (``llama.py``) stores keys and values in one pool of ``num_blocks * block_size`` token
rows per layer; a sequence owns a *block table*, the list of its blocks in order, so position ``p``
lives in row ``table[p // block_size] * block_size + p % block_size``. This module decides which
blocks a sequence gets; it never touches tensors. Block 0 is the null block: padding writes land
there and padded reads are masked, so it is never handed out.

Prefix caching, as vLLM's automatic prefix caching does it: a block that is full is named by a hash
of its tokens chained with the hash of the block before it (and of the adapter, whose keys and
values differ). A later sequence whose prompt starts with the same tokens takes those blocks
instead of computing them again. When the last sequence using a named block ends, the block keeps
its content and waits in an LRU list; it is reused by a hit or, when no free block is left,
evicted (oldest first, tail blocks of a chain before their heads). The hash is SHA-256 over the
token ids, so a client cannot craft a collision that would hand it another request's keys and
values (Python's ``hash`` of integer tuples is deterministic and not collision resistant).

Not thread-safe: the scheduler thread owns the pool.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

NULL_BLOCK = 0


def block_hashes(
    tokens: list[int], block_size: int, salt: bytes, start: bytes = b""
) -> list[bytes]:
    """Chained hashes of every *full* block of ``tokens``: block ``i``'s hash covers the salt and
    every token up to the end of block ``i``. ``start``: the hash of the block before ``tokens``
    (to extend a chain)."""
    out: list[bytes] = []
    parent = start or hashlib.sha256(b"ragline-kv\0" + salt).digest()
    for end in range(block_size, len(tokens) + 1, block_size):
        block = array("q", tokens[end - block_size : end]).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        out.append(parent)
    return out


@dataclass
class PoolStats:
    """Counters since start (the metrics read them): prompt tokens looked up and found cached,
    sequences preempted."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    preemptions: int = 0


@dataclass
class Plan:
    """What admitting a job or resuming a sequence takes from the pool."""

    tokens: list[int]  # the tokens that must be in the cache
    hashes: list[bytes]
    hits: list[int]  # cached blocks it reuses
    new_blocks: int


class BlockPool:
    """Free blocks, reference counts and the prefix cache's hash index.

    A block is in exactly one state: free (no content worth keeping), in use (``refs > 0``, owned
    by one sequence or shared by several through a prefix), or cached (``refs == 0`` with a hash:
    content kept, evictable).
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; LRU first
        self.stats = PoolStats()

    # -- counts --------------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that an allocation can take now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def in_use(self) -> int:
        return self.num_blocks - 1 - self.available

    @property
    def cached(self) -> int:
        """Blocks holding a reusable prefix that no running sequence uses."""
        return len(self._evictable)

    def refs(self, block: int) -> int:
        return self._refs[block]

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self) -> int | None:
        """A block for new content (refs 1), or None when every block is in use."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            digest = self._hash[block]
            if digest is not None and self._by_hash.get(digest) == block:
                del self._by_hash[digest]
            self._hash[block] = None
        else:
            return None
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more sequence uses ``block`` (a forked choice or a prefix hit)."""
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """A sequence ends or is preempted: drop its references, tail first, so that when the pool
        runs short the tail of a cached chain is evicted before its head."""
        for block in reversed(blocks):
            if block == NULL_BLOCK:
                continue
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # -- prefix cache --------------------------------------------------------------------------

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` (not yet shared: call ``share``
        on each block you keep)."""
        found: list[int] = []
        if not self.prefix_caching:
            return found
        for digest in hashes:
            block = self._by_hash.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def register(self, block: int, digest: bytes) -> None:
        """``block`` is full and holds the tokens ``digest`` names: later prompts may reuse it.
        If another block already holds that content, this one stays anonymous."""
        if not self.prefix_caching or self._hash[block] is not None:
            return
        if digest not in self._by_hash:
            self._by_hash[digest] = block
            self._hash[block] = digest

    # -- admission -----------------------------------------------------------------------------

    def plan(self, tokens: list[int], salt: bytes, keep_one: bool) -> Plan:
        """Blocks to reuse and to allocate for ``tokens``; ``keep_one``: leave at least the last
        token to compute (its logits choose the first output token)."""
        hashes = block_hashes(tokens, self.block_size, salt)
        hits = self.lookup(hashes)
        if keep_one:
            hits = hits[: (len(tokens) - 1) // self.block_size]
        return Plan(tokens, hashes, hits, -(-len(tokens) // self.block_size) - len(hits))

    def fits(self, plan: Plan, extra: int, reserve: int) -> bool:
        """Whether ``plan`` and ``extra`` more blocks can be taken, leaving ``reserve`` free."""
        claimed = sum(1 for b in plan.hits if self.refs(b) == 0)  # cached, not free
        return plan.new_blocks + extra + claimed + reserve <= self.available

    def take(self, plan: Plan) -> list[int]:
        """The block table of a plan that ``fits``: its hits shared, its new blocks allocated."""
        for block in plan.hits:
            self.share(block)
        table = list(plan.hits)
        for _ in range(plan.new_blocks):
            new = self.allocate()
            assert new is not None  # fits() checked
            table.append(new)
        return table
