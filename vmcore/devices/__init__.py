"""Emulated devices. Each device that holds state has a persist module beside it; the registry
(`vmcore.devices.registry`) says how to rebuild a device of each kind in a fork."""
