"""A thin typed layer over /dev/kvm: structures, one function per ioctl, guest memory, vCPU and VM
state, and the snapshot format. No policy lives here."""
