"""junit.xml, for CI servers: one function builds a run's testsuite from its report (a run's
file holds one; a suite's holds one per run, with its expectations), one writes the file."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _clip(text: str, limit: int = 20000) -> str:
    return text if len(text) <= limit else text[:limit // 2] + "\n...\n" + text[-limit // 2:]


# Characters XML 1.0 cannot carry at all (not even escaped): a step that prints ESC or NUL
# would otherwise make the whole junit.xml unreadable.
_XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """`text` with every character XML 1.0 forbids written as \\xNN (visible, not lost)."""
    return _XML_FORBIDDEN.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def xml_bytes(root: ET.Element) -> bytes:
    """A JUnit tree as a file's bytes, every text and attribute made XML-safe first: the one
    way both run and suite JUnit files are written."""
    for el in root.iter():
        if el.text:
            el.text = xml_safe(el.text)
        if el.tail:
            el.tail = xml_safe(el.tail)
        for k, v in el.attrib.items():
            el.set(k, xml_safe(v))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def testsuite(r: dict[str, Any]) -> ET.Element:
    """A run's testsuite: a testcase per level's boot (with its timeline), per TAP case and
    per step without cases; and the run's error if it ended before any of them."""
    suite = ET.Element("testsuite", name=r["name"])
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="profile", value=str(r.get("profile")))
    ET.SubElement(props, "property", name="run_dir", value=r["run_dir"])
    n_fail = n_err = 0
    total = 0.0
    # One testcase per level's boot, with its timeline, so a CI server shows where time went.
    for level, info in r["levels"].items():
        tl = info.get("timeline", {})
        took = tl["ssh_ready"] - tl.get("launch", 0.0) if "ssh_ready" in tl else 0.0
        case = ET.SubElement(suite, "testcase", classname=f"{r['name']}.boot",
                             name=f"boot {level}", time=f"{took:.3f}" if "ssh_ready" in tl else "0")
        cprops = ET.SubElement(case, "properties")
        for k, v in tl.items():
            ET.SubElement(cprops, "property", name=k, value=f"{v:.3f}")
        if "ssh_ready" not in tl:
            n_err += 1
            msg = (r.get("error") or {}).get("message", "did not boot")
            err = ET.SubElement(case, "error", message=str(msg)[:500])
            err.text = str((r.get("error") or {}).get("detail", ""))
    for s in r["steps"]:
        total += s["seconds"]
        for c in s["cases"]:
            # One testcase per TAP case, under the level it ran at.
            tc = ET.SubElement(suite, "testcase", name=c["name"], time="0",
                               classname=f"{r['name']}.{s['level']}.{s['name']}")
            if c["status"] == "failed":
                n_fail += 1
                ET.SubElement(tc, "failure", message=c["message"][:500] or "failed")
            elif c["status"] == "skipped":
                ET.SubElement(tc, "skipped", message=c["message"][:500])
        case_failed = any(c["status"] == "failed" for c in s["cases"])
        if s["cases"] and (s["status"] == "passed" or (s["status"] == "failed" and case_failed)):
            continue  # the per-case testcases above tell it all
        case = ET.SubElement(suite, "testcase", classname=f"{r['name']}.{s['level']}",
                             name=s["name"], time=f"{s['seconds']:.3f}")
        if s["status"] == "failed":
            n_fail += 1
            f = ET.SubElement(case, "failure",
                              message=s["message"] or f"exit status {s['exit_status']}, "
                                                   f"expected {s['expected']}")
            f.text = _clip(s["stderr"] or s["stdout"])
        elif s["status"] == "error":
            n_err += 1
            e = ET.SubElement(case, "error", message=s["message"][:500])
            e.text = _clip(s["stderr"] or s["stdout"])
        ET.SubElement(case, "system-out").text = _clip(s["stdout"])
        if s["stderr"]:
            ET.SubElement(case, "system-err").text = _clip(s["stderr"])
    # One testcase per probe check: a failed one is a failure of the kernel under test.
    for c in r.get("checks") or []:
        case = ET.SubElement(suite, "testcase", classname=f"{r['name']}.checks",
                             name=c["name"], time="0")
        if c["status"] == "failed":
            n_fail += 1
            ET.SubElement(case, "failure", message=c["message"][:500])
        else:
            ET.SubElement(case, "system-out").text = c["message"]
    # One testcase per kernel event: an unexpected one is an error wherever it happened.
    for ev in r.get("events") or []:
        d = ev.get("decoded") or {}
        case = ET.SubElement(suite, "testcase", classname=f"{r['name']}.{ev['level']}.events",
                             name=f"#{ev['seq']} {ev['kind']} "
                                  f"{d.get('file_line') or ev.get('file_line') or ''}".strip(),
                             time="0")
        if not ev.get("expected"):
            n_err += 1
            ET.SubElement(case, "error", message=ev["summary"][:500]).text = ev.get("excerpt", "")
        else:
            ET.SubElement(case, "system-out").text = \
                f"expected by {ev.get('expected_by')}: {ev['line']}"
    if r.get("error") is not None and not r["levels"] and not r["steps"]:
        case = ET.SubElement(suite, "testcase", classname=r["name"], name="lab")
        n_err += 1
        ET.SubElement(case, "error", message=str(r["error"].get("message", ""))[:500]).text = \
            str(r["error"].get("detail", ""))
    suite.set("tests", str(len(suite.findall("testcase"))))
    suite.set("failures", str(n_fail))
    suite.set("skipped", str(len(suite.findall("testcase/skipped"))))
    suite.set("errors", str(n_err))
    suite.set("time", f"{r['phases'].get('total', total):.3f}")
    return suite


def write(suites: list[ET.Element], path: Path, name: str | None = None) -> None:
    """The file: <testsuites> (named after a suite, for a suite) holding `suites`."""
    root = ET.Element("testsuites", {"name": name} if name else {})
    root.extend(suites)
    path.write_bytes(xml_bytes(root))
