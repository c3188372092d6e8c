"""Training objectives as modules (`softrepa.objectives`): the registry, the config key, and exact
chunked gradients for every objective — the built-ins (error-based) and a two-set objective that
reads predictions and no-gradient reference predictions (the shape of AGSM)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import softrepa
from softrepa import attach
from softrepa.cli import main
from softrepa.config import ConfigError, load_config, loss_kwargs, parse_overrides
from softrepa.objectives import (AGSM, Needs, Objective, PositiveOnly, SoftREPA, get_objective, objective_names,
                                 register_objective)
from softrepa.pairs import contrastive_backward, error_matrix, objective_backward
from tests.test_effect_options import _pair_batch, _pipe_and_backbone
from tests.conformance import pair_tokens as _tokens
from tests.test_train import _args, toy_files  # noqa: F401  (toy_files is a fixture)

SOFTREPA_KW = {"tau": 0.01, "form": "neg", "denoise_weight": 0.5}


def _set_swapper(handle, sets, ema):
    """The trainer's `use_set` for a test: the handle carries a set (or its reference copy)."""
    return lambda name, reference: handle.carrying((ema if reference else sets)[name])


def _grads(tokens):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in tokens.parameters()]


def _close(grads, ref, what):
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item(), msg=what)


# --------------------------------------------------------------------------- registry and config
def test_registry_names_the_built_ins_and_refuses_unknown_and_duplicate_names():
    assert objective_names()[:3] == ("softrepa", "positive_only", "agsm")
    assert get_objective("softrepa") is SoftREPA and get_objective("positive_only") is PositiveOnly
    assert get_objective("agsm") is AGSM
    with pytest.raises(ConfigError, match=r"objective must be one of \['softrepa', 'positive_only', 'agsm'.*got 'nope'"):
        get_objective("nope")

    class Other(SoftREPA):
        name = "softrepa"

    with pytest.raises(ValueError, match="already registered"):
        register_objective(Other)
    assert register_objective(SoftREPA) is SoftREPA  # the same class again: a no-op


def test_objective_is_a_config_key_and_an_override():
    assert load_config(None, {}).objective == "softrepa"
    assert load_config(None, parse_overrides(["--objective", "positive_only"])).objective == "positive_only"
    with pytest.raises(ConfigError, match=r"one of \['softrepa', 'positive_only'"):
        load_config(None, {"objective": "nope"})
    with pytest.raises(ConfigError, match="loss.contrastive_weight"):
        load_config(None, {"objective": "positive_only", "loss": {"contrastive_weight": 0.5}})


def test_a_run_saved_before_the_objective_key_resumes_as_softrepa(tmp_path):
    """check_resumable: a field the saved config.yaml lacks had its default (objective: softrepa)."""
    import yaml

    from softrepa.config import config_dict
    from softrepa.resume import check_resumable

    saved = config_dict(load_config(None, {"model": "m"}))
    del saved["objective"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    check_resumable(load_config(None, {"model": "m"}), path)
    with pytest.raises(ConfigError, match="objective: 'softrepa' -> 'positive_only'"):
        check_resumable(load_config(None, {"model": "m", "objective": "positive_only"}), path)


def test_positive_only_is_the_old_spelling_of_the_control():
    """objective positive_only == objective softrepa with contrastive_weight 0, denoise_weight 1 (same kwargs)."""
    legacy = SoftREPA(**loss_kwargs(load_config(None, {"loss": {"contrastive_weight": 0, "denoise_weight": 1}}).loss))
    new = get_objective("positive_only").from_config(None, loss_kwargs(load_config(None, {}).loss))
    assert new.loss_kwargs == legacy.loss_kwargs


def test_cli_refuses_an_unknown_objective_naming_the_known_ones(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path), "--data", str(tmp_path), "--objective", "nope",
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "objective must be one of ['softrepa', 'positive_only'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- exact chunked gradients
@pytest.fixture(scope="module")
def sd3():
    pipe, bb = _pipe_and_backbone("sd3")
    return pipe, bb, _pair_batch(bb)  # 3 images, 3 captions, 5 hard negatives (K = 2, one padding slot)


@pytest.mark.parametrize("name", ["softrepa", "positive_only"])
def test_chunked_equals_plain_for_every_builtin_objective(sd3, name):
    pipe, bb, pb = sd3
    objective = get_objective(name)(**SOFTREPA_KW)
    tokens = _tokens(pipe)
    results = {}
    with attach(pipe, tokens):
        for chunk in (None, 1, 4, 100):
            tokens.zero_grad(set_to_none=True)
            out = objective_backward(bb, pb, objective, pair_chunk=chunk)
            results[chunk] = (out, _grads(tokens))
    ref_out, ref = results[None]
    assert any(r.abs().sum() > 0 for r in ref)
    for chunk, (out, grads) in results.items():
        assert out.metrics() == pytest.approx(ref_out.metrics(), rel=1e-5), chunk
        _close(grads, ref, f"{name}, chunk {chunk}")


def test_the_softrepa_objective_is_contrastive_backward_bit_for_bit(sd3):
    pipe, bb, pb = sd3
    tokens = _tokens(pipe)
    with attach(pipe, tokens):
        for chunk in (None, 4):
            tokens.zero_grad(set_to_none=True)
            a = contrastive_backward(bb, pb, pair_chunk=chunk, loss_kwargs=SOFTREPA_KW)
            ga = _grads(tokens)
            tokens.zero_grad(set_to_none=True)
            b = objective_backward(bb, pb, SoftREPA(**SOFTREPA_KW), pair_chunk=chunk)
            assert torch.equal(a.loss, b.loss) and all(torch.equal(x, y) for x, y in zip(ga, _grads(tokens)))


def test_positive_only_gradient_is_that_of_the_mean_diagonal_error(sd3):
    pipe, bb, pb = sd3
    tokens = _tokens(pipe)
    with attach(pipe, tokens):
        tokens.zero_grad(set_to_none=True)
        error_matrix(bb, pb).diagonal().mean().backward()
        direct = _grads(tokens)
        tokens.zero_grad(set_to_none=True)
        objective_backward(bb, pb, PositiveOnly(tau=0.07), pair_chunk=2)
    _close(_grads(tokens), direct, "positive_only")


class TwoSets(Objective):
    """An AGSM-shaped test objective: a "positive" set for an image's own caption, a "negative" set for
    the others; the loss reads predictions, a no-gradient reference copy of each pair's set and E:
    own pairs regress onto target + 0.5 G, the others onto target - 0.5 G, G = reference - target."""

    name = "two_sets_test"
    token_sets = ("positive", "negative")
    needs = Needs(errors=True, predictions=True, reference=True)

    def pair_sets(self, own):
        return (~own).long()

    def loss(self, terms):
        B, P = terms.predictions.shape[:2]
        own = torch.zeros(B, P, dtype=torch.bool)
        own[torch.arange(B), terms.offset + torch.arange(B)] = True
        sign = torch.where(own, 0.5, -0.5)[..., None, None, None]
        target = terms.targets[:, None]
        goal = target + sign * (terms.reference - target)
        per_pair = (terms.predictions - goal).pow(2).mean(dim=(2, 3, 4))  # (B, P)
        value = per_pair.mean() + 0.1 * terms.errors.diagonal().mean() + 0.01 * terms.negatives.sum()
        return _Out(value)


class _Out:
    def __init__(self, loss):
        self.loss = loss

    def detach(self):
        return _Out(self.loss.detach())

    def metrics(self):
        return {"loss": float(self.loss)}


def test_chunked_equals_plain_for_a_two_set_objective_reading_predictions(sd3):
    pipe, bb, pb = sd3
    sets = {"positive": _tokens(pipe), "negative": _tokens(pipe)}
    with torch.no_grad():
        for p in sets["negative"].parameters():
            p.mul_(-0.5)
    ema = {k: copy.deepcopy(v) for k, v in sets.items()}
    for v in ema.values():
        with torch.no_grad():
            for p in v.parameters():
                p.add_(0.01)
    handle = attach(pipe, sets["positive"])

    use_set = _set_swapper(handle, sets, ema)

    results = {}
    try:
        for chunk in (None, 1, 4, 100):
            for v in sets.values():
                v.zero_grad(set_to_none=True)
            out = objective_backward(bb, pb, TwoSets(), pair_chunk=chunk, use_set=use_set)
            results[chunk] = (out.loss.item(), {k: _grads(v) for k, v in sets.items()})
        assert all(p.grad is None for v in ema.values() for p in v.parameters())  # references carry no grad
        with pytest.raises(ValueError, match="use_set"):
            objective_backward(bb, pb, TwoSets())
    finally:
        handle.remove()
    ref_loss, ref = results[None]
    assert all(any(g.abs().sum() > 0 for g in ref[k]) for k in sets)  # both sets train
    for chunk, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), chunk
        for k in sets:
            _close(grads[k], ref[k], f"set {k}, chunk {chunk}")


# --------------------------------------------------------------------------- through the trainer
def test_trainer_runs_the_configured_objective(toy_files, tmp_path):  # noqa: F811
    """--objective positive_only trains exactly what the old spelling (contrastive_weight 0) trained."""
    new, old = tmp_path / "new", tmp_path / "old"
    assert main(_args(toy_files, new, 2, "--objective", "positive_only")) == 0
    assert main(_args(toy_files, old, 2, "--loss.contrastive_weight", "0")) == 0
    a = softrepa.load_soft_tokens(new / "tokens.safetensors")
    b = softrepa.load_soft_tokens(old / "tokens.safetensors")
    assert torch.equal(a.base, b.base) and torch.equal(a.time, b.time)
    rows = [json.loads(x) for x in (new / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [json.loads(x)["loss"] for x in (old / "metrics.jsonl").read_text().splitlines()]
    assert {"i2t", "accuracy", "denoise"} <= set(rows[0])  # the control logs what SoftREPA logs


# --------------------------------------------------------------------------- AGSM
def test_agsm_is_a_config_key_with_the_official_constants():
    cfg = load_config(None, parse_overrides(["--objective", "agsm"]))
    assert cfg.objective == "agsm"
    assert (cfg.agsm.tau, cfg.agsm.gamma_pos, cfg.agsm.gamma_neg, cfg.agsm.ema_decay) == (0.1, 1.0, 0.1, 0.9999)
    objective = get_objective("agsm").from_config(
        load_config(None, parse_overrides(["--objective", "agsm", "--agsm.gamma_neg", "1.0"])), {})
    assert (objective.tau, objective.gamma_pos, objective.gamma_neg) == (0.1, 1.0, 1.0)
    assert get_objective("agsm").reference_decay(cfg) == 0.9999 and SoftREPA.reference_decay(cfg) is None
    assert objective.pair_sets(torch.tensor([True, False, False])).tolist() == [0, 1, 1]
    with pytest.raises(ConfigError, match="negatives.per_image"):
        load_config(None, {"objective": "agsm", "negatives": {"per_image": 2}})
    for key, bad in (("tau", 0), ("gamma_neg", -1), ("ema_decay", 1.0)):
        with pytest.raises(ConfigError, match=f"agsm.{key}"):
            load_config(None, {"objective": "agsm", "agsm": {key: bad}})


def _agsm_sets(pipe):
    """psi+ and psi- sharing one time parameter, and EMA copies a little away from them."""
    pos, neg = _tokens(pipe), _tokens(pipe)
    with torch.no_grad():
        neg.base.mul_(-0.5)
    neg.time = pos.time  # one shared parameter
    sets = {"positive": pos, "negative": neg}
    ema = copy.deepcopy(sets)  # keeps the sharing
    assert ema["positive"].time is ema["negative"].time
    with torch.no_grad():
        for v in ema.values():
            v.base.add_(0.3 * torch.randn_like(v.base))
    return sets, ema


@pytest.mark.parametrize("gamma_neg", [0.1, 0.0])
def test_agsm_chunked_equals_plain_and_trains_both_sets(sd3, gamma_neg):
    pipe, bb, _ = sd3
    pb = _pair_batch(bb, negatives=False)
    sets, ema = _agsm_sets(pipe)
    handle = attach(pipe, sets["positive"])

    use_set = _set_swapper(handle, sets, ema)

    objective = AGSM(tau=0.1, gamma_pos=1.0, gamma_neg=gamma_neg)
    params = {"positive.base": sets["positive"].base, "negative.base": sets["negative"].base,
              "time": sets["positive"].time}
    results = {}
    try:
        for chunk in (None, 1, 4, 100):
            for p in params.values():
                p.grad = None
            out = objective_backward(bb, pb, objective, pair_chunk=chunk, use_set=use_set)
            results[chunk] = (out.metrics(), {k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                              for k, p in params.items()})
        assert all(p.grad is None for v in ema.values() for p in v.parameters())
        # the plain loss is agsm_loss of the pairs' predictions, each under its set, reference under the EMA
        from softrepa.loss import agsm_loss
        from softrepa.pairs import pair_predictions

        with torch.no_grad():
            preds, refs = torch.empty(3, 3, *pb.latents.shape[1:]), torch.empty(3, 3, *pb.latents.shape[1:])
            for i in range(3):
                for j in range(3):
                    name = "positive" if i == j else "negative"
                    r, c = torch.tensor([i]), torch.tensor([j])
                    with use_set(name, False):
                        preds[i, j], target = (x[0] for x in pair_predictions(bb, pb, r, c, pb.cond))
                    with use_set(name, True):
                        refs[i, j] = pair_predictions(bb, pb, r, c, pb.cond)[0][0]
            x0 = pb.latents
            targets = bb.target(x0, pb.noise.expand_as(x0), pb.t)
            direct = agsm_loss(preds, refs, targets[:, None], torch.eye(3, dtype=torch.bool),
                               tau=0.1, gamma_pos=1.0, gamma_neg=gamma_neg)
    finally:
        handle.remove()
    ref_metrics, ref = results[None]
    assert ref_metrics["loss"] == pytest.approx(float(direct), rel=1e-5)
    assert ref_metrics["loss"] == pytest.approx(ref_metrics["positive"] + ref_metrics["negative"], rel=1e-6)
    assert ref["positive.base"].abs().sum() > 0 and ref["time"].abs().sum() > 0
    assert (ref["negative.base"].abs().sum() > 0) == (gamma_neg > 0)  # psi- trains only through its term
    for chunk, (metrics, grads) in results.items():
        assert metrics == pytest.approx(ref_metrics, rel=1e-5), chunk
        for k in params:
            _close([grads[k]], [ref[k]], f"agsm {k}, chunk {chunk}")
