"""The SoftREPA training loop: one loop for every backbone and objective, single process or many (accelerate).

Each step: encode B images and their captions with the frozen encoders, draw one t and one noise
for the batch (defaults, as the paper), pool every rank's prompts, evaluate all image x prompt
pairs with the tokens attached, and take an AdamW step on the tokens only. What is evaluated and
the loss are the objective's (`objective:` in the config, `softrepa.objectives`); the loop asks it
and never branches on its name. Every random draw of step k comes from its own keyed stream
(`softrepa.streams`: (seed, stream, k[, image index | rank])), and the data order from
(seed, epoch), so a resumed run continues exactly as an uninterrupted one.

`run_training(cfg, resume=..., overwrite=...)` is what `softrepa train` calls: it claims the run
folder (refusing another run's folder or one in use in a second, before anything loads), checks
the data and model paths, then trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ConfigError, RunFolderError, TrainingDiverged
from .backbone import Backbone, backbone_for
from .pipeline import load_pipeline
from .compilation import CompileConfig, compile_blocks
from .checkpoint import checkpoints_newest_first, latest_checkpoint, load_checkpoint, remove_leftovers, save_checkpoint
from .config import LossConfig, TrainConfig, absolute_paths, config_dict, loss_kwargs, save_config, split_trackers
from .data import build_dataset, collate_pairs
from .family import family_of
from .hooks import attach
from .runfolder import append_row, atomic_write_bytes, png_bytes
from .resume import (check_resumable, claim_run_folder, drop_abandoned, newest_intact, saved_run_config,
                     saved_tau_table, trim_metrics)
from .runlock import RunLock
from .speedups import attention_backend, check_speed, convert_fp8
from .artifact import model_name, provenance_metadata, save_soft_tokens
from .negatives import CaptionNegatives
from .objectives import Objective, get_objective
from .pairs import PairBatch, all_reduce_grads, gather_prompts, objective_backward
from .streams import STREAMS_VERSION, Stream, generator, python_random
from .tokens import SoftTokens
from .validation import check_trackers, load_validation_metrics, log_images, score_arms

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepBatches(torch.utils.data.Sampler):
    """Index lists for steps start..: a (seed, epoch) permutation stream cut into global batches.

    Yields, per step, this rank's slice of the global batch as indices `epoch * N + i`, so that the
    dataset view knows which epoch's caption to draw (see `EpochView`).
    """

    def __init__(self, n: int, per_rank: int, world: int, rank: int, seed: int, start_step: int, max_steps: int):
        self.n, self.per_rank, self.world, self.rank = n, per_rank, world, rank
        self.seed, self.start, self.stop = seed, start_step, max_steps

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator(self.seed, Stream.EPOCH_ORDER, epoch))

    def __iter__(self) -> Iterator[list[int]]:
        glob = self.per_rank * self.world
        for step in range(self.start, self.stop):
            lo = step * glob + self.rank * self.per_rank
            out = []
            for pos in range(lo, lo + self.per_rank):
                epoch, i = divmod(pos, self.n)
                out.append(epoch * self.n + int(self._perm(epoch)[i]))
            yield out

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class EpochView(torch.utils.data.Dataset):
    """Dataset view whose index `epoch * N + i` selects item i with epoch `epoch`'s caption."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> Any:
        epoch, i = divmod(int(k), len(self.dataset))
        self.dataset.set_epoch(epoch)
        return self.dataset[i]


class Trainer:
    """Trains soft tokens for one backbone.

    Args:
        cfg: the resolved `TrainConfig`.
        pipe: an already loaded pipeline (default: `load_pipeline(cfg.model)`).
        dataset: an already built dataset (default: `build_dataset(cfg.data, ...)`).
        keep_negative: optional predicate on hard-negative captions (`cfg.negatives`); those it
            rejects are not used (the miniature demo keeps held-out compositions out of training).
        progress: show the progress bar (main process only).

    Example:
        >>> cfg = load_config("recipes/sd3.yaml", {"data": "coco/", "output_dir": "runs/sd3"})
        >>> final = Trainer(cfg).train()                 # runs/sd3/tokens.safetensors
        >>> final = Trainer(cfg).train(resume=True)      # after a crash: continues exactly
    """

    def __init__(self, cfg: TrainConfig, pipe: Any = None, dataset: Any = None,
                 keep_negative: Any = None, progress: bool = True):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.progress = progress
        # Autocast / GradScaler are handled here (the contrastive backward is manual), so accelerate
        # is used for device placement, process setup and trackers only.
        self.acc = Accelerator(log_with=split_trackers(cfg.log_with) or None, project_dir=str(self.out))
        # accelerate only warns when the tracker's package is missing and then logs nothing;
        # fail here, before the data is read and the model loaded, instead of after a run without logs.
        _check_trackers(cfg.log_with, self.acc.log_with)
        self.device = self.acc.device
        # Rank / world from torch.distributed itself: under torchrun on CPU, accelerate sets up the
        # gloo process group but reports a single process (DistributedType.NO).
        import torch.distributed as dist

        self._dist = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self._dist else self.acc.num_processes
        self.rank = dist.get_rank() if self._dist else self.acc.process_index
        self.is_main = self.rank == 0
        _warn_single_process_launch(self.world)
        # One writer per run folder, held until `train` returns: a second run on this folder fails
        # here, in a second, not after the model has loaded. The main process writes the folder.
        self.lock = RunLock(self.out).acquire() if self.is_main else None
        try:
            self._build(pipe, dataset, keep_negative)
        except BaseException:  # a failed set-up must not keep the folder locked (notebooks keep frames alive)
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self, pipe: Any, dataset: Any, keep_negative: Any) -> None:
        """The rest of `__init__`, under the run folder's lock: data, model, tokens, optimiser."""
        cfg = self.cfg
        # the saved config must still find its files when resumed from another directory
        absolute_paths(cfg)
        # an option this device lacks (flash / cuDNN attention, fp8) fails now, not after minutes of loading
        check_speed(cfg.speed, self.device, half=cfg.mixed_precision != "no" or cfg.weights_dtype in ("bf16", "fp16"))
        # the data before the model: a bad --data is reported in seconds, not after minutes of loading
        self.dataset = dataset if dataset is not None else build_dataset(
            cfg.data, cfg.resolution, seed=cfg.seed, images=cfg.data_images, max_items=cfg.max_items)
        # validation scorers before the model too: an unknown metric or missing weights fail now
        v = cfg.validation
        self.validation_scorers = (load_validation_metrics(v.metrics, v.metrics_config, device=self.device)
                                   if self.is_main and v.every and v.metrics else {})
        if cfg.weights_dtype == "auto":
            half = self.device.type == "cuda" and cfg.mixed_precision != "no"
            wdtype = DTYPES[cfg.mixed_precision] if half else torch.float32
        else:
            wdtype = DTYPES[cfg.weights_dtype]
        if pipe is None:
            if not cfg.model:
                raise ConfigError("model: give a hub id or a local diffusers folder (--model ...)")
            pipe = load_pipeline(cfg.model, wdtype, self.device)
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.backbone: Backbone = backbone_for(pipe, max_sequence_length=cfg.max_sequence_length)
        self.backbone.freeze()
        self.backbone.denoiser.eval()
        if cfg.gradient_checkpointing:  # every denoiser the family runs (Wan 2.2 A14B: both experts)
            for denoiser in family_of(pipe).denoisers(pipe, self.backbone.denoiser):
                denoiser.enable_gradient_checkpointing()
        self.objective_class = get_objective(cfg.objective)
        # one SoftTokens per token set of the objective; the first is `self.tokens` (attached, saved as
        # tokens.safetensors, used for validation). Further sets draw their own base tokens (seed + k)
        # and share the first set's time-indexed part: one parameter, one optimizer entry.
        names = self.objective_class.token_sets
        self.tokens = SoftTokens.for_model(pipe, cfg.tokens, seed=cfg.seed).to(self.device)
        self.token_sets: dict[str, SoftTokens] = {names[0]: self.tokens}
        for k, name in enumerate(names[1:], start=1):
            other = SoftTokens.for_model(pipe, cfg.tokens, seed=cfg.seed + k).to(self.device)
            if other.time is not None:
                other.time = self.tokens.time
            self.token_sets[name] = other
        self.params = _unique_parameters(self.token_sets.values())
        # EMA copies of every set (the objective's `reference` predictions), exact copies at the start
        self.ema_decay = self.objective_class.reference_decay(cfg)
        self.ema_sets: dict[str, SoftTokens] | None = None
        if self.ema_decay is not None:
            self.ema_sets = copy.deepcopy(self.token_sets)  # one deepcopy: the shared time part stays shared
            for ema in self.ema_sets.values():
                ema.requires_grad_(False)
            self.ema_params = _unique_parameters(self.ema_sets.values())
        self.handle = attach(pipe, self.tokens)
        # regional compilation after attach or before makes no difference: the hooks stay eager
        self.compiled = (compile_blocks(pipe, CompileConfig(mode=cfg.compile_mode))  # every denoiser of the pipe
                         if cfg.compile else None)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.weight_decay)
        s = cfg.schedule
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.optimizer, T_0=s.T_0, T_mult=s.T_mult, eta_min=s.eta_min)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.mixed_precision == "fp16" else None
        self.cache = None
        if cfg.latent_cache:
            from .latent_cache import LatentCache

            self.cache = LatentCache(cfg.latent_cache, meta={"model": cfg.model, "resolution": cfg.resolution})
        self.step = 0
        self.negatives = (CaptionNegatives.from_config(cfg.negatives, keep=keep_negative)
                          if cfg.negatives.per_image else None)
        # a calibrated tau without its table is estimated at the start of `train`
        self.loss_kwargs: dict[str, Any] | None = None
        self.objective: Objective | None = None
        if _tau_ready(cfg.loss):
            self._set_loss()

    def _set_loss(self) -> None:
        """The objective of the run, from `cfg.loss` (a calibrated tau with its table)."""
        self.loss_kwargs = loss_kwargs(self.cfg.loss)
        self.objective = self.objective_class.from_config(self.cfg, self.loss_kwargs)

    # ------------------------------------------------------------------ token sets
    def _use_set(self, name: str, reference: bool):
        """`softrepa.pairs.UseSet`: the denoiser carries set `name` (reference: its EMA copy)."""
        sets = self.ema_sets if reference and self.ema_sets is not None else self.token_sets
        return self.handle.carrying(sets[name])

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * online, for every parameter of every set (once each)."""
        d = self.ema_decay
        for ema, online in zip(self.ema_params, self.params):
            ema.mul_(d).add_(online, alpha=1.0 - d)

    def _extra_token_files(self) -> dict[str, SoftTokens]:
        """The token modules a checkpoint holds beside tokens.safetensors (the first set):
        tokens_<set>.safetensors for the other sets, ema_<set>.safetensors for the EMA copies."""
        names = list(self.token_sets)
        files = {f"tokens_{name}.safetensors": self.token_sets[name] for name in names[1:]}
        if self.ema_sets is not None:
            files.update({f"ema_{name}.safetensors": self.ema_sets[name] for name in names})
        return files

    # ------------------------------------------------------------------ pieces of a step
    def _autocast(self):
        if self.cfg.mixed_precision == "no":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.cfg.mixed_precision])

    def _latents(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        pixels = batch["pixels"].to(self.device)
        if self.cache is None:
            # one generator per item, keyed by its stream position: same latent on any rank layout
            gens = [generator(self.cfg.seed, Stream.POSTERIOR, step, int(i)) for i in batch["indices"]]
            return self.backbone.encode_images(pixels, gens)
        out = []
        for k, key in enumerate(batch["keys"]):
            lat = self.cache.get(key)
            if lat is None:  # a fixed posterior sample per image, reused every epoch
                g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big"))
                lat = self.backbone.encode_images(pixels[k:k + 1], g)[0]
                self.cache.put(key, lat)
            out.append(lat.to(self.device, self.backbone.dtype))
        return torch.stack(out)

    def _pair_batch(self, batch: dict[str, Any], step: int) -> PairBatch:
        cfg, bb = self.cfg, self.backbone
        B = batch["pixels"].shape[0]
        with torch.no_grad(), self._autocast():
            latents = self._latents(batch, step)
            cond = bb.encode_prompts(batch["captions"], resolution=cfg.resolution)

        def draw(stream: Stream, shared: bool) -> torch.Generator:  # shared: the same on every rank
            return generator(cfg.seed, stream, step) if shared else generator(cfg.seed, stream, step, self.rank)

        t = bb.sample_timesteps(B, draw(Stream.TIMESTEPS, cfg.shared_timestep), shared=cfg.shared_timestep,
                                t_min=cfg.t_min, t_max=cfg.t_max)
        shape = (1 if cfg.shared_noise else B,) + tuple(latents.shape[1:])
        noise = torch.randn(shape, generator=draw(Stream.NOISE, cfg.shared_noise)).to(self.device, latents.dtype)
        cond_all, caps_all, t_all, offset = gather_prompts(cond, batch["captions"], t.to(self.device))
        pb = PairBatch(latents, cond_all, caps_all, t.to(self.device), noise, offset, t_all)
        if self.negatives is not None:
            K = cfg.negatives.per_image
            rng = python_random(cfg.seed, Stream.NEGATIVES, step, self.rank)
            texts, rows, slots = self.negatives.for_batch(batch["captions"], K, rng)
            if texts:
                with torch.no_grad(), self._autocast():
                    pb.negatives = bb.encode_prompts(texts, resolution=cfg.resolution)
                pb.negative_rows = torch.tensor(rows, device=self.device)
                pb.negative_slots = torch.tensor(slots, device=self.device)
            pb.num_negatives = K
        return pb

    def calibrate(self) -> list[float]:
        """Estimate the calibrated tau table (`softrepa.diagnose.calibrate_tau`) and use it.

        Runs on the training data with the tokens as they are now (a new run: their
        initialisation). Every rank computes it; rank 0's table is broadcast so all agree.
        """
        from .diagnose import calibrate_tau

        cfg = self.cfg
        table = calibrate_tau(self.backbone, self.dataset, bins=cfg.loss.tau_bins,
                              batches=cfg.loss.calibration_batches, batch_size=cfg.batch_size,
                              resolution=cfg.resolution, seed=cfg.seed)
        if self._dist:
            import torch.distributed as dist

            box = [table]
            dist.broadcast_object_list(box, src=0)
            table = box[0]
        cfg.loss.tau_table = [float(v) for v in table]
        self._set_loss()
        logger.info("calibrated tau per timestep bin: %s", [round(v, 4) for v in table])
        return table

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimisation step on a collated batch; returns the logged metrics."""
        cfg = self.cfg
        if self.objective is None:
            self.calibrate()
        t0 = time.perf_counter()
        pb = self._pair_batch(batch, self.step)
        distributed = self.world > 1
        self.optimizer.zero_grad(set_to_none=True)
        use_set = self._use_set if len(self.token_sets) > 1 or self.ema_sets is not None else None
        with self._autocast(), attention_backend(cfg.speed.attention):  # forward and backward
            out = objective_backward(
                self.backbone, pb, self.objective, pair_chunk=cfg.pair_chunk, distributed=distributed,
                grad_multiplier=self._loss_scale(), use_set=use_set)
        all_reduce_grads(self.params)
        loss = float(out.loss)
        finite_grads = all(p.grad is None or torch.isfinite(p.grad).all() for p in self.params)
        if not math.isfinite(loss) or (self.scaler is None and not finite_grads):
            last = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"loss became {loss} (gradients finite: {finite_grads}) at step {self.step + 1}; "
                f"the last good checkpoint is {last or 'none (no checkpoint written yet)'}. "
                "Lower lr, use bf16 instead of fp16, or raise loss.tau (loss.tau_min with the linear schedule).")
        if self.scaler is not None:  # skips the step itself when the scaled grads overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema_sets is not None:
            self._update_ema()
        self.step += 1
        if self.step % cfg.schedule.step_every == 0:
            self.scheduler.step()
        dt = time.perf_counter() - t0
        n_neg = 0 if pb.negatives is None else len(pb.negatives)
        pairs = (pb.latents.shape[0] * len(pb.cond) + n_neg) * self.world
        return {"step": self.step, **out.metrics(), "t": float(pb.t[0]), "lr": self.optimizer.param_groups[0]["lr"],
                "pairs_per_s": pairs / dt, "step_s": dt}

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool | str | None = None, overwrite: bool = False) -> Path:
        """Run to `cfg.max_steps` and release the run folder; returns the final tokens file.

        Args:
            resume: True / "latest" continues from the run's newest intact checkpoint (a damaged
                one is reported and skipped), a checkpoint folder from that one (newer checkpoints,
                an abandoned continuation, are removed); a run killed before its first checkpoint
                starts again from step 0.
            overwrite: delete another run's artefacts in the folder first (without it, and
                without `resume`, a folder holding a run is refused).
        """
        if self.is_main and (self.lock is None or not self.lock.held):  # a second train() call
            self.lock = RunLock(self.out).acquire()
        try:
            # fp8 swaps the frozen Linear modules for this run only; the originals are back when it returns
            with convert_fp8(self.backbone.denoiser) if self.cfg.speed.fp8 else nullcontext():
                return self._train(resume, overwrite)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self, resume: bool | str | None, overwrite: bool) -> Path:
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.is_main
        # before anything is written: was there a run here? (every rank must agree: rank 0 decides)
        had_run = self._from_main((self.out / "config.yaml").is_file() if main else None)
        if main:
            claim_run_folder(self.out, resume, overwrite)
            for name in remove_leftovers(self.out):
                logger.info("removed %s (left by a killed writer)", name)
        if resume:
            saved = saved_run_config(resume, self.out)
            if saved is not None:  # the resume policy: same training, only its length / logging may change
                check_resumable(cfg, saved)
        if self.objective is None:
            saved = saved_tau_table(self.out / "config.yaml") if resume else None
            if saved is not None:  # a resumed calibrated run keeps the table it started with
                cfg.loss.tau_table = saved
                self._set_loss()
            else:
                self.calibrate()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        # provenance in every tokens file the run writes (checkpoints and final): the base model and
        # the resolved config, after calibration so a calibrated tau table is part of it
        provenance = provenance_metadata(self.pipe, model_name(self.pipe) or cfg.model or None,
                                         train_config=config_dict(cfg))
        for tokens in (self.tokens, *self._extra_token_files().values()):
            tokens.provenance = provenance
        if resume:
            self.step = self._resume(resume, had_run)
            if main:
                # rows past the checkpoint were logged by the killed run and are logged again
                trim_metrics(self.out / "metrics.jsonl", self.step)
        if cfg.log_with:
            self.acc.init_trackers("softrepa", config=_flat(cfg.to_dict()))
            if self.acc.is_main_process:  # init_trackers runs on the main process only
                _check_trackers(cfg.log_with, self.acc.trackers)
        sampler = StepBatches(len(self.dataset), cfg.batch_size, self.world, self.rank,
                              cfg.seed, self.step, cfg.max_steps)
        loader = torch.utils.data.DataLoader(EpochView(self.dataset), batch_sampler=sampler,
                                             num_workers=cfg.num_workers, collate_fn=collate_pairs)
        metrics_path = self.out / "metrics.jsonl"
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="softrepa train", disable=not (main and self.progress), dynamic_ncols=True)
        for batch in loader:
            row = self.train_step(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", lr=f"{row['lr']:.1e}",
                            pairs_s=f"{row['pairs_per_s']:.1f}")
            if main and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps or self.step == 1):
                append_row(metrics_path, row)  # fsynced; a full disk is a StorageError naming the file
                if cfg.log_with:
                    self.acc.log({k: v for k, v in row.items() if k != "step"}, step=self.step)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.checkpoint()
            if main and cfg.validation.every and (self.step % cfg.validation.every == 0 or self.step == cfg.max_steps):
                self.validation_grid()
        bar.close()
        final = self.out / "tokens.safetensors"
        if main:
            # one file holds every set, the first (SoftREPA's tokens, AGSM's psi+) as its main set, and
            # names the objective (`softrepa info`); AGSM's psi- is its "negative" set
            first, *rest = self.token_sets
            save_soft_tokens(self.token_sets[first], final, name=first,
                             others={n: self.token_sets[n] for n in rest},
                             extra_metadata={"step": str(self.step), "objective": cfg.objective})
            try:
                from .viz import plot_training_curves

                plot_training_curves(metrics_path, self.out / "curves.png")
            except (ImportError, ValueError, OSError) as e:  # a plot must not fail a finished run
                logger.warning("no training curve written: %s", e)
            skipped = dict(getattr(self.dataset, "skipped", {}) or {})
            if skipped:
                logger.warning("skipped samples during training (main process): %s", skipped)
        if cfg.log_with:
            self.acc.end_training()
        self._barrier()
        return final

    def _from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (itself without torch.distributed)."""
        if not self._dist:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _resume(self, resume: bool | str, had_run: bool) -> int:
        """Restore the newest intact checkpoint (or the given one); returns its step (0: none yet).

        `had_run`: the folder held this run's config.yaml before this call wrote one, i.e. the run
        was started here and killed before its first checkpoint (then it starts again from 0).

        Rank 0 decides (which checkpoint, a fresh start, or the error) and the other ranks follow:
        left to themselves, a rank whose view of the folder or read of a checkpoint differed (a
        transient I/O error, a lagging network filesystem) would resume from another step, or start
        over, and the ranks would train on apart without noticing. A rank that cannot read the
        checkpoint rank 0 chose stops every rank with one error, before any of them trains.
        """
        chooser = self.is_main or not self._dist
        decision, failure = None, None  # ("start",) or ("resume", checkpoint, step, damaged checkpoints)
        if chooser:
            try:
                decision = self._choose_checkpoint(resume, had_run)
            except Exception as e:  # re-raised below, once the other ranks know not to wait for rank 0
                failure = e
        decision = self._from_main(decision)
        if failure is not None:
            raise failure
        if decision is None:
            raise RunFolderError(f"{self.out}: rank 0 could not resume (its error names the cause)")
        if decision[0] == "start":
            return 0
        _, chosen, step, damaged = decision
        error = None
        if not chooser:
            try:
                state = self._load(Path(chosen))
                if int(state["step"]) != step:
                    error = f"it read step {state['step']}, rank 0 step {step}"
            except Exception as e:  # noqa: BLE001 - reported by every rank below, then raised
                error = f"{type(e).__name__}: {e}"
        # a collective, so also the barrier: every rank has read its checkpoint before rank 0 changes the folder
        failed = [(rank, e) for rank, e in enumerate(self._gather(error)) if e]
        if failed:
            rank, e = failed[0]
            raise RunFolderError(f"{chosen}: rank {rank} could not resume from the checkpoint rank 0 chose ({e}); "
                                 "no rank has trained")
        logger.info("resumed from %s at step %d", chosen, step)
        if self.is_main:
            drop_abandoned(self.out, Path(chosen), step, [Path(p) for p in damaged])
        return step

    def _choose_checkpoint(self, resume: bool | str, had_run: bool) -> tuple:
        """Rank 0's resume decision; restores the chosen checkpoint into this rank's state."""
        latest = resume is True or resume == "latest"
        candidates = checkpoints_newest_first(self.out) if latest else [Path(resume)]
        if not candidates:
            if latest and had_run:
                logger.warning("%s: the run stopped before its first checkpoint; starting it again from step 0",
                               self.out)
                return ("start",)
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out / 'checkpoints'} (nothing to resume; "
                                    "start a new run without --resume)")
        pick, step = newest_intact(candidates, latest, self._load)
        # paths, not indices: the other ranks never list the folder themselves
        return ("resume", str(candidates[pick]), step, [str(p) for p in candidates[:pick]])

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's `value` in rank order (`[value]` without torch.distributed); a barrier too."""
        if not self._dist:
            self._barrier()
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def _load(self, ckpt: Path) -> dict[str, Any]:
        """Restore one checkpoint into this run's tokens, optimizer, schedule and scaler."""
        state = load_checkpoint(ckpt, self.tokens, self.optimizer, self.scheduler, self.scaler,
                                extra_tokens=self._extra_token_files())
        if (state.get("extra") or {}).get("streams") != STREAMS_VERSION:
            logger.warning("%s was written by a softrepa whose random streams overlapped (before softrepa.streams): "
                           "the run continues with independent streams, so it will not equal an uninterrupted run "
                           "of that version", ckpt)
        return state

    def _loss_scale(self) -> float:
        """fp16: the GradScaler's current scale (scaling a unit tensor also initialises it)."""
        if self.scaler is None:
            return 1.0
        return float(self.scaler.scale(torch.ones((), device=self.device)))

    def _barrier(self) -> None:
        if self._dist:
            import torch.distributed as dist

            dist.barrier()
        else:
            self.acc.wait_for_everyone()

    def checkpoint(self) -> Path | None:
        self._barrier()
        path = None
        if self.is_main:
            path = save_checkpoint(self.out, self.step, self.tokens, self.optimizer, self.scheduler, self.cfg,
                                   extra={"streams": STREAMS_VERSION}, scaler=self.scaler,
                                   keep=self.cfg.keep_checkpoints, extra_tokens=self._extra_token_files())
        self._barrier()
        return path

    @torch.no_grad()
    def validation_grid(self) -> Path:
        """Same prompts and seeds without (top row) and with (bottom row) the tokens.

        The grid is saved under `validation/`, sent to the trackers that take images, and scored
        by `validation.metrics` (scalars `validation/<metric>/{vanilla,tokens,delta}` in the
        trackers and a metrics.jsonl row with `"validation": true`).
        """
        from .viz import image_grid, to_pil

        v = self.cfg.validation
        res = v.resolution or self.cfg.resolution
        rows, labels = [], []
        for enabled in (False, True):
            ims = []
            for seed in v.seeds:
                gens = [torch.Generator().manual_seed(seed) for _ in v.prompts]
                with nullcontext() if enabled else self.handle.disabled():  # disabled: the exact vanilla model
                    # the family names the pipeline's CFG arguments (Qwen-Image: true_cfg_scale + negative)
                    family = family_of(self.pipe)
                    guidance = family.guidance_kwargs(family.applied_cfg(self.pipe, v.guidance_scale))
                    out = family.render(self.pipe, list(v.prompts), gens, steps=v.steps, height=res, width=res,
                                        call_kwargs=guidance, output_type="np")
                ims += to_pil(out)  # arrays (H, W, 3) in [0, 1] or PIL images
            rows.append(ims)
            labels.append("tokens" if enabled else "vanilla")
        cols = [f"{p[:24]} s{s}" for s in v.seeds for p in v.prompts]
        path = self.out / "validation" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(rows, labels, cols)
        atomic_write_bytes(path, png_bytes(grid))  # whole or absent; a full disk is one line
        if self.cfg.log_with and v.log_images:
            log_images(self.acc.trackers, "validation/grid", grid, self.step)
        if self.validation_scorers:
            prompts = [p for _ in v.seeds for p in v.prompts]  # the order of the images of each row
            scores = score_arms(self.validation_scorers, prompts, rows[0], rows[1])
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "validation": True, **scores}) + "\n")
            if self.cfg.log_with:
                self.acc.log(scores, step=self.step)
            logger.info("validation at step %d: %s", self.step, {k: round(x, 4) for k, x in scores.items()})
        return path


def run_training(cfg: TrainConfig, resume: bool | str | None = None, overwrite: bool = False,
                 progress: bool = True, **trainer_kwargs: Any) -> Path:
    """Train a run as `softrepa train` does; returns the final tokens file.

    Before anything loads (rank 0; other ranks follow rank 0's decisions in `Trainer.train`): a
    folder in use by another process is refused naming its holder, a folder holding another run is
    refused unless `overwrite` (which deletes that run under the lock, not here) or a `resume` of
    it, and the data and model paths are checked. Then `Trainer(cfg).train(resume, overwrite)`.

    Args:
        cfg: the resolved config (`softrepa.resume.resume_config` for a resumed run).
        resume: None, True / "latest", or a checkpoint folder (see `Trainer.train`).
        overwrite: delete another run's artefacts in `cfg.output_dir` first.
        progress: show the progress bar.
        **trainer_kwargs: passed to `Trainer` (pipe, dataset, keep_negative).
    Raises:
        ConfigError: resume and overwrite together; RunFolderError (RunFolderBusy): the folder
        holds another run or is in use; FileNotFoundError: a missing data or model path.
    """
    from .checks import check_out_folder
    from .data import check_data_spec
    from .runlock import check_free

    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite deletes it: give one of them")
    # Rank 0 only (torchrun / accelerate set RANK): another rank could meet rank 0's own lock or the
    # config.yaml rank 0 has just written, and take this run for another; rank 0 checks again under the lock.
    check_out_folder(cfg.output_dir)  # a file there: one clear line, not [Errno 17]
    if int(os.environ.get("RANK", "0")) == 0:
        check_free(cfg.output_dir)  # another process training here: say so (pid, host) before anything else
        if not overwrite:  # refuse in a second, before anything loads (overwrite deletes under the lock)
            claim_run_folder(cfg.output_dir, resume)
    if isinstance(cfg.data, str) and "dataset" not in trainer_kwargs:  # '' too: never the current folder
        check_data_spec(cfg.data, "--data")  # before the model loads
    if cfg.model and "pipe" not in trainer_kwargs:
        from .loading import check_model  # the library's model-path check, shared by every command

        check_model(cfg.model)
    return Trainer(cfg, progress=progress, **trainer_kwargs).train(resume=resume, overwrite=overwrite)


def _unique_parameters(modules: Any) -> list[torch.nn.Parameter]:
    """The parameters of `modules` in order, each once (token sets share their time part)."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _tau_ready(loss: LossConfig) -> bool:
    return loss.tau_schedule != "calibrated" or loss.tau_table is not None


def _check_trackers(requested: str | None, got: list[Any]) -> None:
    check_trackers(requested, got)  # softrepa.validation: every accelerate tracker, the package to install


def _warn_single_process_launch(world: int) -> None:
    # `accelerate launch --cpu --num_processes N` without --mpirun_hostfile starts ONE process
    # (accelerate's simple launcher) and only leaves MASTER_ADDR behind: a run that looks
    # distributed but trains on 1/N of the intended batch.
    env = os.environ
    if world == 1 and env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in env:
        logger.warning(
            "accelerate launch --cpu started a single process (it needs --mpirun_hostfile for several CPU "
            "processes); for multi-process CPU training use torchrun --nproc_per_node N, or accelerate launch "
            "--multi_gpu --num_processes N with CUDA_VISIBLE_DEVICES=''")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
