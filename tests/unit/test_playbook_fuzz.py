"""Fuzzing the playbooks: wrong types, junk values, deletions, unknown keys and broken YAML
must all end in a one-line UsageError (exit 2), never in another exception."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import yaml

from lab import playbook
from lab.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
JUNK: list[Any] = ["", " ", "\x00", "a\nb", "../../x", "$_shell(\"id\")", -1, 0, 10**12, 1.5,
                   True, None, [], {}, [1, "x"], {"k": "v"}, "x" * 5000, "l9", "💥"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, rng: random.Random) -> Any:
    paths = _paths(doc)
    path = rng.choice(paths)
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    what = rng.randrange(3)
    # A copy: the same [] or {} put in twice would let a later mutation nest it in itself.
    if what == 0:
        parent[key] = copy.deepcopy(rng.choice(JUNK))
    elif what == 1 and isinstance(parent, dict):
        del parent[key]
    elif isinstance(parent, dict):
        parent[f"unknown_{rng.randrange(99)}"] = copy.deepcopy(rng.choice(JUNK))
    return doc


def test_mutated_playbooks_fail_only_with_usage_errors(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    sources = [p for p in sorted((ROOT / "playbooks").glob("*.yaml")) if "suite" not in
               p.read_text()]
    (tmp_path / "images").mkdir()
    for img in (ROOT / "images").glob("*.yaml"):
        (tmp_path / "images" / img.name).write_text(img.read_text())
    (tmp_path / "playbooks").mkdir()
    for src in sources:
        (tmp_path / "playbooks" / src.name).write_text(src.read_text())
    tried = 0
    for i in range(600):
        src = rng.choice(sources)
        doc = yaml.safe_load(src.read_text())
        for _ in range(rng.randrange(1, 4)):
            doc = _mutate(doc, rng)
        text = yaml.safe_dump(doc, allow_unicode=True)
        if rng.randrange(10) == 0:  # broken YAML too
            cut = rng.randrange(len(text))
            text = text[:cut] + rng.choice(["\t", ": [", "&a *b", "\x00", "'"]) + text[cut:]
        p = tmp_path / "playbooks" / f"fuzz-{i}.yaml"
        p.write_text(text)
        try:
            playbook.load(p)
        except UsageError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(str(p)), msg
        tried += 1
    assert tried == 600
