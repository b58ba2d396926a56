"""Generated gRPC code for gaggle (see gaggle.proto)."""
