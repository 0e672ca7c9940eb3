"""Validate compose files against the Compose specification's JSON schema.

``python deploy/lint/compose_schema.py docker-compose.yml [override.yml ...]``: each file
alone, then the override merged over the base the way ``docker compose -f A -f B`` merges
mappings (compose's ``!reset`` tag removes a key). Uses the schema check-jsonschema vendors.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

RESET = object()


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!reset", lambda loader, node: RESET)


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass


def merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if value is RESET:
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value)
        return out
    return override


def strip(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: strip(v) for k, v in doc.items() if v is not RESET}
    return doc


def main(paths: list[str]) -> int:
    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    validator = jsonschema.Draft7Validator(json.loads(schema_file.read_text()))
    docs = [(p, strip(load(Path(p)))) for p in paths]
    merged = load(Path(paths[0]))
    for path in paths[1:]:
        merged = merge(merged, load(Path(path)))
    docs.append((" + ".join(paths), strip(merged)))
    failures = 0
    for name, doc in docs:
        errors = list(validator.iter_errors(doc))
        for error in errors:
            where = "/".join(str(p) for p in error.absolute_path)
            print(f"{name}: {where}: {error.message}")
        print(f"{name}: {'INVALID' if errors else 'valid'}")
        failures += len(errors)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
