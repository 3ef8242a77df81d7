"""Command-line flags generated from config dataclasses: a field's help, choices and CLI name live in its
metadata (``flag(...)``), its type and default in the dataclass, so the CLI never re-types them.

A ``bool`` field that defaults to True becomes ``--no-<name>`` (an ablation switch); other bools ``--<name>``.
Destinations are the flag names with ``_`` (``--beam-size`` -> ``args.beam_size``), as argparse makes them.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

_MISSING = dataclasses.MISSING


class _FieldDefault:
    """Marks a flag whose default is its field's."""

    def __repr__(self) -> str:
        return "<field default>"


FIELD_DEFAULT = _FieldDefault()


@dataclass(frozen=True)
class Flag:
    help: str
    name: str | None = None  # the flag without "--" (default: the field name, "_" -> "-")
    choices: tuple | None = None
    default: Any = FIELD_DEFAULT  # a CLI default other than the field's (e.g. ``--search none``)


def flag(help: str, *, name: str | None = None, choices=None, default: Any = FIELD_DEFAULT) -> dict:
    """Field metadata that gives the field a command-line flag: ``field(default=..., metadata=flag("..."))``."""
    return {"flag": Flag(help, name, tuple(choices) if choices is not None else None, default)}


@dataclass(frozen=True)
class FieldFlag:
    """One generated flag: the field it sets, its option string, argparse destination and what it means."""

    field: str
    option: str
    dest: str
    negated: bool
    spec: Flag
    type: Any
    default: Any


def field_flags(cls) -> list[FieldFlag]:
    """The flags of ``cls``'s fields that carry ``flag(...)`` metadata, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("flag")
        if spec is None:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not _MISSING else f.default_factory()
        negated = tp is bool and default is True
        name = spec.name or f.name.replace("_", "-")
        if negated and spec.name is None:
            name = "no-" + name
        out.append(FieldFlag(f.name, "--" + name, name.replace("-", "_"), negated, spec, tp,
                             default if spec.default is FIELD_DEFAULT else spec.default))
    return out


def _help(item: FieldFlag) -> str:
    return item.spec.help if item.type is bool else f"{item.spec.help} (default: {item.default})"


def add_config_flags(parser, cls) -> None:
    """Add a flag per flagged field of ``cls`` to ``parser`` (an ``ArgumentParser`` or argument group)."""
    for item in field_flags(cls):
        if item.type is bool:
            parser.add_argument(item.option, dest=item.dest, action="store_true", help=_help(item))
            continue
        assert item.type in (int, float, str), f"{cls.__name__}.{item.field}: no flag for type {item.type}"
        parser.add_argument(item.option, dest=item.dest, type=item.type, default=item.default,
                            choices=item.spec.choices, help=_help(item))


def config_from_args(cls, args, **extra):
    """``cls`` built from the parsed flags of its fields (``extra`` sets fields that have none)."""
    values = {}
    for item in field_flags(cls):
        value = getattr(args, item.dest)
        values[item.field] = not value if item.negated else value
    return cls(**values, **extra)


def flag_defaults(cls, config) -> dict:
    """``{destination: value}`` that make the flags of ``cls`` default to ``config`` (``parser.set_defaults``)."""
    return {item.dest: (not getattr(config, item.field)) if item.negated else getattr(config, item.field)
            for item in field_flags(cls)}


def args_for_config(cls, config) -> list[str]:
    """The command line that parses back to ``config`` (every flagged field spelled out)."""
    argv = []
    for item in field_flags(cls):
        value = getattr(config, item.field)
        if item.type is bool:
            if value == item.negated:  # the flag's absence already gives it
                continue
            argv.append(item.option)
        else:
            argv += [item.option, str(value)]
    return argv
