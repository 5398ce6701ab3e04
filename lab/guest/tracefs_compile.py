# Runs inside gdb on the host (gdb -batch -x THIS): compiles probe captures into kprobe-event
# fetch arguments, with offsets from the kernel's and the modules' DWARF. Reads the request
# from $LAB_TRACEFS_REQUEST (JSON), prints one line "LAB-TRACEFS <json>".
#
# An expression is ARG, &ARG, or ARG followed by ->FIELD / .FIELD (and [N] on arrays):
# what kprobe fetch arguments can express (+OFFSET(BASE) dereferences; 6.1 has no struct
# syntax, so offsets come from here). guest_mmu(EXPR) expands into the fields the built-in
# capture needs.
import json
import os
import re

import gdb

ARG_REGS = ["%di", "%si", "%dx", "%cx", "%r8", "%r9"]
TOKEN = re.compile(r"\s*(->|\.|\[\s*\d+\s*\]|&|[A-Za-z_]\w*)")


class Fail(Exception):
    pass


def function(name):
    sym = gdb.lookup_global_symbol(name) or gdb.lookup_static_symbol(name)
    if sym is None or sym.type.code != gdb.TYPE_CODE_FUNC:
        raise Fail(f"no function {name} in the debug symbols")
    block = gdb.block_for_pc(int(sym.value().address))
    while block is not None and block.function is None:
        block = block.superblock
    args = [s for s in block if s.is_argument] if block else []
    objfile = sym.symtab.objfile.filename if sym.symtab else ""
    base = os.path.basename(objfile)
    module = None if base.startswith("vmlinux") else base[:-3].replace("-", "_")
    return module, [(a.name, a.type) for a in args]


def compile_expr(expr, args):
    """-> (kind, base, offset, type): kind 'reg' (value in a register, maybe +offset as an
    address) or 'mem' (value in memory at +offset(base))."""
    toks = TOKEN.findall(expr)
    if "".join(t.replace(" ", "") for t in toks) != expr.replace(" ", ""):
        raise Fail(f"cannot trace {expr!r}: only ARG->field.field chains")
    addr_of = toks and toks[0] == "&"
    if addr_of:
        toks = toks[1:]
    if not toks or toks[0] not in dict(args):
        raise Fail(f"{expr!r} does not start with an argument of the function")
    names = [a for a, _ in args]
    idx = names.index(toks[0])
    if idx >= len(ARG_REGS):
        raise Fail(f"argument {toks[0]} is not passed in a register")
    kind, base, off, typ = "reg", ARG_REGS[idx], 0, dict(args)[toks[0]]
    i = 1
    while i < len(toks):
        t = toks[i].replace(" ", "")
        if t == "->":
            field = toks[i + 1]
            target = typ.strip_typedefs()
            if target.code != gdb.TYPE_CODE_PTR:
                raise Fail(f"{expr!r}: -> on a non-pointer")
            if kind == "mem":
                base, off = f"+{off:#x}({base})", 0  # fetch the pointer first
            st = target.target().strip_typedefs()
            o, typ = field_offset(st, field)
            kind, off = "mem", off + o
            i += 2
        elif t == ".":
            o, typ = field_offset(typ.strip_typedefs(), toks[i + 1])
            if kind != "mem":
                raise Fail(f"{expr!r}: . on a value in a register")
            off += o
            i += 2
        elif t.startswith("["):
            n = int(t[1:-1])
            st = typ.strip_typedefs()
            if st.code != gdb.TYPE_CODE_ARRAY or kind != "mem":
                raise Fail(f"{expr!r}: [] on a non-array")
            typ = st.target()
            off += n * typ.sizeof
            i += 1
        else:
            raise Fail(f"{expr!r}: unexpected {t!r}")
    if addr_of:
        if kind != "mem":
            raise Fail(f"{expr!r}: & of a register")
        return "addr", base, off, typ
    return kind, base, off, typ


def field_offset(struct_type, name):
    for f in struct_type.fields():
        if f.name == name:
            return f.bitpos // 8, f.type
        if f.name is None and f.type.strip_typedefs().code in (gdb.TYPE_CODE_STRUCT,
                                                                gdb.TYPE_CODE_UNION):
            try:
                o, t = field_offset(f.type.strip_typedefs(), name)
                return f.bitpos // 8 + o, t
            except Fail:
                pass
    raise Fail(f"{struct_type} has no field {name}")


def fetch(kind, base, off, typ):
    size = typ.strip_typedefs().sizeof
    if kind == "reg":
        return f"{base}:x64"
    if size not in (1, 2, 4, 8):
        raise Fail(f"a {typ} ({size} bytes) is not a scalar kprobes can fetch")
    return f"+{off:#x}({base}):x{size * 8}"


def vcpu_address(expr, args):
    """guest_mmu's argument: a vcpu pointer, as (base fetch, constant offset)."""
    kind, base, off, _ = compile_expr(expr, args)
    if kind == "reg":
        return base, 0
    if kind == "addr":
        if base in ARG_REGS:
            return base, off
        raise Fail(f"{expr!r}: address too deep for kprobes")
    return f"+{off:#x}({base})", 0  # a pointer stored in memory


def guest_mmu_fields(expr, args):
    base, extra = vcpu_address(expr, args)
    vcpu = gdb.lookup_type("struct kvm_vcpu")
    mmu_t = gdb.lookup_type("struct kvm_mmu")
    arch, _ = field_offset(vcpu, "arch")
    arch_t = vcpu["arch"].type.strip_typedefs()
    gm, _ = field_offset(arch_t, "guest_mmu")
    mmu_ptr, _ = field_offset(arch_t, "mmu")
    names = [f.name for f in mmu_t.fields()]
    fields = {}
    g = extra + arch + gm
    if "root" in names:
        root, _ = field_offset(mmu_t, "root")
        info = gdb.lookup_type("struct kvm_mmu_root_info")
        pgd_name = "pgd" if "pgd" in [f.name for f in info.fields()] else "cr3"
        fields["cur_hpa"] = g + root + field_offset(info, "hpa")[0]
        fields["cur_pgd"] = g + root + field_offset(info, pgd_name)[0]
    else:
        info = gdb.lookup_type("struct kvm_mmu_root_info")
        pgd_name = "pgd" if "pgd" in [f.name for f in info.fields()] else "cr3"
        fields["cur_hpa"] = g + field_offset(mmu_t, "root_hpa")[0]
        fields["cur_pgd"] = g + field_offset(mmu_t, "root_pgd" if "root_pgd" in names
                                             else "root_cr3")[0]
    prev, prev_t = field_offset(mmu_t, "prev_roots")
    n = prev_t.strip_typedefs().sizeof // info.sizeof
    for k in range(n):
        e = g + prev + k * info.sizeof
        fields[f"p{k}_pgd"] = e + field_offset(info, pgd_name)[0]
        fields[f"p{k}_hpa"] = e + field_offset(info, "hpa")[0]
    fetches = {k: f"+{v:#x}({base}):x64" for k, v in fields.items()}
    fetches["mmu"] = f"+{extra + arch + mmu_ptr:#x}({base}):x64"
    fetches["vcpu"] = f"{base}:x64"  # the vcpu pointer itself (register or fetched)
    return fetches, {"guest_mmu_offset": arch + gm, "extra": extra, "prev": n}


def main():
    req = json.loads(os.environ["LAB_TRACEFS_REQUEST"])
    out = []
    for p in req["probes"]:
        res = {"name": p["name"], "error": None, "captures": {}}
        try:
            module, args = function(p["at"])
            res["module"], res["args"] = module, [a for a, _ in args]
            for cname, expr in p["captures"].items():
                m = re.match(r"^\s*guest_mmu\((.+)\)\s*$", expr)
                if m:
                    fetches, meta = guest_mmu_fields(m.group(1).strip(), args)
                    res["captures"][cname] = {"kind": "guest_mmu", "fetch": fetches, **meta}
                else:
                    res["captures"][cname] = {"kind": "value",
                                              "fetch": {"v": fetch(*compile_expr(expr, args))}}
        except (Fail, gdb.error) as e:
            res["error"] = str(e)
        out.append(res)
    print("LAB-TRACEFS " + json.dumps(out))


main()
