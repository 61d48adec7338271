import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# heads a person trained on this machine must not change what tests see
os.environ["VRAMCHAT_DATA_DIR"] = tempfile.mkdtemp(prefix="vramchat-test-data-")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smol():
    """The embedded default model as a Runtime (loaded once per test session)."""
    from app.runtime.engine import Runtime
    return Runtime.load(None)


@pytest.fixture
def fresh_smol(smol):
    smol.clear()
    smol.set_system(None)
    if smol.policy != "full":
        smol.set_policy("full")
    return smol


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored after): many-turn tests on a shared
    2-core machine are steadier and no slower that way."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
