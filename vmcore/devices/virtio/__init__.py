"""virtio over MMIO: the transport, split virtqueues, and the devices behind them."""
