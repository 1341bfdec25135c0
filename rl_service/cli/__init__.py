"""The `rl-service` command line: serve, train with a live progress bar, inspect, plot, export (over gRPC)."""
