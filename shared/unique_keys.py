"""Reading YAML and JSON that say a key twice: an error, not the last value silently.

Python's ``json`` and PyYAML's ``safe_load`` keep the last of two equal keys in one
mapping, so a spec with ``epochs: 1`` and, further down, ``epochs: 3`` trains 3 epochs
with no word said. YAML 1.2 and RFC 8259 ("names within an object SHOULD be unique") both
leave a repeated key an error or undefined; termtune refuses it, naming where it is.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode

_MERGE = "tag:yaml.org,2002:merge"


class RepeatedKeyError(yaml.YAMLError):
    """A mapping that says ``key`` on ``line`` and again on ``again`` (1-based)."""

    def __init__(self, key: Any, line: int, again: int) -> None:
        self.key, self.line, self.again = key, line, again
        super().__init__(
            f"line {again}: the key {key!r} a second time in one mapping (first on line "
            f"{line}): say each key once"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key said twice in one mapping. A ``<<`` merge
    may still be overridden by the mapping's own keys, as YAML's merge means."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE or not isinstance(key_node, ScalarNode):
                continue  # a merge, or a key that is not text (refused by the spec's fields)
            key = self.construct_object(key_node)  # 1 and "1" are two keys
            if key in first_line:
                raise RepeatedKeyError(key, first_line[key] + 1, key_node.start_mark.line + 1)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises RepeatedKeyError (a ``yaml.YAMLError``) for a key said
    twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader


class _Repeated(dict):  # type: ignore[type-arg]
    """A JSON object that said some of its keys more than once (``repeated``)."""

    repeated: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) == len(pairs):
        return found
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for key, _ in pairs:
        if key in seen:
            repeated[key] = None
        seen.add(key)
    marked = _Repeated(found)
    marked.repeated = list(repeated)
    return marked


def repeated_json_keys(text: str | bytes) -> list[tuple[str | int, ...]]:
    """Where a JSON document says a key twice in one object: the path of each repeated
    key (object keys and array indexes), in document order of their objects; [] for a
    document that is not JSON (its own parse reports that)."""
    try:
        document = json.loads(text, object_pairs_hook=_object)
    except ValueError:
        return []
    return list(_walk(document, ()))


def _walk(value: Any, path: tuple[str | int, ...]) -> Any:
    if isinstance(value, dict):
        for key in getattr(value, "repeated", ()):
            yield (*path, key)
        for key, item in value.items():
            yield from _walk(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*path, index))
