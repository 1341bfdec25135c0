"""AUTH_TOKENS_FILE: the parser (every bad case names the setting and the line), constant-time lookup over every
entry, the roles' order, and the owner rule."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from rl_service.core.errors import PermissionDenied
from rl_service.infra import auth_tokens
from rl_service.infra.auth_tokens import (
    Role,
    TokenFileError,
    load_tokens,
    new_token,
    parse_tokens,
    token_digest,
    token_line,
)
from rl_service.transport.auth import ANONYMOUS, Principal, require_owner

DIGEST = "ab" * 32


def test_a_good_file_with_comments_blank_lines_and_every_role(tmp_path: Path) -> None:
    tokens = {role: new_token() for role in Role}
    lines = ["# who may do what", ""]
    lines += [f"  {token_line(f'user.{role.label}', role, token)}   # {role.label}" for role, token in tokens.items()]
    path = tmp_path / "tokens"
    path.write_text("\n".join(lines) + "\n")
    table = load_tokens(path)
    assert [(e.name, e.role) for e in table.entries] == [(f"user.{r.label}", r) for r in Role]
    for role, token in tokens.items():
        entry = table.lookup(token)
        assert entry is not None and entry.role is role and entry.digest == hashlib.sha256(token.encode()).digest()
    assert table.lookup("not-a-token") is None and table.lookup("") is None
    # Upper-case hex is the same digest.
    upper = parse_tokens(f"ops admin sha256:{token_digest('t').hex().upper()}", "f")
    assert upper.lookup("t") is not None


@pytest.mark.parametrize(("line", "reason"), [
    ("alice trainer", "expected `NAME ROLE sha256:HEX`, found 2 field(s)"),
    (f"alice trainer sha256:{DIGEST} extra", "found 4 field(s)"),
    (f"al!ce trainer sha256:{DIGEST}", "name 'al!ce' must be 1 to 64 characters"),
    (f"{'a' * 65} trainer sha256:{DIGEST}", "must be 1 to 64 characters"),
    (f"alice root sha256:{DIGEST}", "unknown role 'root'; use one of reader, actor, trainer, admin"),
    (f"alice Trainer sha256:{DIGEST}", "unknown role 'Trainer'"),
    (f"alice trainer md5:{DIGEST}", "the digest must start with 'sha256:'"),
    (f"alice trainer {DIGEST}", "the digest must start with 'sha256:'"),
    (f"alice trainer sha256:{DIGEST[:-1]}", "must be 64 hex digits after 'sha256:' (the SHA-256 of the token), "
                                            "found 63 characters"),
    (f"alice trainer sha256:{DIGEST}0", "found 65 characters"),
    (f"alice trainer sha256:{'g' * 64}", "must be 64 hex digits"),
    (f"bob reader sha256:{DIGEST}", "name 'bob' is already used on line 2"),
    (f"carol reader sha256:{'cd' * 32}", "the same token digest is already on line 3"),
])
def test_each_bad_line_stops_with_the_setting_the_file_and_its_line_number(line: str, reason: str) -> None:
    text = f"# tokens\nbob actor sha256:{'00' * 32}\ndave actor sha256:{'cd' * 32}\n\n{line}\n"
    with pytest.raises(TokenFileError) as info:
        parse_tokens(text, "/etc/rl/tokens")
    message = str(info.value)
    assert message.startswith("AUTH_TOKENS_FILE /etc/rl/tokens line 5: ") and reason in message, message
    assert "\n" not in message


def test_a_missing_unreadable_empty_or_binary_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=r"^AUTH_TOKENS_FILE .*/missing: cannot read it: No such file"):
        load_tokens(tmp_path / "missing")
    with pytest.raises(TokenFileError, match=r"^AUTH_TOKENS_FILE .*: cannot read it: Is a directory"):
        load_tokens(tmp_path)
    locked = tmp_path / "locked"
    locked.write_text(f"a reader sha256:{DIGEST}\n")
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # root reads anything
        with pytest.raises(TokenFileError, match="cannot read it: Permission denied"):
            load_tokens(locked)
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(TokenFileError, match="holds no token line"):
        load_tokens(empty)
    binary = tmp_path / "binary"
    binary.write_bytes(f"a reader sha256:{DIGEST}\n".encode() + b"\xff\xfe\n")
    with pytest.raises(TokenFileError, match=r"^AUTH_TOKENS_FILE .*/binary line 2: not UTF-8 text$"):
        load_tokens(binary)


def test_lookup_compares_the_digest_with_every_entry_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = [new_token() for _ in range(5)]
    table = parse_tokens("\n".join(token_line(f"u{i}", Role.READER, t) for i, t in enumerate(tokens)), "f")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_tokens.hmac, "compare_digest", counting)
    for token in (tokens[0], tokens[4], "unknown"):
        calls.clear()
        entry = table.lookup(token)
        assert entry is (None if token == "unknown" else table.entries[tokens.index(token)])
        # A match on the first entry does not stop the scan, and only digests are compared, never tokens.
        assert len(calls) == 5 and all(b == token_digest(token) for _, b in calls)


def test_new_tokens_are_256_bit_and_never_repeat() -> None:
    made = {new_token() for _ in range(100)}
    assert len(made) == 100 and all(len(t) == 43 for t in made)  # 32 bytes in URL-safe base64


def test_roles_include_the_ones_before() -> None:
    assert Role.READER < Role.ACTOR < Role.TRAINER < Role.ADMIN
    assert [Role.parse(r.label) for r in Role] == list(Role)


def test_only_the_owner_or_an_admin_changes_a_run_or_policy() -> None:
    alice, bob = Principal("alice", Role.TRAINER), Principal("bob", Role.TRAINER)
    require_owner(alice, "alice", "run 'r'")
    require_owner(Principal("root", Role.ADMIN), "alice", "run 'r'")
    require_owner(ANONYMOUS, "alice", "run 'r'")  # a server without tokens: everyone is an admin
    with pytest.raises(PermissionDenied) as info:
        require_owner(bob, "alice", "run 'r'")
    assert str(info.value) == ("run 'r' belongs to 'alice'; only its owner or an admin may change it, and 'bob' is a "
                               "trainer")
    # What a server without tokens created has no owner: only admins change it once tokens are on.
    with pytest.raises(PermissionDenied, match=r"belongs to nobody \(it was created without authentication\)"):
        require_owner(alice, "", "policy 'p'")
    assert ANONYMOUS.owner == "" and alice.owner == "alice"


def test_a_new_token_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # A command line would read `--token -abc` as a missing value and another option.
    import secrets

    draws = iter(["-" + "a" * 42, "-" + "b" * 42, "c" * 43])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes: next(draws))
    assert new_token() == "c" * 43
