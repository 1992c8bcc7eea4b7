"""MkDocs hook: render Sphinx roles left in docstrings (``:func:`shiftlib.parallelize```) as cross-references.

Markdown renders such a role as ``:func:<code>shiftlib.parallelize</code>``. This turns it into an optional
mkdocs-autorefs reference: a link when the target has an API page, plain code otherwise. Bare names
(``:class:`Engine```) are looked up under ``shiftlib.``; a leading ``~`` shows only the last part, as in Sphinx.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|obj|data|exc):<code>(~?)([\w.]+)</code>")


def _ref(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    identifier = target if "." in target else f"shiftlib.{target}"
    title = target.rsplit(".", 1)[-1] if short else target
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_ref, html)
