"""softrepa.checkpoint: `latest` names a complete checkpoint at every moment, even re-saving a step."""

from __future__ import annotations

import os

import pytest
import torch

from softrepa import checkpoint as ck
from softrepa.config import TrainConfig
from softrepa.tokens import SoftTokens, TokenLayout


class Crash(BaseException):
    """Stands for the process dying (BaseException: no `except Exception` cleanup runs)."""


def _state(seed: int):
    torch.manual_seed(seed)
    tokens = SoftTokens(TokenLayout("sd15", token_dim=8, model_dim=8, num_tokens=2, time_buckets=4,
                                    blocks=("down",)))
    opt = torch.optim.AdamW(tokens.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10)
    return tokens, opt, sched


def _save(run, step, seed, keep=3):
    tokens, opt, sched = _state(seed)
    return ck.save_checkpoint(run, step, tokens, opt, sched, TrainConfig(), keep=keep), tokens


def _assert_latest_complete(run, step):
    root = run / "checkpoints"
    named = root / (root / "latest").read_text().strip()
    assert (named / "state.pt").is_file() and (named / "tokens.safetensors").is_file(), sorted(os.listdir(root))
    found = ck.latest_checkpoint(run)
    assert found == named
    assert torch.load(found / "state.pt", weights_only=True)["step"] == step


@pytest.mark.parametrize("when", ["before", "after"])
def test_resaving_a_step_never_leaves_latest_dangling(tmp_path, monkeypatch, when):
    """Die before / after each rename of a re-save of step 4: `latest` still names a complete step-4 folder."""
    real_replace = os.replace
    old_base, new_base = _state(0)[0].base, _state(1)[0].base
    crashed_at = []
    for k in range(1, 20):
        run = tmp_path / f"{when}{k}"
        _save(run, 4, seed=0)
        calls = []

        def replace(src, dst, _k=k):
            calls.append(1)
            if len(calls) == _k and when == "before":
                raise Crash
            real_replace(src, dst)
            if len(calls) == _k and when == "after":
                raise Crash

        monkeypatch.setattr(os, "replace", replace)
        try:
            _save(run, 4, seed=1)
        except Crash:
            crashed_at.append(k)
        else:
            break
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        _assert_latest_complete(run, 4)
        base = ck.load_soft_tokens(ck.latest_checkpoint(run) / "tokens.safetensors").base
        assert torch.equal(base, old_base) or torch.equal(base, new_base)
        # the next save recovers: latest -> the new folder, no hidden leftovers
        _save(run, 4, seed=1)
        _assert_latest_complete(run, 4)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".step_")]
    assert len(crashed_at) >= 4  # every rename of the re-save (and of `latest`) was a crash point
    _assert_latest_complete(run, 4)
    assert torch.equal(ck.load_soft_tokens(run / "checkpoints" / "step_0000004" / "tokens.safetensors").base,
                       new_base)


def test_prune_keeps_the_checkpoint_just_written(tmp_path):
    """Resumed from an older step, the re-saved checkpoint sorts below newer ones; it must survive pruning."""
    for step in (2, 4, 6):
        _save(tmp_path, step, seed=step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_0000004", "step_0000006"]
    _save(tmp_path, 3, seed=3, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_0000003", "step_0000006"]
    _assert_latest_complete(tmp_path, 3)
