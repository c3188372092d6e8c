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


def test_table_skips_categories_and_prompt_kinds_without_prompts():
    """A smoke run's first prompts may all be one-object: no 'nan%' rows for pair / binding."""
    from softrepa.toy.demo import _table

    def world(acc, single, colour):
        nan = float("nan")
        return {"accuracy": acc, "quality_proxy": 1.0,
                "categories": {"colour": {"n": 4, "accuracy": colour}, "binding": {"n": 0, "accuracy": nan},
                               "relation": {"n": 0, "accuracy": nan}},
                "by_kind": {"single": {"n": 4, "accuracy": single}, "pair": {"n": 0, "accuracy": nan}}}

    table = _table({"vanilla": world(0.25, 0.25, 0.5), "tokens": world(0.75, 0.75, 1.0)})
    assert "nan" not in table.lower()
    assert "pair-object" not in table and "binding" not in table and "relation" not in table
    assert "| single-object prompts (n=4) | 25.0% | 75.0% | +50.0 pts |" in table
    assert "| colour (n=4) | 50.0% | 100.0% | +50.0 pts |" in table
    assert "quality proxy" in table
