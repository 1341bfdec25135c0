"""ConfigurationError: a setting that passed validation but cannot be used once the server starts.

Settings validation (pydantic) checks values; some settings name files that are only read at start-up (TLS
certificates and keys, CA bundles, token files), and some combinations are refused at bind time (a public
address without TLS and tokens). Those raise a ConfigurationError, whose message is one line naming the setting;
the server prints it and exits 2, as it does for an invalid value.
"""

from __future__ import annotations


class ConfigurationError(ValueError):
    """A configured setting is unusable; str(error) is one line that names it."""
