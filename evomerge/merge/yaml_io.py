"""The one YAML reader for configs, recipes, mergekit YAML and run-directory files: safe (no code runs),
YAML 1.2 numbers as mergekit reads them, a duplicate key an error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError

_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        self.key, self.line, self.first = key, line, first
        super().__init__(f"duplicate key '{key}' on line {line} (first on line {first})")


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 (and mergekit, through pydantic) do: `1e-10`, `1.0e30`,
    `-5E3` and `.5` are floats, not strings; a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeConstructor reports unhashable keys itself
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(key, line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def load_yaml_text(text: str) -> Any:
    """YAML text as evomerge reads every file (see `Loader`); raises yaml.YAMLError."""
    loader = Loader(text)  # a SafeLoader subclass: no code runs (what yaml.load does, without naming it)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content (safe loader: no code runs), or an EvomergeError naming the problem. The one
    reader for configs, recipes, mergekit YAML and run-directory files."""
    p = Path(path)
    if not p.is_file():
        if p.exists():
            raise EvomergeError(f"'{p}' is a directory, not a YAML file", "give the path of the YAML file")
        raise EvomergeError(f"config file '{p}' does not exist", "check the path")
    try:
        return load_yaml_text(p.read_text())
    except DuplicateKeyError as e:
        raise EvomergeError(f"{p}: key '{e.key}' is given twice (lines {e.first} and {e.line}); YAML keeps only "
                            "the last, which silently drops the first", f"remove one of the two '{e.key}:' "
                            "entries (merge their contents into one)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0]
        if "could not determine a constructor" in first:
            raise EvomergeError(f"{p}: not readable YAML: {first}",
                                "remove the tag: configs are plain data and never construct objects or run "
                                "code") from None
        raise EvomergeError(f"{p}: not readable YAML: {first}",
                            "fix the YAML syntax (a YAML linter shows the line)") from None
    except OSError as e:
        raise EvomergeError(f"{p}: cannot be read ({e.strerror})", "check the file's permissions") from None
