"""Validation errors as messages a user can act on: one `field.path: what is wrong` per problem. The one formatter
for recipes, manifests, server settings and HTTP requests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class HasErrors(Protocol):
    """pydantic's ValidationError and FastAPI's RequestValidationError both list their problems so."""

    def errors(self) -> Sequence[dict]: ...


def describe(err: HasErrors, *, skip: tuple[str, ...] = (),
             where: Callable[[list[str]], str] = ".".join) -> list[str]:
    """skip: location parts that say nothing to the user (FastAPI's "body"); where: how a location is named
    (default: dotted path)."""
    out = []
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in skip]
        msg = "unknown field (typo?)" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        out.append(f"{where(loc) if loc else '(top level)'}: {msg}")
    return out
