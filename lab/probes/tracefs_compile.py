# Runs inside gdb on the host (gdb -batch -x THIS): compiles probe captures into kprobe-event
# fetch arguments, with offsets from the kernel's and the modules' DWARF. Reads the request
# from $LAB_TRACEFS_REQUEST (JSON), prints one line "LAB-TRACEFS <json>".
#
# An expression is VAR, &VAR, ((struct T *)VAR), followed by ->FIELD / .FIELD / [N]: what
# kprobe fetch arguments can express (+OFFSET(BASE) dereferences; 6.1 has no struct syntax, so
# offsets come from here). Captures arrive parsed (lab.probes.spec.parse_capture): {"kind":
# "expr" | "guest_mmu", "arg": ...}; guest_mmu(ARG) expands into the fields it needs.
#
# Where a probe fires decides where its variables are:
# - entry: the function's first instruction; its arguments are in the ABI's registers.
# - return: kprobes cannot see a return probe's entry arguments, so a return is compiled into
#   one kprobe per way out of the function, placed at the latest instruction before the
#   epilogue where DWARF still locates every variable the captures need (a register from the
#   location lists, or the stack frame by CFA from .debug_frame). Locals are allowed there.
# - entry of X called from F (the condition $_caller_is("F", 1)): one kprobe at each call of
#   X in F (found through F's relocations); X's arguments are in the ABI's registers there.
import json
import os
import re
import subprocess

import gdb

ARG_REGS = ["%di", "%si", "%dx", "%cx", "%r8", "%r9"]
TOKEN = re.compile(r"\s*(->|\.|\[\s*\d+\s*\]|&|[A-Za-z_]\w*)")
CAST = re.compile(r"^\s*\(\s*\(\s*struct\s+(\w+)\s*\*\s*\)\s*(\w+)\s*\)(.*)$")
CALLER = re.compile(r'^\s*\$_caller_is\(\s*"(\w+)"\s*,\s*1\s*\)\s*$')
DWARF_REG = {"rax": "%ax", "rbx": "%bx", "rcx": "%cx", "rdx": "%dx", "rsi": "%si",
             "rdi": "%di", "rbp": "%bp", "rsp": "%sp",
             **{f"r{n}": f"%r{n}" for n in range(8, 16)}}


class Fail(Exception):
    pass


# -- where a function is -------------------------------------------------------------------
class Function:
    def __init__(self, name, bases):
        sym = gdb.lookup_global_symbol(name) or gdb.lookup_static_symbol(name)
        if sym is None or sym.type.code != gdb.TYPE_CODE_FUNC:
            raise Fail(f"no function {name} in the debug symbols")
        self.name = name
        self.start = int(sym.value().address)
        block = gdb.block_for_pc(self.start)
        while block is not None and block.function is None:
            block = block.superblock
        self.end = int(block.end) if block else self.start
        self.args = [(s.name, s.type) for s in block if s.is_argument] if block else []
        self.objfile = sym.symtab.objfile.filename if sym.symtab else ""
        base = os.path.basename(self.objfile)
        self.module = None if base.startswith("vmlinux") else base[:-3].replace("-", "_")
        # Addresses in the object file's own tables (.debug_frame, relocations): a module's
        # .text sits at the base we gave add-symbol-file, vmlinux at its link address.
        self.text_base = bases.get(self.objfile, 0)

    def entry_env(self):
        env = {}
        for i, (name, typ) in enumerate(self.args):
            if i < len(ARG_REGS):
                env[name] = (typ, ("reg", ARG_REGS[i]))
        return env

    def instructions(self):
        arch = gdb.selected_inferior().architecture()
        return [(int(i["addr"]), i["length"], i["asm"])
                for i in arch.disassemble(self.start, self.end - 1)]


def object_table(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise Fail(f"{' '.join(cmd[:2])}: {p.stderr.strip()[-200:]}")
    return p.stdout


_CFA_CACHE: dict = {}


def cfa_rows(fn):
    """[(address, cfa register, cfa offset)] for the function, from .debug_frame."""
    key = fn.objfile
    if key not in _CFA_CACHE:
        _CFA_CACHE[key] = object_table(["readelf", "--debug-dump=frames-interp", fn.objfile])
    text = _CFA_CACHE[key]
    lo = fn.start - fn.text_base
    rows = []
    for m in re.finditer(r"pc=([0-9a-f]+)\.\.([0-9a-f]+)\n(.*?)(?:\n\n|\Z)", text, re.S):
        if int(m.group(1), 16) != lo:
            continue
        for line in m.group(3).splitlines()[1:]:
            r = re.match(r"^([0-9a-f]+)\s+(r\w+)\+(\d+)", line)
            if r:
                rows.append((int(r.group(1), 16) + fn.text_base, r.group(2), int(r.group(3))))
    return rows


def cfa_at(rows, pc):
    best = None
    for addr, reg, off in rows:
        if addr <= pc:
            best = (reg, off)
    return best


_RELOC_CACHE: dict = {}


def call_targets(fn):
    """{address of a call/jmp instruction: target symbol} for the function (a module's calls
    are relocations: gdb shows them all as calls of the next instruction)."""
    out = {}
    if fn.module is None:
        for addr, _, asm in fn.instructions():
            m = re.match(r"^(call|jmp)\s+0x[0-9a-f]+ <([\w.]+)(\+\d+)?>", asm)
            if m and not m.group(3):
                out[addr] = m.group(2)
        return out
    if fn.objfile not in _RELOC_CACHE:
        _RELOC_CACHE[fn.objfile] = object_table(["readelf", "-rW", fn.objfile])
    text = _RELOC_CACHE[fn.objfile]
    sect = re.search(r"Relocation section '\.rela\.text'.*?\n\n", text, re.S)
    relocs = {}
    for line in (sect.group(0) if sect else "").splitlines():
        r = re.match(r"^([0-9a-f]+)\s+\S+\s+R_X86_64_(?:PLT32|PC32)\s+\S+\s+([\w.]+)", line)
        if r:
            relocs[int(r.group(1), 16) + fn.text_base] = r.group(2)
    for addr, length, asm in fn.instructions():
        if asm.startswith(("call", "jmp")) and length == 5 and addr + 1 in relocs:
            out[addr] = relocs[addr + 1]
    return out


# -- where a variable is, at a given address -----------------------------------------------
def scope(fn):
    """{variable: [(lo, hi, location)]} from gdb's `info scope` of the function's outermost
    block; location is ("reg", R), ("fbreg", N) (memory at CFA+N), ("breg", R, N) (the value
    R+N) or None (gdb can say where, but not something kprobes can fetch)."""
    text = gdb.execute(f"info scope *{fn.start:#x}", to_string=True)
    out = {}
    for m in re.finditer(r"^Symbol (\w+) is (.*?)(?=^Symbol |\Z)", text, re.S | re.M):
        name, body = m.group(1), m.group(2)
        parts = []
        if body.startswith("multi-location"):
            for r in re.finditer(r"Range (0x[0-9a-f]+)-(0x[0-9a-f]+): (.*?)(?=\n\s*Range |\n,|\Z)",
                                 body, re.S):
                parts.append((int(r.group(1), 16), int(r.group(2), 16), _location(r.group(3))))
        else:
            parts.append((fn.start, fn.end, _location(body)))
        out[name] = parts
    return out


def _location(desc):
    m = re.match(r"a variable in \$(\w+)", desc)
    if m and m.group(1) in DWARF_REG:
        return ("reg", DWARF_REG[m.group(1)])
    ops = re.findall(r"\d+: (DW_OP_\w+)(?: (-?\d+))?(?: \[\$(\w+)\])?", desc)
    if len(ops) == 1 and ops[0][0] == "DW_OP_fbreg":
        return ("fbreg", int(ops[0][1]))
    if (len(ops) == 2 and ops[0][0].startswith("DW_OP_breg") and ops[1][0] == "DW_OP_stack_value"
            and ops[0][2] in DWARF_REG):
        return ("breg", DWARF_REG[ops[0][2]], int(ops[0][1]))
    return None


def env_at(fn, variables, pc, cfa):
    """The environment at pc: each variable that is locatable there."""
    env: dict = {}
    for name, parts in variables.items():
        sym = gdb.lookup_symbol(name, gdb.block_for_pc(pc))[0]
        if sym is None:
            continue
        for lo, hi, loc in parts:
            if not (lo <= pc < hi) or loc is None:
                continue
            if loc[0] == "fbreg":
                # Frame base is the CFA (gcc on x86-64); usable only while the frame is
                # still allocated (at or above %sp: below it an interrupt may write).
                if cfa is None or cfa[0] != "rsp" or cfa[1] + loc[1] < 0:
                    continue
                env[name] = (sym.type, ("mem", "%sp", cfa[1] + loc[1]))
            elif loc[0] == "reg":
                env[name] = (sym.type, ("reg", loc[1]))
            else:
                env[name] = (sym.type, ("addr", loc[1], loc[2]))
    return env


# -- expressions ----------------------------------------------------------------------------
def start_state(expr, env):
    m = CAST.match(expr)
    cast = None
    if m:
        cast, var, rest = m.group(1), m.group(2), m.group(3)
        expr = var + rest
    toks = TOKEN.findall(expr)
    if "".join(t.replace(" ", "") for t in toks) != expr.replace(" ", ""):
        raise Fail(f"cannot trace {expr!r}: only VAR->field.field chains")
    addr_of = bool(toks) and toks[0] == "&"
    if addr_of:
        toks = toks[1:]
    if not toks or toks[0] not in env:
        raise Fail(f"{expr!r}: {toks[0] if toks else '?'} is not an argument, or not "
                   "locatable here")
    typ, loc = env[toks[0]]
    if cast:
        typ = gdb.lookup_type(f"struct {cast}").pointer()
    if loc[0] == "reg":
        state = ["reg", loc[1], 0, typ]
    elif loc[0] == "mem":
        state = ["mem", loc[1], loc[2], typ]
    else:
        state = ["addr", loc[1], loc[2], typ]
    return state, toks[1:], addr_of


def compile_expr(expr, env):
    """-> (kind, base, offset, type): 'reg' (the value is the register), 'mem' (the value is
    in memory at +offset(base)) or 'addr' (the value is base+offset)."""
    (kind, base, off, typ), toks, addr_of = start_state(expr, env)
    i = 0
    while i < len(toks):
        t = toks[i].replace(" ", "")
        if t == "->":
            target = typ.strip_typedefs()
            if target.code != gdb.TYPE_CODE_PTR:
                raise Fail(f"{expr!r}: -> on a non-pointer")
            o, typ = field_offset(target.target().strip_typedefs(), toks[i + 1])
            if kind == "reg":
                kind, off = "mem", o
            elif kind == "mem":
                base, off = f"+{off:#x}({base})", o  # fetch the pointer first
            else:
                kind, off = "mem", off + o
            i += 2
        elif t == ".":
            if kind != "mem":
                raise Fail(f"{expr!r}: . on a value not in memory")
            o, typ = field_offset(typ.strip_typedefs(), toks[i + 1])
            off += o
            i += 2
        elif t.startswith("["):
            st = typ.strip_typedefs()
            if st.code != gdb.TYPE_CODE_ARRAY or kind != "mem":
                raise Fail(f"{expr!r}: [] on a non-array")
            typ = st.target()
            off += int(t[1:-1]) * typ.sizeof
            i += 1
        else:
            raise Fail(f"{expr!r}: unexpected {t!r}")
    if addr_of:
        if kind != "mem":
            raise Fail(f"{expr!r}: & of a value not in memory")
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
    if kind == "addr":
        raise Fail("a computed address is not something kprobes can fetch")
    if size not in (1, 2, 4, 8):
        raise Fail(f"a {typ} ({size} bytes) is not a scalar kprobes can fetch")
    return f"+{off:#x}({base}):x{size * 8}"


def vcpu_address(expr, env):
    """guest_mmu's argument: a vcpu pointer, as (base fetch, constant offset)."""
    kind, base, off, _ = compile_expr(expr, env)
    if kind == "reg":
        return base, 0
    if kind == "addr":
        if base.startswith("%"):
            return base, off
        raise Fail(f"{expr!r}: address too deep for kprobes")
    return f"+{off:#x}({base})", 0  # a pointer stored in memory


def guest_mmu_fields(expr, env):
    base, extra = vcpu_address(expr, env)
    vcpu = gdb.lookup_type("struct kvm_vcpu")
    mmu_t = gdb.lookup_type("struct kvm_mmu")
    arch, _ = field_offset(vcpu, "arch")
    arch_t = vcpu["arch"].type.strip_typedefs()
    gm, _ = field_offset(arch_t, "guest_mmu")
    mmu_ptr, _ = field_offset(arch_t, "mmu")
    names = [f.name for f in mmu_t.fields()]
    info = gdb.lookup_type("struct kvm_mmu_root_info")
    pgd_name = "pgd" if "pgd" in [f.name for f in info.fields()] else "cr3"
    fields = {}
    g = extra + arch + gm
    if "root" in names:
        root, _ = field_offset(mmu_t, "root")
        fields["cur_hpa"] = g + root + field_offset(info, "hpa")[0]
        fields["cur_pgd"] = g + root + field_offset(info, pgd_name)[0]
    else:
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
    fetches["vcpu"] = f"{base}:x64" if extra == 0 else fetches["mmu"]
    return fetches, {"guest_mmu_offset": arch + gm, "extra": extra, "prev": n}


def compile_captures(captures, env):
    out = {}
    for cname, cap in captures.items():
        if cap["kind"] == "guest_mmu":
            fetches, meta = guest_mmu_fields(cap["arg"], env)
            out[cname] = {"kind": "guest_mmu", "fetch": fetches, **meta}
        else:
            out[cname] = {"kind": "value",
                          "fetch": {"v": fetch(*compile_expr(cap["arg"], env))}}
    return out


def roots_of(captures):
    """The variables the captures start from."""
    names = set()
    for cap in captures.values():
        e = cap["arg"]
        c = CAST.match(e)
        if c:
            names.add(c.group(2))
            continue
        toks = TOKEN.findall(e)
        toks = toks[1:] if toks and toks[0] == "&" else toks
        if toks:
            names.add(toks[0].strip())
    return names


# -- sites ---------------------------------------------------------------------------------------
def return_sites(fn, captures):
    """[(offset, compiled captures)], one per way out of the function."""
    insns = fn.instructions()
    rows = cfa_rows(fn)
    if not rows:
        raise Fail(f"{fn.name}: no call frame information in {os.path.basename(fn.objfile)}")
    targets = set()
    for _addr, _, asm in insns:
        m = re.match(r"^j\w+\s+(0x[0-9a-f]+)", asm)
        if m:
            targets.add(int(m.group(1), 16))
    variables = scope(fn)
    need = roots_of(captures)
    sites = []
    for k, (addr, _length, asm) in enumerate(insns):
        cfa = cfa_at(rows, addr)
        # A way out: `ret`, or a jump (return thunk, tail call) with the frame gone.
        if not (asm.startswith("ret") or (asm.startswith("jmp") and cfa == ("rsp", 8))):
            continue
        if addr == fn.start:
            continue
        chosen = None
        j = k - 1
        while j >= 0:
            pc = insns[j][0]
            env = env_at(fn, variables, pc, cfa_at(rows, pc))
            if need <= set(env):
                chosen = (pc, env)
                break
            # Do not cross into another block: every path out must pass the probe.
            prev_asm = insns[j - 1][2] if j > 0 else ""
            if pc in targets or prev_asm.startswith(("jmp", "ret")):
                break
            j -= 1
        if chosen is None:
            raise Fail(f"{fn.name}+{addr - fn.start:#x}: no instruction before this way out "
                       f"where {', '.join(sorted(need))} can be located")
        sites.append((chosen[0] - fn.start, compile_captures(captures, chosen[1])))
    if not sites:
        raise Fail(f"{fn.name}: found no way out of the function")
    return sites


def caller_sites(callee, caller_name, bases, captures):
    """[(offset in the caller, compiled captures)], one per call of callee in the caller. The
    callee's arguments are in the ABI's registers at the call; the caller's variables that
    DWARF locates there can be captured too (what the caller decided, e.g. INVEPT's type)."""
    caller = Function(caller_name, bases)
    calls = [a for a, t in call_targets(caller).items() if t == callee.name]
    if not calls:
        raise Fail(f"{caller_name} does not call {callee.name} (inlined?)")
    variables = scope(caller)
    rows = cfa_rows(caller)
    sites = []
    for a in calls:
        env = env_at(caller, variables, a, cfa_at(rows, a))
        env.update(callee.entry_env())
        sites.append((a - caller.start, compile_captures(captures, env)))
    return caller, sites


COMPARE = re.compile(r"^(.+?)\s*(==|!=|<=|>=|<|(?<!-)>)\s*(.+)$")  # not the > of ->
NUMBER = re.compile(r"^-?(0x[0-9a-fA-F]+|\d+)$")


def split_condition(cond):
    """-> (caller or None, [terms], [connectors]) of a condition made of comparisons joined
    by && or || (no parentheses): what a kprobe event filter can say."""
    parts = re.split(r"\s*(&&|\|\|)\s*", cond.strip())
    terms, joins = parts[0::2], parts[1::2]
    caller = None
    for i, t in enumerate(terms):
        m = CALLER.match(t)
        if m:
            if caller or any(j != "&&" for j in joins):
                raise Fail("$_caller_is combines with other conditions by && only")
            caller = m.group(1)
            terms = terms[:i] + terms[i + 1:]
            joins = joins[:len(terms) - 1] if terms else []
            break
    return caller, terms, joins


def compile_filter(terms, joins, env):
    """-> ({field: fetch}, filter): each term VAR-chain OP NUMBER (either way round) becomes
    a fetched field `ifN` compared in the event's filter."""
    fetches, parts = {}, []
    flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "==": "==", "!=": "!="}
    for i, t in enumerate(terms):
        m = COMPARE.match(t)
        if not m:
            raise Fail(f"cannot trace the condition {t!r}: expected EXPR OP NUMBER")
        lhs, op, rhs = m.group(1).strip(), m.group(2), m.group(3).strip()
        if NUMBER.match(lhs) and not NUMBER.match(rhs):
            lhs, rhs, op = rhs, lhs, flip[op]
        if not NUMBER.match(rhs):
            raise Fail(f"cannot trace the condition {t!r}: a kprobe filter compares a field "
                       "with a number, not two fields")
        fetches[f"if{i}"] = fetch(*compile_expr(lhs, env))
        parts.append(f"if{i} {op} {rhs}")
    text = parts[0] if parts else ""
    for j, part in zip(joins, parts[1:], strict=True):
        text += f" {j} {part}"
    return fetches, text


def main():
    req = json.loads(os.environ["LAB_TRACEFS_REQUEST"])
    bases = {k: int(v) for k, v in req.get("bases", {}).items()}
    out = []
    for p in req["probes"]:
        res = {"name": p["name"], "error": None, "captures": {}, "sites": []}
        try:
            fn = Function(p["at"], bases)
            res["module"], res["args"] = fn.module, [a for a, _ in fn.args]
            when = p.get("when") or ["entry"]
            cond = p.get("condition")
            caller, terms, joins = split_condition(cond) if cond else (None, [], [])
            if caller:
                if when != ["entry"]:
                    raise Fail("a $_caller_is probe captures on entry only")
                site_fn, sites = caller_sites(fn, caller, bases, p["captures"])
                res["module"] = site_fn.module
                # The filter's variables are the callee's arguments, as at its entry.
                ifs, filt = compile_filter(terms, joins, fn.entry_env())
                res["sites"] = [{"func": site_fn.name, "offset": o, "when": "entry",
                                 "captures": c, "if_fetch": ifs, "filter": filt}
                                for o, c in sites]
            else:
                # The condition decides at entry; a way out pairs only with a kept entry.
                ifs, filt = compile_filter(terms, joins, fn.entry_env())
                if "entry" in when:
                    res["sites"].append({"func": fn.name, "offset": 0, "when": "entry",
                                         "captures": compile_captures(p["captures"],
                                                                      fn.entry_env()),
                                         "if_fetch": ifs, "filter": filt})
                elif filt:
                    raise Fail("a condition needs the entry: `when` must include entry")
                if "return" in when:
                    res["sites"] += [{"func": fn.name, "offset": o, "when": "return",
                                      "captures": c} for o, c in return_sites(fn, p["captures"])]
            res["captures"] = res["sites"][0]["captures"] if res["sites"] else {}
        except (Fail, gdb.error) as e:
            res["error"] = str(e)
        out.append(res)
    print("LAB-TRACEFS " + json.dumps(out))


main()
