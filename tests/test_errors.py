"""The one error policy (`softrepa.errors`, `softrepa.cli.main`): user errors are `SoftrepaError`s and
one line with exit code 2; anything else is a bug, keeps its traceback and exits 1."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import softrepa
from softrepa import errors
from softrepa.cli import main

CLI = Path(softrepa.__file__).resolve().parent / "cli"
INTERNAL = "internal error — please report it (with the traceback above)"


def _info_raises(monkeypatch, exc: BaseException) -> None:
    """`softrepa info` (one library call, no model) raising `exc` from inside the library."""
    import softrepa.cli.tokens as cli_tokens

    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr(cli_tokens, "load_soft_tokens", broken)


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), ValueError("a bare ValueError"),
                                 RuntimeError("a bare RuntimeError"), KeyError("key")])
def test_an_internal_bug_keeps_its_traceback_and_exits_1(monkeypatch, capsys, bug):
    _info_raises(monkeypatch, bug)
    assert main(["info", "x.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(bug).__name__ in err and "broken" in err
    assert err.rstrip().splitlines()[-1] == f"softrepa info: {INTERNAL}"
    assert "error:" not in err  # not dressed up as a user error


@pytest.mark.parametrize("exc", [errors.SoftTokensError("x.safetensors: not a tokens file"),
                                 errors.UsageError("--seeds: cannot parse 'x'"),
                                 errors.RunFolderError("out: holds another run"),
                                 errors.MissingDependencyError("needs gradio: pip install 'softrepa[ui]'"),
                                 FileNotFoundError("x.safetensors: no such file")])
def test_a_user_error_is_one_line_with_exit_code_2(monkeypatch, capsys, exc):
    _info_raises(monkeypatch, exc)
    assert main(["info", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err == f"softrepa info: error: {exc}\n"


@pytest.mark.parametrize("argv", [["--traceback", "info", "x.safetensors"], ["info", "x.safetensors", "--traceback"],
                                  ["-v", "info", "x.safetensors"]])
def test_traceback_flag_shows_the_traceback_of_a_user_error(monkeypatch, capsys, argv):
    _info_raises(monkeypatch, errors.SoftTokensError("x.safetensors: not a tokens file"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "broken" in err
    assert err.rstrip().splitlines()[-1] == "softrepa info: error: x.safetensors: not a tokens file"


@pytest.mark.parametrize("exc", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")])
def test_out_of_memory_is_one_line_with_what_to_lower(monkeypatch, capsys, exc):
    _info_raises(monkeypatch, exc)
    assert main(["info", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("softrepa info: error: out of") and "batch size" in err


def test_ctrl_c_exits_130(monkeypatch, capsys):
    _info_raises(monkeypatch, KeyboardInterrupt())
    assert main(["info", "x.safetensors"]) == 130
    assert capsys.readouterr().err == "softrepa info: interrupted\n"


def test_real_user_errors_are_one_line(tmp_path, capsys):
    """Unpatched paths: a file that is no tokens file, a bad option value checked before any model loads."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    assert main(["info", str(bad)]) == 2
    assert main(["generate", "--model", "m", "--prompts", "a cat", "--seeds", "3-1", "--out", str(tmp_path)]) == 2
    assert main(["generate", "--model", "m", "--prompts", "a cat", "--compare", "--out", str(tmp_path)]) == 2
    assert main(["edit", "--model", "m", "--image", "a.png", "--out", str(tmp_path)]) == 2
    assert main(["diagnose", "--model", "m", "--data", str(tmp_path), "--bins", "0"]) == 2
    assert main(["diagnose", "--model", "m", "--data", str(tmp_path), "--tau", "hot"]) == 2
    assert main(["evaluate", "--images", str(tmp_path), "--metrics", "nope", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 7, err
    assert "--seeds: range '3-1' runs backwards" in err and "--compare needs --tokens" in err
    assert "--source-prompt is required" in err and "--bins must be >= 1" in err and "--tau must be a number" in err


def test_a_bad_option_value_in_argparse_still_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path), "--out", str(tmp_path / "c"), "--sweep", "9,x"])
    assert e.value.code == 2 and "--sweep" in capsys.readouterr().err


def _except_names(handler: ast.ExceptHandler) -> set[str]:
    if handler.type is None:
        return {"<bare>"}
    nodes = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {n.id if isinstance(n, ast.Name) else ast.unparse(n) for n in nodes}


def test_the_cli_catches_no_built_in_value_or_runtime_error():
    """No `except ValueError` / `except RuntimeError` (nor a bare `except`) anywhere in softrepa/cli/;
    main.py's only catch-all is the internal-error handler, after the user-error, interrupt and host-memory
    ones, returning 1 (torch's out-of-GPU-memory is told apart inside it by name)."""
    found = []
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ExceptHandler):
                names = _except_names(node)
                if names & {"ValueError", "RuntimeError", "<bare>", "BaseException"}:
                    found.append(f"{path.name}:{node.lineno} {sorted(names)}")
    assert not found, found
    handlers = [h for h in ast.walk(ast.parse((CLI / "main.py").read_text(encoding="utf-8")))
                if isinstance(h, ast.ExceptHandler)]
    caught = [_except_names(h) for h in handlers]
    assert caught == [{"SoftrepaError", "OSError"}, {"KeyboardInterrupt"}, {"MemoryError"}, {"Exception"}]
    assert any(isinstance(n, ast.Return) and getattr(n.value, "value", None) == 1 for n in ast.walk(handlers[3]))


def test_every_error_class_is_a_softrepa_error_and_its_built_in():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c is not errors.SoftrepaError]
    assert len(classes) >= 11 and set(errors.__all__) == {c.__name__ for c in classes} | {"SoftrepaError"}
    builtin = {errors.UsageError: ValueError, errors.ConfigError: ValueError, errors.DatasetError: ValueError,
               errors.SoftTokensError: ValueError, errors.RunFolderError: RuntimeError,
               errors.MetricError: RuntimeError, errors.StorageError: OSError,
               errors.MissingDependencyError: ImportError}
    for cls in classes:
        assert issubclass(cls, errors.SoftrepaError), cls
    for cls, base in builtin.items():
        assert issubclass(cls, base), cls


def test_library_input_errors_are_softrepa_errors(tmp_path):
    from softrepa.edit import parse_cfgs, read_manifest
    from softrepa.flowedit import FlowEditParams
    from softrepa.prompts import parse_seeds, parse_size, read_prompts

    with pytest.raises(errors.UsageError, match="--seeds"):
        parse_seeds("0,x")
    with pytest.raises(errors.UsageError, match="--size"):
        parse_size("big")
    with pytest.raises(errors.UsageError, match="--target-cfg"):
        parse_cfgs("9,x", 9.0)
    with pytest.raises(errors.UsageError, match="n_max"):
        FlowEditParams(steps=10, n_max=11).validate()
    (tmp_path / "m.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(errors.DatasetError, match="row 1 has no 'source_prompt'"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "p.jsonl").write_text("{oops\n")
    with pytest.raises(errors.DatasetError, match="p.jsonl:1"):
        read_prompts(str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError):  # code written against the built-ins keeps catching them
        parse_seeds("x")


def test_load_model_is_the_library_loader(tmp_path):
    from softrepa.ui.bench import PACKAGED_TOKENS

    params = inspect.signature(softrepa.load_model).parameters
    assert list(params)[:6] == ["model", "tokens", "device", "dtype", "cpu_offload", "compile"]
    assert all(p.kind is p.KEYWORD_ONLY for name, p in params.items() if name != "model")
    with pytest.raises(errors.UsageError, match="--cpu-offload needs a CUDA"):
        softrepa.load_model("@assets/toy_sd3", device="cpu", cpu_offload=True)
    with pytest.raises(errors.UsageError, match="dtype"):
        softrepa.load_model("@assets/toy_sd3", device="cpu", dtype="fp12")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        softrepa.load_model(str(tmp_path / "empty"))
    pipe, handle = softrepa.load_model("@assets/toy_sd3", tokens=PACKAGED_TOKENS, device="cpu", dtype="fp32",
                                       progress=False)
    assert handle is not None and softrepa.attached_handle(pipe) is handle
    assert softrepa.family_of(pipe).name == "sd3"


def test_diagnosis_checks_its_options_before_loading_anything(tmp_path):
    from softrepa.diagnosis import run_diagnosis

    for kw, needle in [({"bins": 0}, "--bins"), ({"batch_size": 1}, "--batch-size must be >= 2"),
                       ({"tau": "warm"}, "--tau")]:
        with pytest.raises(errors.UsageError, match=needle):
            run_diagnosis("no/such/model", tmp_path, **kw)


def test_import_official_offers_the_families_official_converts():
    from softrepa.cli import build_parser
    from softrepa.official import FAMILIES

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["import-official"]
    family = next(a for a in sub._actions if a.dest == "family")
    assert tuple(family.choices) == FAMILIES == ("sd3", "sd15", "sdxl")


def test_page_and_edit_share_the_family_text_length():
    """No hard-coded length: the page's default is the family's `text_length` (the length generate, edit
    and train use); a length for a family that takes none is refused by name."""
    from softrepa.edit import edit_manifest
    from softrepa.tiny import tiny_sd3_pipeline, tiny_sd15_pipeline
    from softrepa.ui.bench import model_defaults

    sd3 = tiny_sd3_pipeline(num_layers=2)
    assert model_defaults(sd3, miniature=False).max_sequence_length == softrepa.family_of(sd3).text_length
    assert model_defaults(sd3, miniature=False, max_sequence_length=77).max_sequence_length == 77
    sd15 = tiny_sd15_pipeline()
    assert model_defaults(sd15, miniature=False).max_sequence_length is None
    with pytest.raises(errors.SoftTokensError, match="take no text length"):
        model_defaults(sd15, miniature=False, max_sequence_length=77)
    with pytest.raises(errors.SoftTokensError, match="take no text length"):
        edit_manifest(sd15, [], "unused", max_sequence_length=77)
