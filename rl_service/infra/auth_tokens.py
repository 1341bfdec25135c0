"""Bearer tokens: the AUTH_TOKENS_FILE format, its parser, and constant-time lookup of a presented token.

One token per line, `NAME ROLE sha256:HEX` (HEX: the SHA-256 of the token, 64 hex digits), so the file holds no
secret; blank lines and `#` comments are ignored. NAME is the principal runs and policies record as their owner.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from rl_service.infra.config_errors import ConfigurationError

SETTING = "AUTH_TOKENS_FILE"
DIGEST_PREFIX = "sha256:"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
TOKEN_BYTES = 32  # 256 bits of randomness per token


class Role(enum.IntEnum):
    """What a token may do; each role includes every role below it."""

    READER = 1  # status, list, watch, history, policy info, reflection
    ACTOR = 2  # + acting, exporting, model downloads, log-probabilities, model watches
    TRAINER = 3  # + start/stop/resume/delete own runs, create and train own policies, checkpoints
    ADMIN = 4  # + delete policies, and act on other principals' runs and policies

    @property
    def label(self) -> str:
        """The name used in the tokens file and in messages ('trainer')."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        """A role from its label; ValueError naming the roles otherwise."""
        for role in cls:
            if role.label == text:
                return role
        raise ValueError(f"unknown role {text[:20]!r}; use one of {', '.join(r.label for r in cls)}")


ROLE_LABELS = tuple(role.label for role in Role)


class TokenFileError(ConfigurationError):
    """AUTH_TOKENS_FILE cannot be used; the message names the setting, the file and the line."""


@dataclass(frozen=True)
class TokenEntry:
    """One line of the tokens file: a principal's name, its role and its token's SHA-256."""

    name: str
    role: Role
    digest: bytes


@dataclass(frozen=True)
class TokenTable:
    """Every configured token; `lookup` compares a presented token against all of them in constant time."""

    entries: tuple[TokenEntry, ...]

    def lookup(self, token: str) -> TokenEntry | None:
        """The entry whose digest matches the token, or None. Every entry is compared, with hmac.compare_digest,
        so the time taken says nothing about which entry (or how much of one) matched."""
        digest = token_digest(token)
        found: TokenEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token's UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def check_name(name: str) -> str:
    """A principal name, or ValueError: 1 to 64 of A-Z a-z 0-9 _ . -."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"name {name[:40]!r} must be 1 to 64 characters of A-Z a-z 0-9 _ . -")
    return name


def new_token() -> str:
    """A fresh random token: 256 bits, URL-safe base64 (43 characters), never starting with '-'."""
    # One in 64 would start with '-', which a command line reads as an option: `--token -x...` is refused by
    # argparse ("expected one argument"). Drawing again costs under 0.03 bits of the 256.
    while (token := secrets.token_urlsafe(TOKEN_BYTES)).startswith("-"):
        pass
    return token


def token_line(name: str, role: Role, token: str) -> str:
    """The tokens-file line for a token: `NAME ROLE sha256:HEX`."""
    return f"{check_name(name)} {role.label} {DIGEST_PREFIX}{token_digest(token).hex()}"


def parse_line(line: str) -> TokenEntry | None:
    """One line of the file: an entry, None for a blank or comment line, ValueError saying what is wrong."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) != 3:
        raise ValueError(f"expected `NAME ROLE {DIGEST_PREFIX}HEX`, found {len(parts)} field(s)")
    name, role_text, digest_text = parts
    check_name(name)
    role = Role.parse(role_text)
    if not digest_text.startswith(DIGEST_PREFIX):
        raise ValueError(f"the digest must start with {DIGEST_PREFIX!r}")
    hex_digest = digest_text[len(DIGEST_PREFIX):]
    if not _HEX_DIGEST.fullmatch(hex_digest):
        raise ValueError(f"the digest must be 64 hex digits after {DIGEST_PREFIX!r} (the SHA-256 of the token), "
                         f"found {len(hex_digest)} characters")
    return TokenEntry(name, role, bytes.fromhex(hex_digest))


def parse_tokens(text: str, source: str) -> TokenTable:
    """Every entry of a tokens file's text; TokenFileError naming `source` and the line at the first fault."""
    entries: list[TokenEntry] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = parse_line(line)
            if entry is not None and entry.name in names:
                raise ValueError(f"name {entry.name!r} is already used on line {names[entry.name]}")
            if entry is not None and entry.digest in digests:
                # One token for two principals would make the owner of what it creates ambiguous.
                raise ValueError(f"the same token digest is already on line {digests[entry.digest]}")
        except ValueError as exc:
            raise TokenFileError(f"{SETTING} {source} line {number}: {exc}") from None
        if entry is not None:
            names[entry.name] = digests[entry.digest] = number
            entries.append(entry)
    if not entries:
        raise TokenFileError(f"{SETTING} {source}: holds no token line (`NAME ROLE {DIGEST_PREFIX}HEX`); every "
                             "call would be refused. Unset it to run without authentication")
    return TokenTable(tuple(entries))


def load_tokens(path: Path) -> TokenTable:
    """Read and parse AUTH_TOKENS_FILE once; TokenFileError when it is missing, unreadable or malformed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenFileError(f"{SETTING} {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise TokenFileError(f"{SETTING} {path} line {line}: not UTF-8 text") from None
    return parse_tokens(text, str(path))
