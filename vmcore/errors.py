"""Exceptions shared by the engine interface and its backends."""


class EngineError(Exception):
    """A VM operation failed; the message is meant for the user."""


class GuestError(EngineError):
    """The guest agent answered wrongly, not at all, or its channel closed."""
