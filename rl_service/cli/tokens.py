"""`rl-service token create NAME --role ROLE`: a new random token and its AUTH_TOKENS_FILE line, offline."""

from __future__ import annotations

import argparse

from rl_service.cli.client import EXIT_OK, EXIT_USAGE, CliError
from rl_service.cli.formatting import Output
from rl_service.infra.auth_tokens import Role, check_name, new_token, token_line


def principal_name(text: str) -> str:
    """argparse type for NAME: a short [A-Za-z0-9_.-] word."""
    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_token_create(args: argparse.Namespace, output: Output) -> int:
    """Print a fresh token (shown only now) and the line that grants it ROLE under NAME."""
    try:
        role = Role.parse(args.role)
    except ValueError as exc:  # argparse's choices already refuse it; kept for callers that skip the parser
        raise CliError(str(exc), EXIT_USAGE) from None
    token = new_token()
    line = token_line(args.name, role, token)
    if args.json:
        output.json({"name": args.name, "role": role.label, "token": token, "line": line})
        return EXIT_OK
    output.line(f"token: {token}")
    output.line(f"line:  {line}")
    output.note(f"Give the token to {args.name}'s clients (rl-service --token, or $RL_SERVICE_TOKEN); it is shown "
                "only now and stored nowhere. Add the line to the server's AUTH_TOKENS_FILE and restart it.")
    return EXIT_OK
