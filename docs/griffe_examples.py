"""Griffe extension for the API reference: the docstrings' ``Example:`` sections read as ``Examples:``.

Griffe's Google-style parser knows ``Examples:`` (rendered as code) but takes ``Example:`` for an admonition, in
which ``>>>`` lines would render as nested block quotes. Only the API reference build uses this file.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Renames ``Example:`` section headers to ``Examples:`` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _EXAMPLE.sub("Examples:", obj.docstring.value)
