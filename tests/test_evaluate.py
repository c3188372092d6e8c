"""Evaluation: metric definitions, published-checkpoint layouts, CLI plumbing, compare.

Every model here is built from a tiny config with random weights (no download): CLIP / PickScore
as a tiny `CLIPModel`, HPSv2 as a tiny open_clip-layout state dict, ImageReward as tiny BLIP dims,
LPIPS with a random AlexNet. The published checkpoints' key -> shape tables (full size) are
loaded strictly into the real architectures on the meta device. FID's plumbing may use the
clearly labelled `test_only_random_features` extractor; the FID math is tested exactly.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from softrepa.cli import main as cli_main
from softrepa.evaluation import load_metric
from softrepa.evaluation import load_metrics_config as load_config
from softrepa.evaluation.clip_models import hf_clip_config, openclip_state_shapes, openclip_to_hf
from softrepa.evaluation.common import WeightsError, check_keys, clip_pixels, load_on_meta
from softrepa.evaluation.imagereward import ImageRewardModel, convert_imagereward, imagereward_state_shapes
from softrepa.evaluation.inception import (FIDInceptionV3, feature_stats, fid_from_features, fid_inception_state_shapes,
                                           frechet_from_stats, load_fid)
from softrepa.evaluation.lpips import CHANNELS, LPIPSNet, backbone_state_shapes, load_lpips, packaged_lin_weights
from softrepa.toy.world import WorldDataset

TINY_OC = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 80, "width": 32, "heads": 2, "layers": 2}}
TINY_MED = {"vocab_size": 80, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 40, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "pad_token_id": 0}
TINY_VIT = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}


def _random_sd(shapes: dict, seed: int, scale: float = 0.1) -> dict:
    """Random tensors with exactly the given keys / shapes (norm scales near 1, counters 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros(s, dtype=torch.long)
        elif k.endswith("position_ids"):
            out[k] = torch.arange(s[-1]).expand(s).clone()
        elif k.endswith("running_var") or (k.endswith("weight") and any(n in k for n in ("ln_", "norm", "LayerNorm", ".bn."))):
            out[k] = 1 + scale * torch.randn(s, generator=g)
        else:
            out[k] = scale * torch.randn(s, generator=g)
    return out


def _bert_tokenizer():
    import inspect

    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, ".", ","]
    words += ["##" + c for c in string.ascii_lowercase] + ["red", "blue", "green", "circle", "square", "left", "of"]
    vocab = {w: i for i, w in enumerate(words)}
    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 5
        return BertTokenizer(vocab=vocab)
    raise pytest.skip("tiny BERT tokenizer needs transformers 5")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny weights for every metric on disk, and a metrics config pointing at them."""
    from transformers import CLIPConfig, CLIPModel

    from softrepa.tiny import make_clip_tokenizer

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    tok = make_clip_tokenizer(model_max_length=77)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16))
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    torch.save({"state_dict": _random_sd(openclip_state_shapes(TINY_OC), 1)}, root / "HPS_v2.1_compressed.pt")  # the default version, v2.1
    torch.save(_random_sd(imagereward_state_shapes(TINY_MED, TINY_VIT), 2), root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps(TINY_MED))
    _bert_tokenizer().save_pretrained(root / "bert")
    alex = {k: v for k, v in _random_sd(backbone_state_shapes("alex"), 3).items() if k.startswith("features.")}
    torch.save(alex, root / "alexnet-owt-7be5be79.pth")
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS["alex"])}
    torch.save(lin, root / "alex_lin.pth")
    cfg = {"offline": True, "clip": {"model": str(root / "clip")},
           "pickscore": {"model": str(root / "clip"), "tokenizer": str(root / "clip")},
           "hps": {"weights": str(root), "architecture": TINY_OC, "tokenizer": str(root / "clip")},
           "imagereward": {"weights": str(root / "ImageReward.pt"), "med_config": str(root), "vision": TINY_VIT,
                           "tokenizer": str(root / "bert")},
           "fid": {"test_only_random_features": True},
           "lpips": {"net": "alex", "backbone_weights": str(root), "lin_weights": str(root / "alex_lin.pth"),
                     "resize": 64}}
    return root, cfg


def _toy_folder(path, n=6, seed=0, cfg_scale=7.0, with_metadata=True):
    ds = WorldDataset(n, seed=seed, split="all", canonical=True)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        item = ds[i]
        item["image"].save(path / f"{i:04d}.png")
        rows.append({"file": f"{i:04d}.png", "prompt": item["caption"], "guidance_scale": cfg_scale, "seed": i})
    if with_metadata:
        (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# ----------------------------------------------------------------------------------- end to end

def test_evaluate_cli_end_to_end(tmp_path, assets, capsys):
    root, cfg = assets
    rows = _toy_folder(tmp_path / "gen", n=6, seed=0)
    _toy_folder(tmp_path / "ref", n=6, seed=1, with_metadata=False)  # same file names, other scenes
    (tmp_path / "metrics.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    rc = cli_main(["evaluate", "--images", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                   "--metrics", "imagereward,pickscore,clip,hps,fid,lpips,world", "--metrics-config",
                   str(tmp_path / "metrics.yaml"), "--batch-size", "4", "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["errors"] == {} and res["run"]["cfg"] == 7.0 and res["n_images"] == 6
    for name in ("imagereward", "pickscore", "clip", "hps", "lpips", "world"):
        m = res["metrics"][name]
        assert m["count"] == 6 and np.isfinite(m["mean"]) and m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    assert res["metrics"]["fid"]["features"].startswith("TEST-ONLY") and res["metrics"]["fid"]["n_reference"] == 6
    assert "same file name" in res["metrics"]["lpips"]["pairs"]
    assert res["metrics"]["world"]["mean"] == 1.0 and res["metrics"]["world"]["quality_proxy"] >= 0
    with open(tmp_path / "out" / "per_image.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["file"] for r in table] == [r["file"] for r in rows]
    assert {"imagereward", "pickscore", "clip", "hps", "lpips", "world"} <= set(table[0])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| clip |" in md and "95% CI" in md and "World alignment by category" in md
    assert (tmp_path / "out" / "results.csv").read_text().startswith("metric,mean,std,ci95_low,ci95_high,count")
    # the world quality proxy is a row of its own everywhere a summary is shown: value, n, no CI
    q = res["metrics"]["world"]["quality_proxy"]
    assert f"| world_quality_proxy | {q:.4f} |  |  | 6 |" in md
    with open(tmp_path / "out" / "results.csv") as f:
        qrow = next(r for r in csv.DictReader(f) if r["metric"] == "world_quality_proxy")
    assert float(qrow["mean"]) == pytest.approx(q) and qrow["count"] == "6" and qrow["ci95_low"] == ""
    printed = capsys.readouterr().out
    assert any(line.split()[:2] == ["world_quality_proxy", f"{q:.4f}"] and "(n=6)" in line and "CI" not in line
               for line in printed.splitlines())


def test_world_metrics_are_exact_on_rendered_scenes(tmp_path):
    from softrepa.evaluation import evaluate

    _toy_folder(tmp_path / "gen", n=10, seed=5)
    res = evaluate(tmp_path / "gen", tmp_path / "out", metrics=["world"], progress=False)
    w = res["metrics"]["world"]
    assert w["accuracy"] == 1.0 and w["mean"] == 1.0 and w["count"] == 10
    assert all(t["accuracy"] == 1.0 for t in w["categories"].values() if t["n"])


def test_missing_weights_are_named_and_other_metrics_still_run(tmp_path, assets):
    root, cfg = assets
    _toy_folder(tmp_path / "gen", n=3)
    bad = {**cfg, "hps": {**cfg["hps"], "weights": str(tmp_path / "nowhere" / "HPS_v2_compressed.pt")},
           "imagereward": {**cfg["imagereward"], "weights": "THUDM/ImageReward"},
           "lpips": {**cfg["lpips"], "backbone_weights": None}}
    (tmp_path / "m.yaml").write_text(json.dumps(bad))
    rc = cli_main(["evaluate", "--images", str(tmp_path / "gen"), "--metrics", "clip,hps,imagereward,lpips,fid",
                   "--metrics-config", str(tmp_path / "m.yaml"), "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path / "out")])
    assert rc == 1
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert np.isfinite(res["metrics"]["clip"]["mean"]) and "error" not in res["metrics"]["clip"]
    e = res["errors"]
    assert "HPS_v2_compressed.pt" in e["hps"] and "huggingface.co/xswu/HPSv2" in e["hps"]
    assert "THUDM/ImageReward" in e["imagereward"] and "offline" in e["imagereward"]
    assert "vgg16" not in e["lpips"] and "alexnet-owt-7be5be79.pth" in e["lpips"] and "download.pytorch.org" in e["lpips"]
    assert "--reference" in e["fid"]
    assert set(res["metrics"]) == {"clip", "hps", "imagereward", "lpips", "fid"}
    assert "ERROR" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(WeightsError, match="offline"):
        load_metric("clip", load_config(overrides={"offline": True, "clip": {"model": "openai/clip-vit-large-patch14"}}))


def test_missing_local_weights_are_reported_as_local_paths_not_hub_ids(tmp_path, monkeypatch):
    """metrics.yaml values as docs/evaluation.md writes them, with the files absent."""
    monkeypatch.chdir(tmp_path)
    cwd = str(Path.cwd())
    note = f"(relative paths are relative to the current directory {cwd})"
    cases = {  # metric -> (config, the local path the message must name)
        "fid": ({"weights": "weights/pt_inception-2015-12-05-6726825d.pth"},
                "weights/pt_inception-2015-12-05-6726825d.pth"),
        "hps": ({"weights": "HPS_v2_compressed.pt"}, "HPS_v2_compressed.pt"),  # suffix, no slash: still local
        "clip": ({"model": "weights/models/clip-vit-large-patch14"}, "weights/models/clip-vit-large-patch14"),
        "lpips": ({"backbone_weights": "./weights/vgg16"}, "weights/vgg16"),
    }
    for name, (section, rel) in cases.items():
        with pytest.raises(WeightsError) as err:
            load_metric(name, load_config(overrides={"offline": True, name: section}))
        msg = str(err.value)
        assert f"local path not found: {os.path.join(cwd, rel)} {note}" in msg, msg
        assert "hub id" not in msg and "hub repo" not in msg and "offline" not in msg, msg
        assert "http" in msg  # the "download it from / published at <url>" hint is kept
    # a genuine "org/name" shape is still tried as a hub id, and the message says it is not a folder either
    with pytest.raises(WeightsError) as err:
        load_metric("pickscore", load_config(overrides={"offline": True, "pickscore": {"model": "weights/PickScore_v1"}}))
    msg = str(err.value)
    assert "hub id 'weights/PickScore_v1'" in msg and "offline" in msg
    assert f"no local folder {os.path.join(cwd, 'weights', 'PickScore_v1')} exists either {note}" in msg
    assert "huggingface.co/yuvalkirstain/PickScore_v1" in msg
    with pytest.raises(WeightsError, match="no local folder .*ImageReward exists either"):
        load_metric("imagereward", load_config(overrides={"offline": True, "imagereward": {"weights": "weights/ImageReward"}}))


# ------------------------------------------------------------------------------- score definitions

def _images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8 * (i % 2), 3), dtype=np.uint8)) for i in range(n)]


PROMPTS = ["a red circle", "a blue square on the left", "two green things", "a circle", "red"]


@pytest.mark.parametrize("name", ["clip", "pickscore", "hps", "imagereward"])
def test_scores_invariant_to_batch_size_and_order(assets, name):
    _, cfg = assets
    scorer = load_metric(name, load_config(overrides=cfg))
    ims = _images(5)
    whole = scorer.score(ims, PROMPTS)
    ones = np.concatenate([scorer.score([im], [p]) for im, p in zip(ims, PROMPTS)])
    rev = scorer.score(ims[::-1], PROMPTS[::-1])[::-1]
    np.testing.assert_allclose(ones, whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rev, whole, rtol=0, atol=1e-5)
    assert len(np.unique(np.round(whole, 6))) > 1  # the scores depend on the inputs


def test_clip_score_is_cosine_of_normalised_embeddings(assets):
    _, cfg = assets
    c = load_config(overrides=cfg)
    scorer = load_metric("clip", c)
    m, tok = scorer.model, scorer.tokenizer
    ims = _images(4)
    with torch.no_grad():
        pix = clip_pixels(ims, 32)
        t = tok(PROMPTS[:4], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        img = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        txt = m.text_projection(m.text_model(**t).pooler_output)
    cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1).double().numpy()
    np.testing.assert_allclose(scorer.score(ims, PROMPTS[:4]), cos, atol=1e-6)  # paper scale: raw cosine
    hessel = load_metric("clip", load_config(overrides={**c, "clip": {**c["clip"], "w": 2.5, "clamp_zero": True}}))
    np.testing.assert_allclose(hessel.score(ims, PROMPTS[:4]), 2.5 * np.maximum(cos, 0), atol=1e-6)
    pick = load_metric("pickscore", c)
    np.testing.assert_allclose(pick.score(ims, PROMPTS[:4]), float(m.logit_scale.detach().exp()) * cos, rtol=1e-5)


def _openclip_reference(sd, arch, pixels, ids):
    """open_clip's CLIP.encode_image / encode_text written directly on the open_clip state dict."""
    def block(x, p, heads, mask):
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        mha = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                             "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        return x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])

    v, t = arch["vision_cfg"], arch["text_cfg"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(v["layers"]):
        x = block(x, f"visual.transformer.resblocks.{i}.", v["width"] // v["head_width"], None)
    img = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(t["layers"]):
        x = block(x, f"transformer.resblocks.{i}.", t["heads"], mask)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    txt = x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_hps_openclip_conversion_matches_a_direct_openclip_forward():
    from transformers import CLIPModel

    sd = _random_sd(openclip_state_shapes(TINY_OC), 7, scale=0.2)
    model = load_on_meta(lambda: CLIPModel(hf_clip_config(TINY_OC)), openclip_to_hf(sd), metric="hps", path="mem").eval()
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.zeros(3, 77, dtype=torch.long)
    for i, n in enumerate((4, 9, 15)):
        ids[i, :n] = torch.randint(1, 70, (n,))
        ids[i, n] = 79  # EOT: the largest id, as in the CLIP vocabulary
    with torch.no_grad():
        ref_img, ref_txt = _openclip_reference(sd, TINY_OC, pixels, ids)
        img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        txt = F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- published checkpoint layouts

def _meta_sd(shapes):
    return {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith(("position_ids", "num_batches_tracked"))
                           else torch.float32) for k, s in shapes.items()}


def test_published_checkpoint_layouts_load_strictly():
    from transformers import CLIPModel

    # HPS_v2_compressed.pt: open_clip ViT-H-14 (686 tensors) -> transformers CLIPModel
    hps = openclip_state_shapes("ViT-H-14")
    assert len(hps) == 686 and hps["visual.positional_embedding"] == (257, 1280) and hps["text_projection"] == (1024, 1024)
    load_on_meta(lambda: CLIPModel(hf_clip_config("ViT-H-14")), openclip_to_hf(_meta_sd(hps)), metric="hps", path="table")
    # ImageReward.pt: BLIP ViT-L/16 + BERT-base with cross-attention + MLP (625 tensors)
    ir = imagereward_state_shapes()
    assert len(ir) == 625 and ir["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    load_on_meta(lambda: ImageRewardModel(), convert_imagereward(_meta_sd(ir)), metric="imagereward", path="table")
    # pt_inception-2015-12-05-6726825d.pth (566 tensors; 472 without the BatchNorm counters)
    fid = fid_inception_state_shapes()
    assert len(fid) == 566 and len(fid_inception_state_shapes(False)) == 472
    model = FIDInceptionV3()
    check_keys(_meta_sd(fid), {k: tuple(v.shape) for k, v in model.state_dict().items()}, metric="fid", path="table")
    # torchvision vgg16-397923af.pth features + lpips vgg.pth linear layers
    vgg = {k: s for k, s in backbone_state_shapes("vgg").items() if k.startswith("features.")}
    vgg |= {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(CHANNELS["vgg"])}
    assert len(vgg) == 26 + 5
    net = LPIPSNet("vgg")
    net.load_state_dict(_random_sd(vgg, 0), strict=True)
    with pytest.raises(WeightsError, match="1 missing"):
        check_keys(_meta_sd({k: s for k, s in vgg.items() if k != "lin4.model.1.weight"}),
                   {k: tuple(v.shape) for k, v in net.state_dict().items()}, metric="lpips", path="table")


def test_fid_inception_loads_the_published_file_layout(tmp_path):
    sd = _random_sd(fid_inception_state_shapes(with_num_batches_tracked=False), 11, scale=0.05)
    torch.save(sd, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    ext = load_fid({"weights": str(tmp_path)})
    feats = ext.features(_images(3, size=48))  # one pass only: a 299 px Inception is slow on 2 CPU cores
    assert feats.shape == (3, 2048) and np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])
    # FID(X, X) = 0 through the real extractor, whatever the image order; X vs a subset is not 0
    assert fid_from_features(feats, feats[::-1]) == pytest.approx(0.0, abs=1e-6 * np.abs(feats).max() ** 2)
    assert fid_from_features(feats, feats[:2]) > 1e-6


def test_fid_low_rank_path_equals_the_eigh_path():
    rng = np.random.default_rng(3)
    for n1, n2, d in [(5, 7, 40), (12, 3, 64), (30, 30, 31)]:
        a, b = rng.normal(size=(n1, d)), rng.normal(0.3, 1.5, size=(n2, d))
        full = frechet_from_stats(*feature_stats(a), *feature_stats(b))
        # the D x D path takes square roots of round-off eigenvalues of rank-deficient
        # covariances (sqrt(1e-15) ~ 3e-8 each), so the two agree to ~1e-7 relative, not 1e-12
        assert fid_from_features(a, b) == pytest.approx(full, rel=1e-6)


# ---------------------------------------------------------------------------------------- FID math

def _fid_numpy(a, b):
    """pytorch-fid's formula: tr sqrt(S1 S2) from the eigenvalues of the (non-symmetric) product."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev.astype(complex)).real.sum())


def test_fid_math():
    from softrepa.toy.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(a, b) == pytest.approx(_fid_numpy(a, b), rel=1e-9)
    assert fid_from_features(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-12)
    mu, cov = np.zeros(3), np.diag([1.0, 4.0, 9.0])  # closed form for commuting covariances
    assert frechet_from_stats(mu, cov, mu + 1, np.eye(3)) == pytest.approx(3 + (0 + 1 + 4))


# -------------------------------------------------------------------------------------------- LPIPS

def test_lpips_zero_on_identical_images_and_positive_otherwise(assets):
    _, cfg = assets
    scorer = load_lpips(cfg["lpips"])
    a, b = _images(3, seed=1), _images(3, seed=2)
    np.testing.assert_array_equal(scorer.distance(a, a), np.zeros(3))
    d = scorer.distance(a, b)
    assert (d > 0).all()
    np.testing.assert_allclose(scorer.distance(a[::-1], b[::-1])[::-1], d, atol=1e-6)
    uint8 = load_lpips({**cfg["lpips"], "input_range": "authors_uint8"})
    assert not np.allclose(uint8.distance(a, b), d)


def test_lpips_finds_the_lpips_wheels_weights_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing lpips needs torchvision')\n")
    (pkg / "weights" / "v0.1" / "vgg.pth").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    assert packaged_lin_weights("vgg") == pkg / "weights" / "v0.1" / "vgg.pth"


# ------------------------------------------------------------------------------ inputs and compare

def test_prompt_file_and_summary_statistics(tmp_path):
    from softrepa.evaluation import read_items, summarize

    _toy_folder(tmp_path / "gen", n=3, with_metadata=False)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\na green triangle\n")
    items = read_items(tmp_path / "gen", tmp_path / "p.txt")
    assert [it.prompt for it in items] == ["a red circle", "a blue square", "a green triangle"]
    (tmp_path / "short.txt").write_text("one\n")
    with pytest.raises(ValueError, match="1 prompts for 3 images"):
        read_items(tmp_path / "gen", tmp_path / "short.txt")
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["count"] == 3
    assert s["ci95"] == pytest.approx([2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5])


def test_world_ci_is_the_wilson_interval_inside_0_1(tmp_path):
    from softrepa.evaluation import evaluate, summarize

    _toy_folder(tmp_path / "gen", n=2, seed=4)
    Image.new("RGB", Image.open(tmp_path / "gen" / "0001.png").size, (255, 255, 255)).save(tmp_path / "gen" / "0001.png")
    res = evaluate(tmp_path / "gen", tmp_path / "out", metrics=["world"], progress=False)  # one hit, one blank miss
    w = res["metrics"]["world"]
    assert w["count"] == 2 and w["mean"] == 0.5 and w["ci95_method"] == "wilson"
    z, n, p = 1.959964, 2, 0.5
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert w["ci95"] == pytest.approx([center - half, center + half], abs=1e-12)
    assert 0.0 <= w["ci95"][0] < 0.5 < w["ci95"][1] <= 1.0
    # the t interval of the same values is what reached [-5.85, 6.85]; continuous metrics keep it
    assert summarize([0.0, 1.0])["ci95"] == pytest.approx([-5.853, 6.853], abs=1e-3)
    # all hits / all misses: the interval still has width and touches the bound it should
    lo, hi = summarize([1.0] * 5, binary=True)["ci95"]
    assert hi == 1.0 and 0.5 < lo < 1.0
    lo, hi = summarize([0.0], binary=True)["ci95"]
    assert lo == 0.0 and 0.5 < hi < 1.0


def test_world_quality_proxy_is_reported_and_compared(tmp_path):
    from softrepa.evaluation import evaluate

    _toy_folder(tmp_path / "ref", n=6, seed=9, with_metadata=False)
    res = {}
    for name, seed in (("a", 1), ("b", 2)):
        _toy_folder(tmp_path / name, n=4, seed=seed)
        res[name] = evaluate(tmp_path / name, tmp_path / f"eval_{name}", metrics=["world"],
                             reference=tmp_path / "ref", progress=False)
    qa, qb = (res[k]["metrics"]["world"]["quality_proxy"] for k in ("a", "b"))
    assert qa != qb
    assert f"| world_quality_proxy | {qa:.4f} |  |  | 4 |" in (tmp_path / "eval_a" / "results.md").read_text()
    assert cli_main(["compare", str(tmp_path / "eval_a"), str(tmp_path / "eval_b"), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "world_quality_proxy ↓" in md and f"{qb:.4f} ({qb - qa:+.4f})" in md
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["delta_world_quality_proxy"]) == pytest.approx(qb - qa)


def test_compare_warns_when_a_sweep_lacks_the_curve_metrics(tmp_path, caplog):
    from softrepa.evaluation import compare_runs

    runs = []
    for cfg in (9.0, 11.0):
        d = tmp_path / f"cfg{cfg:g}"
        d.mkdir()
        m = {"imagereward": {"mean": cfg / 10, "ci95": None, "count": 3}, "clip": {"mean": 0.26, "ci95": None, "count": 3}}
        (d / "results.json").write_text(json.dumps({"n_images": 3, "metrics": m, "errors": {}, "run": {"cfg": cfg}}))
        runs.append(d)
    with caplog.at_level(logging.WARNING, logger="softrepa.evaluation.compare"):
        res = compare_runs(runs, tmp_path / "cmp")
    assert res["sweep"] and not (tmp_path / "cmp" / "cfg_sweep.png").exists()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no lpips values" in warned[0] and "cfg_sweep.png" in warned[0]
    assert "--curve-x / --curve-y" in warned[0] and "imagereward, clip" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="softrepa.evaluation.compare"):
        compare_runs(runs, tmp_path / "cmp2", curve_x="imagereward", curve_y="clip")
    assert (tmp_path / "cmp2" / "cfg_sweep.png").is_file() and not caplog.records


def test_compare_writes_table_bars_and_cfg_sweep(tmp_path):
    def run(name, cfg, tokens, clip, lp):
        d = tmp_path / name
        d.mkdir()
        m = {"clip": {"mean": clip, "std": 0.01, "ci95": [clip - 0.002, clip + 0.002], "count": 100},
             "lpips": {"mean": lp, "std": 0.02, "ci95": [lp - 0.004, lp + 0.004], "count": 100},
             "imagereward": {"error": "WeightsError: missing"}}
        (d / "results.json").write_text(json.dumps({"n_images": 100, "metrics": m, "errors": {},
                                                    "run": {"cfg": cfg, "tokens": tokens}}))
        return str(d)

    runs = [run("flowedit13.5", 13.5, None, 0.261, 0.154), run("flowedit16.5", 16.5, None, 0.262, 0.170),
            run("soft9", 9.0, "tokens.safetensors", 0.263, 0.149), run("soft11", 11.0, "tokens.safetensors", 0.265, 0.160)]
    assert cli_main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    out = tmp_path / "cmp"
    for f in ("compare.md", "compare.csv", "compare_bars.png", "cfg_sweep.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["vanilla", "vanilla", "softrepa", "softrepa"]
    assert float(rows[2]["delta_clip"]) == pytest.approx(0.002) and rows[0]["delta_lpips"] == "0.0"
    md = (out / "compare.md").read_text()
    assert "+0.0020" in md and "imagereward: WeightsError" in md
    # one CFG only -> no sweep plot; an explicit --sweep makes one
    assert cli_main(["compare", runs[0], runs[2], "--out", str(tmp_path / "c2"), "--sweep", "13.5,9"]) == 0
    assert (tmp_path / "c2" / "cfg_sweep.png").is_file()
    assert cli_main(["compare", runs[0], "--out", str(tmp_path / "c3")]) == 0
    assert not (tmp_path / "c3" / "cfg_sweep.png").exists()


def test_edit_folder_pairs_each_edit_with_its_source(tmp_path, assets):
    """`softrepa edit` rows: image (source, absolute), source_prompt, target_prompt, tar_cfg."""
    from softrepa.evaluation import evaluate

    _, cfg = assets
    rows = _toy_folder(tmp_path / "src", n=3, seed=2, with_metadata=False)
    (tmp_path / "edits").mkdir()
    meta = []
    for i, r in enumerate(rows):
        Image.open(tmp_path / "src" / r["file"]).save(tmp_path / "edits" / f"{i:05d}.png")  # identity "edit"
        meta.append({"file": f"{i:05d}.png", "index": i, "image": str(tmp_path / "src" / r["file"]),
                     "source_prompt": "x", "target_prompt": r["prompt"], "tar_cfg": 9.0, "tokens": "t.safetensors"})
    (tmp_path / "edits" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    res = evaluate(tmp_path / "edits", tmp_path / "out", metrics=["lpips", "clip", "world"], config=cfg, progress=False)
    assert res["errors"] == {} and res["run"]["cfg"] == 9.0 and res["run"]["tokens"] == "t.safetensors"
    assert res["metrics"]["lpips"]["pairs"] == "edit vs its source_image"
    assert res["metrics"]["lpips"]["mean"] == 0.0 and res["metrics"]["world"]["mean"] == 1.0  # scored on target


def test_coco_pairing_follows_the_generators_prompt_numbering(tmp_path):
    from softrepa.evaluation import image_pairs as lpips_pairs
    from softrepa.evaluation import read_items

    coco = {"images": [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 3, "file_name": "000000000003.jpg"},
                       {"id": 9, "file_name": "000000000009.jpg"}],
            "annotations": [{"image_id": 9, "caption": "a dog"}, {"image_id": 7, "caption": " "},
                            {"image_id": 3, "caption": "a cat"}, {"image_id": 9, "caption": "another"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "coco").mkdir()
    (tmp_path / "gen").mkdir()
    for name in ("000000000003.png", "000000000009.png"):  # resized copies may change the extension
        Image.new("RGB", (8, 8)).save(tmp_path / "coco" / name)
    rows = [{"file": "00000_s0.png", "prompt": "a cat", "prompt_index": 0, "seed": 0},
            {"file": "00001_s0.png", "prompt": "a dog", "prompt_index": 1, "seed": 0}]
    for r in rows:
        Image.new("RGB", (8, 8)).save(tmp_path / "gen" / r["file"])
    (tmp_path / "gen" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_items(tmp_path / "gen", reference_captions=tmp_path / "captions.json", reference=tmp_path / "coco")
    pairs, how = lpips_pairs(items, tmp_path / "coco")
    assert [p.name for p in pairs] == ["000000000003.png", "000000000009.png"] and "COCO image" in how


def test_shipped_metrics_yaml_matches_the_defaults():
    from softrepa.config import ConfigError, resolve_recipe

    assert load_config(resolve_recipe("metrics")) == load_config("metrics") == load_config()  # configs/metrics.yaml
    with pytest.raises(ConfigError):
        load_config("no_such_metrics.yaml")
    with pytest.raises(ValueError, match="unknown metrics config keys"):
        load_config(overrides={"clipscore": {}})
