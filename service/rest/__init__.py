"""The HTTP front end: FastAPI routes that map requests onto the serving layer (service/serving/) and its answers
and errors back. Nothing here decides what a model does.

- app.py          create_app: the state, routers, error handlers and middlewares of one process
- v1.py           POST /v1/.../classify: multipart or raw images in, predictions with compute figures out
- v2.py           KServe v2 / Triton: health, metadata, config, readiness, infer
- repository.py   Triton's model repository extension: index, load, unload
- kserve.py       the KServe v2 codec: JSON and binary tensors, compression, the response encoding
- openapi.py      the hand-read bodies' schemas, added to the OpenAPI document
- multipart.py    a bounded multipart/form-data parser
- schemas.py      response and error models for the OpenAPI document
- errors.py       ServingError and FastAPI's errors as JSON {"error": ...}, a client gone as 499
- disconnects.py  the client's disconnect watched while its work runs
- deps.py         route dependencies: the state, the version a request goes to
- middlewares.py  body limits, bearer auth, request metrics
- connections.py  connection deadlines and limits on uvicorn's protocol classes
- ops.py          GET /metrics
"""
