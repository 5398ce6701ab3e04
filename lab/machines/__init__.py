"""What runs each level: L0's emulator on the host (qemu.py, bochs.py, behind base.py's
protocol) and the levels inside their parents (nested.py)."""
