"""Merkle trees as RFC 9162 (Certificate Transparency 2.0) makes them.

``leaf = sha256(0x00 || data)``, ``node = sha256(0x01 || left || right)``, the tree of n
leaves split at the largest power of two below n. A tree head (size and root) signed
once proves every leaf under it: a leaf's inclusion by a path of log2(n) hashes, and a
whole trail by recomputing the root. The prefixes keep a leaf from passing for a node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def tree_root(leaves: Iterable[bytes]) -> bytes:
    """The root over already hashed leaves, in one pass and log2(n) memory: a stack of
    the roots of perfect subtrees, merged as they fill (the same tree as RFC 9162's
    recursive split)."""
    stack: list[tuple[int, bytes]] = []  # (size of the subtree, its root)
    for leaf in leaves:
        size, node = 1, leaf
        while stack and stack[-1][0] == size:
            _, left = stack.pop()
            node = node_hash(left, node)
            size *= 2
        stack.append((size, node))
    if not stack:
        return EMPTY_ROOT
    _, node = stack.pop()
    while stack:
        _, left = stack.pop()
        node = node_hash(left, node)
    return node


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def inclusion_path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 section 2.1.3.1: the hashes that lead from leaf ``index`` to the root."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_path(index, leaves[:k]), tree_root(leaves[k:])]
    return [*inclusion_path(index - k, leaves[k:]), tree_root(leaves[:k])]


def inclusion_verify(
    index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2: whether ``leaf`` is leaf ``index`` of the tree of
    ``size`` leaves whose root is ``root``."""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    node = leaf
    for sibling in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and node == root
