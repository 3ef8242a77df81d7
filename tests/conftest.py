"""Without a GPU, Triton kernels run in the interpreter; it must be chosen before triton is imported."""
import os

import pytest

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


# Optional packages and the extra that installs them: a test that needs one which is not installed is
# skipped with that reason (never when the package is installed: then its errors fail the test).
OPTIONAL_PACKAGES = {"triton": "triton", "diffusers": "wan", "transformers": "wan", "tokenizers": "wan",
                     "flash_attn": "flash-attn",
                     "xformers": "xformers", "nvtx": "nvtx"}


def _missing_optional(exc: BaseException) -> str | None:
    import importlib.util

    from streamt1_engine.errors import StreamT1Error

    cause = exc
    while cause is not None and not isinstance(cause, ModuleNotFoundError):
        cause = cause.__cause__ or cause.__context__  # e.g. a backend's one-line error raised from the import
    if cause is not None:
        names = [(cause.name or "").split(".")[0]]
    elif isinstance(exc, StreamT1Error):  # a loader's one-line "pip install streamt1-engine[extra]" message
        names = [n for n, extra in OPTIONAL_PACKAGES.items() if f'streamt1-engine[{extra}]' in str(exc)]
    else:
        return None
    for name in names:
        if name in OPTIONAL_PACKAGES and importlib.util.find_spec(name) is None:
            return f'needs the optional package {name}: pip install -e ".[{OPTIONAL_PACKAGES[name]}]"'
    return None


def _skip_when_optional_missing():
    try:
        return (yield)
    except Exception as exc:
        reason = _missing_optional(exc)
        if reason is None:
            raise
        pytest.skip(reason)


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_when_optional_missing()))
pytest_runtest_call = pytest.hookimpl(wrapper=True)(lambda item: (yield from _skip_when_optional_missing()))
