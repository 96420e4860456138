"""Command-line options generated from a configuration dataclass (``glm-ext train`` from ``TrainConfig``),
so that names, help, choices and defaults live in one place: the dataclass.

Every field becomes ``--field-name`` (plus the names in its metadata's ``aliases``), with the help
of its metadata's ``help`` and the default of the dataclass. The field's type decides the parsing:

* ``bool``: ``--name`` / ``--no-name``;
* ``int``, ``float``, ``str`` (also ``X | None``): one value; ``Literal[...]`` or metadata
  ``choices``: one of those values;
* ``tuple[X, X]``: two values;
* ``dict``: ``FIELD=VALUE`` items;
* a dataclass (e.g. ``BlankInfillingConfig``): one of the named values of metadata ``named`` and/or
  ``FIELD=VALUE`` items for its fields.

``FIELD=VALUE`` values are read as JSON where they parse (``6``, ``0.2``, ``true``), as lists where
they hold commas (``0.5,0.3,0.2``), else as text. Options default to nothing (``argparse.SUPPRESS``):
:func:`option_values` returns only the fields given as flags, which then override a configuration
file (:func:`read_config_file`) and the dataclass's defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["add_dataclass_options", "option_name", "option_values", "read_config_file"]


def option_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _without_none(tp: Any) -> Any:
    """``X`` for ``X | None`` (and ``Optional[X]``), else ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _default_text(field: dataclasses.Field, default: Any) -> str:
    if default is dataclasses.MISSING or default is None or default == {}:
        return ""
    if isinstance(default, bool):
        return " (default: on)" if default else ""
    named = [name for name, value in field.metadata.get("named", {}).items() if value == default]
    if named:
        return f" (default: {named[0]})"
    if isinstance(default, tuple):
        return f" (default: {' '.join(map(str, default))})"
    return f" (default: {default})"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [_parse_value(part) for part in text.split(",")] if "," in text else text


def _assignments(option: str, items: list[str], allowed: set[str] | None) -> dict[str, Any]:
    values = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or not name:
            raise ValueError(f"{option}: expected FIELD=VALUE, got {item!r}")
        if allowed is not None and name not in allowed:
            raise ValueError(f"{option}: unknown field {name!r}; known: {', '.join(sorted(allowed))}")
        values[name] = _parse_value(text)
    return values


def _nested_value(field: dataclasses.Field, nested: type, option: str, items: list[str]) -> dict[str, Any]:
    """A dataclass field from a named value and/or FIELD=VALUE items, as a dict of its fields."""
    named = field.metadata.get("named", {})
    bare = [item for item in items if "=" not in item]
    if len(bare) > 1 or any(name not in named for name in bare):
        raise ValueError(f"{option}: expected at most one of {', '.join(named)} and FIELD=VALUE items, got {items}")
    base = named[bare[0]] if bare else _default(field)
    changes = _assignments(option, [item for item in items if "=" in item],
                           {f.name for f in dataclasses.fields(nested)})
    return {**dataclasses.asdict(base), **changes}


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Adds one option per field of the dataclass ``cls`` (see the module docstring), but those
    named in ``exclude``. ``defaults`` replaces the defaults the help shows (a command that fills
    in other values; ``dataclasses.MISSING``: none shown)."""
    types_ = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        tp = _without_none(types_[field.name])
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        names = [option_name(field), *field.metadata.get("aliases", ())]
        default = (defaults or {}).get(field.name, _default(field))
        help_text = (field.metadata.get("help", "") + _default_text(field, default)).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if "metavar" in field.metadata:
            kwargs["metavar"] = field.metadata["metavar"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs.update(choices=args, type=type(args[0]))
        elif origin is tuple:
            kwargs.update(nargs=len(args), type=args[0])
        elif origin is dict or tp is dict or dataclasses.is_dataclass(tp):
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = tp
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        parser.add_argument(*names, **kwargs)


def option_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given as flags in ``args``, as the dataclass takes them."""
    types_ = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if not hasattr(args, field.name):
            continue
        value, tp = getattr(args, field.name), _without_none(types_[field.name])
        option = option_name(field)
        if dataclasses.is_dataclass(tp):
            value = _nested_value(field, tp, option, value)
        elif typing.get_origin(tp) is dict or tp is dict:
            value = _assignments(option, value, None)
        elif typing.get_origin(tp) is tuple:
            value = tuple(value)
        values[field.name] = value
    return values


def read_config_file(path: str) -> dict[str, Any]:
    """The field values of a ``.json`` or ``.yaml`` / ``.yml`` configuration file (a mapping)."""
    file = Path(path)
    text = file.read_text(encoding="utf-8")
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}); "
                             "name a .yaml file for YAML") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field names to values, got {type(values).__name__}")
    return values
