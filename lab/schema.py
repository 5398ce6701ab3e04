"""Validation of the lab's YAML files (playbooks, image recipes) with file:line errors.

PyYAML's composer keeps a mark (line, column) on every node; validating the node tree instead of
the loaded dict lets every error name the file, the line and the field, as the CLI promises.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab.errors import UsageError


class Located(dict[str, Any]):
    """A mapping that remembers the line of each of its keys (1-based)."""

    def __init__(self, file: str, line: int) -> None:
        super().__init__()
        self.file = file
        self.line = line
        self.lines: dict[str, int] = {}

    def where(self, key: str | None = None) -> str:
        return f"{self.file}:{self.lines.get(key, self.line) if key else self.line}"


def fail(file: str, node: yaml.Node | None, path: str, msg: str) -> UsageError:
    line = node.start_mark.line + 1 if node is not None else 1
    return UsageError(f"{file}:{line}: {path or '<top>'}: {msg}")


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)


class Spec:
    """Checks one node and converts it to a Python value."""

    what = "a value"

    def check(self, node: yaml.Node, path: str, file: str) -> Any:  # pragma: no cover
        raise NotImplementedError


# Control characters other than newline and tab (in multi-line fields only) never have a
# place in a playbook: a newline in a gdb command or a name is how a value breaks out of it.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_OR_NL = re.compile(r"[\x00-\x1f\x7f]")


class Str(Spec):
    what = "a string"

    def __init__(self, choices: tuple[str, ...] | None = None, *, multiline: bool = False,
                 pattern: str | None = None, pattern_what: str = "", nonempty: bool = False,
                 max_len: int = 65536) -> None:
        self.choices = choices
        self.multiline = multiline
        self.pattern = re.compile(pattern) if pattern else None
        self.nonempty = nonempty
        self.max_len = max_len
        if choices:
            self.what = "one of " + ", ".join(choices)
        elif pattern_what:
            self.what = pattern_what

    def check(self, node: yaml.Node, path: str, file: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise fail(file, node, path, f"expected {self.what}, got {_describe(node)}")
        value = str(node.value)
        if self.choices and value not in self.choices:
            raise fail(file, node, path, f"expected {self.what}, got {value!r}")
        bad = (_CONTROL if self.multiline else _CONTROL_OR_NL).search(value)
        if bad:
            allowed = " (newline and tab are allowed)" if self.multiline else ""
            raise fail(file, node, path, f"expected {self.what} without control characters"
                       f"{allowed}, got {bad.group()!r} at offset {bad.start()}")
        if self.nonempty and not value.strip():
            raise fail(file, node, path, f"expected {self.what}, got an empty string")
        if len(value) > self.max_len:
            raise fail(file, node, path, f"expected at most {self.max_len} characters, got "
                       f"{len(value)}")
        if self.pattern and not self.pattern.fullmatch(value):
            raise fail(file, node, path, f"expected {self.what}, got {value!r}")
        return value


def run_name() -> Str:
    """A playbook's or suite's name: it becomes a run directory's name, so a plain name."""
    return Str(pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}",
               pattern_what="a name of letters, digits, '_', '.', '-'")


class Int(Spec):
    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.what = "an integer"
        if minimum is not None:
            self.what += f" >= {minimum}"
        if maximum is not None:
            self.what += f" <= {maximum}"

    def check(self, node: yaml.Node, path: str, file: str) -> int:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int"):
            raise fail(file, node, path, f"expected {self.what}, got {_describe(node)}")
        v = int(yaml.safe_load(node.value))
        if (self.minimum is not None and v < self.minimum) or (
                self.maximum is not None and v > self.maximum):
            raise fail(file, node, path, f"expected {self.what}, got {v}")
        return v


class Bool(Spec):
    what = "true or false"

    def check(self, node: yaml.Node, path: str, file: str) -> bool:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool"):
            raise fail(file, node, path, f"expected {self.what}, got {_describe(node)}")
        return bool(yaml.safe_load(node.value))


class Scalar(Spec):
    """A string, integer or boolean, kept as the string a kernel or module would see."""

    what = "a string, number or boolean"

    def check(self, node: yaml.Node, path: str, file: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise fail(file, node, path, f"expected {self.what}, got {_describe(node)}")
        if node.tag == "tag:yaml.org,2002:bool":
            return "1" if yaml.safe_load(node.value) else "0"
        return str(node.value)


class List(Spec):
    def __init__(self, item: Spec) -> None:
        self.item = item
        self.what = f"a list of {item.what}"

    def check(self, node: yaml.Node, path: str, file: str) -> list[Any]:
        if not isinstance(node, yaml.SequenceNode):
            raise fail(file, node, path, f"expected {self.what}, got {_describe(node)}")
        return [self.item.check(n, f"{path}[{i}]", file) for i, n in enumerate(node.value)]


class Dict(Spec):
    """A mapping with free keys (e.g. module parameters)."""

    def __init__(self, value: Spec, key_check: Callable[[str], bool] | None = None,
                 key_what: str = "a name") -> None:
        self.value, self.key_check, self.key_what = value, key_check, key_what
        self.what = f"a mapping of {key_what} to {value.what}"

    def check(self, node: yaml.Node, path: str, file: str) -> Located:
        if not isinstance(node, yaml.MappingNode):
            raise fail(file, node, path, f"expected {self.what}, got {_describe(node)}")
        out = Located(file, node.start_mark.line + 1)
        for k, v in node.value:
            key = Str().check(k, path, file)
            sub = f"{path}.{key}" if path else key
            if self.key_check and not self.key_check(key):
                raise fail(file, k, sub, f"expected {self.key_what}")
            if key in out:
                raise fail(file, k, sub, "duplicate key")
            out[key] = self.value.check(v, sub, file)
            out.lines[key] = k.start_mark.line + 1
        return out


@dataclass
class Field:
    spec: Spec
    required: bool = False
    default: Any = None


@dataclass
class Map(Spec):
    """A mapping with a fixed set of keys: an unknown key is an error."""

    fields: dict[str, Field] = field(default_factory=dict)
    what: str = "a mapping"

    def check(self, node: yaml.Node, path: str, file: str) -> Located:
        if not isinstance(node, yaml.MappingNode):
            raise fail(file, node, path, f"expected {self.what}, got {_describe(node)}")
        out = Located(file, node.start_mark.line + 1)
        for k, v in node.value:
            key = Str().check(k, path, file)
            sub = f"{path}.{key}" if path else key
            if key not in self.fields:
                known = ", ".join(self.fields)
                raise fail(file, k, sub, f"unknown key (expected one of: {known})")
            if key in out:
                raise fail(file, k, sub, "duplicate key")
            out[key] = self.fields[key].spec.check(v, sub, file)
            out.lines[key] = k.start_mark.line + 1
        for name, f in self.fields.items():
            if name not in out:
                if f.required:
                    raise fail(file, node, f"{path}.{name}" if path else name,
                               "missing required field")
                out[name] = f.default
        return out


def load(path: Path, spec: Spec) -> Any:
    """Read a YAML file and validate it; every problem is a one-line UsageError."""
    name = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{name}: cannot read: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{name}:{line}: not valid YAML: {problem}") from None
    if node is None:
        raise UsageError(f"{name}:1: the file is empty")
    return spec.check(node, "", name)
