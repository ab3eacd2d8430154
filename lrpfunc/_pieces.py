"""The pieces of the tape: the operations between ruled calls, grouped so that each piece's pullback is one
:func:`torch.autograd.grad` call (:mod:`lrpfunc._sweep`).

A piece starts at a leaf (a model input, or a cut lifted to a fresh leaf when an operation without a rule first reads
it); an operation that reads values of several pieces joins them (union-find). Each piece also notes which form of
cotangent its operations need: gradients (it holds a call that stays on the tape in gradient form) or relevance (it
holds an operation other than data movement without a rule). A piece cannot need both: the trace then runs again
with every rule as a step of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._record import Retry, find_piece

Tensor = torch.Tensor


class Pieces:
    """The pieces of one trace (see the module docstring).

    Attributes:
        parent: The union-find forest over piece ids (a piece id is the value id of its first leaf).
        leaves: Root piece to its leaves, each ``(origin, leaf)``: the value the leaf stands for and the leaf tensor.
        of: Value id to the piece it was computed in (find its root with :meth:`find`).
        computes: Roots of the pieces that need relevance.
        gradients: Roots of the pieces that need gradients.
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.leaves: dict[int, list[tuple[int, Tensor]]] = {}
        self.of: dict[int, int] = {}
        self.computes: set[int] = set()
        self.gradients: set[int] = set()

    def new(self, leaf_vid: int, origin: int, tensor: Tensor) -> None:
        """A new piece starting at the leaf ``leaf_vid`` (``tensor``), which stands for the value ``origin``."""
        self.parent[leaf_vid] = leaf_vid
        self.leaves[leaf_vid] = [(origin, tensor)]
        self.of[leaf_vid] = leaf_vid

    def find(self, piece: int) -> int:
        """The root of ``piece``."""
        return find_piece(self.parent, piece)

    def union(self, pieces: Sequence[int]) -> int:
        """Join ``pieces`` (an operation read values of each) into one; returns its root."""
        roots = {self.find(piece) for piece in pieces}
        first = roots.pop()
        for other in roots:
            self.parent[other] = first
            self.leaves[first].extend(self.leaves.pop(other))
            for marks in (self.computes, self.gradients):
                if other in marks:
                    marks.discard(other)
                    marks.add(first)
        return first

    def mark(self, piece: int, gradient: bool) -> None:
        """Note that an operation of the piece needs gradients (``gradient``: a call on the tape in gradient form) or
        relevance (an operation other than data movement without a rule).

        Raises:
            Retry: ``"forms"``, the piece now needs both.
        """
        root = self.find(piece)
        (self.gradients if gradient else self.computes).add(root)
        if root in self.gradients and root in self.computes:
            raise Retry("forms", None)
