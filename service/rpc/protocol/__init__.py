"""KServe v2's gRPC protocol as Triton publishes it (`inference.GRPCInferenceService`): grpc_service.proto and
model_config.proto, vendored unchanged from github.com/triton-inference-server/common (protobuf/, commit 83adf7c,
BSD 3-clause licence: LICENSE beside them), and the Python modules grpcio-tools generates from them (generate.py).
The same definitions stock clients (tritonclient.grpc) are generated from, so both can live in one process."""
