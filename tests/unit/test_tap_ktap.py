"""TAP and KTAP as the suites a KVM developer runs print them: the lab's own programs,
kselftest's runner (KVM selftests), KTAP with nested subtests, and kvm-unit-tests'
`run_tests.sh -t`."""

from __future__ import annotations

from lab import tap

SELFTESTS = """\
TAP version 13
1..3
# timeout set to 120
# selftests: kvm: svm_vmcall_test
# Random seed: 0x6b8b4567
ok 1 selftests: kvm: svm_vmcall_test
# selftests: kvm: vmx_tsc_adjust_test
# 1..0 # SKIP - Requires VMX
ok 2 selftests: kvm: vmx_tsc_adjust_test # SKIP
# selftests: kvm: svm_nested_soft_inject_test
not ok 3 selftests: kvm: svm_nested_soft_inject_test # exit=254
"""

KTAP = """\
KTAP version 1
1..2
    KTAP version 1
    # Subtest: kvm_mmu
    1..3
    ok 1 root_reuse
    not ok 2 prev_roots_flushed
    ok 3 pae_roots # SKIP no PAE here
not ok 1 kvm_mmu
ok 2 kvm_x86
"""

KUT = """\
TAP version 13
ok 1 - vmx: test vmxon with unaligned vmxon region
ok 2 - vmx: test vmxon with bits set beyond physical address width
not ok 3 - vmx: test vmptrld with vmcs12 at 0
ok 4 - svm #SKIP svm not supported
"""


def _cases(text: str) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.message) for c in tap.parse(text).cases}


def test_selftests_names_stay_whole_and_skips_keep_their_directive() -> None:
    r = tap.parse(SELFTESTS)
    assert _cases(SELFTESTS) == {
        "selftests: kvm: svm_vmcall_test": ("passed", ""),
        "selftests: kvm: vmx_tsc_adjust_test": ("skipped", "skipped"),
        "selftests: kvm: svm_nested_soft_inject_test": ("failed", "exit=254")}
    assert not r.ok and "1 of 3 cases failed" in r.problems()


def test_ktap_subtests_are_child_cases_and_their_plan_is_theirs() -> None:
    r = tap.parse(KTAP)
    assert [(c.name, c.status) for c in r.cases] == [
        ("kvm_mmu", "failed"), ("kvm_mmu/root_reuse", "passed"),
        ("kvm_mmu/prev_roots_flushed", "failed"), ("kvm_mmu/pae_roots", "skipped"),
        ("kvm_x86", "passed")]
    assert r.planned == 2 and r.top_level == 2  # the subtests' 1..3 is not the parent's plan
    assert "planned" not in r.problems()
    # a parent that says ok over a failed subtest is not believed
    lying = KTAP.replace("not ok 1 kvm_mmu", "ok 1 kvm_mmu")
    r = tap.parse(lying)
    assert not r.ok and "subtests of case 1: 1 of 3 cases failed" in r.problems()


def test_kvm_unit_tests_lines_keep_unique_names() -> None:
    c = _cases(KUT)
    assert len(c) == 4 and c["vmx: test vmptrld with vmcs12 at 0"] == ("failed", "")
    assert c["svm"] == ("skipped", "svm not supported")  # `#SKIP` without a space


def test_a_skipped_plan_is_one_skipped_case_with_its_reason() -> None:
    r = tap.parse("1..0 # SKIP no VMX on this host\n")
    assert [(c.name, c.status, c.message) for c in r.cases] == [
        ("(all)", "skipped", "no VMX on this host")]
    assert r.ok and r.skip_all == "no VMX on this host"


def test_the_labs_own_programs_and_todo_and_bail_out() -> None:
    text = ("1..3\nok 1 - vmx/unmap: 50 checks in 0.05 s\n"
            "not ok 2 - vmx/cached-root-single: 1 of 102 checks stale or wrong # TODO known\n"
            "ok 3 - vmx/remap-twice # skip L0 offers no INVEPT single-context\n")
    assert _cases(text) == {
        "vmx/unmap": ("passed", "50 checks in 0.05 s"),
        "vmx/cached-root-single": ("skipped", "TODO: known"),
        "vmx/remap-twice": ("skipped", "L0 offers no INVEPT single-context")}
    r = tap.parse("1..2\nok 1 - a\nBail out! /dev/kvm: ENOENT\n")
    assert not r.ok and r.problems() == "bailed out: /dev/kvm: ENOENT; planned 2 cases, got 1"


def test_tap_output_from_junit_reads_back_the_same() -> None:
    """`lab run --tap` writes from junit.xml; the lab's own reader agrees on every case."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(
        '<testsuites><testsuite name="a" failures="1" errors="0">'
        '<testcase classname="a.l0" name="ok # one"/>'
        '<testcase classname="a.l0" name="bad"><failure message="exit 1&#10;more"/></testcase>'
        '<testcase classname="a.l0" name="skip"><skipped message="no svm"/></testcase>'
        '</testsuite><testsuite name="b" failures="0" errors="0">'
        '<testcase classname="b.boot" name="boot l0"/></testsuite></testsuites>')
    text = tap.from_junit(root)
    assert text.startswith("TAP version 13\n1..2\n    1..3\n")
    assert "    ok 1 a.l0: ok \\# one\n" in text  # a # in a name starts no directive
    assert '      failure: "exit 1\\nmore"\n' in text
    assert "    ok 3 a.l0: skip # SKIP no svm\n" in text
    assert text.endswith("not ok 1 a\n    1..1\n    ok 1 b.boot: boot l0\nok 2 b\n")
    r = tap.parse(text)
    assert [c.status for c in r.cases] == ["failed", "passed", "failed", "skipped", "passed",
                                           "passed"]
    single = tap.from_junit(root.find("testsuite"))
    assert single.startswith("TAP version 13\n1..3\nok 1 ") and not tap.parse(single).ok
