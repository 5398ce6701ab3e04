"""gdb's printed values, parsed into JSON: structs to objects, arrays to lists, integers and
pointers to integers, booleans to booleans; anything else stays the string gdb printed.

    {pgd = 36864, hpa = 96612352}                 -> {"pgd": 36864, "hpa": 96612352}
    {{pgd = 1, hpa = 2}, {pgd = 3, hpa = 4}}      -> [{"pgd": 1, ...}, {...}]
    (struct kvm_mmu *) 0xff11000005649ef8         -> 18743... (int)
    0xffffffffc0328e10 <nested_svm_vmexit>        -> 18446744072637...
    {0 <repeats 16 times>}                        -> [0, 0, ..., 0]
"""

from __future__ import annotations

import re
from typing import Any

_INT = re.compile(r"-?(?:0x[0-9a-fA-F]+|\d+)(?![\w.])")
_FLOAT = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?")
_NAME = re.compile(r"[A-Za-z_$][\w$.]*")


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\n":
            self.i += 1

    def peek(self, k: str) -> bool:
        self.ws()
        return self.s.startswith(k, self.i)

    def value(self) -> Any:
        self.ws()
        if self.peek("{"):
            return self.compound()
        return self.scalar()

    def compound(self) -> Any:
        self.i += 1  # {
        items: list[Any] = []
        fields: dict[str, Any] = {}
        while True:
            self.ws()
            if self.peek("}"):
                self.i += 1
                break
            if self.peek("..."):
                self.i += 3
                items.append("...")
            else:
                m = _NAME.match(self.s, self.i)
                j = m.end() if m else self.i
                rest = self.s[j:].lstrip(" ")
                if m and rest.startswith("=") and not rest.startswith("=="):
                    self.i = j
                    self.ws()
                    self.i += 1  # =
                    fields[m.group(0)] = self.value()
                else:
                    v = self.value()
                    self.ws()
                    rep = re.match(r"<repeats (\d+) times>", self.s[self.i:])
                    if rep:
                        self.i += rep.end()
                        items.extend([v] * int(rep.group(1)))
                    else:
                        items.append(v)
            self.ws()
            if self.peek(","):
                self.i += 1
                continue
            if self.peek("}"):
                self.i += 1
                break
            raise ValueError(f"unexpected {self.s[self.i:self.i + 20]!r} at {self.i}")
        if fields and items:
            fields["_items"] = items
            return fields
        return fields if fields else items

    def scalar(self) -> Any:
        start = self.i
        # Leading cast: (struct kvm_mmu *) 0x...
        if self.s.startswith("(", self.i):
            depth = 0
            for j in range(self.i, len(self.s)):
                if self.s[j] == "(":
                    depth += 1
                elif self.s[j] == ")":
                    depth -= 1
                    if depth == 0:
                        self.i = j + 1
                        break
            self.ws()
        m = _INT.match(self.s, self.i)
        if m:
            self.i = m.end()
            v = int(m.group(0), 0)
            self._skip_annotation()
            return v
        m = _FLOAT.match(self.s, self.i)
        if m:
            self.i = m.end()
            return float(m.group(0))
        if self.s.startswith('"', self.i):
            j = self.i + 1
            while j < len(self.s) and self.s[j] != '"':
                j += 2 if self.s[j] == "\\" else 1
            text = self.s[self.i + 1:j]
            self.i = j + 1
            self._skip_annotation()
            return text
        # Anything else up to the next separator at this nesting level.
        depth = 0
        j = self.i
        while j < len(self.s):
            c = self.s[j]
            if c in "<(":
                depth += 1
            elif c in ">)":
                depth -= 1
            elif depth <= 0 and c in ",}":
                break
            j += 1
        word = self.s[self.i:j].strip()
        self.i = j
        if word in ("true", "false"):
            return word == "true"
        return word if word else self.s[start:j].strip()

    def _skip_annotation(self) -> None:
        # 0xffffffffc0328e10 <nested_svm_vmexit>, 97 'a', 0x... "string"
        self.ws()
        if self.s.startswith("<", self.i) and not self.s.startswith("<repeats", self.i):
            end = self.s.find(">", self.i)
            if end > 0:
                self.i = end + 1
        elif self.s.startswith("'", self.i):
            end = self.s.find("'", self.i + 1)
            if end > 0:
                self.i = end + 1


def parse(text: str) -> Any:
    """Parse one printed gdb value; fall back to the text itself if it is not understood."""
    p = _Parser(text.strip())
    try:
        v = p.value()
        p.ws()
        if p.i != len(p.s):
            return text.strip()
        return v
    except (ValueError, IndexError):
        return text.strip()
