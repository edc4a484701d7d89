"""``${ENV}``, ``${file:/path}`` and ``${cred:NAME}`` references in configuration values, and when
they are read.

Contract:

* :func:`expand_secrets` with ``unread=None`` (``sluice run``, the demo, ``--secrets``) resolves
  every reference at load time; one that cannot be resolved is a located error.
* With an ``unread`` list (operator commands from a shell: ``check``, ``status``, ``deadletter``,
  ``once``, ``lot``/``trace``) a file or credential is never read, and an environment variable is
  used only if it is set: those references may exist only inside the systemd unit. Their form is
  still checked (a located error if malformed), each unread one is noted in ``unread``, and the
  value becomes :data:`UNREAD` + the text as written. A :data:`Secret` field turns it into a
  :class:`SecretRef`, which reads the reference only when a command calls ``get_secret_value()``;
  :func:`unread_value` lets validation skip what cannot be known here.
* No message ever carries a resolved value: :class:`_Expanded`'s repr is the text as written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, SecretStr

from gateway.yamlpos import ConfigError, YamlDoc

__all__ = ["UNREAD", "Secret", "SecretRef", "SecretUnavailable", "expand_secrets", "unread_value"]

_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CRED_NAME = re.compile(r"[A-Za-z0-9_.@:-]+")
UNREAD = "\x00unread\x00"
"""Prefix of a value whose references were not read (YAML cannot hold a NUL, so nothing collides)."""


class SecretUnavailable(LookupError):
    """A reference that cannot be read here; the message names it and says what to do."""


def _form_error(ref: str) -> str | None:
    """Why ``${ref}`` is malformed (``what — what to do``), or None; nothing is read."""
    if ref.startswith("file:"):
        return None if ref[5:].strip() else "${file:} has no path — write it like ${file:/etc/sluice/mqtt.password}"
    if ref.startswith("cred:"):
        return None if _CRED_NAME.fullmatch(ref[5:]) else (
            f"${{{ref}}} is not a credential name — write it like ${{cred:mqtt_password}}")
    return None if _ENV_NAME.fullmatch(ref) else (
        f"${{{ref}}} is not a valid reference — write ${{NAME}}, ${{file:/path}} or ${{cred:NAME}}")


def _resolve_ref(ref: str) -> str:
    problem = _form_error(ref)
    if problem is not None:
        raise LookupError(problem.partition(" — ")[0])
    if ref.startswith("file:"):
        return Path(ref[5:]).read_text(encoding="utf-8").strip()
    if ref.startswith("cred:"):
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise LookupError("systemd credentials are not available ($CREDENTIALS_DIRECTORY is not set)")
        return (Path(directory) / ref[5:]).read_text(encoding="utf-8").strip()
    if ref not in os.environ:
        raise LookupError(f"environment variable {ref} is not set")
    return os.environ[ref]


def resolve_text(written: str) -> str:
    """``written`` with every reference read now. Raises :class:`SecretUnavailable`."""

    def sub(match: re.Match[str]) -> str:
        try:
            return _resolve_ref(match.group(1))
        except (LookupError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise SecretUnavailable(f"cannot resolve {match.group(0)}: {reason} — run this where the service's "
                                    "environment and credentials are (the systemd unit)") from None

    return _REF.sub(sub, written)


class SecretRef(SecretStr):
    """A secret that was not read at load time: it is read when a command uses it."""

    def __init__(self, written: str) -> None:
        super().__init__(written)
        self.written = written

    def get_secret_value(self) -> str:
        return resolve_text(self.written)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretRef) and other.written == self.written

    def __hash__(self) -> int:
        return hash(self.written)


def _lazy(value: SecretStr) -> SecretStr:
    text = SecretStr.get_secret_value(value)
    return SecretRef(text.removeprefix(UNREAD)) if text.startswith(UNREAD) else value


Secret = Annotated[SecretStr, AfterValidator(_lazy)]
"""A secret configuration value (password, token, key): masked everywhere; when its references
were not read at load time, a :class:`SecretRef`."""


def unread_value(value: Any) -> bool:
    """Whether ``value`` (from the data :func:`expand_secrets` returned) holds unread references."""
    return isinstance(value, str) and value.startswith(UNREAD)


class _Expanded(str):
    """A value with ``${...}`` references resolved. Its repr is the reference as written, so an
    error message that quotes a rejected value (``port: '${MQTT_PASSWORD}' ...``) never shows
    the secret it resolved to."""

    __slots__ = ("written",)
    written: str

    def __repr__(self) -> str:
        return repr(self.written)


def _expanded(value: str, written: str) -> str:
    out = _Expanded(value)
    out.written = written
    return out


def expand_secrets(doc: YamlDoc, errors: list[ConfigError], unread: list[ConfigError] | None = None) -> Any:
    """The document's data with ``${ENV}``, ``${file:/path}`` and ``${cred:NAME}`` in every string
    value resolved; with an ``unread`` list, files and credentials are not read (module docstring)."""

    def walk(value: Any, loc: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*loc, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*loc, i)) for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            refs = _REF.findall(value)
            bad = [p for p in map(_form_error, refs) if p is not None]
            if bad:
                message, _sep, hint = bad[0].partition(" — ")
                errors.append(doc.error(loc, message, hint))
                return ""
            if unread is not None and any(r.startswith(("file:", "cred:")) or r not in os.environ for r in refs):
                unread.append(doc.error(loc, ", ".join(f"${{{r}}}" for r in refs) + " not read",
                                        "the service reads it; `sluice check --secrets` reads it here"))
                return UNREAD + value
            try:
                return _expanded(resolve_text(value), value)
            except SecretUnavailable as exc:
                message, _sep, _hint = str(exc).partition(" — ")
                errors.append(doc.error(loc, message, "set it in the service's environment or credentials"))
                return ""
        return value

    return walk(doc.data, ())
