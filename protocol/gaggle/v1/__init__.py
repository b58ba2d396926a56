"""Generated gRPC code for v1 (see gaggle.proto)."""
