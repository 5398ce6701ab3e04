"""Probes: where L0 is watched (spec.py: what a probe is, backend-neutral) and how (gdb.py
through L0's gdbstub, tracefs.py through kprobe events inside L0; tracefs_compile.py is the
gdb script that compiles captures for tracing, run on the host). held.py lets a person reach
an L0 that a probe holds stopped."""
