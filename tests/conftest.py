"""Shared fixtures: tiny models built from configs (no downloads, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower test (CLI runs on saved folders); runs in the normal "
                                       "suite, `-m 'not slow'` leaves it out")


@pytest.fixture
def sd3_model():
    from softrepa.tiny import tiny_sd3_transformer

    return tiny_sd3_transformer(num_layers=6)


@pytest.fixture(params=["sd3-medium", "sd3.5"])
def mmdit_model(request):
    """SD3-medium layout, and SD3.5's (qk RMS-norm + dual attention in the first blocks)."""
    from softrepa.tiny import tiny_sd3_transformer

    if request.param == "sd3.5":
        return tiny_sd3_transformer(num_layers=6, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    return tiny_sd3_transformer(num_layers=6)


@pytest.fixture(params=["sd15", "sdxl"])
def unet_model(request):
    from softrepa.tiny import tiny_unet

    return tiny_unet(sdxl=request.param == "sdxl")


def mmdit_inputs(model, batch: int = 3, seed: int = 0, timesteps=None):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = 8
    hs = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    ehs = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor(timesteps if timesteps is not None else [1000.0, 503.7, 9.0][:batch])
    return dict(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=t)


def unet_inputs(model, batch: int = 3, seed: int = 0, timesteps=None):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    sample = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    ehs = torch.randn(batch, 6, cfg.cross_attention_dim, generator=g)
    t = torch.tensor(timesteps if timesteps is not None else [999, 503, 9][:batch])
    kw = dict(sample=sample, timestep=t, encoder_hidden_states=ehs)
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled_dim, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(batch, 1),
        }
    return kw


def randomize_tokens(tokens, seed: int = 1, std: float = 0.5):
    """Give tokens large random values so that their effect is far above float noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tokens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return tokens


def write_square_images(folder, colours=None):
    """A tiny image-folder dataset: one 40 x 40 white image per colour with a square of that colour
    (shifted by its index) and the caption "a <colour> square"."""
    import numpy as np
    from PIL import Image

    colours = colours or {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20)}
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(colours.items()):
        a = np.full((40, 40, 3), 255, np.uint8)
        a[8 + i:28 + i, 10:30] = rgb
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} square\n")
    return folder


def one_training_step(tmp_path, pipe, objective: str, *overrides: str) -> tuple:
    """One step of the one trainer on an in-memory `pipe` (three square images, 2 token blocks, tau 2):
    (the tokens file, the metrics.jsonl rows). `overrides` are further `--key value` training options."""
    import json

    from softrepa.config import load_config, parse_overrides
    from softrepa.train import run_training

    write_square_images(tmp_path / "data")
    cfg = load_config(None, parse_overrides([
        "--model", "tiny", "--data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
        "--resolution", "32", "--batch_size", "3", "--max_steps", "1", "--num_workers", "0",
        "--checkpoint_every", "1", "--log_every", "1", "--validation.every", "0", "--tokens.num_layers", "2",
        "--tokens.init", "normal", "--loss.tau", "2.0", "--objective", objective, *overrides]))
    path = run_training(cfg, progress=False, pipe=pipe)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return path, rows
