"""Parameters computed on access."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = ["LazyParams"]


class LazyParams(Mapping[str, torch.Tensor]):
    """Parameters computed when read (merged parameters are only needed by rules that read them), each by
    ``compute(name)``.

    ``cache=False`` computes a parameter again at each read and keeps nothing: a rule that modifies a merged weight
    (``W'^+``) then holds the modified weight alone, not the merged one beside it (one weight's memory less at the
    peak of a rule on a large convolution), for the cost of an element-wise product per read.
    """

    def __init__(self, names: tuple[str, ...], compute: Callable[[str], torch.Tensor], *, cache: bool = True) -> None:
        self._names = names
        self._compute = compute
        self._cache = cache
        self._values: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        found = self._values.get(name)
        if found is None:
            found = self._compute(name)
            if self._cache:
                self._values[name] = found
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names
