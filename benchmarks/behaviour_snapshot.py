"""Digest of what softrepa computes on fixed inputs, to show a refactor changed no behaviour.

    python benchmarks/behaviour_snapshot.py --out before.json      # on the old tree
    python benchmarks/behaviour_snapshot.py --out after.json       # on the new tree
    python benchmarks/behaviour_snapshot.py --compare before.json after.json

It drives only what must stay stable across a redesign: the public API (`SoftTokens.for_model`,
`attach`, `save_soft_tokens`, `load_into`), the tiny-model builders and the command line
(`softrepa.cli.main`). Every record is a sha256 of raw bytes (tensors, PNG files, token files) or an
exact score, so "equal" means bit for bit. About two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensor_sha(t: torch.Tensor) -> str:
    return sha(t.detach().contiguous().cpu().numpy().tobytes())


def tokens_file_sha(path: Path, metadata: bool = True) -> str:
    """Tensors and sorted header metadata (safetensors writes its metadata map in no fixed order,
    so the file bytes of two identical saves can differ)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        parts = [json.dumps(f.metadata(), sort_keys=True).encode()] if metadata else []
        parts += [k.encode() + f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())]
    return sha(b"".join(parts))


def folder_pngs(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p.read_bytes()) for p in sorted(folder.rglob("*.png"))}


def cli(*argv: str) -> None:
    from softrepa.cli import main

    rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"softrepa {' '.join(argv)} -> exit {rc}")


def attach_records() -> dict[str, str]:
    """Denoiser outputs with random tokens attached, and after detaching, per family."""
    import softrepa
    from softrepa import tiny

    rec: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for name, build in (("sd3", tiny.tiny_sd3_pipeline), ("sd15", tiny.tiny_sd15_pipeline),
                        ("sdxl", tiny.tiny_sdxl_pipeline)):
        pipe = build()
        den = pipe.transformer if name == "sd3" else pipe.unet
        cfg = softrepa.SoftTokensConfig(num_layers=2, blocks=("down", "mid"))
        toks = softrepa.SoftTokens.for_model(pipe, cfg, seed=0)
        if name == "sd3":
            c = den.config
            x = torch.randn(2, c.in_channels, 8, 8, generator=g)
            ctx = torch.randn(2, 7, c.joint_attention_dim, generator=g)
            pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
            call = lambda: den(hidden_states=x, timestep=torch.tensor([10.0, 700.0]), encoder_hidden_states=ctx,
                               pooled_projections=pooled, return_dict=False)[0]
        else:
            c = den.config
            x = torch.randn(2, c.in_channels, 8, 8, generator=g)
            ctx = torch.randn(2, 7, c.cross_attention_dim, generator=g)
            kw = {}
            if name == "sdxl":
                emb = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
                kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, emb, generator=g),
                                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
            call = lambda: den(x, torch.tensor([10, 700]), encoder_hidden_states=ctx, return_dict=False, **kw)[0]
        with torch.no_grad():
            plain = call()
            handle = softrepa.attach(pipe, toks)
            with_tokens = call()
            handle.remove()
            after = call()
        rec[f"{name}.plain"] = tensor_sha(plain)
        rec[f"{name}.tokens"] = tensor_sha(with_tokens)
        rec[f"{name}.detached_equals_plain"] = str(torch.equal(plain, after))
    return rec


def run(out: Path) -> dict[str, object]:
    from softrepa.toy.world import export_image_folder

    torch.manual_seed(0)
    torch.set_num_threads(2)
    snap: dict[str, object] = {"attach": attach_records()}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        data = export_image_folder(t / "data", n=32, seed=3)
        # training: 3 steps of the miniature recipe (calibrated tau + hard negatives)
        cli("train", "--config", "configs/toy_sd3.yaml", "--data", str(data), "--output_dir", str(t / "run"),
            "--max_steps", "3", "--batch_size", "4", "--loss.calibration_batches", "2", "--checkpoint_every", "2",
            "--log_every", "1")
        tokens = t / "run" / "tokens.safetensors"
        snap["train.tokens"] = tokens_file_sha(tokens)
        # the tensors alone: a new config field recorded in the metadata changes only the record above
        snap["train.tokens_tensors"] = tokens_file_sha(tokens, metadata=False)
        rows = [json.loads(ln) for ln in (t / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        snap["train.loss"] = [r.get("loss") for r in rows]
        # generation with and without the tokens
        cli("generate", "--model", "@assets/toy_sd3", "--tokens", str(tokens), "--prompts",
            "a red circle left of a blue square", "--seeds", "0,1", "--steps", "6", "--max-sequence-length", "8",
            "--compare", "--no-progress", "--out", str(t / "gen"))
        snap["generate"] = folder_pngs(t / "gen")
        src = next(iter(sorted((t / "gen" / "vanilla").glob("*.png"))))
        # editing, vanilla presets and the tokens presets, plus a CFG sweep
        cli("edit", "--model", "@assets/toy_sd3", "--image", str(src), "--source-prompt",
            "a red circle left of a blue square", "--target-prompt", "a green circle left of a blue square",
            "--max-sequence-length", "8", "--no-progress", "--out", str(t / "edit_vanilla"))
        cli("edit", "--model", "@assets/toy_sd3", "--tokens", str(tokens), "--image", str(src), "--source-prompt",
            "a red circle left of a blue square", "--target-prompt", "a green circle left of a blue square",
            "--max-sequence-length", "8", "--target-cfg", "5,9", "--no-progress",
            "--out", str(t / "edit_tokens"))
        cli("edit", "--model", "@assets/toy_sd15", "--image", str(src), "--source-prompt",
            "a red circle", "--target-prompt", "a yellow circle", "--no-progress",
            "--out", str(t / "edit_sd15"))
        for name in ("edit_vanilla", "edit_tokens", "edit_sd15"):
            snap[name] = folder_pngs(t / name)
        # generation and editing with a fixed tokens file (the page's packaged miniature tokens), so that
        # a change of training (e.g. its random streams) does not hide a change of attaching / sampling
        fixed = Path(__file__).resolve().parents[1] / "src" / "softrepa" / "ui" / "toy_sd3_tokens.safetensors"
        if fixed.exists():
            cli("generate", "--model", "@assets/toy_sd3", "--tokens", str(fixed), "--prompts",
                "a red circle left of a blue square", "--seeds", "0,1", "--steps", "6", "--max-sequence-length", "8",
                "--compare", "--no-progress", "--out", str(t / "gen_fixed"))
            snap["generate_fixed_tokens"] = folder_pngs(t / "gen_fixed")
            cli("edit", "--model", "@assets/toy_sd3", "--tokens", str(fixed), "--image", str(src), "--source-prompt",
                "a red circle left of a blue square", "--target-prompt", "a green circle left of a blue square",
                "--max-sequence-length", "8", "--target-cfg", "5,9", "--no-progress", "--out", str(t / "edit_fixed"))
            snap["edit_fixed_tokens"] = folder_pngs(t / "edit_fixed")
        # evaluation with the miniature's world judge
        cli("evaluate", "--images", str(t / "gen" / "tokens"), "--metrics", "world", "--no-progress",
            "--out", str(t / "eval"))
        res = json.loads((t / "eval" / "results.json").read_text())
        snap["evaluate.world"] = res.get("metrics", res).get("world", res.get("metrics"))
        snap["evaluate.per_image"] = sha((t / "eval" / "per_image.csv").read_bytes())
    out.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    return snap


def compare(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())

    def flat(d, p=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{p}{k}.")
            else:
                yield f"{p}{k}", v

    fx, fy = dict(flat(x)), dict(flat(y))
    diff = [k for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)]
    print(f"| records | equal | differ |\n|---|---|---|\n| {len(set(fx) | set(fy))} | "
          f"{len(set(fx) | set(fy)) - len(diff)} | {len(diff)} |")
    for k in diff:
        print(f"DIFF {k}: {fx.get(k)!r} -> {fy.get(k)!r}")
    return 1 if diff else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compare", nargs=2, type=Path, default=None)
    a = ap.parse_args()
    if a.compare:
        sys.exit(compare(*a.compare))
    run(a.out or Path("snapshot.json"))
