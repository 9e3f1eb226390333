"""The gRPC side of the daemon: servicers, error mapping, interceptors."""
