"""`lightning-drop study`: the command's typed options, read without importing the study machinery.

`lightning_drop.study.study_main` does the work; it lives with the study code for now.
"""

from __future__ import annotations

from typing import Any


def study_main(config: str, output: str | None = None, budget: str | None = None,
               max_quality_loss: float | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Sweep targets x number dropped; report with plots (configs/study/*.yaml).

    Args:
        config: study YAML (see configs/study/)
        output: override the output directory of the config
        budget: automated selection: e.g. speedup=1.2, params=0.8, kv=0.5
        max_quality_loss: automated selection: largest allowed relative quality loss (e.g. 0.05)
        overwrite: write into a non-empty output directory that is not an earlier run of this study
    """
    from ..study import study_main as run_study

    return run_study(config=config, output=output, budget=budget, max_quality_loss=max_quality_loss,
                     overwrite=overwrite)
