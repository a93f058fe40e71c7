"""A griffe extension: Sphinx roles in docstrings (``:class:`~a.b.C```) become Markdown code spans.

The package's docstrings are written for both ``help()`` and Sphinx-style readers; in
Markdown a role would render as literal ``:class:`` text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`target`, :role:`~a.b.target` (last component shown), :role:`text <target>` (text shown).
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const|paramref):`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")
# reST literals (``x``) become Markdown code (`x`).
_LITERAL = re.compile(r"``([^`]+?)``")


def _role(match: re.Match[str]) -> str:
    tilde, text, target = match.groups()
    if target:  # :role:`text <target>`
        return f"`{text.strip()}`"
    text = text.strip()
    return f"`{text.rsplit('.', 1)[-1] if tilde else text.lstrip('.')}`"


def convert(text: str) -> str:
    """``text`` with its Sphinx roles and reST literals as Markdown code spans."""
    return _LITERAL.sub(r"`\1`", _ROLE.sub(_role, text))


class SphinxRoles(griffe.Extension):
    """Rewrites each docstring once, when griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
