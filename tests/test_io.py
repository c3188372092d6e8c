"""Safetensors artefacts: round trip, layout checks that name the field, corrupt files."""

from __future__ import annotations

import json

import pytest
import torch

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, SoftTokensError, load_soft_tokens, save_soft_tokens


def test_round_trip_and_sidecar(tmp_path, sd3_model):
    tokens = SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=3, num_tokens=2))
    path = save_soft_tokens(tokens, tmp_path / "tok")
    assert path.name == "tok.safetensors"
    loaded = load_soft_tokens(path)
    assert loaded.layout == tokens.layout
    assert torch.equal(loaded.base, tokens.base) and torch.equal(loaded.time, tokens.time)
    side = json.loads((tmp_path / "tok.json").read_text())
    assert side["layout"]["family"] == "sd3" and side["softrepa_version"] == softrepa.__version__
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_time_part_round_trip(tmp_path, unet_model):
    tokens = SoftTokens.for_model(unet_model, SoftTokensConfig(time_buckets=0))
    loaded = load_soft_tokens(save_soft_tokens(tokens, tmp_path / "t.safetensors"))
    assert loaded.time is None and torch.equal(loaded.base, tokens.base)


def test_mismatched_model_names_the_field(tmp_path, sd3_model):
    from softrepa.tiny import tiny_sd3_transformer

    path = save_soft_tokens(SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=5)), tmp_path / "t")
    narrow = tiny_sd3_transformer(num_layers=6, caption_projection_dim=64)
    with pytest.raises(SoftTokensError, match="model_dim"):
        softrepa.load_into(narrow, path)
    shallow = tiny_sd3_transformer(num_layers=3)
    with pytest.raises(SoftTokensError, match="layers"):
        softrepa.load_into(shallow, path)
    other_text = tiny_sd3_transformer(num_layers=6, joint_attention_dim=48)
    with pytest.raises(SoftTokensError, match="token_dim"):
        softrepa.load_into(other_text, path)


def test_corrupt_files(tmp_path, sd3_model):
    path = save_soft_tokens(SoftTokens.for_model(sd3_model), tmp_path / "t")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SoftTokensError, match="trunc.safetensors"):
        load_soft_tokens(tmp_path / "trunc.safetensors")
    torch.save({"x": torch.ones(2)}, tmp_path / "pickle.pth")
    with pytest.raises(SoftTokensError, match="not a readable safetensors"):
        load_soft_tokens(tmp_path / "pickle.pth")
    with pytest.raises(SoftTokensError, match="no such tokens file"):
        load_soft_tokens(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"base": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(SoftTokensError, match="softrepa_layout"):
        load_soft_tokens(tmp_path / "foreign.safetensors")


def test_shape_mismatch_in_file_is_named(tmp_path, sd3_model):
    from safetensors.torch import save_file

    tokens = SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2))
    meta = {"softrepa_layout": json.dumps(tokens.layout.to_dict())}
    save_file({"base": torch.zeros(3, 4, 5), "time": tokens.time.detach()}, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(SoftTokensError, match="'base' has shape"):
        load_soft_tokens(tmp_path / "bad.safetensors")
