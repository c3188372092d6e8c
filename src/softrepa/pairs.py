"""Error matrices over image x caption pairs, and exact contrastive gradients in bounded memory.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .backbone import Backbone, TextCond
from .loss import LossOutput, loss_grads, softrepa_loss


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


def pair_errors(backbone: Backbone, batch: PairBatch, rows: torch.Tensor, cols: torch.Tensor,
                cond: TextCond | None = None) -> torch.Tensor:
    """Errors of the pairs (rows[k], cols[k]): (K,) float32.

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
    return (pred.float() - target).pow(2).mean(dim=(1, 2, 3))  # (K,)


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
    B, P = batch.latents.shape[0], len(batch.cond)
    chunk = chunk or B * P
    dev = batch.latents.device
    parts = [pair_errors(backbone, batch, r, c) for r, c in _pair_chunks(B, P, chunk, dev)]
    return torch.cat(parts).view(B, P)  # (B, P)


def negative_errors(backbone: Backbone, batch: PairBatch, chunk: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """H (B, K) errors of each image under its own hard-negative prompts, and the (B, K) valid mask.

    Padding slots (an image with fewer than K negatives) hold 0 and are False in the mask.
    Runs under the caller's grad mode.
    """
    B, K = batch.latents.shape[0], batch.num_negatives
    dev = batch.latents.device
    H = torch.zeros(B, K, device=dev, dtype=torch.float32)
    valid = torch.zeros(B, K, device=dev, dtype=torch.bool)
    if batch.negatives is None or len(batch.negatives) == 0:
        return H, valid
    rows, slots = batch.negative_rows.to(dev), batch.negative_slots.to(dev)  # (N,), (N,)
    n = len(batch.negatives)
    chunk = chunk or n
    parts = [pair_errors(backbone, batch, rows[k:k + chunk], torch.arange(k, min(k + chunk, n), device=dev),
                         cond=batch.negatives) for k in range(0, n, chunk)]
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
    """Compute the SoftREPA loss of a batch and accumulate its exact gradient into the tokens.

    Args:
        backbone: family interface with tokens attached to its denoiser.
        batch: this process's images and every process's prompts.
        pair_chunk: pairs per forward pass; None evaluates all pairs in one pass (plain path,
            single process only).
        loss_kwargs: keyword arguments of `softrepa_loss` (tau, scale, form, symmetric,
            denoise_weight).
        grad_multiplier: multiplies the gradient (fp16 GradScaler's scale).
        distributed: pool error rows across torch.distributed ranks (prompts must already be
            gathered in `batch.cond`).
        backward: plain path only: called with the loss instead of `loss.backward()`
            (e.g. `accelerator.backward`).
    Returns:
        The (detached) `LossOutput` of the global batch.
    """
    kw = dict(loss_kwargs or {})
    B, P = batch.latents.shape[0], len(batch.cond)
    t_loss = batch.t_all if batch.t_all is not None else batch.t
    hard = batch.num_negatives > 0
    n_neg = 0 if batch.negatives is None else len(batch.negatives)
    if not distributed and (pair_chunk is None or pair_chunk >= B * P + n_neg):  # one chunk: one pass
        if P != B:
            raise ValueError(f"{B} images but {P} prompts on a single process")
        E = error_matrix(backbone, batch)  # (B, B) with graph
        if hard:
            H, valid = negative_errors(backbone, batch)  # (B, K) with graph
            kw.update(negatives=H, negatives_valid=valid)
        out = softrepa_loss(E, t_loss, captions=list(batch.captions), **kw)
        if out.loss.requires_grad:  # positive-only with denoise_weight 0 has nothing to train
            loss = out.loss * grad_multiplier if grad_multiplier != 1.0 else out.loss
            (backward or torch.Tensor.backward)(loss)
        return out.detach()

    chunk = pair_chunk or B * P + n_neg
    with torch.no_grad():
        E_local = error_matrix(backbone, batch, chunk)  # (B, P), pass 1
        H_local, valid_local = negative_errors(backbone, batch, chunk) if hard else (None, None)  # (B, K)
    E_full = _all_gather_rows(E_local) if distributed else E_local  # (P, P)
    if E_full.shape[0] != P:
        raise ValueError(f"gathered {E_full.shape[0]} image rows for {P} prompts; ranks must hold equal batches")
    if hard:
        H_full = _all_gather_rows(H_local) if distributed else H_local  # (P, K)
        valid_full = (_all_gather_rows(valid_local.float()) > 0.5) if distributed else valid_local
        kw.update(negatives=H_full, negatives_valid=valid_full)
    out, dLdE, dLdH = loss_grads(E_full, t_loss, captions=list(batch.captions), **kw)
    dLdE_local = dLdE[batch.offset:batch.offset + B] * grad_multiplier  # (B, P)
    for rows, cols in _pair_chunks(B, P, chunk, batch.latents.device):  # pass 2
        g = dLdE_local[rows, cols]
        if not torch.any(g != 0):
            continue  # masked / zero-gradient pairs need no recomputation
        pair_errors(backbone, batch, rows, cols).backward(g.to(torch.float32))
    if hard and n_neg:
        dev = batch.latents.device
        dLdH_local = dLdH[batch.offset:batch.offset + B] * grad_multiplier  # (B, K)
        rows_all, slots_all = batch.negative_rows.to(dev), batch.negative_slots.to(dev)
        for k in range(0, n_neg, chunk):
            idx = torch.arange(k, min(k + chunk, n_neg), device=dev)
            g = dLdH_local[rows_all[idx], slots_all[idx]]
            if not torch.any(g != 0):
                continue
            pair_errors(backbone, batch, rows_all[idx], idx, cond=batch.negatives).backward(g.to(torch.float32))
    return out


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
