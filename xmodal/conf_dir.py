"""Where the Hydra config groups live: ``conf/`` at the repository root.

The entry point (``xmodal.run``) and every other Hydra app or compose call
(the DAS benchmark, named models) import it from here.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
