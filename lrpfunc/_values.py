"""The values of one recorded forward pass: an id per tensor, the tensor held strongly (a cut, an input, a parameter,
a value a rule reads) or weakly (inside a piece of the tape, where the tape's graph saves what its pullback needs),
its caller-level form, and the substitutions that make later reads see the caller's parameters, the result of an
in-place operation or the leaf a cut was lifted to."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ._tape import Tape

Tensor = torch.Tensor


class Values:
    """The value table of a :class:`~lrpfunc._trace.Tracer` (see the module docstring).

    Attributes:
        vid_of: ``id(tensor)`` to its value id, for the tensors the record knows (a weakly held one leaves when it
            dies, before its id can be reused).
        tensors: Value id to the tensor, held strongly.
        weak: Value id to the tensor, held weakly (values inside pieces that no cut holds yet).
        low: Value id to its caller-level tensor (:meth:`Tape.lower`), for the values rules and the sweep read.
        activations: The value ids that depend on the model's input (floating-point by construction).
        substitute: ``id(tensor)`` to the tensor to read instead (:meth:`resolve`).
        keep_alive: Tensors whose ids ``substitute`` names: kept so that those ids cannot be reused.
    """

    def __init__(self, tape: Tape) -> None:
        self.tape = tape
        self.vid_of: dict[int, int] = {}
        self.tensors: dict[int, Tensor] = {}
        self.weak: dict[int, weakref.ref[Tensor]] = {}
        self.low: dict[int, Tensor] = {}
        self.activations: set[int] = set()
        self.substitute: dict[int, Tensor] = {}
        self.keep_alive: list[Tensor] = []
        self.next_vid = 0

    def register(self, tensor: Tensor, *, activation: bool) -> int:
        """A new value id for ``tensor``, held strongly."""
        vid = self.next_vid
        self.next_vid = vid + 1
        self.tensors[vid] = tensor
        self.vid_of[id(tensor)] = vid
        if activation:
            self.activations.add(vid)
        return vid

    def add_model_tensors(self, tensors: Iterable[tuple[str, Tensor, Tensor]], *, detach: bool) -> dict[int, str]:
        """Register the model's parameters and buffers, each ``(name, the module's tensor, the caller's value)``: reads
        of the module's tensor see the caller's (detached for a tape nothing differentiates). Returns value id to
        name."""
        names: dict[int, str] = {}
        for name, tensor, value in tensors:
            if detach:
                value = value.detach()
            if value is not tensor:
                self.substitute[id(tensor)] = value
            if id(value) not in self.vid_of:
                vid = self.register(value, activation=False)
                self.low[vid] = value
                names[vid] = name
        return names

    def value(self, vid: int) -> Tensor:
        """The tensor of value ``vid``, held strongly or (inside a piece) weakly."""
        found = self.tensors.get(vid)
        if found is None:
            found = self.weak[vid]()
            if found is None:
                raise RuntimeError(f"lrpfunc._trace: value {vid} was read after it was freed")
        return found

    def hold_weakly(self, vids: Sequence[int]) -> None:
        """Hold the new values ``vids`` inside a piece weakly: when the model drops one, nothing can read it again, and
        it leaves ``vid_of`` (before its id can be reused)."""
        tensors, weak, vid_of = self.tensors, self.weak, self.vid_of
        for vid in vids:
            tensor = tensors.pop(vid)
            key = id(tensor)

            def forget(_: Any, key: int = key, vid: int = vid) -> None:
                if vid_of.get(key) == vid:
                    del vid_of[key]
                weak.pop(vid, None)

            weak[vid] = weakref.ref(tensor, forget)

    def hold(self, vid: int) -> Tensor:
        """Hold value ``vid`` strongly from now on (it became a cut or an output: the sweep reads it)."""
        found = self.tensors.get(vid)
        if found is None:
            found = self.tensors[vid] = self.value(vid)
            del self.weak[vid]
        return found

    def resolve(self, tensor: Tensor) -> Tensor:
        """The tensor to use for ``tensor``: the caller's parameter, the latest value after in-place operations, or
        the leaf a cut lifted it to."""
        substitute = self.substitute.get(id(tensor))
        while substitute is not None and substitute is not tensor:
            tensor = substitute
            substitute = self.substitute.get(id(tensor))
        return tensor

    def vid(self, tensor: Tensor) -> int | None:
        """The value id of ``tensor`` as the model sees it (after :meth:`resolve`), ``None`` if the record has none."""
        return self.vid_of.get(id(self.resolve(tensor)))

    def lower(self, vid: int) -> Tensor:
        """The caller-level tensor of value ``vid`` (cached)."""
        found = self.low.get(vid)
        if found is None:
            found = self.low[vid] = self.tape.lower(self.value(vid))
        return found

    def is_activation(self, value: Any) -> bool:
        """Whether ``value`` is a tensor that depends on the model's input."""
        if not isinstance(value, Tensor):
            return False
        vid = self.vid_of.get(id(value))
        return vid is not None and vid in self.activations
