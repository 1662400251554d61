"""Turning environment strings into typed values, with errors that name the variable.

One converter serves both the worker's own settings and every vLLM engine argument, so
``true``/``1``/``yes`` and JSON mean the same thing everywhere.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from vlm_worker.contract.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null"}


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(
        f"{name}={raw!r} is not a boolean; use one of true/false, 1/0, yes/no, on/off"
    )


def _parse_mapping(name: str, raw: str) -> dict[str, Any]:
    """JSON object, or the ``image=1,video=0`` shorthand that fits a console text field."""
    text = raw.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}={raw!r} is not valid JSON: {exc.msg}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={raw!r} must be a JSON object")
        return value
    result: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"{name}={raw!r} is neither a JSON object nor key=value pairs "
                f"(e.g. image=1,video=0)"
            )
        val = val.strip()
        try:
            result[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            result[key.strip()] = val
    return result


def _parse_list(name: str, raw: str) -> list[Any]:
    text = raw.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}={raw!r} is not valid JSON: {exc.msg}") from exc
        if not isinstance(value, list):
            raise ConfigError(f"{name}={raw!r} must be a JSON list")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def convert(name: str, raw: str, annotation: Any) -> Any:
    """Convert ``raw`` to ``annotation`` (a resolved type hint), or raise ``ConfigError``.

    Handles what engine-argument dataclasses use: bool, int, float, str, Literal, Optional,
    unions, list/tuple/set and dict types. Anything else takes JSON, because that is the
    only faithful way to spell a nested config in one environment variable.
    """
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        if type(None) in args and raw.strip().lower() in _NONE:
            return None
        errors: list[str] = []
        # Try narrow types first so "1" becomes 1, not "1", in an int | str union.
        for member in sorted(members, key=_specificity):
            try:
                return convert(name, raw, member)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{name}={raw!r}: " + "; ".join(errors)
        )
    if origin is Literal:
        for choice in args:
            if str(choice).lower() == raw.strip().lower():
                return choice
        raise ConfigError(
            f"{name}={raw!r} is not accepted; choose one of {', '.join(map(str, args))}"
        )
    if annotation is bool:
        return parse_bool(name, raw)
    if annotation is int:
        try:
            return int(raw.strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if annotation is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
    if annotation is str:
        return raw
    if origin in (dict, typing.Mapping) or annotation is dict:
        return _parse_mapping(name, raw)
    if origin in (list, tuple, set, typing.Sequence) or annotation in (list, tuple, set):
        items = _parse_list(name, raw)
        item_type = args[0] if args and args[0] is not Ellipsis else None
        if item_type in (int, float, str, bool):
            items = [convert(f"{name}[{i}]", str(v), item_type) for i, v in enumerate(items)]
        return tuple(items) if origin is tuple else items
    if annotation is Any or annotation is object:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    # Nested config objects and other classes: JSON is the only unambiguous spelling.
    text = raw.strip()
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}={raw!r} is not valid JSON: {exc.msg}") from exc
    if isinstance(annotation, type) and issubclass(annotation, str):  # str enums
        return annotation(raw)
    return raw


def _specificity(annotation: Any) -> int:
    order = {bool: 0, int: 1, float: 2}
    if get_origin(annotation) is Literal:
        return 0
    if annotation is str:
        return 9
    return order.get(annotation, 5)


def type_label(annotation: Any) -> str:
    """A short human name for a type, used in docs and the console template."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Union or origin is types.UnionType:
        return " | ".join(type_label(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if annotation in (bool, int, float, str):
        return annotation.__name__
    if origin in (dict, typing.Mapping):
        return "JSON object or k=v,k=v"
    if origin in (list, tuple, set):
        return "JSON list or comma-separated"
    return "JSON"
