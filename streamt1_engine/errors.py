"""One exception type for every user-facing failure, so the CLI can print one line instead of a traceback."""

from .kernels.errors import StreamT1Error  # defined there: the kernels import nothing of the engine


class EngineBusy(StreamT1Error):
    """The engine cannot take a request now (its queue is full, or it is closed): the request itself is fine,
    so a server answers it with "retry later" (503) rather than "bad request"."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise StreamT1Error(message)


def require_packages(what: str, *modules: str, extra: str = "wan") -> None:
    """Optional packages ``what`` needs, checked before use: one line naming the extra that installs them."""
    import importlib.util
    import sys

    missing = [m for m in modules if sys.modules.get(m, ...) is None or (m not in sys.modules
                                                                        and importlib.util.find_spec(m) is None)]
    if missing:
        raise StreamT1Error(f"{what} needs {' and '.join(missing)}, which {'are' if len(missing) > 1 else 'is'} not "
                            f'installed: pip install "streamt1-engine[{extra}]"')
