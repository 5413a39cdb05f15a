"""Prefix detection: a token trie over the batch's prompts, cut into shared segments.

Padding is read from ``attention_mask`` only (a pad id may also be a real token). Every trie node shared by at
least two rows and at least ``min_shared_tokens`` long becomes a shared segment; shorter shared runs are pushed
down into the segments (or suffixes) below them. Copies of one prompt (``num_return_sequences``, beams) always
share the whole prompt. The last prompt token of every row stays in that row's own suffix, so ``generate``
always has a token to feed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Forest:
    """The segment forest of one batch (host data only).

    seg_tokens[s]:   token ids of shared segment s (segments are numbered level by level).
    seg_parent[s]:   parent segment id, or -1 for a root segment.
    seg_pos[s]:      position id of the segment's first token (the length of its ancestors).
    seg_level[s]:    depth of the segment (0 for roots).
    paths[r]:        segment ids from root to leaf that row r attends to, in order.
    suffix_tokens[r]: row r's own tokens after its path (always at least its last prompt token).
    """

    seg_tokens: tuple[tuple[int, ...], ...]
    seg_parent: tuple[int, ...]
    seg_pos: tuple[int, ...]
    seg_level: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...]
    suffix_tokens: tuple[tuple[int, ...], ...]

    @property
    def num_rows(self) -> int:
        return len(self.paths)

    @property
    def num_levels(self) -> int:
        return max(self.seg_level, default=-1) + 1

    def ancestor_len(self, r: int) -> int:
        return sum(len(self.seg_tokens[s]) for s in self.paths[r])

    def select(self, rows: list[int]) -> "Forest":
        """The same segments, serving only ``rows`` (in that order)."""
        pick = lambda xs: tuple(xs[r] for r in rows)  # noqa: E731
        return Forest(self.seg_tokens, self.seg_parent, self.seg_pos, self.seg_level, pick(self.paths),
                      pick(self.suffix_tokens))


def build_forest(input_ids: torch.Tensor, attention_mask: torch.Tensor, min_shared_tokens: int = 16, copies: int = 1) -> Forest:
    """Build the forest of a left-padded batch. ``input_ids``/``attention_mask``: [B, L] on any device."""
    ids = input_ids.tolist()
    mask = attention_mask.tolist()
    rows, source = [], []  # source[r]: the input row that row r copies
    for b, (row, m) in enumerate(zip(ids, mask)):
        pad = len(m) - sum(m)
        for _ in range(copies):
            rows.append(row[pad:])
            source.append(b)

    seg_tokens: list[tuple[int, ...]] = []
    seg_parent: list[int] = []
    seg_pos: list[int] = []
    seg_level: list[int] = []
    paths: list[list[int]] = [[] for _ in rows]
    suffix_start = [0] * len(rows)

    # Iterative DFS over groups of rows that share rows[r][:depth]. `pending` is where the not-yet-stored
    # shared tokens of this group begin; `parent`/`level` describe the last stored segment above it.
    stack = [(list(range(len(rows))), 0, 0, -1, 0)]
    while stack:
        group, depth, pending, parent, level = stack.pop()
        if len(group) == 1:
            suffix_start[group[0]] = pending
            continue
        # Longest common extension of the group over each row's tokens[:-1].
        first = rows[group[0]]
        limit = min(len(rows[r]) - 1 for r in group)
        end = depth
        while end < limit and all(rows[r][end] == first[end] for r in group):
            end += 1
        same_source = len({source[r] for r in group}) == 1
        if end > pending and (end - pending >= min_shared_tokens or same_source):
            s = len(seg_tokens)
            seg_tokens.append(tuple(first[pending:end]))
            seg_parent.append(parent)
            seg_pos.append(pending)
            seg_level.append(level)
            for r in group:
                paths[r].append(s)
            parent, level, pending = s, level + 1, end
        children: dict[int, list[int]] = {}
        for r in group:
            if len(rows[r]) - 1 == end:
                suffix_start[r] = pending  # its prompt ends here: only its last token is left
            else:
                children.setdefault(rows[r][end], []).append(r)
        for child in children.values():
            stack.append((child, end + 1 if len(child) > 1 else end, pending, parent, level))

    # Number segments level by level (stable), so that each level's segments are contiguous.
    order = sorted(range(len(seg_tokens)), key=lambda s: (seg_level[s], s))
    renum = {old: new for new, old in enumerate(order)}
    return Forest(
        seg_tokens=tuple(seg_tokens[o] for o in order),
        seg_parent=tuple(renum[seg_parent[o]] if seg_parent[o] >= 0 else -1 for o in order),
        seg_pos=tuple(seg_pos[o] for o in order),
        seg_level=tuple(seg_level[o] for o in order),
        paths=tuple(tuple(renum[s] for s in p) for p in paths),
        suffix_tokens=tuple(tuple(rows[r][suffix_start[r]:]) for r in range(len(rows))),
    )
