"""Shared fixtures: seeds, a fixed terminal width, tiny models and the sample data path."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"

os.environ.setdefault("COLUMNS", "200")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the CI box is small and shared: no OpenMP oversubscription stalls)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture
def cli():
    """Invoke the Typer app in-process; returns a function(args) -> Result."""
    from typer.testing import CliRunner

    from featviz.cli import app

    runner = CliRunner()

    def invoke(*args: str, **kw):
        return runner.invoke(app, [str(a) for a in args], **kw)

    return invoke
