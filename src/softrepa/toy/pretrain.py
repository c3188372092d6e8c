"""Pretrain the miniature SD3 and SD1.5 pipelines from scratch on the world's train split.

    from softrepa.toy.pretrain import PretrainConfig, pretrain
    summary = pretrain("both", "src/softrepa/assets", PretrainConfig())

Stages (each timed and printed): render the training scenes; train the shared tiny
`AutoencoderKL` (`pretrain_vae`) and judge its round trip; cache the VAE posteriors of all
training images; train the SD3 miniature (`pretrain_sd3`: two CLIP encoders + MM-DiT,
rectified flow) and/or the SD1.5 miniature (`pretrain_sd15`: CLIP + UNet, v-prediction), the
two side by side in two processes when both are asked for; save each as an ordinary diffusers
folder (`save_pretrained(..., safe_serialization=True)`) named
`toy_sd3` / `toy_sd15` under the output directory, with a `pretrain.json` recording the
configuration, timings, sizes and the VAE report. The defaults are the settings that produced
the bundled assets (`benchmarks/toy_pretrain.md`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from .pretrain_common import Timer, WorldImages, folder_megabytes, param_count, seed_everything, set_threads
from .pretrain_sd3 import assemble_sd3, build_sd3_components, train_sd3
from .pretrain_text import pretrain_text_encoders
from .pretrain_sd15 import assemble_sd15, build_sd15_components, train_sd15
from .pretrain_vae import build_vae, encode_posteriors, set_latent_scale, train_vae, vae_roundtrip_report

BACKBONES = ("sd3", "sd15", "both")
#: Folder names of the two pipelines under the output directory (and in `softrepa/assets`).
FOLDERS = {"sd3": "toy_sd3", "sd15": "toy_sd15"}
#: Where the bundled miniature pipelines live inside the installed package.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (defaults = the bundled assets).

    Args:
        seed: seeds data, initialisation, batches, captions and noise.
        n_images: training scenes rendered (train split, half one-object, half two-object).
        vae_steps, vae_batch_size, vae_lr, kl_weight: VAE stage (`pretrain_vae.train_vae`).
        vae_channels: VAE block widths (3 levels = downsampling factor 4: 32x32 -> 8x8x4).
        sd3_steps, sd15_steps: diffusion optimiser steps per backbone.
        batch_size: diffusion batch size.
        lr: peak diffusion learning rate (AdamW, warm-up + cosine to 10%).
        caption_dropout: empty-prompt probability (classifier-free guidance).
        caption_noise: share of two-object captions that describe a corrupted scene (colours
            swapped between the objects, or the relation reversed): web-like caption noise, so
            that SoftREPA, trained on clean captions, has alignment to teach
            (`pretrain_common.web_noise`; see benchmarks/toy_pretrain.md).
        text_steps: SD3 only: steps of contrastive pretraining of the two text encoders against
            image towers before the denoiser trains (`pretrain_text.pretrain_text_encoders`);
            0 = train them jointly with the denoiser (the first-generation miniature).
        freeze_text: SD3 only: keep the text encoders frozen while the denoiser trains.
        pooled_drop: SD3 only: share of samples trained with the empty prompt's pooled vector
            (the sequence then has to carry the caption).
        caption_omit: SD3 only: share of captions with an attribute or the relation left out
            (`pretrain_common.omit`; text-encoder and denoiser stages).
        snapshots: SD3 only: also save the EMA model after these steps, as `toy_sd3_step<N>`
            beside the final folder (training lengths compared in one run).
        vae_from: a pipeline folder whose trained VAE is reused instead of training one (the
            bundled miniatures share one VAE: `--vae-from src/softrepa/assets/toy_sd15`).
        sd3: `build_sd3_components` keyword arguments.
        sd15: `build_sd15_components` keyword arguments.
        sd15_prediction: "v_prediction" (default; see `pretrain_sd15` for why) or "epsilon".
        threads: torch intra-op threads per process (1 is fastest on a busy 2-core machine).
        parallel: with both backbones, train them in two processes at once.
        vae_amp: bf16 autocast in the VAE stage (its 32x32 convolutions run ~1.4x faster).
        amp: bf16 autocast in the diffusion stages (off: at this size the casts cost more than
            they save, measured 1.6x slower on this machine). Weights always stay fp32.
        roundtrip_n: fresh scenes for the VAE round-trip judge report (0 = skip).
    """

    seed: int = 0
    n_images: int = 16384
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    vae_channels: tuple[int, ...] = (16, 32, 64)
    sd3_steps: int = 4000
    sd15_steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    caption_dropout: float = 0.1
    caption_noise: float = 0.0
    text_steps: int = 1500
    freeze_text: bool = True
    pooled_drop: float = 0.8
    caption_omit: float = 0.7
    vae_from: str | None = None
    snapshots: tuple[int, ...] = ()
    sd3: dict = field(default_factory=lambda: dict(width=64, layers=6, heads=4, text_width=64, text_layers=3,
                                                   patch_size=2, tokenizer="word"))
    sd15: dict = field(default_factory=lambda: dict(channels=(32, 64, 64), heads=4, layers_per_block=1,
                                                    text_width=64, text_layers=3))
    sd15_prediction: str = "v_prediction"
    threads: int | None = 1
    parallel: bool = True
    vae_amp: bool = True
    amp: bool = False
    roundtrip_n: int = 256


def load_vae(folder: str | Path):
    """The trained `AutoencoderKL` of a pipeline folder (its `vae/` subfolder), frozen.

    Args:
        folder: a pipeline folder (e.g. the bundled `toy_sd15`) or its `vae/` subfolder.
    Raises:
        FileNotFoundError: when no VAE config is found there.
    """
    from diffusers import AutoencoderKL

    folder = Path(folder)
    sub = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no vae/config.json (expected a pipeline folder with a trained VAE)")
    return AutoencoderKL.from_pretrained(sub).eval().requires_grad_(False)


def _save(pipe, path: Path) -> dict:
    """save_pretrained (safetensors) into a fresh folder; returns parameter counts and MB."""
    if path.exists():
        shutil.rmtree(path)  # only the pipeline subfolder this run owns: no stale files
    pipe.save_pretrained(path, safe_serialization=True)
    parts = {name: param_count(getattr(pipe, name, None))
             for name in ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
             if isinstance(getattr(pipe, name, None), torch.nn.Module)}
    return {"parameters": parts, "parameters_total": sum(parts.values()),
            "megabytes": round(folder_megabytes(path), 2)}


def _backbone_job(name: str, cfg: "PretrainConfig", data: WorldImages, latents, vae, path: Path,
                  base: dict) -> dict:
    """Train one backbone on the cached latents and save it (also the body of a spawned child).

    Args:
        name: "sd3" or "sd15".
        cfg: run configuration.
        data: training scenes (captions).
        latents: (mean, std) VAE posteriors of `data`.
        vae: the trained VAE (its config holds the latent scale / shift).
        path: pipeline folder to write.
        base: record fields shared by both backbones (config, latent stats, VAE report).
    Returns:
        The record written to `path/pretrain.json` (train log, sizes, stage seconds).
    """
    set_threads(cfg.threads)
    seed = cfg.seed + (1 if name == "sd3" else 2)  # each backbone its own, fixed stream
    seed_everything(seed)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    timer = Timer()
    with timer.stage(f"{name}_train"):
        if name == "sd3":
            parts = build_sd3_components(seed, **cfg.sd3)
            text_log = None
            if cfg.text_steps:
                text_log = pretrain_text_encoders([parts["text_encoder"], parts["text_encoder_2"]],
                                                  parts["tokenizer"], data, cfg.text_steps,
                                                  omit_share=cfg.caption_omit, seed=seed)
                print(f"[toy pretrain] text encoders: loss {text_log['loss']:.3f}, in-batch retrieval "
                      f"{text_log['retrieval']:.2f} ({text_log['seconds']:.0f} s)", flush=True)
            def snapshot(step: int) -> None:
                _save(assemble_sd3(parts, vae), path.parent / f"{path.name}_step{step}")

            log = train_sd3(parts, latents, data, scale, shift, cfg.sd3_steps, cfg.batch_size, cfg.lr,
                            cfg.caption_dropout, seed=seed, amp=cfg.amp, freeze_text=cfg.freeze_text,
                            pooled_drop=cfg.pooled_drop, caption_omit=cfg.caption_omit,
                            snapshot_steps=tuple(cfg.snapshots), on_snapshot=snapshot)
            log["text_encoders"] = text_log
            pipe = assemble_sd3(parts, vae)
        else:
            parts = build_sd15_components(seed, **cfg.sd15)
            log = train_sd15(parts, latents, data, scale, cfg.sd15_steps, cfg.batch_size, cfg.lr,
                             cfg.caption_dropout, prediction_type=cfg.sd15_prediction, seed=seed, amp=cfg.amp)
            pipe = assemble_sd15(parts, vae, cfg.sd15_prediction)
    with timer.stage(f"{name}_save"):
        record = base | {"backbone": name, "train": log}
        record["sizes"] = _save(pipe, path)
    record["stage_seconds"] = {k: round(v, 1) for k, v in timer.stages.items()}
    (path / "pretrain.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    sizes = record["sizes"]
    print(f"[toy pretrain] {name}: {sizes['parameters_total'] / 1e6:.2f} M parameters, "
          f"{sizes['megabytes']:.1f} MB on disk, final loss {log['loss']:.4f}", flush=True)
    return record


def pretrain(backbone: str, out: str | Path, cfg: PretrainConfig | None = None) -> dict:
    """Train the VAE and the requested miniature pipeline(s), and save them under `out`.

    Args:
        backbone: "sd3", "sd15" or "both".
        out: output directory; pipelines go to `out/toy_sd3`, `out/toy_sd15` (replaced).
        cfg: run configuration (defaults = the bundled assets).
    Returns:
        Summary dict: config, per-stage seconds, VAE report, and per backbone its folder,
        sizes and training loss.
    """
    if backbone not in BACKBONES:
        raise UsageError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    cfg = cfg or PretrainConfig()
    wanted = ("sd3", "sd15") if backbone == "both" else (backbone,)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    timer, t_start = Timer(), time.perf_counter()
    summary: dict = {"config": asdict(cfg), "backbones": {}}

    with timer.stage("render"):
        data = WorldImages(cfg.n_images, cfg.seed, caption_noise=cfg.caption_noise)
    with timer.stage("vae"):
        if cfg.vae_from:
            vae = load_vae(cfg.vae_from)
            summary["vae_train"] = {"from": str(cfg.vae_from)}
        else:
            vae = build_vae(cfg.vae_channels, seed=cfg.seed)
            summary["vae_train"] = train_vae(vae, data, cfg.vae_steps, cfg.vae_batch_size, cfg.vae_lr,
                                             cfg.kl_weight, seed=cfg.seed, amp=cfg.vae_amp)
    with timer.stage("encode"):
        # a reused VAE encodes in fp32: autocast only pays while training it (and on CPUs without
        # fast bf16 it is >10x slower: measured 5.1 s vs 0.36 s per 128 images on this machine)
        latents = encode_posteriors(vae, data, amp=cfg.vae_amp and not cfg.vae_from)
        if cfg.vae_from:  # keep the reused VAE's scale / shift: the other miniature samples with them
            scale, shift = vae.config.scaling_factor, vae.config.shift_factor
        else:
            scale, shift = set_latent_scale(vae, latents[0])
        summary["latent"] = {"scaling_factor": scale, "shift_factor": shift,
                             "shape": list(latents[0].shape[1:]), "posterior_std": float(latents[1].mean())}
    if cfg.roundtrip_n:
        with timer.stage("vae_check"):
            rep = vae_roundtrip_report(vae, cfg.roundtrip_n)
            summary["vae_roundtrip"] = {"accuracy": rep["roundtrip"]["accuracy"],
                                        "clean_accuracy": rep["clean"]["accuracy"], "l1": rep["l1"],
                                        "categories": {k: v["accuracy"] for k, v in
                                                       rep["roundtrip"]["categories"].items() if v["n"]}}
            print(f"[toy pretrain] VAE round trip: judge accuracy {rep['roundtrip']['accuracy']:.3f} "
                  f"(clean renders {rep['clean']['accuracy']:.3f}), L1 {rep['l1']:.4f}", flush=True)

    base = {"config": asdict(cfg), "latent": summary["latent"], "vae_roundtrip": summary.get("vae_roundtrip")}
    jobs = [(name, cfg, data, latents, vae, out / FOLDERS[name], base) for name in wanted]
    if len(jobs) > 1 and cfg.parallel:
        # One process per backbone, one thread each: on a 2-core machine the two trainings
        # then run side by side (~2x less wall time than one after the other, same results:
        # each backbone has its own seed stream and single-threaded kernels).
        with timer.stage("+".join(wanted) + " (parallel)"):
            ctx = torch.multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_backbone_job, args=job, name=f"toy-{job[0]}") for job in jobs]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            failed = [p.name for p in procs if p.exitcode != 0]
            if failed:
                raise RuntimeError(f"pretraining failed in {failed} (see the output above)")
        results = [json.loads((job[5] / "pretrain.json").read_text()) for job in jobs]
    else:
        results = [_backbone_job(*job) for job in jobs]  # each times its own stages
    for name, res in zip(wanted, results):
        summary["backbones"][name] = {"path": str(out / FOLDERS[name]), "train": res["train"],
                                      "sizes": res["sizes"]}
        timer.stages.update(res["stage_seconds"])
    summary["stage_seconds"] = {k: round(v, 1) for k, v in timer.stages.items()}
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)  # wall clock (stages may overlap)
    return summary


__all__ = ["ASSETS_DIR", "BACKBONES", "FOLDERS", "PretrainConfig", "pretrain"]
