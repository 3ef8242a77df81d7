"""The engine's one user-facing error type, defined beside the kernels so they import nothing of the engine
(``streamt1_engine.errors`` re-exports it)."""


class StreamT1Error(Exception):
    """A problem with the user's input, weights or environment, described in one line."""
