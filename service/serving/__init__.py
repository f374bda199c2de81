"""The protocol-neutral serving layer: what an HTTP or gRPC front end does with a request once it is parsed. It
imports nothing of FastAPI or Starlette, nor anything above it (tests/test_layers.py).

- errors.py      ServingError: what went wrong, said for the client, with its outcome's status
- pipeline.py    admission, the cascade through the scheduler (its failures become ServingErrors), a client gone
- state.py       one process's shared state: settings, metrics, models, model control, pools, readiness
- models.py      a served model version (runtime + scheduler + metrics), the store, the device and thread budget
- scheduler.py   queues, dynamic batching and stage dispatch (request, stage and continuous policies)
- control.py     model control: which versions are served, changes under traffic (poll, explicit)
- repository.py  the repository requests (index, load, unload), control's refusals as ServingErrors
- decoding.py    encoded images -> normalised tensors, in a bounded pool, with pixel limits
- tensors.py     the tensors a served cascade takes and gives, named once for every protocol
- metrics.py     Prometheus metrics: the server's, each model's, the scheduler's observer
"""
