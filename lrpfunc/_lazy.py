"""Parameters computed on first access."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

__all__ = ["LazyParams"]


class LazyParams(Mapping[str, torch.Tensor]):
    """Parameters computed on first access (merged parameters are only needed by rules that read them)."""

    def __init__(self, names: tuple[str, ...], compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        self._names = names
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = compute
        self._values: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._compute is not None:
            self._values, self._compute = self._compute(), None
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names
