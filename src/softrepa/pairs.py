"""Error matrices and predictions over image x caption pairs, and exact objective gradients in bounded memory.

For B images and P prompts (P = B on one process; P = R*B when R ranks pool their prompts) the
loss needs E[i, j] = mean || pred(x_t(i), t_i | y_j) - target_i ||^2 for all B*P pairs. Holding
all their graphs at once is what makes the authors' trainer need two GPUs for B = 4. Here:

* `pair_chunk=None` and one process: one forward over every pair, then backward (the plain way).
* optional hard negatives: K captions per image made from its own caption (`softrepa.negatives`),
  evaluated against that image only -> H (B, K); they add B*K pairs and K columns to row i.
* otherwise, two passes: (1) every pair without a graph, in chunks -> E; gather E across ranks;
  dL/dE from the full matrix; (2) each chunk recomputed with a graph and back-propagated with
  `E_chunk.backward(dL/dE[chunk])`. L depends on the tokens only through E, so the accumulated
  gradient is the exact gradient (tested against the plain way); memory is one chunk's graph.
  Across ranks each rank back-propagates its own rows of dL/dE of the *global* loss, so summing
  the token gradients over ranks gives exactly the single-process gradient on the union batch.

What is evaluated and how it becomes a loss is the objective's (`softrepa.objectives`): its token
sets and which set each pair uses (`Objective.pair_sets`), what it reads (`Objective.needs`: errors,
predictions, predictions under a no-gradient copy) and its loss. `objective_backward` asks the
objective and never branches on its name; `contrastive_backward` is the SoftREPA objective's
shorthand. With predictions the two passes work the same way, with dL/d(prediction) beside dL/dE.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch

from .backbone import Backbone, TextCond
from .loss import LossOutput
from .objectives import Objective, ObjectiveOutput, PairTerms, SoftREPA


@dataclass
class PairBatch:
    """One contrastive step's inputs on this process.

    Args:
        latents: (B, C, h, w) this process's images, encoded.
        cond: prompts of ALL processes, (P,) samples; prompt `offset + i` belongs to image i.
        captions: the P caption strings (duplicates are masked as non-negatives).
        t: (B,) timesteps of this process's images.
        noise: (1 | B, C, h, w) noise; one draw shared by every image by default (authors).
        offset: global index of this process's first image.
        t_all: (P,) timesteps of all images (per-image timestep schedules of tau need them).
        negatives: N hard-negative prompts of this process's images (None: none).
        negative_rows: (N,) local image index of each negative prompt.
        negative_slots: (N,) its column in 0..num_negatives-1 of the image's row of H.
        num_negatives: K, the fixed number of negative slots per image (padding where an image
            has fewer); the same on every rank so that H rows can be gathered.
    """

    latents: torch.Tensor
    cond: TextCond
    captions: Sequence[str]
    t: torch.Tensor
    noise: torch.Tensor
    offset: int = 0
    t_all: torch.Tensor | None = None
    negatives: TextCond | None = None
    negative_rows: torch.Tensor | None = None
    negative_slots: torch.Tensor | None = None
    num_negatives: int = 0


def pair_predictions(backbone: Backbone, batch: PairBatch, rows: torch.Tensor, cols: torch.Tensor,
                     cond: TextCond | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and regression targets of the pairs (rows[k], cols[k]): (K, C, h, w) float32 each.

    Args:
        backbone: family interface (its denoiser may carry soft tokens).
        batch: the step's inputs.
        rows: (K,) local image indices; cols: (K,) indices into `cond`.
        cond: the prompts `cols` index (default: `batch.cond`, the global prompts).
    """
    cond = batch.cond if cond is None else cond
    x0 = batch.latents[rows]  # (K, C, h, w)
    noise = batch.noise[rows] if batch.noise.shape[0] > 1 else batch.noise.expand_as(x0)
    t = batch.t.to(x0.device)[rows]  # (K,)
    x_t = backbone.add_noise(x0, noise, t)
    target = backbone.target(x0, noise, t)  # (K, C, h, w) float32
    pred = backbone.denoise(x_t, t, cond.index(cols))
    return pred.float(), target


def pair_errors(backbone: Backbone, batch: PairBatch, rows: torch.Tensor, cols: torch.Tensor,
                cond: TextCond | None = None) -> torch.Tensor:
    """Errors of the pairs (rows[k], cols[k]): (K,) float32, mean || pred - target ||^2 per pair.

    Args: as for `pair_predictions`.
    """
    pred, target = pair_predictions(backbone, batch, rows, cols, cond)
    return _squared_error(pred, target)


def _squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).mean(dim=(1, 2, 3))  # (K,)


def _pair_chunks(n_rows: int, n_cols: int, chunk: int, device: torch.device):
    """Row-major (image, prompt) index chunks of at most `chunk` pairs."""
    flat = torch.arange(n_rows * n_cols, device=device)
    for start in range(0, flat.numel(), chunk):
        k = flat[start:start + chunk]
        yield k // n_cols, k % n_cols


def error_matrix(backbone: Backbone, batch: PairBatch, chunk: int | None = None) -> torch.Tensor:
    """E (B, P) over every pair, in chunks of `chunk` pairs (None: all at once).

    Runs under the caller's grad mode: wrap in `torch.no_grad()` for the first pass.
    """
    return _error_matrix(batch, chunk, lambda r, c: pair_errors(backbone, batch, r, c))


def _error_matrix(batch: PairBatch, chunk: int | None, errors_of: Callable) -> torch.Tensor:
    B, P = batch.latents.shape[0], len(batch.cond)
    chunk = chunk or B * P
    dev = batch.latents.device
    parts = [errors_of(r, c) for r, c in _pair_chunks(B, P, chunk, dev)]
    return torch.cat(parts).view(B, P)  # (B, P)


def negative_errors(backbone: Backbone, batch: PairBatch, chunk: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """H (B, K) errors of each image under its own hard-negative prompts, and the (B, K) valid mask.

    Padding slots (an image with fewer than K negatives) hold 0 and are False in the mask.
    Runs under the caller's grad mode.
    """
    return _negative_errors(batch, chunk, lambda r, c: pair_errors(backbone, batch, r, c, cond=batch.negatives))


def _negative_errors(batch: PairBatch, chunk: int | None, errors_of: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    B, K = batch.latents.shape[0], batch.num_negatives
    dev = batch.latents.device
    H = torch.zeros(B, K, device=dev, dtype=torch.float32)
    valid = torch.zeros(B, K, device=dev, dtype=torch.bool)
    if batch.negatives is None or len(batch.negatives) == 0:
        return H, valid
    rows, slots = batch.negative_rows.to(dev), batch.negative_slots.to(dev)  # (N,), (N,)
    n = len(batch.negatives)
    chunk = chunk or n
    parts = [errors_of(rows[k:k + chunk], torch.arange(k, min(k + chunk, n), device=dev)) for k in range(0, n, chunk)]
    errs = torch.cat(parts)  # (N,)
    valid[rows, slots] = True
    H = H.index_put((rows, slots), errs)  # out of place: keeps the graph to errs
    return H, valid


def _all_gather_rows(E_local: torch.Tensor) -> torch.Tensor:
    """(B, P) per rank -> (R*B, P), rank order; identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return E_local
    parts = [torch.empty_like(E_local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, E_local.contiguous())
    return torch.cat(parts)


#: `use_set(name, reference)`: a context in which the denoiser evaluates pairs with token set `name`
#: (reference=True: that set's no-gradient copy, e.g. its EMA); the trainer supplies it.
UseSet = Callable[[str, bool], AbstractContextManager]


def _single_set(name: str, reference: bool = False) -> AbstractContextManager:
    return nullcontext()  # one set, attached as it is; its "copy" is itself evaluated without grad


class _Pairs:
    """Evaluates lists of pairs for one objective: each pair under the token set the objective
    assigns it, returning what the objective's `needs` asks for. Runs under the caller's grad mode."""

    def __init__(self, backbone: Backbone, batch: PairBatch, objective: Objective, use_set: UseSet | None):
        if use_set is None:
            if len(objective.token_sets) > 1:
                raise ValueError(f"{objective!r} trains the token sets {objective.token_sets}: "
                                 "pass use_set to say how each is put on the denoiser")
            use_set = _single_set
        self.backbone, self.batch, self.objective, self.use_set = backbone, batch, objective, use_set
        self.needs = objective.needs

    def __call__(self, rows: torch.Tensor, cols: torch.Tensor, *, hard: bool = False,
                 reference: bool = False) -> dict[str, torch.Tensor]:
        """{"errors": (K,)} of the pairs (rows[k], cols[k]); with `needs.predictions` also
        "predictions" (K, C, h, w); with `reference` also "reference" (K, C, h, w), without grad.
        `hard`: cols index the hard negatives (errors only)."""
        out: dict[str, torch.Tensor] = {}
        for idx, group in self.each_set(rows, cols, hard=hard, reference=reference):
            for key, value in group.items():
                if key not in out:
                    out[key] = value.new_zeros((rows.shape[0],) + value.shape[1:])
                out[key] = out[key].index_put((idx,), value)  # out of place: keeps each set's graph
        return out

    def each_set(self, rows: torch.Tensor, cols: torch.Tensor, *, hard: bool = False,
                 reference: bool = False):
        """Yield (idx, outputs) per token set: the positions `idx` (k,) of the pairs evaluated under
        that set and what `__call__` returns for them. A caller that back-propagates each group
        before asking for the next keeps gradient checkpointing exact: a block recomputed in the
        backward reads the tokens of the call in flight, which the next set's forward replaces."""
        own = torch.zeros_like(rows, dtype=torch.bool) if hard else cols == rows + self.batch.offset
        sets = self.objective.pair_sets(own)
        names = self.objective.token_sets
        if sets is None:
            yield torch.arange(rows.shape[0], device=rows.device), self._group(names[0], rows, cols, hard, reference)
            return
        for s, name in enumerate(names):
            idx = (sets == s).nonzero().flatten()  # (k,) pairs of this set
            if idx.numel():
                yield idx, self._group(name, rows[idx], cols[idx], hard, reference)

    def _group(self, name: str, rows: torch.Tensor, cols: torch.Tensor, hard: bool,
               reference: bool) -> dict[str, torch.Tensor]:
        bb, batch = self.backbone, self.batch
        cond = batch.negatives if hard else batch.cond
        out = {}
        with self.use_set(name, False):
            if self.needs.predictions and not hard:
                pred, target = pair_predictions(bb, batch, rows, cols, cond)
                out["predictions"], out["errors"] = pred, _squared_error(pred, target)
            else:
                out["errors"] = pair_errors(bb, batch, rows, cols, cond=cond)
        if reference and not hard:
            with torch.no_grad(), self.use_set(name, True):
                out["reference"] = pair_predictions(bb, batch, rows, cols, cond)[0]
        return out

    def terms(self, chunk: int | None, t: torch.Tensor) -> PairTerms:
        """Every pair of the batch (in chunks of `chunk` pairs; None: at once) as `PairTerms`."""
        batch, needs = self.batch, self.needs
        B, P = batch.latents.shape[0], len(batch.cond)
        terms = PairTerms(t=t, captions=list(batch.captions), offset=batch.offset)
        if not (needs.predictions or needs.reference):
            terms.errors = _error_matrix(batch, chunk, lambda r, c: self(r, c)["errors"])  # (B, P)
        else:
            parts = [self(r, c, reference=needs.reference)
                     for r, c in _pair_chunks(B, P, chunk or B * P, batch.latents.device)]
            full = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            terms.errors = full["errors"].view(B, P)  # (B, P)
            if needs.predictions:
                terms.predictions = full["predictions"].view(B, P, *full["predictions"].shape[1:])  # (B, P, C, h, w)
                x0 = batch.latents
                noise = batch.noise if batch.noise.shape[0] > 1 else batch.noise.expand_as(x0)
                terms.targets = self.backbone.target(x0, noise, batch.t.to(x0.device))  # (B, C, h, w)
            if needs.reference:
                terms.reference = full["reference"].view(B, P, *full["reference"].shape[1:])
        if batch.num_negatives > 0 and needs.errors:
            terms.negatives, terms.negatives_valid = _negative_errors(
                batch, chunk, lambda r, c: self(r, c, hard=True)["errors"])  # (B, K), (B, K)
        if not needs.errors:
            terms.errors = None
        return terms


def objective_grads(objective: Objective, terms: PairTerms) -> tuple[ObjectiveOutput, dict[str, torch.Tensor]]:
    """The objective's loss and its gradient with respect to the differentiable terms.

    The terms (errors E, hard-negative errors H, predictions) are detached into leaf copies, so
    the gradient stops there: with them the chunked second pass back-propagates each chunk's
    share (`E_chunk.backward(dL/dE[chunk])`) and the sum is the exact token gradient.

    Returns:
        (the detached output, {field name: dL/d(field)}, zeros where the loss does not use it).
    """
    leaf_terms, leaves = terms.with_leaves()
    with torch.enable_grad():
        out = objective.loss(leaf_terms)
        if not out.loss.requires_grad:  # e.g. positive-only with denoise_weight 0: nothing to train
            grads = [torch.zeros_like(x) for x in leaves.values()]
        else:
            grads = list(torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True))
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves.values())]
    return out.detach(), dict(zip(leaves, grads))


def objective_backward(
    backbone: Backbone,
    batch: PairBatch,
    objective: Objective,
    *,
    pair_chunk: int | None = None,
    grad_multiplier: float = 1.0,
    distributed: bool = False,
    backward: Callable[[torch.Tensor], None] | None = None,
    use_set: UseSet | None = None,
) -> ObjectiveOutput:
    """Compute an objective's loss on a batch and accumulate its exact gradient into the tokens.

    Args:
        backbone: family interface with tokens attached to its denoiser.
        batch: this process's images and every process's prompts.
        objective: what to evaluate and the loss (`softrepa.objectives`).
        pair_chunk: pairs per forward pass; None evaluates all pairs in one pass (plain path,
            single process only).
        grad_multiplier: multiplies the gradient (fp16 GradScaler's scale).
        distributed: pool the pair terms (errors, predictions, references, targets) across
            torch.distributed ranks (prompts must already be gathered in `batch.cond`).
        backward: plain path only: called with the loss instead of `loss.backward()`
            (e.g. `accelerator.backward`).
        use_set: how each of the objective's token sets is put on the denoiser (`UseSet`); None
            for a one-set objective, whose set is attached.
    Returns:
        The (detached) output of the objective on the global batch.
    """
    pairs = _Pairs(backbone, batch, objective, use_set)
    needs = objective.needs
    B, P = batch.latents.shape[0], len(batch.cond)
    t_loss = batch.t_all if batch.t_all is not None else batch.t
    n_neg = 0 if batch.negatives is None else len(batch.negatives)
    # several token sets (or a reference copy) on one graph break gradient checkpointing: a block
    # recomputed in the backward reads the tokens of the last forward, another set's; the two-pass
    # path back-propagates each set's pairs right after their forward
    serial = (len(objective.token_sets) > 1 or needs.reference) and bool(
        getattr(backbone.denoiser, "is_gradient_checkpointing", False))
    if not distributed and not serial and (pair_chunk is None or pair_chunk >= B * P + n_neg):  # one pass
        if P != B:
            raise ValueError(f"{B} images but {P} prompts on a single process")
        out = objective.loss(pairs.terms(None, t_loss))  # every pair with its graph
        if out.loss.requires_grad:  # positive-only with denoise_weight 0 has nothing to train
            loss = out.loss * grad_multiplier if grad_multiplier != 1.0 else out.loss
            (backward or torch.Tensor.backward)(loss)
        return out.detach()

    chunk = pair_chunk or B * P + n_neg
    with torch.no_grad():
        terms = pairs.terms(chunk, t_loss)  # pass 1: every pair, no graph
    if distributed:
        # every rank sees the whole batch's terms (rows in rank order), so the loss is the union
        # batch's; each rank then back-propagates its own rows' share of the gradient
        if terms.errors is not None:
            terms.errors = _all_gather_rows(terms.errors)  # (P, P)
        for name in ("predictions", "reference", "targets"):  # (P, P, C, h, w) / (P, C, h, w)
            if getattr(terms, name) is not None:
                setattr(terms, name, _all_gather_rows(getattr(terms, name)))
        terms.offset = 0  # gathered rows are global: image i's own caption is column i
        if terms.negatives is not None:
            terms.negatives = _all_gather_rows(terms.negatives)  # (P, K)
            terms.negatives_valid = _all_gather_rows(terms.negatives_valid.float()) > 0.5
    if terms.errors is not None and terms.errors.shape[0] != P:
        raise ValueError(f"gathered {terms.errors.shape[0]} image rows for {P} prompts; ranks must hold equal batches")
    out, grads = objective_grads(objective, terms)
    rows_of = slice(batch.offset, batch.offset + B)  # this process's rows of the global gradient
    dE = grads["errors"][rows_of] * grad_multiplier if "errors" in grads else None  # (B, P)
    dP = grads["predictions"][rows_of] * grad_multiplier if "predictions" in grads else None  # (B, P, C, h, w)
    for rows, cols in _pair_chunks(B, P, chunk, batch.latents.device):  # pass 2
        outputs, grad_outputs = [], []
        if dE is not None and torch.any(dE[rows, cols] != 0):
            outputs.append("errors")
            grad_outputs.append(dE[rows, cols].to(torch.float32))
        if dP is not None and torch.any(dP[rows, cols] != 0):
            outputs.append("predictions")
            grad_outputs.append(dP[rows, cols].to(torch.float32))
        if not outputs:
            continue  # masked / zero-gradient pairs need no recomputation
        for idx, part in pairs.each_set(rows, cols):  # each set's backward before the next set's forward
            torch.autograd.backward([part[k] for k in outputs], [g[idx] for g in grad_outputs])
    if terms.negatives is not None and n_neg:
        dev = batch.latents.device
        dH = grads["negatives"][rows_of] * grad_multiplier  # (B, K)
        rows_all, slots_all = batch.negative_rows.to(dev), batch.negative_slots.to(dev)
        for k in range(0, n_neg, chunk):
            idx = torch.arange(k, min(k + chunk, n_neg), device=dev)
            g = dH[rows_all[idx], slots_all[idx]]
            if not torch.any(g != 0):
                continue
            pairs(rows_all[idx], idx, hard=True)["errors"].backward(g.to(torch.float32))
    return out


def contrastive_backward(
    backbone: Backbone,
    batch: PairBatch,
    *,
    pair_chunk: int | None = None,
    loss_kwargs: dict[str, Any] | None = None,
    grad_multiplier: float = 1.0,
    distributed: bool = False,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> LossOutput:
    """`objective_backward` with the SoftREPA objective of `loss_kwargs` (`softrepa_loss` keywords:
    tau, scale, form, symmetric, denoise_weight, contrastive_weight); returns its `LossOutput`."""
    return objective_backward(backbone, batch, SoftREPA(**(loss_kwargs or {})), pair_chunk=pair_chunk,
                              grad_multiplier=grad_multiplier, distributed=distributed, backward=backward)


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum token gradients over ranks (each rank holds its rows' share of the global gradient)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def gather_prompts(cond: TextCond, captions: Sequence[str], t: torch.Tensor) -> tuple[TextCond, list[str], torch.Tensor, int]:
    """All ranks' prompt embeddings, captions and timesteps (rank order) and this rank's offset.

    Prompt embeddings come from frozen encoders, so gathering them needs no gradient.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cond, list(captions), t, 0
    world, rank = dist.get_world_size(), dist.get_rank()

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    all_caps: list[Any] = [None] * world
    dist.all_gather_object(all_caps, list(captions))
    pooled = None if cond.pooled is None else gather(cond.pooled)
    full = TextCond(gather(cond.embeds), pooled, {k: gather(v) for k, v in cond.extra.items()})
    t_all = gather(t.to(cond.embeds.device)).to(t.device)
    return full, [c for caps in all_caps for c in caps], t_all, rank * len(captions)
