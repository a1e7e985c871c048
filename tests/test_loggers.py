from xmodal.reporting.loggers import scrub_secrets


def test_secrets_are_scrubbed_from_logged_configs():
    cfg = {"logger": {"api_key": "abc", "project": "x"}, "hub": [{"token": "t"}], "layer": 3}
    assert scrub_secrets(cfg) == {"logger": {"api_key": "<redacted>", "project": "x"}, "hub": [{"token": "<redacted>"}], "layer": 3}
