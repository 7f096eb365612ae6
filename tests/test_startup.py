"""Startup: `lightning-drop --help` loads no heavy library; the lazy package keeps its public behaviour.

Timings live in benchmarks/cli_startup.py; these tests check what is imported, not how long it takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "lightning", "torchmetrics", "datasets")


def _python(code: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_help_and_argument_errors_import_no_heavy_library():
    out = _python(f"""
import contextlib, io, json, sys
from lightning_drop.cli import main
codes = []
for argv in (["--help"], ["drop", "--help"], ["drop", "--model", "x"], ["speed", "--help"], ["export", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            codes.append(e.code)
print(json.dumps({{"codes": codes, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
""")
    result = json.loads(out)
    assert result["codes"] == [0, 0, 2, 0, 0]
    assert result["loaded"] == []


def test_drop_parser_defaults_match_the_library():
    """The parser's choices and defaults come from the light options module; the library uses the same ones."""
    from lightning_drop.cli import build_parser
    from lightning_drop.io.text_data import CalibrationConfig
    from lightning_drop.core.options import METRICS
    from lightning_drop.core.options import CalibrationConfig as LightCalibrationConfig
    from lightning_drop.core.options import SCHEDULES, TARGETS

    assert CalibrationConfig is LightCalibrationConfig
    args = build_parser().parse_args(["drop", "--model", "m", "--num", "1", "--output", "o"])
    d = CalibrationConfig()
    assert (args.calibration, args.num_samples, args.seq_len, args.seed) == (d.source, d.num_samples, d.seq_len,
                                                                            d.seed)
    assert args.metric in METRICS and args.target in TARGETS and args.schedule in SCHEDULES


def test_public_names_are_lazy_and_unchanged():
    out = _python("""
import json, sys
import lightning_drop as ld
light = "transformers" not in sys.modules and "torch" not in sys.modules
from lightning_drop import apply_drop, load_model
from lightning_drop.core.architectures import ArchSpec
from lightning_drop.io.dropped_checkpoint import load_dropped, save_dropped
from lightning_drop.core.modeling_dropped import apply_drop as real_apply_drop
from lightning_drop.io.model_loading import load_model as real_load_model
same = (apply_drop is real_apply_drop and load_model is real_load_model and ld.ArchSpec is ArchSpec
        and ld.save_dropped is save_dropped and ld.load_dropped is load_dropped)
names = all(hasattr(ld, n) for n in ld.__all__) and set(ld.__all__) <= set(dir(ld))
sub = ld.vision.__name__ == "lightning_drop.vision" and ld.io.model_loading.load_model is load_model
try:
    ld.no_such_name
    missing = False
except AttributeError:
    missing = True
print(json.dumps([light, same, names, sub, missing]))
""")
    assert json.loads(out) == [True, True, True, True, True]


@pytest.fixture(scope="module")
def dropped_dir(tmp_path_factory):
    from lightning_drop.io.dropped_checkpoint import save_dropped
    from lightning_drop.core.modeling_dropped import apply_drop
    from lightning_drop.io.tiny_models import tiny_model

    model, tok = tiny_model("llama")
    apply_drop(model, attn=[1], mlp=[2])
    out = tmp_path_factory.mktemp("startup") / "dropped"
    save_dropped(model, out, tokenizer=tok)
    return out


@pytest.mark.parametrize("first", [
    "import lightning_drop",                                # package first, transformers later
    "import transformers; import lightning_drop",           # transformers already there
    "from lightning_drop.io.dropped_checkpoint import read_config",    # transformers first imported from inside the package
])
def test_auto_classes_registered_in_any_import_order(dropped_dir, first):
    """`AutoModelForCausalLM.from_pretrained(dropped_dir)` works after `import lightning_drop`, without
    trust_remote_code (stdin is closed: an unregistered class would fail, not prompt)."""
    out = _python(f"""
{first}
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
model = AutoModelForCausalLM.from_pretrained({str(dropped_dir)!r})
print(type(model).__name__, "dropped_vit" in CONFIG_MAPPING)
""")
    assert out == "DroppedLlamaForCausalLM True"
