"""Paper fidelity (docs/fidelity.md): recipes and metric paths exactly as the authors ran them.

No official package is needed: each reference rule is written out here from the official code
(hpsv2's `ResizeMaxSize`, OpenAI CLIP / open_clip's `simple_tokenizer`, transformers'
`center_crop`, `lpips` at batch size 1, pytorch-fid's Fréchet distance) and compared with the
softrepa path on inputs chosen where the old paths differed (non-square odd sizes, curly quotes,
`&amp;`, accents, emoji, crop offsets of x.5). `benchmarks/metric_parity.py` compares with the
packages themselves when they are installed.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from softrepa.evaluation import load_metrics_config as load_config
from softrepa.evaluation.common import (CLIP_MEAN, CLIP_STD, center_crop, clean_text, clip_pixels, crop_offset,
                                        letterbox_geometry, letterbox_pixels, resize_shorter, to_tensor)

ODD_SIZES = [(301, 157), (157, 301), (225, 223), (333, 500), (37, 99), (224, 224), (223, 224), (512, 512), (1023, 769)]


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed + 7 * w + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------- HPS letterbox

def _resize_max_size_reference(x: torch.Tensor, max_size: int) -> torch.Tensor:
    """hpsv2 1.2.0 `ResizeMaxSize.forward` on a ToTensor'd image, step by step (torchvision's
    tensor `F.resize(..., BICUBIC)` = interpolate bicubic with antialias; `F.pad([l, t, r, b], fill=0)`)."""
    height, width = x.shape[1:]
    scale = max_size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        x = F.interpolate(x[None], size=new_size, mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = max_size - new_size[0], max_size - new_size[1]
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return x


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_letterbox_equals_resize_longest_side_then_pad(w, h):
    im = _image(w, h)
    (nw, nh), (left, top, right, bottom) = letterbox_geometry(w, h, 224)
    assert max(nw, nh) == 224 and nw + left + right == 224 and nh + top + bottom == 224
    assert 0 <= right - left <= 1 and 0 <= bottom - top <= 1           # odd pixel right / bottom
    assert abs(nw / nh - w / h) <= 1.0 / min(nw, nh) + 1e-9              # aspect kept up to rounding
    got = letterbox_pixels([im], 224)[0]
    m, s = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    ref = _resize_max_size_reference(to_tensor(im), 224)
    if ref.shape[-2:] != (224, 224):  # the reference leaves a non-square 224-long image unpadded
        assert max(w, h) == 224
        ref = F.pad(ref, (left, right, top, bottom), value=0.0)
    assert torch.equal(got, (ref - m) / s)
    # padding is black before normalisation; the whole image is kept (nothing cropped)
    if left:
        assert torch.allclose(got[:, :, :left], (-m / s).expand(3, 224, left))
    if w != h:
        assert not torch.equal(got, clip_pixels([im], 224)[0])


def test_hps_scorer_uses_the_letterbox_and_pickscore_the_floored_crop(tmp_path):
    scorer = _tiny_scorer("hps")
    im = _image(301, 157)
    assert scorer.preprocess == "letterbox"
    assert torch.equal(scorer.pixels([im]), letterbox_pixels([im], scorer.size))
    pick = _tiny_scorer("pickscore")
    assert pick.preprocess == "center_crop_floor" and pick.text_cleaning == "none"
    assert torch.equal(pick.pixels([im]), clip_pixels([im], pick.size, crop_offset="floor"))
    with pytest.raises(Exception, match="preprocess"):
        _tiny_scorer("clip", preprocess="squash")


# -------------------------------------------------------------------------- PickScore crop

@pytest.mark.parametrize("extent", range(224, 240))
def test_crop_offset_floors_like_transformers_and_rounds_like_torchvision(extent):
    from transformers.image_transforms import center_crop as hf_center_crop

    arr = np.arange(extent * extent * 3, dtype=np.float32).reshape(extent, extent, 3)
    top_hf = int(hf_center_crop(arr, (224, 224))[0, 0, 0] // (extent * 3))
    assert crop_offset(extent, 224, "floor") == (extent - 224) // 2 == top_hf
    assert crop_offset(extent, 224, "round") == int(round((extent - 224) / 2.0))
    differs = crop_offset(extent, 224, "floor") != crop_offset(extent, 224, "round")
    assert differs == ((extent - 224) % 4 == 3)


def test_pickscore_crop_on_a_wide_image_matches_transformers():
    from transformers.image_transforms import center_crop as hf_center_crop

    im = resize_shorter(_image(454, 300), 224)   # -> 338 x 224 after the shorter-side resize
    assert im.size == (338, 224) and (338 - 224) % 4 == 2
    im = _image(227, 224)                        # (227 - 224) % 4 == 3: round 2, floor 1
    ours = np.asarray(center_crop(im, 224, "floor"))
    assert np.array_equal(ours, hf_center_crop(np.asarray(im), (224, 224)))
    assert not np.array_equal(np.asarray(center_crop(im, 224, "round")), ours)


# ---------------------------------------------------------------------------- text cleaning

@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def _official_ids(text: str, context_length: int = 77) -> list[int]:
    """open_clip / OpenAI CLIP `tokenize` with this vocabulary and no merges, written out:
    basic_clean (ftfy.fix_text, html.unescape x2, strip) + whitespace_clean + lower, the CLIP
    regex, byte encoding, BPE (no merges: characters, last one + </w>), SOT/EOT, truncation."""
    import ftfy
    import regex

    vocab, enc = _byte_vocab(), _bytes_to_unicode()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = regex.sub(r"\s+", " ", text).strip().lower()
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    ids = []
    for token in regex.findall(pat, text):
        chars = [enc[b] for b in token.encode("utf-8")]
        chars[-1] += "</w>"
        ids += [vocab[c] for c in chars]
    ids = [0] + ids + [1]
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = 1
    return ids


def _byte_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=77)


def _tiny_scorer(name: str, **kw):
    from transformers import CLIPConfig, CLIPModel

    from softrepa.evaluation.clip_models import CLIPScorer

    tok = _byte_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=8))
    defaults = load_config()[name]
    kw = {"preprocess": defaults["preprocess"], "text_cleaning": defaults["text_cleaning"], **kw}
    return CLIPScorer(model, tok, name=name, **kw)


SPECIAL_PROMPTS = [
    "a “cozy” café’s window &amp; a dog",          # curly quotes, accent, &amp;
    "Crème brûlée on a plate\u00a0 —  with\tforks",  # accents, nbsp, em dash, tabs
    "a cat 🐱 riding a 🚲 &amp;amp; smiling 😀",       # emoji, double-escaped &amp;
    "mojibake: cafÃ© and naÃ¯ve",                      # ftfy repairs it
    "Ｆｕｌｌｗｉｄｔｈ letters &lt;b&gt; and it's ok",      # html entities, contraction
    "a red cube " * 20 + "on a blue sphere",         # truncated to 77 tokens
]


@pytest.mark.parametrize("prompt", SPECIAL_PROMPTS)
@pytest.mark.parametrize("name", ["clip", "hps"])
def test_clip_and_hps_token_ids_equal_the_official_cleaning(name, prompt):
    scorer = _tiny_scorer(name)
    assert scorer.text_cleaning == "official"
    tok = scorer.tokenize([prompt])
    ids = tok["input_ids"][0].tolist()
    ref = _official_ids(prompt)
    assert ids[:len(ref)] == ref
    assert tok["attention_mask"][0].sum().item() == len(ref)


def test_cleaning_changes_the_ids_of_special_prompts_and_not_of_plain_ones():
    raw = _tiny_scorer("clip", text_cleaning="none")
    for prompt in (SPECIAL_PROMPTS[0], *SPECIAL_PROMPTS[2:5]):  # quotes / entities / mojibake (accents: NFC agrees)
        assert raw.tokenize([prompt])["input_ids"][0].tolist()[:len(_official_ids(prompt))] != _official_ids(prompt)
    plain = "a red cube on top of a blue sphere, 3 dogs"
    assert raw.tokenize([plain])["input_ids"].tolist() == _tiny_scorer("clip").tokenize([plain])["input_ids"].tolist()
    assert clean_text("  A “B”  &amp;amp;\n C  ") == 'a "b" & c'


# ------------------------------------------------------------------------------------ LPIPS

def _lpips_scorer(resize):
    from softrepa.evaluation.lpips import CHANNELS, LPIPSNet, LPIPSScorer

    torch.manual_seed(0)
    net = LPIPSNet("alex")
    for k, c in enumerate(CHANNELS["alex"]):
        getattr(net, f"lin{k}").model[1].weight.data = torch.rand(1, c, 1, 1)
    return LPIPSScorer(net, resize=resize)


def test_lpips_native_sizes_mixed_in_one_batch_equal_per_pair_results():
    scorer = _lpips_scorer(None)
    sizes = [(64, 48), (53, 71), (64, 64), (99, 57), (64, 48)]
    a = [_image(w, h, 1) for w, h in sizes]
    b = [_image(w, h, 2) for w, h in sizes]
    batch = scorer.distance(a, b)
    single = np.array([scorer.distance([x], [y])[0] for x, y in zip(a, b)])
    assert batch.shape == (5,) and np.array_equal(batch, single)
    # each pair at batch size 1 is the LPIPS formula on that pair's own tensors
    x0, x1 = 2 * to_tensor(a[1])[None] - 1, 2 * to_tensor(b[1])[None] - 1
    with torch.no_grad():
        assert batch[1] == float(scorer.model(x0, x1)[0])
    with pytest.raises(Exception, match=r"lpips.*sizes differ within a pair.*lpips\.resize"):
        scorer.distance([a[0]], [b[1]])
    with pytest.raises(ValueError, match="lpips resize"):
        _lpips_scorer(0)


def test_evaluate_lpips_resize_null_on_edits_of_different_sizes(tmp_path):
    from softrepa.evaluation import evaluate
    from softrepa.evaluation.lpips import backbone_state_shapes

    root = tmp_path / "w"
    root.mkdir()
    g = torch.Generator().manual_seed(3)
    torch.save({k: 0.1 * torch.randn(s, generator=g) for k, s in backbone_state_shapes("alex").items()
                if k.startswith("features.")}, root / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))},
               root / "lin.pth")
    edits, src = tmp_path / "edits", tmp_path / "src"
    edits.mkdir()
    src.mkdir()
    rows = []
    for i, (w, h) in enumerate([(64, 48), (53, 71), (64, 64), (99, 57)]):
        _image(w, h, 10 + i).save(edits / f"{i}.png")
        _image(w, h, 20 + i).save(src / f"{i}.png")
        rows.append({"file": f"{i}.png", "image": str(src / f"{i}.png"), "target_prompt": "a dog"})
    (edits / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"offline": True, "lpips": {"net": "alex", "backbone_weights": str(root), "lin_weights": str(root / "lin.pth"),
                                      "resize": None}}
    res = evaluate(edits, tmp_path / "out", metrics=["lpips"], config=cfg, batch_size=16, device="cpu", progress=False)
    assert not res["errors"] and res["metrics"]["lpips"]["count"] == 4 and res["metrics"]["lpips"]["resize"] is None
    one = evaluate(edits, tmp_path / "out1", metrics=["lpips"], config=cfg, batch_size=1, device="cpu", progress=False)
    assert res["metrics"]["lpips"]["mean"] == one["metrics"]["lpips"]["mean"]


# -------------------------------------------------------------------------------------- FID

def _pytorch_fid_reference(a, b):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm of S1 S2)."""
    from scipy import linalg

    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_path_choice_and_values():
    from softrepa.evaluation.inception import FID_PATHS, _fid_low_rank, fid_path, fid_with_path, frechet_from_stats, \
        feature_stats

    assert fid_path(500, 5000, 2048) == "eigen" and fid_path(500, 2047, 2048) == "low_rank"
    assert fid_path(2048, 10, 2048) == "eigen" and fid_path(10, None, 2048) == "eigen"
    assert set(FID_PATHS) == {"low_rank", "eigen"}
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 64)), rng.normal(0.3, 1.2, size=(30, 64))
    value, path = fid_with_path(a, b)
    assert path == "low_rank" and value == _fid_low_rank(a, b)
    # the D x D path takes square roots of round-off eigenvalues of the rank-deficient covariances
    assert value == pytest.approx(frechet_from_stats(*feature_stats(a), *feature_stats(b)), rel=1e-6)
    big_a, big_b = rng.normal(size=(80, 16)), rng.normal(0.2, 1.1, size=(70, 16))
    value, path = fid_with_path(big_a, big_b)
    assert path == "eigen" and value == frechet_from_stats(*feature_stats(big_a), *feature_stats(big_b))


def test_fid_eigen_path_matches_pytorch_fids_formula():
    """Full-rank covariances: the eigen path equals pytorch-fid's scipy sqrtm formula (reported as
    skipped, not silently passed, where scipy, not a dependency, is missing)."""
    pytest.importorskip("scipy")
    from softrepa.evaluation.inception import fid_with_path

    rng = np.random.default_rng(0)
    rng.normal(size=(20, 64)), rng.normal(0.3, 1.2, size=(30, 64))  # the same draws as above
    big_a, big_b = rng.normal(size=(80, 16)), rng.normal(0.2, 1.1, size=(70, 16))
    value, path = fid_with_path(big_a, big_b)
    assert path == "eigen" and value == pytest.approx(_pytorch_fid_reference(big_a, big_b), rel=1e-9)


def test_evaluate_records_the_fid_path(tmp_path):
    from softrepa.evaluation import evaluate
    from softrepa.evaluation.inception import FID_PATHS

    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for d, seed in ((gen, 0), (ref, 100)):
        d.mkdir()
        for i in range(5):
            _image(40, 40, seed + i).save(d / f"{i}.png")
    cfg = {"fid": {"test_only_random_features": True}}
    res = evaluate(gen, tmp_path / "out", metrics=["fid"], reference=ref, config=cfg, device="cpu", progress=False)
    m = res["metrics"]["fid"]
    assert m["fid_path"] == "low_rank" and m["fid_path_note"] == FID_PATHS["low_rank"]  # 5 images < 32 dims
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["metrics"]["fid"]
    assert saved["fid_path"] == "low_rank"
    np.savez(tmp_path / "stats.npz", mu=np.zeros(32), sigma=np.eye(32))
    res = evaluate(gen, tmp_path / "out2", metrics=["fid"], reference=tmp_path / "stats.npz", config=cfg,
                   device="cpu", progress=False)
    assert res["metrics"]["fid"]["fid_path"] == "eigen"


def test_evaluate_fid_reference_folder(tmp_path):
    from softrepa.evaluation import evaluate

    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for d, seed in ((gen, 0), (ref, 100)):
        d.mkdir()
        for i in range(4):
            _image(40, 40, seed + i).save(d / f"{i}.png")
    res = evaluate(gen, tmp_path / "o", metrics=["fid"], reference=ref,
                   config={"fid": {"test_only_random_features": True}}, device="cpu", progress=False)
    assert res["metrics"]["fid"]["fid_path"] == "low_rank" and res["metrics"]["fid"]["n_reference"] == 4


# ---------------------------------------------------------------------------------- metrics config

def test_metric_defaults_are_the_authors_versions():
    cfg = load_config("metrics")
    assert cfg == load_config()
    assert cfg["hps"]["version"] == "v2.1" and cfg["hps"]["filename"] is None
    from softrepa.evaluation.clip_models import hps_filename

    assert hps_filename(cfg["hps"]) == "HPS_v2.1_compressed.pt"
    assert hps_filename({"version": "v2.0"}) == "HPS_v2_compressed.pt"
    with pytest.raises(Exception, match="hps: version"):
        hps_filename({"version": "v3"})
    assert (cfg["clip"]["preprocess"], cfg["clip"]["text_cleaning"]) == ("center_crop", "official")
    assert (cfg["hps"]["preprocess"], cfg["hps"]["text_cleaning"]) == ("letterbox", "official")
    assert (cfg["pickscore"]["preprocess"], cfg["pickscore"]["text_cleaning"]) == ("center_crop_floor", "none")


def test_hps_missing_v21_checkpoint_names_the_file(tmp_path):
    from softrepa.evaluation import WeightsError, load_metric

    cfg = load_config(overrides={"offline": True, "hps": {"weights": str(tmp_path)}})
    with pytest.raises(WeightsError, match=r"HPS_v2\.1_compressed\.pt"):
        load_metric("hps", cfg)


# ------------------------------------------------------------------------------------- recipes

def test_recipes_follow_the_authors_scripts():
    from softrepa.config import load_config as load_recipe

    sd15, sdxl, sd3 = load_recipe("sd15"), load_recipe("sdxl"), load_recipe("sd3")
    assert sd15.tokens.blocks == ("down",) or list(sd15.tokens.blocks) == ["down"]
    assert (sd15.tokens.num_tokens, sd15.tokens.time_buckets, sd15.tokens.init) == (4, 100, "empty_prompt")
    assert (sd15.max_steps, sd15.loss.denoise_weight) == (26000, 10.0)
    assert sdxl.tokens.time_buckets == 0 and list(sdxl.tokens.blocks) == ["down", "mid"]
    assert (sdxl.tokens.num_tokens, sdxl.tokens.init, sdxl.max_steps, sdxl.loss.denoise_weight) == (4, "normal", 30000, 10.0)
    assert (sd3.tokens.num_tokens, sd3.tokens.num_layers, sd3.tokens.time_buckets) == (4, 5, 100)
    for r in (sd15, sdxl, sd3):
        assert (r.lr, r.weight_decay, r.batch_size, r.loss.tau, r.loss.scale) == (1e-3, 1e-4, 16, 0.07, 4.0)


def test_agsm_recipes_follow_the_official_scripts():
    """scripts/train_coco.sh + train.py of jaayeon/AGSM (docs/fidelity.md, AGSM section)."""
    from softrepa.config import load_config as load_recipe

    sd3, sd15, sdxl = load_recipe("sd3_agsm"), load_recipe("sd15_agsm"), load_recipe("sdxl_agsm")
    for r in (sd3, sd15, sdxl):
        assert r.objective == "agsm" and r.negatives.per_image == 0
        assert (r.lr, r.weight_decay, r.batch_size, r.resolution, r.mixed_precision) == (1e-3, 1e-4, 4, 512, "fp16")
        assert (r.agsm.tau, r.agsm.gamma_pos, r.agsm.ema_decay) == (0.1, 1.0, 0.9999)
        assert (r.schedule.T_0, r.schedule.T_mult, r.schedule.eta_min) == (10, 1, 1e-5)
        assert r.tokens.num_tokens == 4 and r.tokens.time_buckets == 100
    assert (sd3.agsm.gamma_neg, sd15.agsm.gamma_neg, sdxl.agsm.gamma_neg) == (0.1, 1.0, 0.1)
    assert (sd3.tokens.num_layers, sd3.tokens.token_space, sd3.max_sequence_length) == (5, "block", 512)
    assert list(sd15.tokens.blocks) == list(sdxl.tokens.blocks) == ["down", "mid"]  # apply_soft_tokens default
    assert (sd15.tokens.init, sdxl.tokens.init, sd3.tokens.init) == ("empty_prompt", "normal", "normal")
    # epochs over COCO train2017 (118,287 images, 4 per step): 10 / 20 / 1; restarts every num_iter
    assert (sd3.max_steps, sd15.max_steps, sdxl.max_steps) == (10 * 29572, 20 * 29572, 29572)
    assert (sd3.schedule.step_every, sd15.schedule.step_every, sdxl.schedule.step_every) == (1000, 1000, 100)


def test_import_official_defaults_to_down_blocks_and_info_says_so(tmp_path, capsys):
    from softrepa.cli import main

    torch.save(torch.randn(4, 768), tmp_path / "dc_tokens.pth")
    torch.save(torch.nn.Embedding(100, 768), tmp_path / "dc_t_tokens.pth")
    out = tmp_path / "sd15.safetensors"
    assert main(["import-official", "--family", "sd15", "--dc-tokens", str(tmp_path / "dc_tokens.pth"),
                 "--dc-t-tokens", str(tmp_path / "dc_t_tokens.pth"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert layout["blocks"] == ["down"] and layout["time_buckets"] == 100 and layout["num_tokens"] == 4
    assert main(["import-official", "--family", "sd15", "--dc-tokens", str(tmp_path / "dc_tokens.pth"),
                 "--blocks", "down,middle", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--blocks" in capsys.readouterr().err
