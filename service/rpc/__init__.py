"""The gRPC front end (RESKD_GRPC_PORT): KServe v2's `inference.GRPCInferenceService` as Triton publishes it
(protocol/) and `grpc.health.v1.Health`, on the same event loop, models, queues, limits, auth and metrics as HTTP.
service.py holds the RPCs, codec.py the messages, server.py the grpc.aio server's life."""
