"""The peer suites a KVM developer already runs, run at any level of a lab: kvm-unit-tests from
the developer's build (kut.py), the kernel's KVM selftests built by the lab (selftests.py)."""
