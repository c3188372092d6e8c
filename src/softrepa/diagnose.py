"""Loss-regime diagnosis: is SoftREPA's contrastive term switched on for this model and data?

The logit `scale * exp(-E / tau)` is only sensitive where the error E is comparable to tau. With
the authors' tau = 0.07 and a model whose errors are 0.2-1.6 (the bundled miniature; a real
model at a new resolution may be anywhere), every negative's logit is ~0, the loss sits near
ln B, and what trains the tokens is a re-weighted denoising pressure on the matching pair. This
module measures that per timestep bin, for any model a `Backbone` covers (no special paths):

    E diagonal / off-diagonal, their relative gap, in-batch retrieval accuracy,
    positive / negative logits, the loss against ln B,
    the share of the loss gradient that flows through the negatives (|dL/dE| mass and, with
    tokens to differentiate, the token-gradient norm split into positive and negative parts),
    tau* = the temperature that puts this bin's logits in their sensitive range (below).

tau* (the calibration): for a positive error a and a typical negative error b, the logit gap
`scale * (exp(-a/tau) - exp(-b/tau))` is largest at tau = (b - a) / ln(b / a), the logarithmic
mean of a and b (set its derivative in tau to zero). `calibrate_tau` returns that value per bin;
`loss.tau_schedule: calibrated` trains with it (`softrepa.loss.binned_tau`).

Example:
    >>> from softrepa.diagnose import diagnose
    >>> report = diagnose(pipe, "demo_out/data", bins=10, batches_per_bin=2)   # doctest: +SKIP
    >>> print(report.table()); report.save("diagnosis/")                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import ConfigError, DatasetError, SoftTokensError
from .loss import contrastive_logits, loss_grads, retrieval_accuracy, softrepa_loss
from .pairs import PairBatch, error_matrix, negative_errors, pair_errors
from .streams import Stream, generator, python_random


def log_mean(a: float, b: float) -> float:
    """(b - a) / ln(b / a), the temperature that maximises exp(-a/tau) - exp(-b/tau); a for a == b."""
    if not (a > 0 and b > 0):
        raise ValueError(f"log_mean needs positive errors, got {a}, {b}")
    return a if abs(b - a) <= 1e-12 * max(a, b) else (b - a) / math.log(b / a)


def bin_centres(bins: int, t_max: float = 1000.0) -> list[float]:
    """The timestep at the centre of each of `bins` equal bins of [0, t_max)."""
    if bins < 1:
        raise ConfigError(f"bins must be >= 1, got {bins}")
    return [(k + 0.5) * t_max / bins for k in range(bins)]


def _keys(name: int | tuple[int, ...], stream: Stream) -> tuple[int, ...]:
    """The stream keys of a batch named `name` (an int, or a tuple such as (seed, bin, batch)): the seed,
    the stream id at its fixed place, then the rest of the name — no arithmetic packing, and the stream
    id's fixed position keeps two streams apart whatever the names' lengths."""
    name = tuple(int(k) for k in name) if isinstance(name, tuple) else (int(name),)
    return (name[0], int(stream)) + name[1:]


def draw_batches(dataset: Any, batch_size: int, n: int, seed: int | tuple[int, ...]) -> Iterator[dict[str, Any]]:
    """n collated batches of distinct random items (seeded; independent of training's streams)."""
    from .data import collate_pairs

    if len(dataset) < batch_size:
        raise DatasetError(f"batch_size: the dataset holds {len(dataset)} items, fewer than one batch of {batch_size}")
    g = generator(*_keys(seed, Stream.DIAGNOSE_ORDER))
    for _ in range(n):
        idx = torch.randperm(len(dataset), generator=g)[:batch_size].tolist()
        yield collate_pairs([dataset[i] for i in idx])


def prepare_batch(backbone: Any, batch: dict[str, Any], t: float, seed: int | tuple[int, ...], resolution: int | None,
                  negatives: Any = None, per_image: int = 0) -> PairBatch:
    """Encode a collated batch at one fixed timestep `t` with one shared noise draw.

    `seed` names the batch; its noise, each image's posterior sample and its hard negatives come from
    streams keyed by it (`softrepa.streams`), so no two of them, and no two batches, share draws.
    """
    g = generator(*_keys(seed, Stream.DIAGNOSE_NOISE))
    with torch.no_grad():
        pixels = batch["pixels"].to(backbone.device)
        latents = backbone.encode_images(pixels, [generator(*_keys(seed, Stream.DIAGNOSE_POSTERIOR), k)
                                                  for k in range(pixels.shape[0])])
        cond = backbone.encode_prompts(batch["captions"], resolution=resolution)
    B = latents.shape[0]
    noise = torch.randn((1,) + tuple(latents.shape[1:]), generator=g).to(latents.device, latents.dtype)
    tt = torch.full((B,), float(t), device=latents.device)
    pb = PairBatch(latents, cond, list(batch["captions"]), tt, noise)
    if negatives is not None and per_image > 0:
        rng = python_random(*_keys(seed, Stream.DIAGNOSE_NEGATIVES))
        texts, rows, slots = negatives.for_batch(pb.captions, per_image, rng)
        if texts:
            with torch.no_grad():
                pb.negatives = backbone.encode_prompts(texts, resolution=resolution)
            pb.negative_rows, pb.negative_slots = torch.tensor(rows), torch.tensor(slots)
        pb.num_negatives = per_image
    return pb


def positive_negative_errors(E: torch.Tensor, captions: Sequence[str]) -> tuple[float, float]:
    """Mean error of the matching pairs (diagonal) and of the negatives (off-diagonal, duplicate
    captions excluded; NaN when the batch has no negative)."""
    from .loss import duplicate_caption_mask

    B = E.shape[0]
    keep = ~torch.eye(B, dtype=torch.bool, device=E.device) & ~duplicate_caption_mask(captions, device=E.device)
    return float(E.diagonal().mean()), (float(E[keep].mean()) if keep.any() else float("nan"))


@torch.no_grad()
def batch_statistics(E: torch.Tensor, t: float, captions: Sequence[str], loss_kwargs: dict[str, Any],
                     H: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> dict[str, float]:
    """The per-batch numbers of one bin row, from an error matrix (a pure function; tested exactly).

    Args:
        E: (B, B) errors; t: the batch's timestep; captions: its B captions.
        loss_kwargs: `softrepa_loss` keywords (tau, scale, form, ...).
        H, valid: optional (B, K) hard-negative errors and their mask.
    """
    from .loss import duplicate_caption_mask

    B = E.shape[0]
    mask = duplicate_caption_mask(captions, device=E.device)
    kw = dict(loss_kwargs)
    if H is not None:
        kw.update(negatives=H, negatives_valid=valid)
    out, dE, dH = loss_grads(E, t, captions=list(captions), **kw)
    logits = contrastive_logits(E, t, tau=kw.get("tau", 0.07), scale=kw.get("scale", 4.0), form=kw.get("form", "exp"))
    neg = ~torch.eye(B, dtype=torch.bool, device=E.device) & ~mask
    e_pos, e_neg = positive_negative_errors(E, captions)
    mass_pos = float(dE.diagonal().abs().sum())
    mass_neg = float(dE[neg].abs().sum()) + (float(dH[valid].abs().sum()) if dH is not None else 0.0)
    row = {
        "e_pos": e_pos, "e_neg": e_neg, "rel_gap": e_neg / e_pos - 1.0,
        "retrieval": float(retrieval_accuracy(E, mask)),
        "logit_pos": float(logits.diagonal().mean()), "logit_neg": float(logits[neg].mean()),
        "loss": float(out.i2t),
        # chance level: ln(number of candidate captions per row); ln B without hard negatives
        "ln_b": float(torch.isfinite(out.logits).sum(dim=1).double().log().mean()),
        "dlde_neg_share": mass_neg / (mass_pos + mass_neg) if mass_pos + mass_neg > 0 else float("nan"),
        "tau_star": log_mean(e_pos, e_neg) if e_neg > 0 else float("nan"),
    }
    if H is not None and bool(valid.any()):
        row["e_hard"] = float(H[valid].mean())
        row["hard_retrieval"] = float(out.hard_accuracy)
        row["tau_star_hard"] = log_mean(e_pos, row["e_hard"])
    return row


def token_gradient_split(backbone: Any, pb: PairBatch, loss_kwargs: dict[str, Any], params: Sequence[torch.Tensor],
                         chunk: int | None = None) -> tuple[float, float]:
    """Norms of the token gradient through the positive pairs and through the negatives.

    Exact: L depends on the tokens only through E (and H), so grad = sum_ij dL/dE_ij grad E_ij;
    the positive part is the diagonal's terms, the negative part every other term.
    """
    B = pb.latents.shape[0]
    with torch.no_grad():
        E = error_matrix(backbone, pb, chunk)
        H, valid = negative_errors(backbone, pb, chunk) if pb.num_negatives else (None, None)
    kw = dict(loss_kwargs)
    if H is not None:
        kw.update(negatives=H, negatives_valid=valid)
    _, dE, dH = loss_grads(E, pb.t, captions=list(pb.captions), **kw)
    eye = torch.eye(B, dtype=torch.bool, device=E.device)
    parts = {"pos": [torch.zeros_like(p) for p in params], "neg": [torch.zeros_like(p) for p in params]}
    rows, cols = torch.meshgrid(torch.arange(B), torch.arange(B), indexing="ij")
    rows, cols = rows.reshape(-1).to(E.device), cols.reshape(-1).to(E.device)
    step = chunk or B * B
    for k in range(0, B * B, step):
        r, c = rows[k:k + step], cols[k:k + step]
        g = dE[r, c]
        for name, sel in (("pos", eye[r, c]), ("neg", ~eye[r, c])):
            gs = torch.where(sel, g, torch.zeros_like(g))
            if not torch.any(gs != 0):
                continue
            e = pair_errors(backbone, pb, r, c)
            grads = torch.autograd.grad(e, params, grad_outputs=gs.float(), allow_unused=True)
            for acc, gr in zip(parts[name], grads):
                if gr is not None:
                    acc += gr
    if H is not None and pb.negatives is not None and len(pb.negatives):
        idx = torch.arange(len(pb.negatives), device=E.device)
        nr, ns = pb.negative_rows.to(E.device), pb.negative_slots.to(E.device)
        g = dH[nr, ns]
        if torch.any(g != 0):
            e = pair_errors(backbone, pb, nr, idx, cond=pb.negatives)
            grads = torch.autograd.grad(e, params, grad_outputs=g.float(), allow_unused=True)
            for acc, gr in zip(parts["neg"], grads):
                if gr is not None:
                    acc += gr

    def norm(gs: list[torch.Tensor]) -> float:
        return float(torch.sqrt(sum((x.double() ** 2).sum() for x in gs)))

    return norm(parts["pos"]), norm(parts["neg"])


@dataclass
class Diagnosis:
    """Per-bin rows of `diagnose` and how they were measured.

    Attributes:
        rows: one dict per timestep bin (t_lo, t_hi, t, batches and the `batch_statistics`
            keys averaged over the bin's batches, plus grad_neg_share when measured).
        setup: what was measured (model, data, tokens, batch size, loss settings).
    """

    rows: list[dict[str, Any]]
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def tau_table(self) -> list[float]:
        """tau* per bin: the `loss.tau_table` of a calibrated run."""
        return [r["tau_star"] for r in self.rows]

    def table(self) -> str:
        """Markdown table, one row per bin."""
        hard = any("e_hard" in r for r in self.rows)
        grad = any(r.get("grad_neg_share") is not None for r in self.rows)
        head = ["t", "E diag", "E off-diag", "rel. gap", "retrieval", "logit pos", "logit neg",
                f"loss (chance ln N = {self.rows[0]['ln_b']:.3f})", "|dL/dE| on negatives"]
        head += ["token grad via negatives"] if grad else []
        head += ["E hard", "hard retrieval"] if hard else []
        head += ["tau*"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [f"{r['t_lo']:.0f}-{r['t_hi']:.0f}", f"{r['e_pos']:.3f}", f"{r['e_neg']:.3f}", f"{r['rel_gap']:.2f}",
                     f"{r['retrieval']:.2f}", f"{r['logit_pos']:.3g}", f"{r['logit_neg']:.3g}", f"{r['loss']:.4f}",
                     f"{100 * r['dlde_neg_share']:.1f}%"]
            if grad:
                cells.append("-" if r.get("grad_neg_share") is None else f"{100 * r['grad_neg_share']:.1f}%")
            if hard:
                cells += [f"{r.get('e_hard', float('nan')):.3f}", f"{r.get('hard_retrieval', float('nan')):.2f}"]
            cells.append(f"{r['tau_star']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"setup": self.setup, "rows": self.rows, "tau_table": self.tau_table}

    def save(self, out: str | Path) -> Path:
        """Write diagnosis.md, diagnosis.json and (with matplotlib) diagnosis.png into `out`."""
        from .runfolder import atomic_write_bytes

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        setup = "\n".join(f"* {k}: {v}" for k, v in self.setup.items())
        atomic_write_bytes(out / "diagnosis.md", f"# softrepa diagnose\n\n{setup}\n\n{self.table()}\n".encode())
        atomic_write_bytes(out / "diagnosis.json", json.dumps(self.to_dict(), indent=2, default=str).encode())
        try:
            self.plot(out / "diagnosis.png")
        except ImportError:
            pass
        return out

    def plot(self, path: str | Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [r["t"] for r in self.rows]
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
        ax[0].plot(t, [r["e_pos"] for r in self.rows], "o-", label="E positive (diagonal)")
        ax[0].plot(t, [r["e_neg"] for r in self.rows], "o-", label="E negatives (off-diagonal)")
        if any("e_hard" in r for r in self.rows):
            ax[0].plot(t, [r.get("e_hard", float("nan")) for r in self.rows], "o-", label="E hard negatives")
        ax[0].plot(t, [r["tau_star"] for r in self.rows], "k--", label="tau*")
        ax[0].axhline(self.setup.get("tau_value", float("nan")), color="grey", lw=0.8, label="tau used")
        ax[0].set_xlabel("t"); ax[0].legend(fontsize=7); ax[0].set_title("errors")
        ax[1].plot(t, [r["loss"] for r in self.rows], "o-", label="loss")
        ax[1].axhline(self.rows[0]["ln_b"], color="grey", ls="--", label="chance: ln N")
        ax[1].set_xlabel("t"); ax[1].legend(fontsize=7); ax[1].set_title("loss vs chance")
        ax[2].plot(t, [r["dlde_neg_share"] for r in self.rows], "o-", label="|dL/dE| on negatives")
        if any(r.get("grad_neg_share") is not None for r in self.rows):
            ax[2].plot(t, [r.get("grad_neg_share") for r in self.rows], "o-", label="token grad via negatives")
        ax[2].plot(t, [r["retrieval"] for r in self.rows], "o-", label="in-batch retrieval")
        ax[2].set_ylim(0, 1.05); ax[2].set_xlabel("t"); ax[2].legend(fontsize=7); ax[2].set_title("shares")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def diagnose(pipe: Any, data: Any, tokens: Any = None, *, bins: int = 10, batches_per_bin: int = 2,
             batch_size: int = 16, loss: Any = None, negatives: Any = None, resolution: int | None = None,
             max_sequence_length: int | None = None, seed: int = 0, grad_share: bool = True, progress: bool = True,
             pair_chunk: int | None = None) -> Diagnosis:
    """Measure the loss regime per timestep bin (see the module docstring).

    Args:
        pipe: a loaded diffusers pipeline of any supported family.
        data: a dataset spec / path (`softrepa.data.build_dataset`) or a dataset object.
        tokens: None (the bare model), a tokens file, or a `SoftTokens`; attached while measuring.
        bins: timestep bins over 0..1000 (each measured at its centre).
        batches_per_bin: batches drawn per bin (seeded).
        batch_size: images (= captions) per batch.
        loss: a `LossConfig` (default: the authors' tau 0.07, scale 4); a calibrated schedule
            without a table is measured at its tau* (so the report shows the calibrated regime).
        negatives: optional `NegativesConfig` with per_image > 0: hard negatives too.
        resolution: image side (default: the pipeline's native size).
        grad_share: also split the token gradient (exact, one more backward per batch); without
            `tokens`, freshly initialised default tokens are attached for that part only.
        pair_chunk: pairs per forward pass (memory bound on large models).

    Returns:
        A `Diagnosis` (`.table()`, `.save(dir)`, `.tau_table`).
    """
    from tqdm.auto import tqdm

    from .backbone import backbone_for
    from .config import LossConfig
    from .data import build_dataset
    from .hooks import attach, attached_handle
    from .artifact import load_soft_tokens
    from .negatives import CaptionNegatives
    from .generate import native_resolution
    from .tokens import SoftTokensError
    from .config import loss_kwargs as make_loss_kwargs

    if bins < 1:
        raise ConfigError(f"--bins must be >= 1, got {bins}")
    if batches_per_bin < 1:
        raise ConfigError(f"--batches-per-bin must be >= 1, got {batches_per_bin}")
    if batch_size < 2:
        raise ConfigError(f"--batch-size must be >= 2 (negatives need a second caption), got {batch_size}")
    loss = loss or LossConfig()
    res = resolution or native_resolution(pipe)
    dataset = data if hasattr(data, "__getitem__") and not isinstance(data, (str, Path, dict)) else build_dataset(data, res, seed=seed)
    backbone = backbone_for(pipe, max_sequence_length=max_sequence_length)
    backbone.freeze()
    if attached_handle(pipe) is not None:
        raise SoftTokensError("the pipeline already carries soft tokens; pass them as `tokens` (or remove them) instead")
    source = None
    if isinstance(tokens, (str, Path)):
        source, tokens = tokens, load_soft_tokens(tokens, device=backbone.device)
    try:
        handle = attach(pipe, tokens) if tokens is not None else None
    except SoftTokensError as e:  # name the file, as load_into does
        raise SoftTokensError(f"{source}: {e}" if source else str(e)) from e
    cal_tau = loss.tau_schedule == "calibrated" and loss.tau_table is None
    neg_maker = CaptionNegatives.from_config(negatives) if negatives is not None and negatives.per_image else None
    per_image = negatives.per_image if neg_maker is not None else 0
    centres = bin_centres(bins)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=bins * batches_per_bin, desc="softrepa diagnose", disable=not progress, dynamic_ncols=True)
    prepared: list[list[PairBatch]] = []
    try:
        for k, t in enumerate(centres):
            stats, kbatches = [], []
            for b, batch in enumerate(draw_batches(dataset, batch_size, batches_per_bin, (seed, k))):
                pb = prepare_batch(backbone, batch, t, (seed, k, b), res, neg_maker, per_image)
                with torch.no_grad():
                    E = error_matrix(backbone, pb, pair_chunk)
                    H, valid = negative_errors(backbone, pb, pair_chunk) if per_image else (None, None)
                kw = _measure_kwargs(loss, make_loss_kwargs, E, pb.captions) if cal_tau else make_loss_kwargs(loss)
                stats.append(batch_statistics(E, t, pb.captions, kw, H, valid) | {"_kw": kw})
                kbatches.append(pb)
                bar.update(1)
            row = {"t_lo": k * 1000 / bins, "t_hi": (k + 1) * 1000 / bins, "t": t, "batches": len(stats)}
            for key in dict.fromkeys(k for st in stats for k in st):
                if key != "_kw":
                    vals = [s[key] for s in stats if key in s]
                    row[key] = sum(vals) / len(vals)
            row["_kws"] = [s["_kw"] for s in stats]
            rows.append(row)
            prepared.append(kbatches)
        if grad_share:
            rows = _add_grad_share(pipe, backbone, handle, tokens, rows, prepared, pair_chunk)
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    for r in rows:
        r.pop("_kws", None)
    setup = {"model": getattr(pipe, "name_or_path", None) or type(pipe).__name__,
             "family": backbone.family, "data": str(getattr(dataset, "source", data)), "items": len(dataset),
             "tokens": "none (bare model)" if tokens is None else getattr(tokens, "layout", tokens),
             "batch_size": batch_size, "bins": bins, "batches_per_bin": batches_per_bin, "resolution": res,
             "loss": f"{loss.describe_tau()}, scale {loss.scale}, form {loss.form}" + (
                 " (measured at each bin's tau*)" if cal_tau else ""),
             "tau_value": loss.tau if loss.tau_schedule == "constant" else float("nan"),
             "hard_negatives_per_image": per_image, "seed": seed}
    return Diagnosis(rows, setup)


def _measure_kwargs(loss: Any, make: Any, E: torch.Tensor, captions: Sequence[str]) -> dict[str, Any]:
    """A calibrated schedule without a table: measure this batch at its own tau* (constant)."""
    import dataclasses

    tau = log_mean(*positive_negative_errors(E, captions))
    return make(dataclasses.replace(loss, tau_schedule="constant", tau=tau, tau_table=None))


def _add_grad_share(pipe, backbone, handle, tokens, rows, prepared, pair_chunk):
    from .hooks import attach
    from .tokens import SoftTokens, SoftTokensConfig

    own = None
    if tokens is None:  # gradients need parameters: fresh default tokens, for this part only
        tokens = SoftTokens.for_model(pipe, SoftTokensConfig(), seed=0).to(backbone.device)
        own = attach(pipe, tokens)
    params = [p for p in tokens.parameters() if p.requires_grad]
    try:
        for row, batches in zip(rows, prepared):
            shares = []
            for pb, kw in zip(batches, row["_kws"]):
                gp, gn = token_gradient_split(backbone, pb, kw, params, pair_chunk)
                shares.append(gn / (gp + gn) if gp + gn > 0 else float("nan"))
            row["grad_neg_share"] = sum(shares) / len(shares)
    finally:
        if own is not None:
            own.remove()
    return rows


def calibrate_tau(backbone: Any, dataset: Any, *, bins: int, batches: int, batch_size: int,
                  resolution: int | None, seed: int) -> list[float]:
    """tau* per timestep bin from `batches` seeded batches spread over the bins (round robin).

    Runs the model as it is (with whatever tokens are attached, e.g. a run's initial tokens).
    A bin that receives no batch (batches < bins) takes the nearest measured bin's value.

    Returns:
        `bins` temperatures for `loss.tau_table`.
    """
    if batches < 1 or bins < 1:
        raise ConfigError(f"need bins >= 1 and calibration batches >= 1, got {bins}, {batches}")
    centres = bin_centres(bins)
    sums: dict[int, list[float]] = {}
    for b, batch in enumerate(draw_batches(dataset, batch_size, batches, (seed,))):
        k = b % bins
        pb = prepare_batch(backbone, batch, centres[k], (seed, b), resolution)
        with torch.no_grad():
            E = error_matrix(backbone, pb)
        e_pos, e_neg = positive_negative_errors(E, pb.captions)
        if not e_neg == e_neg:  # NaN: every caption of the batch is the same, no negative to measure
            continue
        acc = sums.setdefault(k, [0.0, 0.0, 0])
        acc[0] += e_pos
        acc[1] += e_neg
        acc[2] += 1
    if not sums:
        raise DatasetError("calibration: no batch had two different captions; the dataset's captions are all the same")
    measured = {k: log_mean(v[0] / v[2], v[1] / v[2]) for k, v in sums.items()}
    return [measured[min(measured, key=lambda m: (abs(m - k), m))] for k in range(bins)]


__all__ = ["Diagnosis", "batch_statistics", "bin_centres", "calibrate_tau", "diagnose", "log_mean",
           "token_gradient_split"]
