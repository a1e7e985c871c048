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
    """The XmodalError behind `err`, also when Hydra's instantiate wrapped it."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, XmodalError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
