"""Coordinator role: the gRPC service, the durable store, assembly on Ray, tracking in MLflow."""
