"""Proto messages <-> JSON for the HTTP API: every field always present, numbers as numbers (int64 included),
enums by name, non-finite floats and bytes as proto3's JSON mapping writes them ("NaN", base64)."""

from __future__ import annotations

import base64
import math
from typing import Any

import grpc
from google.protobuf.message import Message

from rl_service.core.errors import quoted
from rl_service.transport.http.calls import CallAborted


def message_to_json(message: Message) -> dict[str, Any]:
    """A message as a JSON object; unset optional fields and messages are null."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, item) for item in value]
        elif (field.message_type is not None or field.has_presence) and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_to_json(value)
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def build(message_type: type[Message], **fields: Any) -> Any:
    """A request message from validated JSON values; a value the message cannot hold is INVALID_ARGUMENT."""
    try:
        return message_type(**{name: value for name, value in fields.items() if value is not None})
    except (ValueError, TypeError) as exc:  # e.g. a string with a lone surrogate, a float out of range
        field = next((name for name, value in fields.items() if _refused_by(message_type, name, value)), "body")
        raise CallAborted(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field}: the value cannot be carried ({quoted(str(exc))})", field) from None


def _refused_by(message_type: type[Message], name: str, value: Any) -> bool:
    """True when `value` alone cannot be set as field `name` (to name the field at fault)."""
    if value is None:
        return False
    try:
        message_type(**{name: value})
    except (ValueError, TypeError):
        return True
    return False
