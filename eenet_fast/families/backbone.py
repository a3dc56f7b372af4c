"""A recognised model cut into blocks (:class:`Backbone`), and how blocks become stages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["Backbone", "split_after", "every_few"]


@dataclass(frozen=True)
class Backbone:
    """A recognised model cut into blocks.

    Attributes:
        family: one of :data:`FAMILIES`.
        stem: runs before block 0 (a CNN's stem, a transformer's embeddings and mask).
        blocks: the blocks after which exits may go, in order.
        output_head: the model's own path from the last block's output to its logits.
        new_head: builds a new exit head for the output of block ``i``.
        default_exits: block indices after which exits go when the user names none.
        block_name: what a block is, for messages.
    """

    family: str
    stem: nn.Module
    blocks: list[nn.Module]
    output_head: nn.Module
    new_head: Callable[[int], nn.Module]
    default_exits: list[int]
    block_name: str

    def stages(self, exits_after: list[int]) -> list[nn.Module]:
        """Stage ``k`` runs blocks ``exits_after[k-1]+1 .. exits_after[k]`` (the stem first in stage 0)."""
        return split_after(self.blocks, exits_after, self.block_name, self.stem, ", where the model's own classifier is the last exit")


def split_after(
    blocks: Sequence[nn.Module],
    exits_after: Sequence[int],
    block_name: str,
    stem: nn.Module | None = None,
    last_note: str = "",
) -> list[nn.Module]:
    """Cut ``blocks`` into stages: stage ``k`` is an ``nn.Sequential`` of blocks
    ``exits_after[k-1]+1 .. exits_after[k]``, with ``stem`` first in stage 0.

    Raises:
        ValueError: ``exits_after`` is not increasing block indices ending at the last block.
    """
    cuts, last = list(exits_after), len(blocks) - 1
    if not cuts or cuts != sorted(set(cuts)) or cuts[0] < 0 or cuts[-1] != last:
        raise ValueError(
            f"exits_after must be increasing {block_name} indices (0-based) ending at the last {block_name} "
            f"({last}{last_note}), got {cuts}"
        )
    bounds = [-1, *cuts]
    first = [stem] if stem is not None else []
    return [nn.Sequential(*(first if lo < 0 else []), *blocks[lo + 1 : hi + 1]) for lo, hi in zip(bounds, bounds[1:])]


def every_few(num_blocks: int, exits: int = 4) -> list[int]:
    """About ``exits`` evenly spaced block indices ending at the last: 12 blocks -> 2, 5, 8, 11; 6 -> 1, 3, 5."""
    step = -(-num_blocks // exits)
    return [*range(num_blocks - 1, -1, -step)][::-1]
