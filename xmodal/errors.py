"""User-facing errors: each prints as one line and exits non-zero."""


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
