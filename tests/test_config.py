"""softrepa.config: the loss's tau schedule is selectable, validated, and wired into the loss."""

from __future__ import annotations

import pytest
import torch

from softrepa.config import ConfigError, LossConfig, load_config, parse_overrides
from softrepa.loss import linear_tau, softrepa_loss
from softrepa.train import loss_kwargs


def _loss_cfg(*overrides: str) -> LossConfig:
    return load_config(None, parse_overrides(list(overrides))).loss


def test_default_tau_is_the_plain_float():
    # the authors' path must stay bit-identical: a float tau, not a callable that returns 0.07
    kw = loss_kwargs(LossConfig())
    assert kw["tau"] == 0.07 and type(kw["tau"]) is float
    assert kw == dict(tau=0.07, scale=4.0, form="exp", symmetric=False, denoise_weight=0.0)


@pytest.mark.parametrize("overrides, field", [
    (["--loss.tau_schedule", "cosine"], "loss.tau_schedule"),
    (["--loss.tau_schedule", "linear", "--loss.tau_max", "0.2"], "loss.tau_min"),
    (["--loss.tau_schedule", "linear", "--loss.tau_min", "0.05"], "loss.tau_max"),
    (["--loss.tau_schedule", "linear", "--loss.tau_min", "0", "--loss.tau_max", "0.2"], "loss.tau_min"),
    (["--loss.tau_schedule", "linear", "--loss.tau_min", "0.05", "--loss.tau_max", "-1"], "loss.tau_max"),
    (["--loss.tau_min", "0.05"], "loss.tau_min"),  # set but unused by the constant schedule
    (["--loss.tau_schedule", "linear", "--loss.tau_min", "x", "--loss.tau_max", "0.2"], "loss.tau_min"),
])
def test_tau_schedule_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _loss_cfg(*overrides)


def test_linear_schedule_gives_linear_tau_and_its_loss():
    cfg = _loss_cfg("--loss.tau_schedule", "linear", "--loss.tau_min", "0.05", "--loss.tau_max", "0.5")
    kw = loss_kwargs(cfg)
    assert isinstance(kw["tau"], linear_tau)
    g = torch.Generator().manual_seed(0)
    E = (0.05 + 0.3 * torch.rand(3, 3, generator=g)).double()
    t = torch.tensor([0.0, 500.0, 1000.0], dtype=torch.float64)
    taus = torch.tensor([0.05, 0.275, 0.5], dtype=torch.float64)  # tau_min + (tau_max - tau_min) t / 1000
    logits = 4.0 * torch.exp(-E / taus[:, None])
    expected = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
    got = softrepa_loss(E, t, **kw).loss
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # and the schedule matters: the constant tau gives another value on the same errors
    assert not torch.isclose(softrepa_loss(E, t, **loss_kwargs(LossConfig())).loss, expected)
