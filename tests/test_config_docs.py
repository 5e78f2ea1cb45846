"""docs/configuration.md lists every field of the config dataclasses, with its default, and nothing else
(issue 25): the page is checked against ``common.config`` so it cannot drift again.

Each dataclass reachable from ``DeploymentConfig`` has a table under a heading that names it
(``### `actuator` (ActuatorConfig)``, or a paragraph starting ``` `OpenpiKeys` (in ...``` for a shared one);
a class whose fields are all dataclasses with their own tables (``OpenpiConfig``) needs none.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from common.config import REPO_ROOT, DeploymentConfig

PAGE = REPO_ROOT / "docs" / "configuration.md"
HEADING = re.compile(r"^(?:### `[^`]*` \((\w+)\)|`(\w+)` \(in )")
ROW = re.compile(r"^\| `(\w+)` \| `((?:[^`])*)` \| (`(?:[^`])*`|[^|]*) \|")


def documented(page: Path) -> dict[str, dict[str, str]]:
    """``{class name: {field: default column}}`` from the page's tables."""
    tables: dict[str, dict[str, str]] = {}
    current: str | None = None
    for line in page.read_text().splitlines():
        heading = HEADING.match(line)
        if heading:
            current = heading[1] or heading[2]
            tables[current] = {}
        elif line.startswith("## "):
            current = None
        elif current and (row := ROW.match(line)):
            tables[current][row[1]] = row[3].strip()
    return tables


def config_classes(root: type) -> dict[type, list[dataclasses.Field[Any]]]:
    found: dict[type, list[dataclasses.Field[Any]]] = {}

    def walk(cls: type) -> None:
        if cls in found:
            return
        found[cls] = list(dataclasses.fields(cls))
        hints = typing.get_type_hints(cls)
        for item in found[cls]:
            for part in (hints[item.name], *typing.get_args(hints[item.name])):
                if dataclasses.is_dataclass(part) and isinstance(part, type):
                    walk(part)

    walk(root)
    return found


def default_of(item: dataclasses.Field[Any]) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


def default_differs(item: dataclasses.Field[Any], text: str) -> bool:
    """Whether the page's default column (a Python literal in backticks) says another value than the code;
    nested sections (dataclass defaults) are not compared."""
    value = default_of(item)
    if value is dataclasses.MISSING or dataclasses.is_dataclass(value):
        return False
    try:
        said = ast.literal_eval(text.strip("`"))
    except (ValueError, SyntaxError):
        return True
    return bool(said != value or (type(said) is not type(value) and not isinstance(value, float)))


def test_the_configuration_page_lists_every_field_with_its_default() -> None:
    tables = documented(PAGE)
    problems = []
    for cls, fields in config_classes(DeploymentConfig).items():
        hints = typing.get_type_hints(cls)
        if cls.__name__ not in tables:
            if all(dataclasses.is_dataclass(hints[f.name]) for f in fields):
                continue  # only nested sections, each with its own table
            problems.append(f"{cls.__name__}: no table (a heading `### `<path>` ({cls.__name__})`)")
            continue
        table = tables[cls.__name__]
        names = [f.name for f in fields]
        problems += [f"{cls.__name__}.{name}: not on the page" for name in names if name not in table]
        problems += [f"{cls.__name__}.{name}: on the page but not a field" for name in table if name not in names]
        for item in fields:
            if item.name in table and default_differs(item, table[item.name]):
                problems.append(f"{cls.__name__}.{item.name}: the page says default {table[item.name]}, the code "
                                f"{default_of(item)!r}")
    assert not problems, "docs/configuration.md is out of date:\n" + "\n".join(problems)
