"""`softrepa demo` end to end on the bundled miniature, on a tiny budget (smoke test)."""

from __future__ import annotations

import json

import pytest

from softrepa.cli import main


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--train-images", "32", "--max-steps", "2", "--seeds", "0",
               "--max-prompts", "4", "--validation.steps", "4"])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "alignment accuracy" in report and "quality proxy" in report
    assert (out / "grid.png").is_file() and (out / "curves.png").is_file()
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"vanilla", "tokens"}
    assert res["vanilla"]["count"] == 4 and 0.0 <= res["tokens"]["accuracy"] <= 1.0
    assert (out / "train" / "tokens.safetensors").is_file()
    # rerunning into the same folder with another recipe must not reuse the old tokens
    with pytest.raises(SystemExit, match=r"another recipe \(max_steps: 2 -> 3\).*--fresh"):
        main(["demo", "--out", str(out), "--train-images", "32", "--max-steps", "3", "--seeds", "0",
              "--max-prompts", "4", "--validation.steps", "4"])
