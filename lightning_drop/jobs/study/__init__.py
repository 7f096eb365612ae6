"""`lightning-drop study` (see `sweep`); `lightning_drop.study` and `lightning_drop.report` are its old names."""

from .sweep import *  # noqa: F401,F403
from .sweep import _derive  # noqa: F401
from .sweep import study_main  # noqa: F401
