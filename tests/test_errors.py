"""Which errors count as the user's: only those raised as, or explicitly from, an XmodalError."""

from __future__ import annotations

from xmodal.errors import ConfigError, DatasetError, user_error


def test_an_error_raised_from_a_user_error_is_the_user_error():
    try:
        try:
            raise ConfigError("layer=99 is out of range")
        except ConfigError as err:
            raise RuntimeError("Error in call to target") from err  # as Hydra's instantiate wraps it
    except RuntimeError as wrapped:
        assert isinstance(user_error(wrapped), ConfigError)


def test_a_crash_while_handling_a_user_error_is_not_a_user_error():
    try:
        try:
            raise DatasetError("no images")
        except DatasetError:
            {}["missing"]  # a bug in the handler: its __context__ is the DatasetError, its __cause__ is None
    except KeyError as crash:
        assert crash.__context__ is not None and user_error(crash) is None


def test_user_error_itself():
    err = ConfigError("bad")
    assert user_error(err) is err
