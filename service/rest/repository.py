"""Triton's model repository extension over HTTP: the index (POST, and a GET form), load and unload
(RESKD_MODEL_CONTROL=explicit; service/serving/control.py decides, service/serving/repository.py answers)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from reskd.validation import describe

from ..serving import repository
from ..serving.errors import bad_request
from ..serving.state import ServerState
from .deps import get_state
from .openapi import add_schemas
from .schemas import ERROR_RESPONSES

router = APIRouter(tags=["kserve v2"], responses=ERROR_RESPONSES)


# Flags must be JSON booleans, as the infer request's are (a string such as "yes" is refused, not read as true).
class RepositoryIndexRequest(BaseModel):
    ready: StrictBool = Field(False, description="only versions ready to serve")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADING"]
    reason: str = Field(description="why the version is not READY: refused (the verification or warm-up "
                                    "failure), not loaded (yet), unloaded, being loaded, or draining")


class LoadRequest(BaseModel):
    parameters: dict[str, Any] = Field({}, json_schema_extra={"maxProperties": 0},
                                       description="none accepted: reskd loads versions from the repository (no "
                                                   "config or file overrides)")


class UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unload_dependents: StrictBool = Field(False, description="accepted for Triton's clients; reskd models have no "
                                                       "dependents")


class UnloadRequest(BaseModel):
    parameters: UnloadParameters = UnloadParameters()


add_schemas(LoadRequest, UnloadRequest)  # bodies read by hand (optional, maybe empty)


async def _json_object(request: Request, model: type[BaseModel]):
    """An optional JSON object body (tritonclient sends an empty one for the index) as `model`; 400 otherwise."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise bad_request(f"invalid request body: {'; '.join(describe(err))}") from None


def _control_route(action: str, body: type[BaseModel], summary: str):
    """POST /v2/repository/models/{name}/<action>: an optional JSON body (`body`), an empty 200 when done."""
    return router.post(f"/v2/repository/models/{{name}}/{action}", response_class=Response, summary=summary,
                       responses={200: {"description": "done (empty body, as Triton answers)", "content": {}}},
                       openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                           "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}})


@router.post("/v2/repository/index", response_model=list[RepositoryIndexEntry],
             summary="Every version in the model repository, served or not, with its state")
async def repository_index(request: Request, state: ServerState = Depends(get_state)):
    body = await _json_object(request, RepositoryIndexRequest)
    return repository.index(state, body.ready)


@router.get("/v2/repository/index", response_model=list[RepositoryIndexEntry],
            summary="The repository index (GET form; POST is Triton's)")
async def repository_index_get(ready: bool = False, state: ServerState = Depends(get_state)):
    return repository.index(state, ready)


@_control_route("load", LoadRequest, "Load the model's versions as the repository holds them now "
                "(RESKD_MODEL_CONTROL=explicit): new and changed versions are verified and warmed before they take "
                "traffic")
async def repository_load(request: Request, name: str, state: ServerState = Depends(get_state)):
    body = await _json_object(request, LoadRequest)
    await repository.load(state, name, list(body.parameters or {}))
    return Response(status_code=200)


@_control_route("unload", UnloadRequest, "Stop serving the model (RESKD_MODEL_CONTROL=explicit): new requests get "
                "404; requests already admitted finish first")
async def repository_unload(request: Request, name: str, state: ServerState = Depends(get_state)):
    await _json_object(request, UnloadRequest)
    await repository.unload(state, name)
    return Response(status_code=200)
