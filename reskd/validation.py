"""Pydantic validation errors as messages a user can act on: one `field.path: what is wrong` per problem."""

from __future__ import annotations

from pydantic import ValidationError


def describe(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = "unknown field (typo?)" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {msg}")
    return out
