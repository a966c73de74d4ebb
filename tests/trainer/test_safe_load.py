"""Checkpoint state is read back with torch.load(weights_only=True): a pickle planted in the
checkpoint prefix by whoever can write it does not run in the next attempt."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetune_trainer.errors import UserError
from kubetune_trainer.state import RNG_FILE, TrainState, restore_rng, safe_load


class _Evil:
    def __reduce__(self):  # what an attacker's pickle does on load
        return (os.system, (f"touch {os.environ['KUBETUNE_TEST_MARKER']}",))


def test_planted_pickle_is_not_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("KUBETUNE_TEST_MARKER", str(marker))
    torch.save([_Evil()], tmp_path / RNG_FILE)
    with pytest.raises(UserError, match="other than tensors"):
        safe_load(tmp_path / RNG_FILE)
    assert not marker.exists()


def test_real_state_still_loads(tmp_path: Path) -> None:
    """What the trainer saves (RNG states with numpy's, an AdamW and a LambdaLR state) loads back."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save([rng], tmp_path / RNG_FILE)
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    from transformers import get_scheduler

    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    opt.step()
    sched.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")
    opt.load_state_dict(safe_load(tmp_path / "optimizer.pt"))
    sched.load_state_dict(safe_load(tmp_path / "scheduler.pt"))
    np.random.seed(1)
    st = TrainState.__new__(TrainState)
    st.world_size = 1
    restore_rng(tmp_path, st, rank=0, world=1, cuda=False, seed=0)
    assert (np.random.get_state()[1] == rng["numpy"][1]).all()
