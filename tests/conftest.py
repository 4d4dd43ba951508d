"""Shared test setup: offline copies of the corpus and the tiktoken files, CPU only."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

# These machines have no internet: point tiktoken at the shared cache when it is there.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The tiny Shakespeare corpus (1,115,394 characters)."""
    path = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path.read_text(encoding="utf-8")
