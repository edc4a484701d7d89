"""A YAML document validated against a pydantic model, every error turned into a located one for
people (``file:line:col: what is wrong — what to do``): unknown keys with the closest allowed one,
missing keys, wrong types (YAML 1.1's ``no`` and ``0755`` named), values out of range. Used by
gateway.yaml, devices, profiles, trace.yaml and the simulators' files."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from gateway.driver import StrictModel
from gateway.secretref import unread_value
from gateway.yamlpos import ConfigError, YamlDoc

__all__ = ["validate_doc"]

ModelT = TypeVar("ModelT", bound=StrictModel)


def _describe(err: Any, model: type[StrictModel] | None) -> tuple[str, str]:
    kind = err["type"]
    loc = [p for p in err["loc"] if isinstance(p, (str, int))]
    name = str(loc[-1]) if loc else "value"
    given = err.get("input")
    if kind == "extra_forbidden":
        allowed = sorted(model.model_fields) if model is not None and hasattr(model, "model_fields") else []
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        if close:
            return f"unknown key '{name}'", f"did you mean '{close[0]}'?"
        return f"unknown key '{name}'", ("remove it; keys allowed here: " + ", ".join(allowed)) if allowed else "remove it"
    if kind == "missing":
        where = f" in '{loc[-2]}'" if len(loc) > 1 else ""
        return f"required key '{name}' is missing{where}", f"add `{name}: ...` to this block"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{name}: {given!r} is not allowed", f"use one of {expected}"
    if kind == "union_tag_invalid":
        expected = err.get("ctx", {}).get("expected_tags", "")
        return f"unknown type {err.get('ctx', {}).get('tag')!r}", f"use one of {expected}"
    if kind == "union_tag_not_found":
        return "the 'type' key is missing", "add `type: mqtt` or `type: influxdb`"
    if kind == "string_pattern_mismatch":
        return f"{name}: {given!r} is not a valid id", "use letters, digits, '_', '.', '-' (at most 64), starting with a letter or digit"
    if kind == "value_error":
        text = str(err.get("ctx", {}).get("error", err["msg"]))
        message, _sep, hint = text.partition(" — ")
        return (f"{name}: {message}" if loc else message), hint
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{name}: {err['msg'].lower()}, got {given!r}", "correct the value's type"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{name}: {given!r} is out of range ({err['msg'].lower()})", "choose a value in range"
    return f"{name}: {err['msg']}", ""


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _real_loc(data: Any, loc: tuple[str | int, ...], keep_last: bool) -> tuple[tuple[str | int, ...], bool]:
    """Keep the parts of a pydantic loc that are keys in the YAML data (drops union tags).

    Returns the cleaned loc and whether it ends at a scalar value (a field, not a block)."""
    real: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
            real.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            real.append(part)
        elif keep_last and i == len(loc) - 1:
            real.append(part)
            node = None
    return tuple(real), not isinstance(node, (dict, list))


def validate_doc(doc: YamlDoc, model: type[ModelT], errors: list[ConfigError],
                 data: Any = None, **context: Any) -> ModelT | None:
    """Validate ``doc`` against ``model``; append located errors. Returns the model or None."""
    data = doc.data if data is None else data
    if not isinstance(data, dict):
        errors.append(doc.error((), "expected a block of `key: value` settings",
                                "see the example files under config/ for the layout"))
        return None
    try:
        return model.model_validate(data, context=context or None)
    except ValidationError as exc:
        for err in exc.errors():
            raw = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
            loc, at_value = _real_loc(data, raw, keep_last=err["type"] in ("missing", "extra_forbidden"))
            if unread_value(err.get("input")):
                continue  # its references were not read: what it will be is not known here
            if err["type"] == "union_tag_invalid":
                loc, at_value = (*loc, "type"), True  # point at the wrong value, not at the block
            message, hint = _describe({**err, "loc": loc if at_value or err["type"] == "missing" else ()}, model)
            if err["type"] in ("extra_forbidden", "missing"):
                message, hint = _describe({**err, "loc": loc}, _model_at(model, loc[:-1], data))
            written = doc.plain_scalar(loc) if err["type"] == "string_type" and at_value else None
            if written is not None and not isinstance(err.get("input"), str):
                # YAML 1.1 reads `no`, `on`, `0755` or `1e3` unquoted as a bool or a number.
                kind = "false" if err["input"] is False else "true" if err["input"] is True else "a number"
                message = f"{loc[-1]}: YAML reads {written} as {kind}, not as the text '{written}'"
                hint = f"quote it: {loc[-1]}: \"{written}\""
            errors.append(doc.error(loc, message, hint, key=err["type"] == "extra_forbidden"))
        return None


def _model_at(model: Any, loc: Sequence[str | int], data: Any = None) -> Any:
    current = model
    annotation: Any = None
    node = data
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
        if current is None or not hasattr(current, "model_fields"):
            return None
        if isinstance(part, str) and part in current.model_fields:
            annotation = current.model_fields[part].annotation
            nxt = _model_of(annotation)
            current = nxt if nxt is not None else current
    if isinstance(node, dict) and "type" in node and annotation is not None:
        # A block of a `type:`-discriminated union (sinks): the model its type names.
        return _model_of_type(annotation, node["type"]) or current
    return current


def _model_of_type(annotation: Any, kind: Any) -> Any:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        field = annotation.model_fields.get("type")
        return annotation if field is not None and kind in getattr(field.annotation, "__args__", ()) else None
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of_type(arg, kind)
        if found is not None:
            return found
    return None
