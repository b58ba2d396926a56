"""The gRPC edge: the Coordinator and Admin servicers, token auth and the health check."""
