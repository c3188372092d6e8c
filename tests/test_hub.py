"""Tokens on the Hub, offline: loading by repo id from a pre-populated Hub cache (HF_HUB_OFFLINE),
pushing through a recording stand-in for `HfApi` (the call and every file it sends are checked),
provenance in the tokens file (recorded, shown by `softrepa info`, a different base warns once)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import softrepa
from softrepa import SoftTokens, SoftTokensConfig, SoftTokensError, load_soft_tokens, save_soft_tokens
from softrepa.artifact import denoiser_config_hash, provenance_metadata, provenance_of
from softrepa.cli import main as cli_main
from softrepa.cli import main as main_cli
from softrepa.hub import HubRef, parse_hub_ref, resolve_tokens

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache folder; env and huggingface_hub's constants both point at it."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main",
                 commit: str = COMMIT) -> None:
    """Lay files out as huggingface_hub's cache does (refs/<revision> -> snapshots/<commit>/...)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for name, data in files.items():
        f = repo / "snapshots" / commit / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)


@pytest.fixture
def tokens_file(tmp_path, sd3_model):
    tokens = SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2, num_tokens=2), seed=0)
    return save_soft_tokens(tokens, tmp_path / "made" / "tokens.safetensors")


def test_parse_hub_ref():
    assert parse_hub_ref("user/tok") == HubRef("user/tok", None, "tokens.safetensors")
    assert parse_hub_ref("hf://user/tok@v1:a/b.safetensors") == HubRef("user/tok", "v1", "a/b.safetensors")
    assert parse_hub_ref("user/tok:x.safetensors") == HubRef("user/tok", None, "x.safetensors")
    for local in ("runs/tokens.safetensors", "./user/tok", "/abs/tok", "~/tok/x", "a/b/c.safetensors", "tok"):
        assert parse_hub_ref(local) is None, local


def test_load_by_repo_id_from_the_offline_cache(hub_cache, tokens_file, sd3_model):
    data = tokens_file.read_bytes()
    put_in_cache(hub_cache, "someone/sd3-tokens", {"tokens.safetensors": data, "v2/other.safetensors": data})
    put_in_cache(hub_cache, "someone/sd3-tokens", {}, revision="v1")
    want = load_soft_tokens(tokens_file)
    for ref in ("someone/sd3-tokens", "someone/sd3-tokens@v1", "someone/sd3-tokens:v2/other.safetensors",
                "hf://someone/sd3-tokens@main:tokens.safetensors"):
        got = load_soft_tokens(ref)
        assert torch.equal(got.base, want.base) and torch.equal(got.time, want.time), ref
    assert str(resolve_tokens("someone/sd3-tokens")).startswith(str(hub_cache))
    handle = softrepa.load_into(sd3_model, "someone/sd3-tokens")
    handle.remove()


def test_a_local_path_wins_over_a_hub_id(hub_cache, tokens_file, tmp_path, monkeypatch):
    # a folder named like a repo id, holding tokens.safetensors: used, nothing is looked up
    local = tmp_path / "someone" / "sd3-tokens"
    local.mkdir(parents=True)
    (local / "tokens.safetensors").write_bytes(tokens_file.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert resolve_tokens("someone/sd3-tokens") == Path("someone/sd3-tokens/tokens.safetensors")
    load_soft_tokens("someone/sd3-tokens")
    # a run folder is accepted too
    assert load_soft_tokens(tokens_file.parent).layout == load_soft_tokens(tokens_file).layout


def test_missing_hub_ids_are_one_line_errors(hub_cache):
    with pytest.raises(SoftTokensError, match=r"nobody/nothing.*not in the Hub cache while offline") as e:
        load_soft_tokens("nobody/nothing")
    assert "\n" not in str(e.value)
    put_in_cache(hub_cache, "someone/tok", {"tokens.safetensors": b"x"})
    with pytest.raises(SoftTokensError, match=r"someone/tok:nope.safetensors"):
        load_soft_tokens("someone/tok:nope.safetensors")
    with pytest.raises(SoftTokensError, match="no such tokens file"):
        load_soft_tokens("runs/missing.safetensors")


def test_cli_info_takes_a_hub_id_offline(hub_cache, tokens_file, tmp_path):
    put_in_cache(hub_cache, "someone/sd3-tokens", {"tokens.safetensors": tokens_file.read_bytes()})
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "softrepa", "info", "someone/sd3-tokens"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["layout"]["family"] == "sd3"
    bad = subprocess.run([sys.executable, "-m", "softrepa", "info", "nobody/nothing@v3"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "nobody/nothing@v3" in bad.stderr


# --------------------------------------------------------------------------- provenance
def test_provenance_is_recorded_shown_and_kept(tmp_path, sd3_model, capsys):
    tokens = SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2), seed=0)
    tokens.provenance = provenance_metadata(sd3_model, "org/sd3-a", train_config={"lr": 0.001, "model": "org/sd3-a"})
    path = save_soft_tokens(tokens, tmp_path / "t")
    prov = provenance_of(path)
    probe = prov.pop("denoiser_weights_probe")
    assert len(probe) == 12 and all(isinstance(v, float) for v in probe)
    assert prov == {"base_model": "org/sd3-a", "denoiser_config_hash": denoiser_config_hash(sd3_model),
                    "train_config": {"lr": 0.001, "model": "org/sd3-a"}}
    prov["denoiser_weights_probe"] = probe
    # re-saving loaded tokens (e.g. a checkpoint of a continued run) keeps where they came from
    again = save_soft_tokens(load_soft_tokens(path), tmp_path / "again")
    assert provenance_of(again) == prov
    assert cli_main(["info", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["provenance"]["base_model"] == "org/sd3-a"
    assert "softrepa_train_config" not in shown["metadata"]


def test_a_different_base_warns_once_naming_both(tmp_path, sd3_model, caplog):
    from softrepa.tiny import tiny_sd3_transformer

    tokens = SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2), seed=0)
    path = save_soft_tokens(tokens, tmp_path / "t",
                            extra_metadata=provenance_metadata(sd3_model, "org/sd3-a"))
    other = tiny_sd3_transformer(num_layers=6, qk_norm="rms_norm")  # same widths, another architecture (SD3.5-like)
    assert denoiser_config_hash(other) != denoiser_config_hash(sd3_model)
    with caplog.at_level(logging.WARNING, logger="softrepa.artifact"):
        for _ in range(2):
            softrepa.load_into(other, path).remove()
    warnings = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert len(warnings) == 1
    assert "org/sd3-a" in warnings[0] and denoiser_config_hash(other) in warnings[0]
    caplog.clear()
    # the same model named as recorded: silent; an old file without provenance: silent
    sd3_model.register_to_config(_name_or_path="org/sd3-a")
    old = save_soft_tokens(tokens, tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="softrepa.artifact"):
        softrepa.load_into(sd3_model, path).remove()
        softrepa.load_into(other, old).remove()
    assert not [r for r in caplog.records if "trained on" in r.getMessage()]
    # another checkpoint of the same architecture (other weights): warns, naming both
    same_arch = tiny_sd3_transformer(num_layers=6, seed=1)
    same_arch.register_to_config(_name_or_path="org/sd3-b")
    with caplog.at_level(logging.WARNING, logger="softrepa.artifact"):
        softrepa.load_into(same_arch, path).remove()
    msg = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert len(msg) == 1 and "org/sd3-a" in msg[0] and "org/sd3-b" in msg[0] and "other weights" in msg[0]
    caplog.clear()
    # the same weights under another name (a local copy), in half precision: silent
    copy = tiny_sd3_transformer(num_layers=6).to(torch.bfloat16)
    copy.register_to_config(_name_or_path="/data/models/my-copy")
    with caplog.at_level(logging.WARNING, logger="softrepa.artifact"):
        softrepa.load_into(copy, path).remove()
    assert not [r for r in caplog.records if "trained on" in r.getMessage()]
    # a file with provenance but no weights probe falls back to the names
    from softrepa.artifact import WEIGHTS_PROBE_KEY

    meta = {k: v for k, v in provenance_metadata(sd3_model, "org/sd3-a").items() if k != WEIGHTS_PROBE_KEY}
    no_probe = save_soft_tokens(tokens, tmp_path / "noprobe", extra_metadata=meta)
    with caplog.at_level(logging.WARNING, logger="softrepa.artifact"):
        softrepa.load_into(copy, no_probe).remove()
    assert len([r for r in caplog.records if "trained on" in r.getMessage()]) == 1


def test_revision_is_read_from_a_hub_snapshot_path(sd3_model):
    sd3_model.register_to_config(_name_or_path=f"/cache/models--org--sd3/snapshots/{COMMIT}/transformer")
    meta = provenance_metadata(sd3_model)
    assert meta["softrepa_base_revision"] == COMMIT and "softrepa_denoiser_probe" in meta


def test_a_hub_repo_that_does_not_exist_online_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    import httpx

    def missing(*a, **kw):
        url = "https://huggingface.co/nobody/nothing/resolve/main/tokens.safetensors"
        raise RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found for url: " + url,
                                      response=httpx.Response(404, request=httpx.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(SoftTokensError, match=r"nobody/nothing: no such Hub repo 'nobody/nothing'") as e:
        load_soft_tokens("nobody/nothing")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- push
class RecordingHub:
    """Stands in for the Hub API: records create_repo / upload_folder and copies the uploaded files."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}

    def install(self, monkeypatch):
        import huggingface_hub

        hub = self

        def create_repo(self, repo_id, **kw):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://hub.example/{repo_id}"

        def create_branch(self, repo_id, **kw):
            hub.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw):
            hub.calls.append(("upload_folder", kw))
            root = Path(kw["folder_path"])
            hub.files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
            return type("CommitInfo", (), {"commit_url": f"https://hub.example/{kw['repo_id']}/commit/1"})()

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self


def _eval_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"n_images": 8, "metrics": {
        "world": {"mean": 0.625, "std": 0.5, "ci95": [0.31, 0.86], "count": 8},
        "clip": {"error": "weights not configured"}}}))
    return path


def test_push_uploads_tokens_layout_config_and_card(tmp_path, sd3_model, monkeypatch, hub_cache):
    hub = RecordingHub().install(monkeypatch)
    run = tmp_path / "run"
    tokens = SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2), seed=0)
    cfg = {"model": "org/sd3-a", "data": "coco.json", "lr": 0.001, "batch_size": 4, "max_steps": 10,
           "loss": {"tau": 0.07, "tau_schedule": "constant", "scale": 4.0}}
    tokens.provenance = provenance_metadata(sd3_model, "org/sd3-a", train_config=cfg)
    path = save_soft_tokens(tokens, run / "tokens.safetensors")
    evaluation = _eval_folder(tmp_path / "eval_tokens")
    rc = cli_main(["push", str(run), "me/sd3-tokens", "--evaluation", str(evaluation), "--private"])
    assert rc == 0
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["repo_id"] == "me/sd3-tokens" and hub.calls[0][1]["private"] is True
    assert hub.calls[0][1]["exist_ok"] is True
    up = hub.calls[1][1]
    assert up["repo_id"] == "me/sd3-tokens" and up["repo_type"] == "model"
    assert set(hub.files) == {"tokens.safetensors", "tokens.json", "config.yaml", "README.md"}
    assert hub.files["tokens.safetensors"] == path.read_bytes()
    assert json.loads(hub.files["tokens.json"])["layout"]["family"] == "sd3"
    assert yaml.safe_load(hub.files["config.yaml"]) == cfg
    card = hub.files["README.md"].decode()
    assert "base_model: org/sd3-a" in card and "library_name: softrepa" in card
    assert "| world | 0.625 | [0.31, 0.86] | 8 |" in card and "| clip" not in card
    assert 'softrepa.load_into(pipe, "me/sd3-tokens")' in card and "tau `0.07`" in card

    # what was uploaded loads back by repo id from the (offline) cache
    put_in_cache(hub_cache, "me/sd3-tokens", {k: v for k, v in hub.files.items()})
    assert torch.equal(load_soft_tokens("me/sd3-tokens").base, tokens.base)


def test_push_without_provenance_takes_the_run_config_and_checks_inputs(tmp_path, sd3_model, monkeypatch):
    hub = RecordingHub().install(monkeypatch)
    tokens = SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2), seed=0)
    path = save_soft_tokens(tokens, tmp_path / "run" / "tokens.safetensors")
    (tmp_path / "run" / "config.yaml").write_text("model: local/model\nlr: 0.002\n")
    softrepa.push_to_hub(path, "me/t2", revision="dev", filename="sd3/tokens.safetensors")
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[2][1]["revision"] == "dev"
    assert set(hub.files) == {"sd3/tokens.safetensors", "sd3/tokens.json", "config.yaml", "README.md"}
    assert 'softrepa.load_into(pipe, "me/t2:sd3/tokens.safetensors")' in hub.files["README.md"].decode()
    with pytest.raises(ValueError, match="owner/name"):
        softrepa.push_to_hub(path, "not a repo")
    with pytest.raises(FileNotFoundError, match="results.json"):
        softrepa.push_to_hub(path, "me/t3", evaluation=tmp_path / "nowhere")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SoftTokensError, match="junk.safetensors"):
        softrepa.push_to_hub(tmp_path / "junk.safetensors", "me/t4")


def test_generate_cli_takes_tokens_by_repo_id(hub_cache, tmp_path):
    """`--tokens owner/name` through the shared model options: the packaged miniature tokens from the cache."""
    from softrepa.ui.bench import PACKAGED_TOKENS

    put_in_cache(hub_cache, "someone/toy-sd3-tokens", {"tokens.safetensors": PACKAGED_TOKENS.read_bytes()})
    out = tmp_path / "gen"
    assert main_cli(["generate", "--model", "@assets/toy_sd3", "--tokens", "someone/toy-sd3-tokens",
                     "--prompts", "a red circle on the left", "--steps", "2", "--no-progress", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and (out / rows[0]["file"]).is_file()


def test_a_refused_push_is_one_line(tmp_path, sd3_model, monkeypatch, capsys):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kw):
        url = "https://huggingface.co/api/repos/create"
        raise HfHubHTTPError("401 Client Error: Unauthorized for url: " + url + "\nInvalid credentials",
                             response=httpx.Response(401, request=httpx.Request("POST", url)))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    path = save_soft_tokens(SoftTokens.for_model(sd3_model, SoftTokensConfig(num_layers=2)), tmp_path / "t")
    assert cli_main(["push", str(path), "me/tokens"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "push to me/tokens: 401 Client Error" in err and "HF_TOKEN" in err
