"""`reskd serve`: the cascade behind HTTP and gRPC, with dynamic batching, limits and metrics. Three layers, each importing
only those below it (the contracts in pyproject.toml, checked by tests/test_layers.py):

- the process layer, here:
  launch.py       `reskd serve`: one process, or the supervisor of several
  supervisor.py   several worker processes on one port: start, restart, signals, model changes in all at once
  server.py       one server process: the application under uvicorn (and gRPC beside it), start-up checks, draining
                  shutdown
  link.py         a worker's line to its supervisor (the Coordinator its model control works with)
  settings.py     RESKD_* settings;  logs.py  log configuration;  healthcheck.py  the container's HEALTHCHECK
- rest/     the HTTP front end: FastAPI routes that map requests to the serving layer and its answers and errors
            back (v1, KServe v2, Triton's repository extension, the KServe codec, middlewares, connections)
- rpc/      the gRPC front end: Triton's inference.GRPCInferenceService (vendored protocol) and grpc.health.v1 on
            the same event loop, mapping calls to the serving layer as rest/ maps requests
- serving/  what every front end reuses, protocol-neutral: admission and the request pipeline, domain errors,
            the scheduler, served models and model control, decoding, metrics
"""
