import os
import sys
from pathlib import Path

import pytest

# The tests run on the CPU in fp32 on every machine: CUDA is hidden before torch starts (child
# processes inherit it), and the shared arguments pin --device cpu --bf16 off.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import ALL_PHASES, TINY, read_json, run_main  # noqa: E402


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """One tiny two-arm run whose phase arm visits every phase: (output dir, results, stdout)."""
    out = tmp_path_factory.mktemp("default")
    code, stdout, stderr = run_main([*TINY, *ALL_PHASES, "--output-dir", out])
    assert code == 0, stderr
    return out, read_json(out / "results_seed_42.json"), stdout
