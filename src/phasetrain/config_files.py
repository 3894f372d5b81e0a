"""Reading config files, YAML or JSON, with a key given twice refused: both formats silently keep the last."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import yaml

from phasetrain.errors import ConfigError


class DuplicateKey(Exception):
    """A key given twice in one mapping, which YAML and JSON parsers resolve silently: the last one wins."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line

    def located(self, source: str) -> str:
        return f"{source} line {self.line}: {self}" if self.line else f"{source}: {self}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping, at any depth."""

    def get_single_node(self) -> yaml.Node | None:
        # Checked on the composed nodes, before construction: merging `<<:` rewrites mappings in place,
        # after which a merged key and the key that overrides it would look like a duplicate.
        node = super().get_single_node()
        if node is not None:
            self._refuse_duplicate_keys(node, set())
        return node

    def _refuse_duplicate_keys(self, node: yaml.Node, checked: set[int]) -> None:
        if id(node) in checked:  # an alias: checked where its anchor is
            return
        checked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # a `<<:` key may be set again below it (YAML's override); complex keys are rare
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKey(f"duplicate key {key!r} (first on line {first_line[key]}): remove one of "
                                        "them (YAML would keep only the last)", line)
                first_line[key] = line
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        for child in children:
            self._refuse_duplicate_keys(child, checked)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:  # json has no line numbers here: the object's keys say where
            raise DuplicateKey(f"duplicate key {key!r} (in an object with keys: {', '.join(dict(pairs))}): "
                                "remove one of them (JSON would keep only the last)")
        result[key] = value
    return result


def read_config_file(path: pathlib.Path) -> Any:
    """The data of a ``.json`` (read as JSON) or any other (read as YAML) config file."""
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8): expected a {kind} config") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_json_object) if kind == "JSON" else load_yaml(text)
    except DuplicateKey as exc:
        raise ConfigError(exc.located(str(path))) from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {one_line(exc)}") from None


def one_line(exc: Exception) -> str:
    """A parser's error in one line: PyYAML adds the offending text and a ``^`` marker on lines of their own."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return " ".join(str(exc).split())
