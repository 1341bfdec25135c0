"""gRPC servicers, proto <-> DTO conversion and status-code mapping."""
