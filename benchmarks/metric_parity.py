"""Metric parity: softrepa's scorers against the official packages, on identical random weights.

    python benchmarks/metric_parity.py [--official-python /path/to/venv/bin/python] [--work DIR] [--out FILE.md]

Two stages, because the official packages need torchvision (which does not import beside the CPU
torch that softrepa pins) and their own transformers:

1. `--side official`, run by `--official-python` (default: this interpreter). It builds each
   official model with random weights (seeded), small where the package takes an architecture
   and at full size where it hard-codes one, scores the images and prompts below with the
   package's own code, and saves the weights in the layout softrepa reads plus the scores:
   * ImageReward: `ImageReward.ImageReward` (BLIP ViT-L, a 2-layer 768-wide BERT med_config),
     `.score(prompt, image)`; saved as ImageReward.pt + med_config.json + a BERT vocab.
   * CLIP score: ImageReward's `CLIPScore.score` with `clip.load` returning a small random OpenAI
     `clip.model.CLIP` and `clip`'s own 224 px preprocess; saved as the OpenAI state dict.
   * PickScore: transformers `CLIPModel` + `CLIPProcessor` (slow `CLIPImageProcessor`, fast
     tokenizer, as `AutoProcessor` of the PickScore README); the reference formula
     `logit_scale.exp() * cos`; saved with `save_pretrained`.
   * HPS: hpsv2's own `create_model_and_transforms(..., light_augmentation=True)` (its
     `preprocess_val` letterbox) on a small ViT config registered with its bundled open_clip,
     and `get_tokenizer`; the `hpsv2.score` formula; saved as `{"state_dict": ...}` in
     HPS_v2.1_compressed.pt.
   * FID: pytorch-fid's `InceptionV3([pool3])` (its `fid_inception_v3` with the weights download
     replaced by a random state dict), `get_activations` + `calculate_frechet_distance`.
   * LPIPS: `lpips.LPIPS(net="vgg", pnet_rand=True)` (random VGG-16, the package's calibrated
     linear layers); 299 x 299 (torchvision `Resize((299, 299))`) and native sizes at batch 1,
     inputs in [-1, 1] (`normalize=True`) and the authors' uint8 inputs.
   The CLIP BPE vocabulary comes from the official tokenizer (`bpe_simple_vocab_16e6.txt.gz`).
2. softrepa (this interpreter): loads every saved model through `softrepa.metrics` exactly as
   `softrepa evaluate` does and scores the same inputs; prints max |official - softrepa| per
   metric as a markdown table with the package versions.

When the official packages are missing the script says which and exits 0. Images: square,
non-square and odd sizes (224, 512, 301x157, 157x301, 225x223, 333x500, 227x224, 1023x769);
prompts with curly quotes, `&amp;`, accents, emoji, HTML entities, mojibake and > 77 tokens.
Runs on CPU in a few minutes (the BLIP ViT-L and VGG-16 are full size).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(224, 224), (512, 512), (301, 157), (157, 301), (225, 223), (333, 500), (227, 224), (1023, 769)]
PROMPTS = [
    "a red cube on top of a blue sphere",
    "a “cozy” café’s window &amp; a dog",
    "Crème brûlée on a plate\u00a0 —  with\tforks",
    "a cat 🐱 riding a 🚲 &amp;amp; smiling 😀",
    "mojibake: cafÃ© and naÃ¯ve",
    "Ｆｕｌｌｗｉｄｔｈ letters &lt;b&gt; and it's OK",
    "two dogs, three cats & 4 birds in a field at sunset",
    "a very long prompt " + "with many many words " * 16 + "at the end",
]
OFFICIAL = {"ImageReward": "image-reward", "clip": "openai-clip", "hpsv2": "hpsv2", "lpips": "lpips",
            "pytorch_fid": "pytorch-fid", "transformers": "transformers", "torchvision": "torchvision",
            "scipy": "scipy", "ftfy": "ftfy"}
#: Small open_clip ViT for HPS (hpsv2 takes any open_clip config; ViT-H-14 itself is 1B parameters).
HPS_ARCH = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                                            "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
#: Small OpenAI CLIP (ImageReward's CLIPScore; ViT-L/14 in the paper): QuickGELU, heads = width // 64.
CLIP_ARCH = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 64, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 1024,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": 12, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 30524, "encoder_width": 1024, "add_cross_attention": True}


def make_images(folder: Path, seed: int = 0) -> list[str]:
    """Smooth colour ramps plus noise at every size in SIZES (PNG, RGB)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i, (w, h) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / max(w + h - 2, 1)], -1) * 200
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        name = f"{i:02d}_{w}x{h}.png"
        Image.fromarray(img, "RGB").save(folder / name)
        names.append(name)
    return names


def versions(mods) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for mod, dist in mods.items():
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


# ------------------------------------------------------------------------------------ official side

def official_side(work: Path) -> int:
    missing = [dist for mod, dist in OFFICIAL.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"SKIP: official packages missing in {sys.executable}: {', '.join(missing)} "
              "(pip install image-reward openai-clip hpsv2 lpips pytorch-fid torchvision scipy ftfy)")
        return 3
    hps_bpe = Path(importlib.util.find_spec("hpsv2").origin).parent / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not hps_bpe.is_file():  # hpsv2 1.2.0's wheel lacks the (standard CLIP) BPE file its tokenizer opens
        clip_bpe = Path(importlib.util.find_spec("clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
        print(f"SKIP: {hps_bpe} is missing (hpsv2's wheel omits it); it is the standard CLIP BPE file: "
              f"cp {clip_bpe} {hps_bpe.parent}/")
        return 3
    import torch
    from PIL import Image

    torch.set_grad_enabled(False)
    imgs_dir = work / "images"
    names = make_images(imgs_dir, 0)
    ref_names = make_images(work / "reference", 1)
    paths = [str(imgs_dir / n) for n in names]
    out: dict = {"versions": versions(OFFICIAL) | {"torch": torch.__version__}, "images": names, "prompts": PROMPTS,
                 "scores": {}, "ids": {}}
    (work / "weights").mkdir(exist_ok=True)
    w = work / "weights"

    # CLIP BPE files from the official tokenizer (vocab.json / merges.txt, the transformers layout)
    import clip
    from clip.simple_tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    (w / "clip_bpe").mkdir(exist_ok=True)
    (w / "clip_bpe" / "vocab.json").write_text(json.dumps(st.encoder, ensure_ascii=False))
    merges = [" ".join(m) for m, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    (w / "clip_bpe" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    # --- CLIP score: ImageReward's CLIPScore with a small random OpenAI CLIP
    from clip.model import CLIP

    cs_mod = importlib.import_module("ImageReward.models.CLIPScore")  # the module (the package re-exports the class)

    torch.manual_seed(0)
    v, t = CLIP_ARCH["vision_cfg"], CLIP_ARCH["text_cfg"]
    clip_model = CLIP(CLIP_ARCH["embed_dim"], v["image_size"], v["layers"], v["width"], v["patch_size"],
                      t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"]).float().eval()
    cs_mod.clip.load = lambda *a, **k: (clip_model, clip.clip._transform(v["image_size"]))
    scorer = cs_mod.CLIPScore(download_root=str(work), device="cpu")
    out["scores"]["clip"] = [scorer.score(p, path) for p, path in zip(PROMPTS, paths)]
    out["ids"]["clip"] = [clip.tokenize(p, truncate=True)[0].tolist() for p in PROMPTS]
    torch.save(clip_model.state_dict(), w / "openai_clip.pt")

    # --- HPS: hpsv2's own factory, transform, tokenizer and formula on a small ViT
    from hpsv2.src.open_clip import factory as hps_factory

    hps_factory._MODEL_CONFIGS["parity-tiny"] = json.loads(json.dumps(HPS_ARCH))
    torch.manual_seed(1)
    model, _, preprocess_val = hps_factory.create_model_and_transforms(
        "parity-tiny", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    model.eval()
    with torch.no_grad():  # random logit scale etc. are irrelevant; perturb LayerNorms off identity
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    tokenizer = hps_factory.get_tokenizer("ViT-H-14")
    hps = []
    for p, path in zip(PROMPTS, paths):
        image = preprocess_val(Image.open(path)).unsqueeze(0)
        text = tokenizer([p])
        o = model(image, text)
        hps.append(float(torch.diagonal(o["image_features"] @ o["text_features"].T)[0]))
    out["scores"]["hps"] = hps
    out["ids"]["hps"] = [tokenizer([p])[0].tolist() for p in PROMPTS]
    (w / "hps").mkdir(exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, w / "hps" / "HPS_v2.1_compressed.pt")
    (w / "hps" / "arch.json").write_text(json.dumps(HPS_ARCH))

    # --- PickScore: transformers CLIPModel + processor, the reference formula
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    tok = CLIPTokenizerFast(vocab_file=str(w / "clip_bpe" / "vocab.json"), merges_file=str(w / "clip_bpe" / "merges.txt"),
                            pad_token="!")  # LAION CLIP-H's tokenizer pads with "!" (id 0)
    improc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                do_center_crop=True, do_normalize=True, do_resize=True, do_convert_rgb=True)
    proc = CLIPProcessor(image_processor=improc, tokenizer=tok)
    torch.manual_seed(2)
    pick = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, hidden_act="gelu"), projection_dim=32)).eval()
    ps = []
    for p, path in zip(PROMPTS, paths):
        ii = proc(images=[Image.open(path)], return_tensors="pt")
        ti = proc(text=[p], padding=True, truncation=True, max_length=77, return_tensors="pt")
        ie = pick.get_image_features(**ii)
        ie = ie / ie.norm(dim=-1, keepdim=True)
        te = pick.get_text_features(**ti)
        te = te / te.norm(dim=-1, keepdim=True)
        ps.append(float(pick.logit_scale.exp() * (te @ ie.T)[0, 0]))
    out["scores"]["pickscore"] = ps
    out["ids"]["pickscore"] = [tok(p, truncation=True, max_length=77)["input_ids"] for p in PROMPTS]
    pick.save_pretrained(w / "pickscore")
    tok.save_pretrained(w / "pickscore")

    # --- ImageReward: the package's class (BLIP ViT-L + a small BERT), tokenizer from a local vocab
    from transformers import BertTokenizer

    import ImageReward.models.BLIP.blip_pretrain as bp
    from ImageReward.ImageReward import ImageReward as IR

    words = ["[PAD]", *[f"[unused{i}]" for i in range(99)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [chr(c) for c in range(33, 127) if not chr(c).isupper()] + ["##" + chr(c) for c in range(97, 123)]
    words += ["red", "cube", "blue", "sphere", "dog", "cat", "plate", "window", "on", "a", "of", "the", "with"]
    words = list(dict.fromkeys(words))
    words += [f"[fill{i}]" for i in range(30522 - len(words))]
    (w / "bert").mkdir(exist_ok=True)
    (w / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")

    def init_tokenizer():
        tk = BertTokenizer(str(w / "bert" / "vocab.txt"))
        tk.add_special_tokens({"bos_token": "[DEC]"})
        tk.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tk.enc_token_id = tk.additional_special_tokens_ids[0]
        return tk

    bp.init_tokenizer = init_tokenizer
    (w / "imagereward").mkdir(exist_ok=True)
    (w / "imagereward" / "med_config.json").write_text(json.dumps(MED_CONFIG))
    torch.manual_seed(3)
    ir = IR(str(w / "imagereward" / "med_config.json"), device="cpu").eval()
    with torch.no_grad():  # the package's MLP init (std 1 / 769, zero bias) makes every reward the same
        for layer in ir.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, layer.in_features ** -0.5)
                layer.bias.normal_(0, 0.1)
    out["scores"]["imagereward"] = [float(ir.score(p, path)) for p, path in zip(PROMPTS, paths)]
    torch.save(ir.state_dict(), w / "imagereward" / "ImageReward.pt")
    del ir

    # --- LPIPS: random VGG-16 + the package's linear layers
    import lpips
    import torchvision.transforms as T

    torch.manual_seed(4)
    lp = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    feats = {}
    for k in range(1, 6):
        for idx, m in getattr(lp.net, f"slice{k}")._modules.items():
            for pn, pv in m.state_dict().items():
                feats[f"features.{idx}.{pn}"] = pv.clone()
    (w / "lpips").mkdir(exist_ok=True)
    torch.save(feats, w / "lpips" / "vgg16-397923af.pth")
    shutil.copy(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", w / "lpips" / "vgg.pth")
    tt = T.Compose([T.Resize((299, 299)), T.ToTensor()])
    pairs = list(zip(paths, [str(work / "reference" / n) for n in ref_names]))
    r299, r299_u8, native = [], [], []
    for a, b in pairs:
        x0, x1 = tt(Image.open(a).convert("RGB"))[None], tt(Image.open(b).convert("RGB"))[None]
        r299.append(float(lp(x0, x1, normalize=True)))
        r299_u8.append(float(lp((x0 * 255).byte(), (x1 * 255).byte())))
        y0, y1 = T.ToTensor()(Image.open(a).convert("RGB"))[None], T.ToTensor()(Image.open(b).convert("RGB"))[None]
        native.append(float(lp(y0, y1, normalize=True)))
    out["scores"]["lpips_299"], out["scores"]["lpips_299_uint8"], out["scores"]["lpips_native"] = r299, r299_u8, native

    # --- FID: pytorch-fid's network with random weights (no download)
    import pytorch_fid.inception as pfi
    import torch.nn.functional as F
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    torch.manual_seed(5)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    # BatchNorm statistics calibrated on the images (train-mode pass, cumulative average): with the
    # default statistics a random Inception maps every image to nearly the same features.
    calib = torch.cat([F.interpolate(T.ToTensor()(Image.open(q).convert("RGB"))[None], size=(299, 299),
                                     mode="bilinear", align_corners=False) for q in paths + [
                           str(work / "reference" / n) for n in ref_names]]) * 2 - 1
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(calib)
    net.eval()
    sd = net.state_dict()
    pfi.load_state_dict_from_url = lambda *a, **k: sd
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    (w / "fid").mkdir(exist_ok=True)
    torch.save(sd, w / "fid" / "pt_inception-2015-12-05-6726825d.pth")
    ga = get_activations(paths, model, batch_size=1, dims=2048, device="cpu", num_workers=0)
    ra = get_activations([str(work / "reference" / n) for n in ref_names], model, batch_size=1, dims=2048,
                         device="cpu", num_workers=0)
    np.save(work / "fid_gen.npy", ga)
    np.save(work / "fid_ref.npy", ra)
    out["scores"]["fid"] = [float(calculate_frechet_distance(ga.mean(0), np.cov(ga, rowvar=False),
                                                             ra.mean(0), np.cov(ra, rowvar=False)))]
    out["reference_images"] = ref_names
    (work / "official.json").write_text(json.dumps(out, indent=1))
    print(f"official side done: {work / 'official.json'}")
    return 0


# ------------------------------------------------------------------------------------ softrepa side

def softrepa_side(work: Path) -> list[tuple]:
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    from softrepa.metrics import load_config, load_metric
    from softrepa.metrics.clip_models import hf_clip_config, openclip_to_hf
    from softrepa.metrics.common import load_rgb
    from softrepa.metrics.inception import fid_with_path

    off = json.loads((work / "official.json").read_text())
    w = work / "weights"
    images = [load_rgb(work / "images" / n) for n in off["images"]]
    refs = [load_rgb(work / "reference" / n) for n in off["reference_images"]]
    prompts = off["prompts"]
    # the OpenAI CLIP BPE as a transformers tokenizer folder (the layout of openai/clip-vit-large-patch14)
    for name, pad in (("clip_tok", "<|endoftext|>"), ("laion_tok", "!")):
        CLIPTokenizer(str(w / "clip_bpe" / "vocab.json"), str(w / "clip_bpe" / "merges.txt"),
                      pad_token=pad).save_pretrained(w / name)
    # the BERT vocabulary as a transformers tokenizer folder (the layout of google-bert/bert-base-uncased)
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate((w / "bert" / "vocab.txt").read_text().splitlines())}
    try:
        bert = BertTokenizer(vocab=vocab)                      # transformers 5
    except TypeError:
        bert = BertTokenizer(str(w / "bert" / "vocab.txt"))  # transformers 4
    bert.save_pretrained(w / "bert_hf")
    # OpenAI CLIP state dict -> transformers CLIPModel folder (what softrepa's clip metric reads)
    sd = openclip_to_hf(torch.load(w / "openai_clip.pt", map_location="cpu", weights_only=True))
    cm = CLIPModel(hf_clip_config(CLIP_ARCH))
    missing, unexpected = cm.load_state_dict(sd, strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise SystemExit(f"CLIP conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    cm.save_pretrained(w / "clip_hf")
    cfg = load_config(overrides={
        "offline": True,
        "clip": {"model": str(w / "clip_hf"), "tokenizer": str(w / "clip_tok")},
        "pickscore": {"model": str(w / "pickscore"), "tokenizer": str(w / "pickscore")},
        "hps": {"weights": str(w / "hps"), "architecture": HPS_ARCH, "tokenizer": str(w / "laion_tok")},
        "imagereward": {"weights": str(w / "imagereward" / "ImageReward.pt"), "med_config": str(w / "imagereward"),
                        "tokenizer": str(w / "bert_hf")},
        "fid": {"weights": str(w / "fid")},
        "lpips": {"net": "vgg", "backbone_weights": str(w / "lpips"), "lin_weights": str(w / "lpips" / "vgg.pth")}})
    rows = []

    def add(metric, what, official, ours, tol=1e-5):
        official, ours = np.asarray(official, np.float64), np.asarray(ours, np.float64)
        diff = float(np.abs(official - ours).max())
        scale = float(np.abs(official).max()) or 1.0
        rows.append((metric, what, len(official), diff, diff / scale, "yes" if diff <= tol else "NO"))

    for name in ("clip", "pickscore", "hps", "imagereward"):
        scorer = load_metric(name, cfg, device="cpu")
        ours = np.concatenate([scorer.score([im], [p]) for im, p in zip(images, prompts)])
        add(name, "score, batch 1", off["scores"][name], ours)
        batched = scorer.score(images, prompts)
        add(name, f"score, one batch of {len(images)}", off["scores"][name], batched)
        if name in off["ids"]:
            tok = scorer.tokenize(prompts)
            same = 0
            for i, ref in enumerate(off["ids"][name]):
                ref = [t for t in ref if t != 0] if name in ("clip", "hps") else ref  # their padding is 0
                got = tok["input_ids"][i][: int(tok["attention_mask"][i].sum())].tolist()
                same += got == ref
            rows.append((name, "token ids identical (prompts)", len(prompts), float(len(prompts) - same), 0.0,
                         "yes" if same == len(prompts) else "NO"))
        del scorer
    # the paths softrepa took before (docs/fidelity.md): they must differ from the official scores
    old = {"hps": {"preprocess": "center_crop", "text_cleaning": "none"}, "clip": {"text_cleaning": "none"},
           "pickscore": {"preprocess": "center_crop"}}
    for name, over in old.items():
        scorer = load_metric(name, {**cfg, name: {**cfg[name], **over}}, device="cpu")
        o = np.asarray(off["scores"][name])
        d = float(np.abs(o - scorer.score(images, prompts)).max())
        rows.append((name, f"previous path {over} (must differ)", len(o), d, d / (float(np.abs(o).max()) or 1.0),
                     "differs" if d > 1e-5 else "SAME?"))
        del scorer
    fid = load_metric("fid", cfg, device="cpu")
    ga = np.concatenate([fid.features([im]) for im in images])
    ra = np.concatenate([fid.features([im]) for im in refs])
    add("fid", "pool3 features", np.load(work / "fid_gen.npy"), ga)
    value, path = fid_with_path(ga, ra)
    add("fid", f"FID value ({path} path vs scipy sqrtm)", off["scores"]["fid"], [value], tol=1e-5 * abs(value))
    for key, resize, rng in (("lpips_299", 299, "minus1_1"), ("lpips_299_uint8", 299, "authors_uint8"),
                             ("lpips_native", None, "minus1_1")):
        c = {**cfg, "lpips": {**cfg["lpips"], "resize": resize, "input_range": rng}}
        sc = load_metric("lpips", c, device="cpu")
        add("lpips", f"resize {resize}, {rng}, one batch", off["scores"][key], sc.distance(images, refs))
    return rows


def table(rows, vers) -> str:
    lines = ["| metric | compared | n | max abs diff | max rel diff | <= 1e-5 |", "|---|---|---|---|---|---|"]
    for m, what, n, d, r, ok in rows:
        lines.append(f"| {m} | {what} | {n} | {d:.2e} | {r:.2e} | {ok} |")
    lines += ["", "Official side: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items())) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["official", "both"], default="both")
    ap.add_argument("--official-python", default=sys.executable, help="interpreter with the official packages")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--reuse", action="store_true", help="reuse the official side already in --work")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="metric_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.side == "official":
        return official_side(work)
    if args.reuse and (work / "official.json").is_file():
        return _finish(work, args.out)
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([args.official_python, str(Path(__file__).resolve()), "--side", "official", "--work", str(work)],
                          env=env, capture_output=True, text=True)
    if proc.returncode == 3 or (proc.returncode != 0 and "No module named" in proc.stderr):
        print((proc.stdout.strip() or proc.stderr.strip().splitlines()[-1]) + "\nmetric parity skipped.")
        return 0
    if proc.returncode != 0:
        print(proc.stdout[-4000:] + proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    return _finish(work, args.out)


def _finish(work: Path, out: str | None) -> int:
    rows = softrepa_side(work)
    text = table(rows, json.loads((work / "official.json").read_text())["versions"])
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
