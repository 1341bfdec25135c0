"""The HTTP/JSON API, /metrics and the dashboard: a second transport over the same servicers, tokens and table.

Each route names the RPC it is (rpc_roles.RPC_ROLES gives its role), builds that RPC's request message and calls the
gRPC servicer's own method through `calls.RpcCaller`, which admits, audits and counts it exactly as gRPC does; an
aborted call becomes RFC 9457 problem JSON with the HTTP status error_mapping gives its code.
"""
