"""User-facing errors: each prints as one line and exits non-zero."""

from __future__ import annotations


class XmodalError(Exception):
    """Bad input or environment. The message says what was wrong, with the value, and what to do."""


class ConfigError(XmodalError):
    pass


class ModelLoadError(XmodalError):
    pass


class SAEError(XmodalError):
    pass


class DatasetError(XmodalError):
    pass


class StoreError(XmodalError):
    pass


def user_error(err: BaseException) -> XmodalError | None:
    """The XmodalError behind `err`, also when Hydra's instantiate wrapped it (``raise ... from``).

    Only ``__cause__`` is followed: an error raised while handling a user error (its ``__context__``)
    is a bug in the handler, and must show as one, with its traceback.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, XmodalError):
            return seen
        seen = seen.__cause__
    return None
