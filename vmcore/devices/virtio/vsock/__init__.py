"""virtio-vsock: the guest's stream sockets, bridged to one host Unix socket per VM."""
