"""Generated pagetrack.v1 protobuf and gRPC modules; made by proto/generate.py."""
