"""One exception type for every user-facing failure, so the CLI can print one line instead of a traceback."""


class StreamT1Error(Exception):
    """A problem with the user's input, weights or environment, described in one line."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise StreamT1Error(message)
