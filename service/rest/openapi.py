"""The OpenAPI document's parts FastAPI cannot write itself: the KServe v2 bodies that are read by hand (JSON or
binary tensors, maybe compressed; the repository extension's optional bodies), so FastAPI never sees their models.
Their schemas go into the document's components here, and document() adds them to the app's OpenAPI, where the
routes' request and response bodies refer to them."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from ..serving.tensors import INPUTS, OUTPUTS
from . import kserve

_SCHEMAS = {}


def add_schemas(*models: type[BaseModel]) -> None:
    """The models' JSON schemas (and those they refer to) into _SCHEMAS, referred to as components."""
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        _SCHEMAS.update({**schema.pop("$defs", {}), model.__name__: schema})


add_schemas(kserve.InferRequest, kserve.InferResponse)
# What this server's models take and give (the protocol itself allows any names), and an example that runs.
_SCHEMAS["InferRequest"]["properties"]["inputs"]["maxItems"] = 1
_SCHEMAS["InferRequest"]["properties"]["parameters"]["properties"].update({
    "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                  "description": "one exit threshold for every non-final stage, for this request"},
    "max_stage": {"type": "integer", "minimum": 0, "description": "stop at this stage at the latest"},
    "operating_point": {"type": "string", "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$",
                        "description": "the id of one of the version's operating points (`default` in every "
                                       "version): its thresholds and last stage for this request, which threshold "
                                       "and max_stage still override"},
    "degrade": {"type": "boolean", "description": "false: under load, run at the point asked for (the default "
                                                  "one) or get 503, never at a cheaper point the server chose"},
    "timeout": {"type": "number", "minimum": 0, "description": "Triton's: the request's deadline in microseconds "
                                                               "after its admission (0: none); images still waiting "
                                                               "for a later stage then are answered from the stages "
                                                               "they ran, 504 if some ran none"}})
_SCHEMAS["TensorIn"]["properties"]["name"]["enum"] = list(INPUTS)
_SCHEMAS["OutputRequest"]["properties"]["name"]["enum"] = list(OUTPUTS)
_SCHEMAS["InferRequest"]["examples"] = [{  # one black 28 x 28 PNG; the model resizes any other size
    "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [
        "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAEElEQVR42mNgGAWjYBQQAwADLAAB1wvpfAAAAABJRU5ErkJggg=="]}],
    "outputs": [{"name": "class_id"}, {"name": "exit_stage"}, {"name": "flops"}]}]
INFER_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "JSON header (length in Inference-Header-Content-Length) followed by "
                                            "binary tensor data"}}}},
              "responses": {"200": {
                  "description": "The outputs: JSON, or with binary outputs a JSON header followed by their data",
                  "headers": {"Inference-Header-Content-Length": {
                      "description": "length of the JSON header (only when some output is binary)",
                      "schema": {"type": "integer"}}},
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}},
                              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}}


def document(app: FastAPI) -> None:
    """Adds the schemas of add_schemas (the infer request and response, the repository bodies) to app's OpenAPI
    components."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = build().setdefault("components", {}).setdefault("schemas", {})
            schemas.update(_SCHEMAS)
        return app.openapi_schema

    app.openapi = openapi
