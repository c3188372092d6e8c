"""The package's shape: no import cycle (function-level imports included), family knowledge in one
place per family, one error base, the CLI's shared spellings, `--version`, `python -m softrepa`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import softrepa
from softrepa.cli import COMMANDS, build_parser

PKG = Path(softrepa.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_graph() -> dict[str, set[str]]:
    """module -> softrepa modules it imports anywhere in its body (functions included), except under
    `if TYPE_CHECKING:` (never executed). `from . import x` names the submodule x when it is one."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        edges: set[str] = set()
        skip: set[int] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                skip |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("softrepa")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("softrepa"):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                edges |= set(subs) if subs and len(subs) == len(node.names) else {target}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycle_anywhere_in_the_package():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert len(graph) > 40  # the walk saw the package


def test_the_graph_walker_finds_a_cycle(tmp_path):
    """The cycle test can fail: a function-level import back into an importer is an edge."""
    graph = import_graph()
    assert "softrepa.registry" in graph["softrepa.tokens"]
    assert "softrepa.families.sd3" in graph["softrepa.families"]
    assert "softrepa.tokens" not in graph["softrepa.registry"]  # the registry sits below the tokens
    assert "softrepa.tokens" in graph["softrepa.family"]  # the contract above them names TokenLayout for real


def test_every_denoiser_class_is_named_in_exactly_one_family_module():
    """Outside tests, the toy package and the tiny-model builders, a diffusers denoiser class appears
    in one family module only (messages and docstrings included); the classes are those the registered
    families attach to (each family's `denoiser_class`)."""
    from softrepa.family import family_names, get_family

    denoisers = tuple(dict.fromkeys(get_family(name).denoiser_class for name in family_names()))
    assert len(denoisers) >= 5 and all(denoisers)
    for cls in denoisers:
        holders = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
                   if cls in p.read_text(encoding="utf-8")
                   and not p.relative_to(PKG).as_posix().startswith(("toy/", "tiny.py", "tiny_dit.py"))]
        assert len(holders) == 1 and holders[0].startswith("families/"), (cls, holders)


def test_tokens_module_imports_no_diffusers():
    tree = ast.parse((PKG / "tokens.py").read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [n for n in names if n.split(".")[0] == "diffusers"]


def test_every_error_is_a_softrepa_error():
    from softrepa.errors import ConfigError, DatasetError, LatentCacheError, SoftTokensError, TrainingDiverged

    for cls in (ConfigError, DatasetError, LatentCacheError, SoftTokensError, TrainingDiverged):
        assert issubclass(cls, softrepa.SoftrepaError)
    assert issubclass(SoftTokensError, ValueError)  # code catching the built-in keeps working


def test_version_flag_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "softrepa", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"softrepa {softrepa.__version__}"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0


def _parse(cmd: str, extra: list[str]):
    return build_parser().parse_known_args([cmd, *extra])[0]


@pytest.mark.parametrize("spelling", ["--out", "--output-dir", "--output_dir"])
@pytest.mark.parametrize("cmd,base", [
    ("generate", ["--model", "m", "--prompts", "p"]),
    ("edit", ["--model", "m"]),
    ("evaluate", ["--images", "i"]),
    ("diagnose", ["--model", "m", "--data", "d"]),
    ("import-official", ["--family", "sd3", "--dc-tokens", "x"]),
])
def test_every_command_takes_the_same_output_spellings(cmd, base, spelling):
    assert _parse(cmd, [*base, spelling, "here"]).out == "here"


@pytest.mark.parametrize("spelling,name", [("fp16", "fp16"), ("float16", "fp16"), ("bfloat16", "bf16"),
                                           ("fp32", "fp32"), ("float32", "fp32")])
@pytest.mark.parametrize("cmd,base", [("generate", ["--model", "m", "--prompts", "p", "--out", "o"]),
                                      ("edit", ["--model", "m", "--out", "o"]),
                                      ("evaluate", ["--images", "i", "--out", "o"]),
                                      ("diagnose", ["--model", "m", "--data", "d"])])
def test_dtype_spellings_agree(cmd, base, spelling, name):
    assert _parse(cmd, [*base, "--dtype", spelling]).dtype == name


def test_train_takes_out_and_no_progress():
    args = _parse("train", ["--out", "runs/x", "--no-progress"])
    assert args.out == "runs/x" and args.no_progress


def test_command_table_is_explicit():
    assert {"train", "generate", "edit", "evaluate", "compare", "diagnose", "demo", "toy", "import-official",
            "info"} <= set(COMMANDS)
    for cmd in COMMANDS.values():
        assert callable(cmd.add_arguments) and callable(cmd.run)


def test_log_every_zero_is_refused_up_front():
    from softrepa.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="log_every must be >= 1"):
        load_config(None, {"log_every": 0})


def test_edit_image_defaults_to_the_presets_of_the_tokens_in_effect(monkeypatch):
    """The API and the CLI agree: with tokens attached, edit_image uses n_max 30 / CFG 9 (paper),
    without them the vanilla 33 / 13.5."""
    from PIL import Image

    import softrepa.edit as edit_mod
    from softrepa.tiny import tiny_sd15_pipeline

    seen = []
    monkeypatch.setattr(edit_mod, "edit_latents", lambda pipe, z, s, t, params, **kw: seen.append(params) or z)
    pipe = tiny_sd15_pipeline()
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    edit_mod.edit_image(pipe, img, "a", "b")
    with softrepa.attach(pipe, softrepa.SoftTokens.for_model(pipe, seed=0)) as handle:
        edit_mod.edit_image(pipe, img, "a", "b")
        with handle.disabled():
            edit_mod.edit_image(pipe, img, "a", "b")
    assert [(p.n_max, p.tar_cfg) for p in seen] == [(33, 13.5), (30, 9.0), (33, 13.5)]


def test_trainer_resume_applies_the_resume_policy(tmp_path):
    """`Trainer(cfg).train(resume=True)` refuses a config that trains something else, as the CLI does."""
    from softrepa.config import ConfigError, load_config, save_config
    from softrepa.resume import check_resumable, resume_config

    old = load_config(None, {"output_dir": str(tmp_path), "lr": 1e-3})
    save_config(old, tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="lr"):
        check_resumable(load_config(None, {"output_dir": str(tmp_path), "lr": 5e-3}), tmp_path / "config.yaml")
    check_resumable(load_config(None, {"output_dir": str(tmp_path), "lr": 1e-3, "max_steps": 9999}),
                    tmp_path / "config.yaml")  # the length may change
    assert resume_config(True, None, {"output_dir": str(tmp_path)}).lr == 1e-3  # the saved config is used


def test_benchmark_scripts_compile():
    """Benchmarks are not imported by the suite; a syntax error there would go unseen until a GPU run."""
    import py_compile

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    scripts = sorted(root.glob("*.py"))
    assert scripts
    for path in scripts:
        py_compile.compile(str(path), doraise=True)
