"""Shared test fixtures."""

import os
from pathlib import Path

import pytest


def _find_shared_data() -> Path:
    """$JAXLLM_SHARED_DATA, else `shared/data` in the nearest folder above the
    checkout that has one."""
    if os.environ.get("JAXLLM_SHARED_DATA"):
        return Path(os.environ["JAXLLM_SHARED_DATA"])
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED_DATA = _find_shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the checkout (GPT-2 vocabulary, corpora)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DATA}: the tokenizer and corpus "
                    f"tests read it from shared/data above the checkout, or from "
                    f"$JAXLLM_SHARED_DATA")
    return SHARED_DATA
