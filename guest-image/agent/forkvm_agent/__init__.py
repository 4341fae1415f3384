"""The forkvm guest agent: starts the warm IPython kernel and bridges it to the host."""
