"""`softrepa edit --manifest` reads FlowEdit's own edit file (YAML entries with input_img, source_prompt,
several target_prompts, optional target_codes): one row per target prompt; bad entries are one line."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from softrepa.cli import main
from softrepa.edit import read_manifest

# The layout of the FlowEdit repository's edits.yaml (our own prompts): a folded multi-line
# source prompt, several targets with their codes, and a second entry without codes.
EDITS_YAML = textwrap.dedent("""\
    -
        input_img:  example_images/a.png
        source_prompt: A red circle on a light background, drawn
          with crisp edges and no shading.

        target_prompts:
        - A blue circle on a light background, drawn
          with crisp edges and no shading.
        - A red square on a light background.

        target_codes:
        - blue
        - square

    -
        input_img:  example_images/b.png
        source_prompt: a green triangle
        target_prompts:
        - a yellow triangle
    """)


@pytest.fixture
def flowedit_dir(tmp_path):
    (tmp_path / "example_images").mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        arr = (np.random.RandomState(seed).rand(16, 16, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "example_images" / f"{name}.png")
    (tmp_path / "edits.yaml").write_text(EDITS_YAML)
    return tmp_path


def test_official_yaml_gives_one_row_per_target(flowedit_dir):
    rows = read_manifest(flowedit_dir / "edits.yaml")
    assert [(r["target_prompt"], r.get("target_code")) for r in rows] == [
        ("A blue circle on a light background, drawn with crisp edges and no shading.", "blue"),
        ("A red square on a light background.", "square"),
        ("a yellow triangle", None)]
    assert rows[0]["source_prompt"] == "A red circle on a light background, drawn with crisp edges and no shading."
    assert rows[0]["image"] == rows[1]["image"] == str(flowedit_dir / "example_images" / "a.png")
    assert rows[2]["image"] == str(flowedit_dir / "example_images" / "b.png")


def test_paths_relative_to_the_working_directory_also_work(flowedit_dir, tmp_path_factory, monkeypatch):
    # the authors' Data/flowedit.yaml names init_img paths relative to where their script runs
    other = tmp_path_factory.mktemp("yaml")
    (other / "flowedit.yaml").write_text("- init_img: example_images/b.png\n  source_prompt: x\n"
                                         "  target_prompts: [y, z]\n")
    monkeypatch.chdir(flowedit_dir)
    rows = read_manifest(other / "flowedit.yaml")
    assert [r["target_prompt"] for r in rows] == ["y", "z"]
    assert rows[0]["image"] == str(flowedit_dir / "example_images" / "b.png")


@pytest.mark.parametrize("body,message", [
    ("- source_prompt: a\n  target_prompts: [b]\n", "entry 1 has no 'input_img'"),
    ("- input_img: example_images/a.png\n  target_prompts: [b]\n", "entry 1 has no 'source_prompt'"),
    ("- input_img: example_images/a.png\n  source_prompt: a\n", "entry 1 has no 'target_prompts'"),
    ("- input_img: example_images/a.png\n  source_prompt: a\n  target_prompts: [b, '']\n",
     "row 1 (target 2) has no 'target_prompt'"),
    ("- input_img: example_images/a.png\n  source_prompt: a\n  target_prompts: [b, c]\n  target_codes: [x]\n",
     "entry 1: 'target_codes' must list one code per target prompt"),
    ("input_img: a.png\n", "expected a YAML list of FlowEdit entries"),
    ("- [unclosed\n", "not valid YAML"),
    ("- input_img: example_images/missing.png\n  source_prompt: a\n  target_prompts: [b]\n",
     "1 source image(s) not found"),
])
def test_bad_entries_are_one_line_errors_naming_the_field(flowedit_dir, body, message, capsys):
    bad = flowedit_dir / "bad.yaml"
    bad.write_text(body)
    rc = main(["edit", "--model", "@assets/toy_sd3", "--manifest", str(bad), "--out", str(flowedit_dir / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and str(bad) in err and err.count("\n") == 1


def test_cli_edits_every_target_of_the_yaml(flowedit_dir, tmp_path):
    from softrepa.tiny import tiny_sd15_pipeline

    model = tmp_path / "sd15"
    tiny_sd15_pipeline().save_pretrained(model)
    out = tmp_path / "out"
    assert main(["edit", "--model", str(model), "--manifest", str(flowedit_dir / "edits.yaml"), "--steps", "2",
                 "--n-max", "2", "--no-progress", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00000_a.png", "00001_a.png", "00002_b.png"]
    assert [r.get("target_code") for r in rows] == ["blue", "square", None]
    assert rows[1]["target_prompt"] == "A red square on a light background."
    assert all((out / r["file"]).is_file() for r in rows)
