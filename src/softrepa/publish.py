"""Publish soft tokens on the Hugging Face Hub: `push_to_hub` and the generated model card.

One commit through `huggingface_hub.HfApi` (`create_repo`, then `upload_folder` of a staging
folder): the tokens, their layout (`tokens.json`), the resolved training config (`config.yaml`)
and `README.md` (base model, recipe, measured metrics, how to load it). Loading back by repo id:
`softrepa.load_into(pipe, "owner/name")` (`softrepa.hub`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .artifact import load_soft_tokens, provenance_of
from .errors import DatasetError, UsageError
from .hub import DEFAULT_FILENAME, HubError, parse_hub_ref

logger = logging.getLogger(__name__)


def _metrics_tables(evaluation: Sequence[str | os.PathLike]) -> list[str]:
    """Markdown tables of `softrepa evaluate` folders (their results.json)."""
    lines: list[str] = []
    for folder in evaluation:
        results_file = Path(folder) / "results.json"
        if not results_file.is_file():
            raise FileNotFoundError(f"--evaluation {folder}: no results.json (run `softrepa evaluate` first)")
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
            metrics = results["metrics"]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{results_file}: not a `softrepa evaluate` results.json ({e!r})") from e
        lines += ["", f"**{Path(folder).name}** ({results.get('n_images', '?')} images)", "",
                  "| metric | mean | 95% CI | count |", "|---|---|---|---|"]
        for name, m in metrics.items():
            if not isinstance(m, dict) or "error" in m or m.get("mean") is None:
                continue
            ci = m.get("ci95")
            ci_txt = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if isinstance(ci, (list, tuple)) and None not in ci else ""
            lines.append(f"| {name} | {m['mean']:.4g} | {ci_txt} | {m.get('count', '')} |")
    return lines


def model_card(repo_id: str, tokens_file: str | os.PathLike, *, config: dict[str, Any] | None = None,
               evaluation: Sequence[str | os.PathLike] = (), filename: str = DEFAULT_FILENAME) -> str:
    """The README.md of a tokens repo: base model, recipe, measured metrics, how to load it.

    Args:
        repo_id: the repo the card is for (used in the loading snippet).
        tokens_file: the tokens `.safetensors` (its layout and provenance are read).
        config: the resolved training config (a dict), if known.
        evaluation: `softrepa evaluate` output folders whose results.json are tabulated.
        filename: the tokens file's name in the repo.
    Example:
        >>> print(model_card("user/sd3-tokens", "runs/sd3/tokens.safetensors"))
    """
    tokens = load_soft_tokens(tokens_file)
    prov = provenance_of(tokens_file)
    layout = tokens.layout.to_dict()
    base = prov.get("base_model") or (config or {}).get("model") or "unknown"
    front = ["---", "library_name: softrepa", "tags:", "- softrepa", "- soft-tokens", "- text-to-image",
             "- diffusers"]
    if base != "unknown" and parse_hub_ref(str(base)) is not None:
        front.append(f"base_model: {base}")
    front.append("---")
    ref = repo_id if filename == DEFAULT_FILENAME else f"{repo_id}:{filename}"
    lines = front + [
        "", f"# SoftREPA soft tokens: {repo_id}", "",
        "Learnable soft text tokens (SoftREPA) for a frozen text-to-image model: attached to the denoiser, "
        "they improve text-image alignment; detached, the model is the stock one bit for bit.", "",
        "## Base model", "", f"* model: `{base}`",
    ]
    if prov.get("denoiser_config_hash"):
        lines.append(f"* denoiser config hash: `{prov['denoiser_config_hash']}` (softrepa warns when the tokens "
                     "are attached to a model with another one)")
    lines += [f"* family: `{layout['family']}`, {layout['num_tokens']} tokens per set, "
              f"{'layers ' + str(layout['layers']) if layout['layers'] else 'blocks ' + str(layout['blocks'])}, "
              f"{layout['time_buckets']} time buckets, "
              f"{sum(p.numel() for p in tokens.parameters()):,} parameters", ""]
    lines += ["## How to load", "", "```python", "import softrepa", "from diffusers import DiffusionPipeline",
              f'pipe = DiffusionPipeline.from_pretrained("{base}")',
              f'softrepa.load_into(pipe, "{ref}")  # pipe(...) now uses the tokens', "```", "",
              f"Command line: `softrepa generate --model {base} --tokens {ref} --prompts ... --out ...`", ""]
    if config:
        keys = ("data", "resolution", "batch_size", "max_steps", "lr", "seed", "mixed_precision")
        lines += ["## Training recipe", ""]
        lines += [f"* {k}: `{config[k]}`" for k in keys if k in config]
        loss = config.get("loss") or {}
        if loss:
            lines.append(f"* loss: tau `{loss.get('tau')}` ({loss.get('tau_schedule')}), scale `{loss.get('scale')}`")
        lines += ["", "The full resolved config is `config.yaml` in this repo (`softrepa train --config config.yaml` "
                  "reruns it).", ""]
    if evaluation:
        lines += ["## Measured metrics", "", "From `softrepa evaluate` (mean and 95% confidence interval over images)."]
        lines += _metrics_tables(evaluation) + [""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- push
def push_to_hub(tokens_file: str | os.PathLike, repo_id: str, *, config: str | os.PathLike | None = None,
                evaluation: Sequence[str | os.PathLike] | str | os.PathLike = (), private: bool | None = None,
                token: str | None = None, revision: str | None = None, commit_message: str | None = None,
                filename: str = DEFAULT_FILENAME) -> Any:
    """Upload soft tokens with their layout, training config and a model card, in one commit.

    Uploaded: `filename` (the tokens), `tokens.json` (layout), `config.yaml` (the training config:
    `config` if given, else the one recorded in the tokens file, else the run folder's config.yaml
    beside the tokens) and `README.md` (`model_card`). The repo is created when missing.

    Args:
        tokens_file: a local tokens file or run folder.
        repo_id: target model repo, ``owner/name``.
        config: a training config YAML to upload instead of the recorded one.
        evaluation: `softrepa evaluate` output folder(s) whose metrics go into the card.
        private: create the repo private (None: the Hub's default).
        token: Hub token (default: the logged-in one / HF_TOKEN).
        revision: branch to commit to (default: main).
        commit_message: default "Upload SoftREPA tokens".
        filename: the tokens file's name in the repo.
    Returns:
        huggingface_hub's `CommitInfo` of the upload.
    Raises:
        SoftTokensError: not a tokens file; UsageError: a bad repo id; HubError: the Hub refused
            the upload or cannot be reached (one line naming the repo).

    Example:
        >>> softrepa.push_to_hub("runs/sd3/tokens.safetensors", "me/softrepa-sd3", evaluation="eval/tokens")
    """
    import yaml
    from huggingface_hub import HfApi

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id or ""):
        raise UsageError(f"repo id {repo_id!r}: expected owner/name")
    if not filename.endswith(".safetensors"):
        raise UsageError(f"filename {filename!r}: must end in .safetensors")
    src = Path(tokens_file).expanduser()
    if src.is_dir():
        src = src / DEFAULT_FILENAME
    load_soft_tokens(src)  # refuse anything that softrepa could not load back
    if isinstance(evaluation, (str, os.PathLike)):
        evaluation = [evaluation]
    cfg_dict: dict[str, Any] | None = None
    if config is not None:
        cfg_dict = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    elif provenance_of(src).get("train_config"):
        cfg_dict = provenance_of(src)["train_config"]
    elif (src.parent / "config.yaml").is_file():
        cfg_dict = yaml.safe_load((src.parent / "config.yaml").read_text(encoding="utf-8")) or {}
    with tempfile.TemporaryDirectory(prefix="softrepa-push-") as tmp:
        stage = Path(tmp)
        (stage / filename).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, stage / filename)
        sidecar = src.with_suffix(".json")
        if sidecar.is_file():
            shutil.copyfile(sidecar, (stage / filename).with_suffix(".json"))
        else:
            tokens = load_soft_tokens(src)
            (stage / filename).with_suffix(".json").write_text(json.dumps({"layout": tokens.layout.to_dict()}, indent=2))
        if cfg_dict is not None:
            (stage / "config.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        (stage / "README.md").write_text(model_card(repo_id, src, config=cfg_dict, evaluation=evaluation,
                                                    filename=filename), encoding="utf-8")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(stage), repo_type="model", revision=revision,
                                     commit_message=commit_message or "Upload SoftREPA tokens")
        except OSError as e:  # HfHubHTTPError (401 / 403 / 404), offline mode, no connection
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HubError(f"push to {repo_id}: {first} (log in with `huggingface-cli login` or set HF_TOKEN; "
                           "HF_HUB_OFFLINE must be unset)") from e
    logger.info("pushed %s to %s", src, repo_id)
    return info


__all__ = ["model_card", "push_to_hub"]
