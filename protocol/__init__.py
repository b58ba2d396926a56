"""The contract both roles share: the expert bundle, its validation, the errors, the gRPC API."""
