"""The one rule for names (experts, contributors, uploads) and for echoing untrusted values.

A name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit: safe as a
file name, an MLflow tag or a metric-name part, and short enough to show anywhere. Every
place that takes a name from outside checks it here, so the rule cannot drift between the
contributor, the coordinator and the token book.
"""

from __future__ import annotations

import re

from protocol.errors import InvalidArgument

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
PREVIEW_CHARS = 40  # how much of an offending value an error message may quote


def preview(value: object) -> str:
    """A short, printable quotation of an untrusted value for an error message.

    Error messages travel back to the sender in gRPC metadata and land in the coordinator's
    log: quoting a 100 KB value (or a terminal escape) whole would break both.
    """
    if isinstance(value, str):
        shown = repr(value[:PREVIEW_CHARS])
        return shown if len(value) <= PREVIEW_CHARS else f"{shown}... ({len(value)} chars)"
    text = repr(value) if isinstance(value, int | float | bool | None) else type(value).__name__
    return text if len(text) <= PREVIEW_CHARS else f"{text[:PREVIEW_CHARS]}..."


def is_name(value: object) -> bool:
    # fullmatch: with match, "$" also passes a trailing newline ("alice\n").
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def check_name(value: object, what: str, field: str, hint: str = "") -> str:
    """`value` if it follows the name rule; InvalidArgument naming `what` otherwise."""
    if not is_name(value):
        raise InvalidArgument(f"{what} {preview(value)} is not allowed: use {NAME_RULE}"
                              f"{hint}", field=field)
    return value
