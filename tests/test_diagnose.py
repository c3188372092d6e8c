"""softrepa.diagnose: per-bin loss-regime numbers equal a direct computation; tau* calibration; errors.

`batch_statistics` is a pure function of the error matrix and is checked against hand-written
formulas; `diagnose` / `calibrate_tau` are checked against a recomputation with the same seeds
through `draw_batches` + `prepare_batch` + `error_matrix`; `token_gradient_split`'s parts are
recomputed independently and must add up to the token gradient of `contrastive_backward`.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from softrepa import SoftTokens, SoftTokensConfig, attach
from softrepa.backbone import backbone_for
from softrepa.config import LossConfig
from softrepa.data import build_dataset
from softrepa.diagnose import (
    Diagnosis,
    batch_statistics,
    bin_centres,
    calibrate_tau,
    diagnose,
    draw_batches,
    log_mean,
    prepare_batch,
    token_gradient_split,
)
from softrepa.hooks import attached_handle
from softrepa.loss import duplicate_caption_mask, loss_grads, softrepa_loss
from softrepa.negatives import CaptionNegatives, NegativesConfig
from softrepa.pairs import PairBatch, contrastive_backward, error_matrix, negative_errors
from softrepa.tiny import tiny_sd3_pipeline, tiny_sd15_pipeline
from softrepa.tokens import SoftTokensError

CAPS = ["a red car", "a tree", "A red  car", "the sea", "a boat"]  # 0 and 2 are duplicates
MSL = 16  # T5 length of the tiny SD3 prompts: short keeps the forward passes cheap


# --------------------------------------------------------------------------- helpers
def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.05 + 0.3 * torch.rand(*shape, generator=g)).double()


def _hand_stats(E, captions, tau, scale, w, H=None, valid=None):
    """The batch_statistics numbers from loops over the entries ("exp" logits, i2t loss, mean reduction)."""
    B = E.shape[0]
    mask = duplicate_caption_mask(captions).tolist()
    neg = [(i, j) for i in range(B) for j in range(B) if i != j and not mask[i][j]]
    z = lambda e: scale * math.exp(-e / tau)  # noqa: E731
    e_pos = sum(E[i, i].item() for i in range(B)) / B
    e_neg = sum(E[i, j].item() for i, j in neg) / len(neg)
    retrieval = sum(all(E[i, i] < E[a, b] for a, b in neg if a == i) for i in range(B)) / B
    losses, sizes, mass_pos, mass_neg = [], [], 0.0, 0.0
    for i in range(B):
        # the softmax row of image i: (kind, error) for own, unmasked prompts, valid hard negatives
        row = [("own", E[i, i].item())] + [("neg", E[i, j].item()) for a, j in neg if a == i]
        if H is not None:
            row += [("neg", H[i, k].item()) for k in range(H.shape[1]) if valid[i, k]]
        logits = [z(e) for _, e in row]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        losses.append(lse - logits[0])
        sizes.append(len(row))
        for (kind, e), v in zip(row, logits):
            # d(i2t_i)/de = (p - [own]) * dz/de with dz/de = -z / tau; the mean over B images
            g = (math.exp(v - lse) - (kind == "own")) * (-v / tau) / B
            if kind == "own":
                mass_pos += abs(g + w / B)
            else:
                mass_neg += abs(g)
    return {
        "e_pos": e_pos, "e_neg": e_neg, "rel_gap": e_neg / e_pos - 1, "retrieval": retrieval,
        "logit_pos": sum(z(E[i, i].item()) for i in range(B)) / B,
        "logit_neg": sum(z(E[i, j].item()) for i, j in neg) / len(neg),
        "loss": sum(losses) / B,
        "ln_b": sum(math.log(n) for n in sizes) / B,  # chance: ln(candidates per row), averaged
        "dlde_neg_share": mass_neg / (mass_pos + mass_neg),
        "tau_star": (e_neg - e_pos) / math.log(e_neg / e_pos),
    }


# --------------------------------------------------------------------------- pure functions
def test_batch_statistics_equal_a_direct_computation():
    """Every number of a bin row, from loops over a random E with a duplicate caption pair."""
    E = _rand((5, 5), seed=0)
    kw = dict(tau=0.1, scale=4.0, form="exp", denoise_weight=0.5)
    got = batch_statistics(E, 500.0, CAPS, kw)
    ref = _hand_stats(E, CAPS, 0.1, 4.0, 0.5)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key
    assert 0 < got["dlde_neg_share"] < 1


def test_batch_statistics_with_hard_negatives():
    """Hard negatives add e_hard / hard_retrieval / tau_star_hard and their |dL/dH| mass to the share."""
    E, H = _rand((5, 5), seed=1), _rand((5, 2), seed=2)
    H[3, 0] = E[3, 3] - 0.01  # image 3 loses to one of its hard negatives
    valid = torch.tensor([[True, True], [True, False], [False, False], [True, True], [False, True]])
    kw = dict(tau=0.1, scale=4.0, form="exp", denoise_weight=0.0)
    got = batch_statistics(E, 500.0, CAPS, kw, H, valid)
    ref = _hand_stats(E, CAPS, 0.1, 4.0, 0.0, H, valid)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key
    e_hard = H[valid].mean().item()
    assert got["e_hard"] == pytest.approx(e_hard, rel=1e-12)
    assert got["tau_star_hard"] == pytest.approx(log_mean(ref["e_pos"], e_hard), rel=1e-12)
    own_wins = [all(H[i, k] > E[i, i] for k in range(2) if valid[i, k]) for i in range(5)]
    assert got["hard_retrieval"] == pytest.approx(sum(own_wins) / 5)
    assert not all(own_wins)


def test_batch_statistics_accepts_softrepa_loss_defaults():
    """loss_kwargs are softrepa_loss keywords: omitting tau means its default 0.07, as in the loss."""
    E = _rand((4, 4), seed=3)
    caps = ["a", "b", "c", "d"]
    assert batch_statistics(E, 500.0, caps, {}) == batch_statistics(E, 500.0, caps, {"tau": 0.07})


@pytest.mark.parametrize("a, b", [(0.2, 1.6), (0.05, 0.06), (1.0, 3.0), (0.3, 0.1)])
def test_log_mean_maximises_the_logit_gap(a, b):
    """tau = log_mean(a, b) maximises exp(-a/tau) - exp(-b/tau) (checked on a fine grid)."""
    tau = log_mean(a, b)
    lo, hi = min(a, b), max(a, b)
    assert lo < tau < hi
    assert tau == pytest.approx((b - a) / math.log(b / a), rel=1e-14)
    grid = np.linspace(0.01 * lo, 10 * hi, 200001)
    gap = np.abs(np.exp(-a / grid) - np.exp(-b / grid))
    best = grid[np.argmax(gap)]
    assert abs(best - tau) <= 2 * (grid[1] - grid[0])
    assert abs(math.exp(-a / tau) - math.exp(-b / tau)) >= gap.max() - 1e-15


def test_log_mean_edge_cases():
    assert log_mean(0.4, 0.4) == 0.4
    assert log_mean(0.2, 0.5) == pytest.approx(log_mean(0.5, 0.2), rel=1e-14)
    for a, b in [(0.0, 1.0), (1.0, -0.5)]:
        with pytest.raises(ValueError):
            log_mean(a, b)


def test_bin_centres():
    assert bin_centres(2) == [250.0, 750.0]
    assert bin_centres(4) == [125.0, 375.0, 625.0, 875.0]
    with pytest.raises(ValueError):
        bin_centres(0)


# --------------------------------------------------------------------------- on a tiny SD3
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "yellow": (230, 230, 20)}
CAPTIONS = ["a red square left of a blue circle", "a green square above a yellow circle",
            "a blue square left of a red circle", "a yellow circle"]


@pytest.fixture(scope="module")
def sd3():
    pipe = tiny_sd3_pipeline(num_layers=6)
    bb = backbone_for(pipe, max_sequence_length=MSL)
    bb.freeze()
    return pipe, bb


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An image folder of 4 PNGs with .txt captions (two colours and a relation: hard negatives exist)."""
    data = tmp_path_factory.mktemp("diag_data")
    for i, (cap, rgb) in enumerate(zip(CAPTIONS, COLOURS.values())):
        a = np.full((40, 40, 3), 255, np.uint8)
        a[6 + 2 * i:26 + 2 * i, 8:28] = rgb
        Image.fromarray(a).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(cap + "\n")
    return data


SEED = 3
LOSS = LossConfig(tau=0.5, scale=4.0, denoise_weight=0.5)
NEG = NegativesConfig(per_image=1)


@pytest.fixture(scope="module")
def diagnosis(sd3, data_dir):
    pipe, _ = sd3
    return diagnose(pipe, str(data_dir), bins=2, batches_per_bin=1, batch_size=3, loss=LOSS, negatives=NEG,
                    resolution=32, max_sequence_length=MSL, seed=SEED, progress=False)


def test_diagnose_rows_equal_a_recomputation_with_the_same_seeds(sd3, data_dir, diagnosis):
    """Each bin's e_pos / e_neg / e_hard / loss == error_matrix on draw_batches + prepare_batch, same seeds."""
    pipe, bb = sd3
    assert attached_handle(pipe) is None  # the gradient split's own tokens were removed
    ds = build_dataset(str(data_dir), 32, seed=SEED)
    maker = CaptionNegatives.from_config(NEG)
    kw = dict(tau=0.5, scale=4.0, form="exp", symmetric=False, denoise_weight=0.5)
    assert len(diagnosis.rows) == 2
    for k, (row, t) in enumerate(zip(diagnosis.rows, bin_centres(2))):
        assert (row["t_lo"], row["t_hi"], row["t"], row["batches"]) == (500.0 * k, 500.0 * (k + 1), t, 1)
        (batch,) = draw_batches(ds, 3, 1, (SEED, k))
        pb = prepare_batch(bb, batch, t, (SEED, k, 0), 32, maker, 1)
        with torch.no_grad():
            E = error_matrix(bb, pb)
            H, valid = negative_errors(bb, pb)
        assert pb.negatives is not None and bool(valid.any())
        keep = ~torch.eye(3, dtype=torch.bool) & ~duplicate_caption_mask(pb.captions)
        assert row["e_pos"] == pytest.approx(E.diagonal().mean().item(), rel=1e-6)
        assert row["e_neg"] == pytest.approx(E[keep].mean().item(), rel=1e-6)
        assert row["e_hard"] == pytest.approx(H[valid].mean().item(), rel=1e-6)
        loss = softrepa_loss(E, t, captions=pb.captions, negatives=H, negatives_valid=valid, **kw).i2t
        assert row["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert row["tau_star"] == pytest.approx(log_mean(row["e_pos"], row["e_neg"]), rel=1e-12)
        assert 0.0 <= row["grad_neg_share"] <= 1.0
        assert 0.0 <= row["dlde_neg_share"] <= 1.0
    assert diagnosis.tau_table == [r["tau_star"] for r in diagnosis.rows]
    assert diagnosis.setup["hard_negatives_per_image"] == 1 and diagnosis.setup["family"] == "sd3"


def test_diagnosis_save_writes_markdown_and_json(diagnosis, tmp_path, monkeypatch):
    """save(dir): diagnosis.md with one table row per bin, diagnosis.json with rows and tau_table."""
    monkeypatch.setattr(Diagnosis, "plot", lambda self, path: None)  # the figure is not under test
    out = diagnosis.save(tmp_path / "diag")
    md = (out / "diagnosis.md").read_text()
    assert md.startswith("# softrepa diagnose")
    table_lines = [x for x in md.splitlines() if x.startswith("| ")]
    assert len(table_lines) == 1 + 2  # header + one row per bin
    assert "tau*" in table_lines[0] and "E hard" in table_lines[0] and "token grad via negatives" in table_lines[0]
    data = json.loads((out / "diagnosis.json").read_text())
    assert data["tau_table"] == diagnosis.tau_table
    assert data["rows"] == diagnosis.rows
    assert data["setup"]["bins"] == 2


def test_calibrated_loss_without_table_is_measured_at_each_batch_tau_star(sd3, data_dir):
    """loss.tau_schedule calibrated (no table): the bin's loss is the i2t loss at its own tau*."""
    pipe, bb = sd3
    loss = LossConfig(tau_schedule="calibrated")
    diag = diagnose(pipe, str(data_dir), bins=1, batches_per_bin=1, batch_size=3, loss=loss, resolution=32,
                    max_sequence_length=MSL, seed=SEED, progress=False, grad_share=False)
    (row,) = diag.rows
    (batch,) = draw_batches(build_dataset(str(data_dir), 32, seed=SEED), 3, 1, (SEED, 0))
    pb = prepare_batch(bb, batch, 500.0, (SEED, 0, 0), 32)
    with torch.no_grad():
        E = error_matrix(bb, pb)
    expected = softrepa_loss(E, 500.0, tau=row["tau_star"], captions=pb.captions).i2t
    assert row["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert "grad_neg_share" not in row and "tau*" in diag.setup["loss"]


def test_calibrate_tau_fills_unmeasured_bins_from_the_nearest(sd3, data_dir):
    """calibrate_tau: batch b measures bin b % bins; a bin without a batch copies its nearest neighbour."""
    _, bb = sd3
    ds = build_dataset(str(data_dir), 32, seed=0)
    table = calibrate_tau(bb, ds, bins=3, batches=2, batch_size=3, resolution=32, seed=1)
    assert len(table) == 3 and all(v > 0 for v in table) and table[2] == table[1]
    centres = bin_centres(3)
    for b, batch in enumerate(draw_batches(ds, 3, 2, (1,))):
        pb = prepare_batch(bb, batch, centres[b], (1, b), 32)
        with torch.no_grad():
            E = error_matrix(bb, pb)
        keep = ~torch.eye(3, dtype=torch.bool) & ~duplicate_caption_mask(pb.captions)
        assert table[b] == pytest.approx(log_mean(E.diagonal().mean().item(), E[keep].mean().item()), rel=1e-6)


def _tokens(pipe):
    tokens = SoftTokens.for_model(pipe, SoftTokensConfig(num_layers=2), seed=0)
    with torch.no_grad():
        for p in tokens.parameters():
            p.mul_(10)
    return tokens


def _grad_batch(bb):
    g = torch.Generator().manual_seed(0)
    lat = bb.encode_images(torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, generator=g)
    noise = torch.randn((1,) + lat.shape[1:], generator=g)
    with torch.no_grad():
        cond = bb.encode_prompts(CAPTIONS[:3], resolution=32)
        negs = bb.encode_prompts(["a blue square left of a red circle", "a red square right of a blue circle",
                                  "a green square below a yellow circle"], resolution=32)
    pb = PairBatch(lat, cond, CAPTIONS[:3], torch.full((3,), 700.0), noise)
    pb.negatives, pb.negative_rows, pb.negative_slots = negs, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    pb.num_negatives = 2  # image 2 has none: padding
    return pb


def _norm(gs):
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs))


def test_token_gradient_split_parts_add_up_to_the_token_gradient(sd3):
    """pos part (diagonal terms) + neg part (off-diagonal + hard terms) == contrastive_backward's gradient,
    and their norms are the ones token_gradient_split reports (chunked or not)."""
    pipe, bb = sd3
    pb = _grad_batch(bb)
    tokens = _tokens(pipe)
    params = list(tokens.parameters())
    kw = dict(tau=0.01, form="neg", denoise_weight=0.5)
    with attach(pipe, tokens):
        splits = [token_gradient_split(bb, pb, kw, params, chunk) for chunk in (None, 4)]
        tokens.zero_grad(set_to_none=True)
        contrastive_backward(bb, pb, loss_kwargs=kw)
        full = [p.grad.clone() for p in params]
        with torch.no_grad():
            E0 = error_matrix(bb, pb)
            H0, valid = negative_errors(bb, pb)
        _, dE, dH = loss_grads(E0, pb.t, captions=list(pb.captions), negatives=H0, negatives_valid=valid, **kw)
        E, H = error_matrix(bb, pb), negative_errors(bb, pb)[0]
        eye = torch.eye(3, dtype=torch.bool)
        pos_obj = (dE.float() * E)[eye].sum()
        neg_obj = (dE.float() * E)[~eye].sum() + (dH.float() * H)[valid].sum()
        pos = torch.autograd.grad(pos_obj, params, retain_graph=True)
        neg = torch.autograd.grad(neg_obj, params)
    for gp, gn, gf in zip(pos, neg, full):
        torch.testing.assert_close(gp + gn, gf, rtol=1e-4, atol=1e-4 * gf.abs().max().item())
    assert _norm(pos) > 0 and _norm(neg) > 0
    for gp_norm, gn_norm in splits:
        assert gp_norm == pytest.approx(_norm(pos), rel=1e-4)
        assert gn_norm == pytest.approx(_norm(neg), rel=1e-4)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, option", [
    ({"bins": 0}, "--bins"),
    ({"batches_per_bin": 0}, "--batches-per-bin"),
    ({"batch_size": 1}, "--batch-size"),
    ({"batch_size": 10}, "batch_size"),  # the folder holds 4 items
])
def test_bad_options_name_the_option(sd3, data_dir, kwargs, option):
    pipe, _ = sd3
    args = dict(bins=1, batches_per_bin=1, batch_size=3, resolution=32, max_sequence_length=MSL, progress=False,
                grad_share=False) | kwargs
    with pytest.raises(ValueError, match=option):
        diagnose(pipe, str(data_dir), **args)
    assert attached_handle(pipe) is None


def test_tokens_of_another_layout_are_a_soft_tokens_error(sd3, data_dir, tmp_path):
    """SD1.5 tokens (a file or a module) onto the SD3 pipeline: SoftTokensError, nothing left attached."""
    from softrepa.artifact import save_soft_tokens

    pipe, _ = sd3
    sd15_tokens = SoftTokens.for_model(tiny_sd15_pipeline(), SoftTokensConfig(), seed=0)
    path = save_soft_tokens(sd15_tokens, tmp_path / "sd15.safetensors")
    for tokens in (path, str(path), sd15_tokens):
        with pytest.raises(SoftTokensError, match="family"):
            diagnose(pipe, str(data_dir), tokens, bins=1, batches_per_bin=1, batch_size=3, resolution=32,
                     max_sequence_length=MSL, progress=False)
        assert attached_handle(pipe) is None


def test_pipeline_already_carrying_tokens_is_refused(sd3, data_dir):
    pipe, _ = sd3
    with attach(pipe, _tokens(pipe)):
        with pytest.raises(ValueError, match="already carries soft tokens"):
            diagnose(pipe, str(data_dir), bins=1, batches_per_bin=1, batch_size=3, resolution=32,
                     max_sequence_length=MSL, progress=False)
    assert attached_handle(pipe) is None


def test_prepare_batch_is_deterministic_and_shares_one_noise_and_t(sd3, data_dir):
    _, bb = sd3
    ds = build_dataset(str(data_dir), 32, seed=0)
    (batch,) = draw_batches(ds, 3, 1, 7)
    (again,) = draw_batches(ds, 3, 1, 7)
    assert batch["captions"] == again["captions"] and torch.equal(batch["pixels"], again["pixels"])
    a = prepare_batch(bb, batch, 250.0, 11, 32, CaptionNegatives.from_config(NEG), 1)
    b = prepare_batch(bb, batch, 250.0, 11, 32, CaptionNegatives.from_config(NEG), 1)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.noise, b.noise)
    assert a.noise.shape[0] == 1 and torch.equal(a.t, torch.full((3,), 250.0))
    texts, rows, _ = CaptionNegatives.from_config(NEG).for_batch(a.captions, 1, random.Random(11))
    assert a.num_negatives == 1 and a.negative_rows.tolist() == rows and len(a.negatives) == len(texts)


def test_cli_bad_options_are_one_line_errors(tmp_path, capsys):
    """`softrepa diagnose` with 0 bins, a dataset smaller than a batch, or tokens of another family:
    exit code 2 and one line naming the option / the mismatch (no traceback)."""
    import numpy as np
    from PIL import Image

    from softrepa import SoftTokens, SoftTokensConfig, save_soft_tokens
    from softrepa.cli import main
    from softrepa.tiny import tiny_sd3_pipeline, tiny_sd15_pipeline

    model = tmp_path / "sd3"
    tiny_sd3_pipeline(num_layers=6).save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    for i, rgb in enumerate([(220, 40, 40), (40, 70, 215), (40, 170, 60)]):
        a = np.full((32, 32, 3), 255, np.uint8)
        a[8:24, 8:24] = rgb
        Image.fromarray(a).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square number {i}\n")
    sd15_tokens = tmp_path / "sd15.safetensors"
    save_soft_tokens(SoftTokens.for_model(tiny_sd15_pipeline(), SoftTokensConfig(init="normal")), sd15_tokens)
    base = ["diagnose", "--model", str(model), "--data", str(data), "--resolution", "32", "--no-progress",
            "--out", str(tmp_path / "out"), "--max-sequence-length", "8"]
    cases = [(["--bins", "0"], "--bins"), (["--batch-size", "8"], "batch_size"),
             (["--batch-size", "2", "--tokens", str(sd15_tokens)], "sd15.safetensors")]
    capsys.readouterr()
    for extra, needle in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("softrepa diagnose: error:")]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert main(base + ["--batch-size", "2", "--bins", "2", "--batches-per-bin", "1"]) == 0
    assert (tmp_path / "out" / "diagnosis.md").is_file()
