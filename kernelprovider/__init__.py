"""The Jupyter side of forkvm: provisioner, host daemon, ZMQ bridge and CLI."""
