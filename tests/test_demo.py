"""`softrepa demo` end to end on the bundled miniature, on a tiny budget (smoke test)."""

from __future__ import annotations

import json

import pytest

from softrepa.cli import main


def test_demo_smoke(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--train-images", "32", "--max-steps", "2", "--seeds", "0",
               "--max-prompts", "3", "--validation.steps", "4", "--loss.calibration_batches", "2"])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "McNemar p" in report and "quality proxy" in report and "positive-only" in report
    # the gates of the bundled miniature (its gates.json) and the trained tokens' own leverage
    assert "leverage of random tokens" in report and "operating point: CFG" in report
    assert "leverage of the tokens trained here: positive-only" in report
    assert (out / "grid.png").is_file() and (out / "curves.png").is_file()
    js = json.loads((out / "results.json").read_text())
    res = js["results"]
    assert set(res) == {"vanilla", "positive-only", "SoftREPA"}
    for arm in res.values():  # every arm judged on the same 3 + 3 (prompt, seed) pairs
        assert {k: len(v["outcomes"]) for k, v in arm.items()} == {"train_pairs": 3, "heldout_pairs": 3}
    s = js["summary"]["vs_vanilla"]
    assert s["n"] == 6 and 0.0 <= s["p_mcnemar"] <= 1.0
    assert (out / "train" / "tokens.safetensors").is_file()
    assert (out / "train_positive_only" / "tokens.safetensors").is_file()
    # rerunning into the same folder with another recipe must not reuse the old tokens
    with pytest.raises(SystemExit, match=r"another recipe \(max_steps: 2 -> 3\).*--fresh"):
        main(["demo", "--out", str(out), "--train-images", "32", "--max-steps", "3", "--seeds", "0",
              "--max-prompts", "3", "--validation.steps", "4", "--loss.calibration_batches", "2"])


def test_demo_agsm_arm(tmp_path):
    """`softrepa demo --agsm`: a fourth arm trained with AGSM (one file holding psi+ and psi-), judged
    on the same pairs, named in the report's headline."""
    import softrepa

    out = tmp_path / "demo"
    rc = main(["demo", "--agsm", "--out", str(out), "--train-images", "32", "--max-steps", "2", "--seeds", "0",
               "--max-prompts", "2", "--validation.steps", "4", "--loss.calibration_batches", "2"])
    assert rc == 0
    js = json.loads((out / "results.json").read_text())
    assert set(js["results"]) == {"vanilla", "positive-only", "SoftREPA", "AGSM"}
    assert {k: len(v["outcomes"]) for k, v in js["results"]["AGSM"].items()} == {"train_pairs": 2, "heldout_pairs": 2}
    assert js["summary"]["agsm"]["vs_vanilla"]["n"] == 4
    assert "AGSM vs vanilla" in (out / "report.md").read_text()
    assert softrepa.token_sets_of(out / "train_agsm" / "tokens.safetensors") == ["positive", "negative"]


def test_comparison_table_counts_and_tests_pairs():
    """The demo / controls table: accuracy, paired delta, up/down counts and McNemar p from outcomes."""
    from softrepa.stats import mcnemar_exact
    from softrepa.toy.effect import comparison_table, summary

    def arm(a, b):
        return {"train_pairs": {"outcomes": a, "quality_proxy": 1.0}, "heldout_pairs": {"outcomes": b, "quality_proxy": 2.0}}

    van = arm([False] * 10, [True] * 5 + [False] * 5)
    pos = arm([True] + [False] * 9, [True] * 5 + [False] * 5)
    sr = arm([True] * 6 + [False] * 4, [True] * 4 + [False] * 6)  # +6 up on train, 1 down on held-out
    res = {"vanilla": van, "positive-only": pos, "SoftREPA": sr}
    table = comparison_table(res, ["train_pairs", "heldout_pairs"])
    assert "| pooled | SoftREPA | 50.0% " in table
    assert "+25.0 pts" in table and "6/1" in table and f"p = {mcnemar_exact(6, 1):.3g}" in table
    h = summary(res, ["train_pairs", "heldout_pairs"], "SoftREPA")
    assert h["vs_vanilla"]["b_only"] == 6 and h["vs_vanilla"]["a_only"] == 1
    assert h["vs_positive-only"]["delta"] == 0.2 and h["quality_proxy_change"] == 0.0
