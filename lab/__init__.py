"""A nested-virtualization lab for KVM developers.

L0 (the kernel under test) runs under QEMU on the host; L1 (a guest hypervisor) runs under
L0's KVM; L2 runs under L1's KVM. The lab boots that chain from images it builds, watches every
console, reaches every level over SSH and reports what happened.
"""

__version__ = "0.1.0"
