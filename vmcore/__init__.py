"""Everything about VMs: the engine interface and its backends (own KVM VMM, QEMU)."""
