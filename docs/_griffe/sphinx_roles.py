"""A griffe extension for the API reference (mkdocs.yml): the docstrings' Sphinx markup
rendered as Markdown.

The docstrings are written for Sphinx: ``:class:`Name```, ``:meth:`~mod.Class.name```
and the like refer to other objects, and a paragraph ending in ``::`` introduces a
literal block. mkdocstrings knows neither, so before the docstrings are rendered:

- a role whose name resolves in the package (from the documented object's scope, as
  Python would) becomes an mkdocs-autorefs link to that object, or plain code when the
  object has no page (a private module), without a warning;
- a role whose name resolves to nothing becomes a required cross-reference, which
  ``mkdocs build --strict`` reports: a broken reference fails the build;
- a role naming another package (``psycopg.OperationalError``) becomes plain code;
- a trailing ``::`` becomes ``:`` and a lone ``::`` line goes.
"""

from __future__ import annotations

import builtins
import html
import importlib.util
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|exc|obj|const):`(~?)\.?([^`<>]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, pkg)
            stack.extend(member for member in obj.members.values() if not member.is_alias)


def _rewrite(text: str, scope: griffe.Object, pkg: griffe.Module) -> str:
    text = ROLE.sub(lambda match: _reference(match, scope, pkg), text)
    lines = []
    for line in text.split("\n"):
        if line.strip() == "::":
            line = ""
        elif line.endswith("::"):
            line = line[:-1]
        lines.append(line)
    return "\n".join(lines)


def _reference(match: re.Match[str], scope: griffe.Object, pkg: griffe.Module) -> str:
    _kind, short, name = match.groups()
    name = name.strip()
    title = f"<code>{html.escape(name.rsplit('.', 1)[-1] if short else name)}</code>"
    path = _resolve(name, scope, pkg)
    if path is None:
        # Nothing of that name: left for autorefs to report.
        return f"[{title}][{name}]"
    if path.split(".", 1)[0] != pkg.name:
        return title
    return f'<autoref identifier="{html.escape(path)}" optional>{title}</autoref>'


def _in_scope(name: str, scope: griffe.Object) -> str | None:
    """What ``name`` means in ``scope``'s classes and module (a member, inherited ones
    too, or an import), else among its packages' names: a private module's docstring
    may name what its package exports. A package's submodules are not names there
    (``sqlalchemy`` in ``pgreplica.contrib.sqlalchemy`` is SQLAlchemy)."""
    obj: griffe.Object | None = scope
    in_module = True
    while obj is not None:
        member = obj.members.get(name)
        if member is not None and (in_module or not member.is_module):
            return member.target_path if member.is_alias else member.path
        if in_module and obj.is_module and name in obj.imports:
            return obj.imports[name]
        if obj.is_class and name in obj.all_members:
            return f"{_exported_path(obj)}.{name}"
        if obj.is_module:
            in_module = False
        obj = obj.parent
    return None


def _exported_path(cls: griffe.Object) -> str:
    """Where the reference documents ``cls``: the package that re-exports it from its
    private module (``pgreplica.sticking.Sticking``, not ``..._sticking.Sticking``)."""
    module = cls.parent
    path = cls.path
    while module is not None and module.name.startswith("_") and module.parent is not None:
        if cls.name not in module.parent.members:
            break
        path = f"{module.parent.path}.{cls.name}"
        module = module.parent
    return path


def _resolve(name: str, scope: griffe.Object, pkg: griffe.Module) -> str | None:
    """The canonical path of ``name`` as seen from ``scope``, or None."""
    head, _, rest = name.partition(".")
    if head == pkg.name:
        path = name
    else:
        found = _in_scope(head, scope)
        if found is None and not rest and hasattr(builtins, head):
            return f"builtins.{head}"
        if found is None:
            # A fully qualified name in another installed package: plain code.
            return name if rest and importlib.util.find_spec(head) else None
        path = f"{found}.{rest}" if rest else found
    if path.split(".", 1)[0] != pkg.name:
        return path
    try:
        target = pkg[path.split(".", 1)[1]] if "." in path else pkg
        if target.is_alias and target.inherited:
            # Rendered with each subclass that inherits it: the one named here.
            return f"{_exported_path(target.parent)}.{target.name}"
        return target.canonical_path if not target.is_alias else target.final_target.canonical_path
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
