"""`softrepa diagnose` as one library call: load the model and the data, measure, save.

`run_diagnosis` checks the options first (before the slow model load), then loads the bare
pipeline (`softrepa.load_model`), builds the dataset at the model's resolution and runs
`softrepa.diagnose.diagnose` with the options turned into its `LossConfig` / `NegativesConfig`.
The measurement itself is `softrepa.diagnose`.

Example:
    >>> from softrepa.diagnosis import run_diagnosis
    >>> report = run_diagnosis("@assets/toy_sd3", "demo_out/data", out="runs/diagnose",
    ...                        tau="calibrated")                                    # doctest: +SKIP
    >>> print(report.table())                                                        # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import UsageError


def loss_for(tau: str | float, scale: float = 4.0) -> Any:
    """The `LossConfig` of a `--tau` value: a number, or "calibrated" (each bin at its tau*).

    Raises:
        UsageError: neither a number nor "calibrated"; ConfigError: tau <= 0.
    """
    from .config import LossConfig

    if tau == "calibrated":
        return LossConfig(tau_schedule="calibrated", scale=scale)
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise UsageError(f"--tau must be a number or 'calibrated', got {tau!r}") from None
    return LossConfig(tau=value, scale=scale)


def run_diagnosis(model: str, data: Any, *, out: str | Path | None = None, tokens: str | Path | None = None,
                  data_images: str | None = None, bins: int = 10, batches_per_bin: int = 2, batch_size: int = 16,
                  resolution: int | None = None, tau: str | float = 0.07, scale: float = 4.0,
                  hard_negatives: int = 0, swap: Sequence[Sequence[str]] | None = None, grad_share: bool = True,
                  pair_chunk: int | None = None, max_sequence_length: int | None = None, device: str | None = None,
                  dtype: Any = None, seed: int = 0, progress: bool = True, command: str | None = None) -> Any:
    """Diagnose the loss regime of `model` on `data` (with `tokens`, or the bare model).

    Args:
        model: hub id, local pipeline folder or `@assets/toy_sd3`.
        data: dataset spec (COCO captions JSON, image folder, JSONL / CSV manifest, shards, Hub id).
        out: folder for diagnosis.md, diagnosis.json and diagnosis.png (None: not saved).
        tokens: soft tokens to measure with (file, run folder or Hub reference); None: the bare model.
        data_images: COCO image folder when `data` is a captions JSON.
        bins, batches_per_bin, batch_size: timestep bins over 0..1000, batches per bin, images
            (= captions) per batch (>= 2: negatives need a second caption).
        resolution: image side (default: the pipeline's native size).
        tau, scale: the logits' temperature (a number, or "calibrated": each bin at its tau*) and scale.
        hard_negatives: K hard-negative captions scored per image (0: in-batch negatives only).
        swap: word groups for the hard-negative swaps (default: colour words).
        grad_share: also split the token gradient (one more backward per batch).
        pair_chunk: pairs per forward pass (memory bound).
        max_sequence_length: text length (default: the family's `text_length`, as train uses).
        device, dtype: where the model runs (`softrepa.load_model`'s defaults).
        seed: seed of the batches and the noise.
        progress: progress bars.
        command: the command line, recorded in the report's setup.
    Returns:
        The `softrepa.diagnose.Diagnosis` (`.table()`, `.tau_table`), saved into `out` when given.
    Raises:
        UsageError: a count below its minimum, a dataset smaller than one batch, a bad `tau`;
        FileNotFoundError: missing data or model; SoftTokensError: tokens that do not fit.
    """
    from .artifact import load_soft_tokens
    from .data import build_dataset, check_data_spec
    from .diagnose import diagnose
    from .generate import native_resolution
    from .loading import check_model, load_model
    from .negatives import NegativesConfig

    for name, value, least in (("bins", bins, 1), ("batches-per-bin", batches_per_bin, 1),
                               ("batch-size", batch_size, 2), ("hard-negatives", hard_negatives, 0)):
        if value < least:
            why = " (negatives need a second caption)" if name == "batch-size" else ""
            raise UsageError(f"--{name} must be >= {least}{why}, got {value}")
    loss = loss_for(tau, scale)
    negatives = None
    if hard_negatives:
        groups = {} if swap is None else {"swap": [[w.strip() for w in g if w.strip()] for g in swap]}
        negatives = NegativesConfig(per_image=hard_negatives, **groups)
    check_data_spec(data)  # before the (slow) model load
    check_model(model)
    if tokens:
        load_soft_tokens(tokens)  # a bad tokens file fails before the model load
    pipe, _ = load_model(model, device=device, dtype=dtype, progress=progress)
    pipe.set_progress_bar_config(disable=True)
    res = resolution or native_resolution(pipe)
    dataset = build_dataset(data, res, seed=seed, images=data_images)
    if len(dataset) < batch_size:
        raise UsageError(f"batch_size {batch_size} (--batch-size): the dataset holds only {len(dataset)} items, "
                         "fewer than one batch")
    report = diagnose(pipe, dataset, tokens, bins=bins, batches_per_bin=batches_per_bin, batch_size=batch_size,
                      loss=loss, negatives=negatives, resolution=res, max_sequence_length=max_sequence_length,
                      seed=seed, grad_share=grad_share, progress=progress, pair_chunk=pair_chunk)
    if command:
        report.setup["command"] = command
    if out is not None:
        report.save(out)
    return report


__all__ = ["loss_for", "run_diagnosis"]
