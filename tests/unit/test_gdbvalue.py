"""gdb's printed values as JSON (values taken from real sessions on Debian 6.1)."""

from __future__ import annotations

import pytest

from lab.gdbvalue import parse

INVALID = 2**64 - 1


@pytest.mark.parametrize("text,value", [
    ("{pgd = 36864, hpa = 96612352}", {"pgd": 36864, "hpa": 96612352}),
    ("{{pgd = 18446744073709551615, hpa = 18446744073709551615}, {pgd = 0x9000, hpa = 1}}",
     [{"pgd": INVALID, "hpa": INVALID}, {"pgd": 0x9000, "hpa": 1}]),
    ("(struct kvm_mmu *) 0xff11000005649ef8", 0xFF11000005649EF8),
    ("0xffffffffc0328e10 <nested_svm_vmexit>", 0xFFFFFFFFC0328E10),
    ("{0 <repeats 3 times>}", [0, 0, 0]),
    ("97 'a'", 97),
    ("-3", -3),
    ("true", True),
    ('"text"', "text"),
    ("KVM_MMU_ROOT_CURRENT", "KVM_MMU_ROOT_CURRENT"),
    ("<optimized out>", "<optimized out>"),
    ("{a = {b = 1, c = 0x0}, d = false}", {"a": {"b": 1, "c": 0}, "d": False}),
    ("{word = 12, {level = 4}}", {"word": 12, "_items": [{"level": 4}]}),
    ("{1, 2, ...}", [1, 2, "..."]),
])
def test_parse(text: str, value: object) -> None:
    assert parse(text) == value


def test_unparseable_stays_text() -> None:
    assert parse("{a = ") == "{a ="
