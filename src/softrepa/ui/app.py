"""The `softrepa ui` page: gradio Blocks over `softrepa.ui.jobs`, and the server around it.

Only this module imports gradio (the optional extra `softrepa[ui]`), so the library and the other
commands never need it. The page holds no logic of its own: each button calls one function of
`jobs`, which calls the library; expected failures (a non-image upload, an empty or too long
prompt, a model folder that does not load) come back as one-line messages in the page
(`gr.Error`) and the server keeps serving. Offline: analytics off, fonts served by the server
itself, nothing fetched from elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

# before gradio is imported: its version check and telemetry read these at import time
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from ..errors import SoftrepaError  # noqa: E402
from .bench import DEFAULT_MODEL, PACKAGED_TOKENS, QUICK_TRAIN_STEPS, Workbench  # noqa: E402
from . import jobs  # noqa: E402

log = logging.getLogger(__name__)

# small images (the miniature's are 32 px) fill their box, upscaled without the browser's blur
CSS = (".pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; } "
       "#model-status p { margin: 0; }")
#: the errors a user can cause (`softrepa.errors`' policy); anything else is a bug and keeps its traceback
_EXPECTED = (SoftrepaError, OSError)


@contextlib.contextmanager
def page_errors() -> Iterator[None]:
    """Expected failures become a message in the page (the server keeps serving)."""
    try:
        yield
    except gr.Error:
        raise
    except _EXPECTED as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.info("refused: %s", message)
        raise gr.Error(message, duration=None) from e


def _image(label: str, elem_id: str, height: int = 256) -> gr.Image:
    # no "share" button: sharing goes through the Hugging Face Hub, and the page works offline
    return gr.Image(label=label, type="pil", format="png", interactive=False, height=height, elem_id=elem_id,
                    elem_classes="pixelated", buttons=["download", "fullscreen"])


def build_app(bench: Workbench, examples_dir: str | None = None) -> gr.Blocks:
    """The page: a model panel, a Generate tab and an Edit tab, every button one `jobs` call.

    Args:
        bench: the workbench with its model loaded (its defaults fill the forms).
        examples_dir: a folder for the miniature's example renders (the Edit tab's examples).
    Returns:
        The `gr.Blocks` (queue and launch it; `serve` does both).
    """
    d = bench.defaults
    with gr.Blocks(title="softrepa: vanilla vs soft tokens", analytics_enabled=False) as app:
        gr.Markdown("## SoftREPA: the same seed without and with soft tokens")
        model_status = gr.Markdown(bench.describe(), elem_id="model-status")
        with gr.Accordion("Model", open=False):
            with gr.Row():
                model_box = gr.Textbox(label="model (folder, hub id or @assets/toy_sd3)", value=bench.model,
                                       elem_id="model-path", scale=3)
                tokens_box = gr.Textbox(label="tokens .safetensors (empty: the demo's for the miniature)",
                                        value="" if bench.tokens == str(PACKAGED_TOKENS) else bench.tokens,
                                        elem_id="model-tokens", scale=3)
                load_btn = gr.Button("Load", elem_id="model-load", scale=1)

        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="prompt", value=d.prompt, elem_id="gen-prompt")
            with gr.Row():
                seeds = gr.Textbox(label=f"seeds (e.g. 0-3; at most {jobs.MAX_SEEDS})", value="0-3", elem_id="gen-seeds")
                cfg = gr.Number(label="CFG", value=d.cfg, elem_id="gen-cfg")
                steps = gr.Number(label="steps", value=d.steps, precision=0, elem_id="gen-steps")
                size = gr.Number(label="size (px)", value=d.size, precision=0, elem_id="gen-size")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-run")
            gen_status = gr.Markdown(elem_id="gen-status")
            with gr.Row():
                with gr.Column():
                    van_img = _image("vanilla (first seed)", "gen-vanilla")
                    van_note = gr.Markdown(elem_id="gen-vanilla-note")
                with gr.Column():
                    tok_img = _image("with tokens (same seed)", "gen-tokens")
                    tok_note = gr.Markdown(elem_id="gen-tokens-note")
                with gr.Column():
                    diff_img = _image("difference x4", "gen-diff")
                    diff_note = gr.Markdown(elem_id="gen-diff-note")
            grid_img = _image("all seeds: vanilla (top) / tokens (bottom)", "gen-grid", height=220)

        with gr.Tab("Edit"):
            with gr.Row():
                upload = gr.File(label=f"source image (at most {jobs.MAX_UPLOAD_MB} MB)", type="filepath",
                                 elem_id="edit-upload", height=120)
                source_view = _image("source", "edit-source", height=200)
            src_prompt = gr.Textbox(label="source prompt (what the image shows)", elem_id="edit-src-prompt")
            tar_prompt = gr.Textbox(label="target prompt (what it should show)", elem_id="edit-tar-prompt")
            if bench.miniature and examples_dir:
                gr.Examples([list(row) for row in jobs.example_sources(examples_dir)], [upload, src_prompt, tar_prompt],
                            label="miniature renders")
            with gr.Row():
                src_cfg = gr.Number(label="source CFG", value=d.src_cfg, elem_id="edit-src-cfg")
                n_van = gr.Number(label="vanilla n_max", value=d.vanilla[0], precision=0, elem_id="edit-nmax-vanilla")
                c_van = gr.Number(label="vanilla target CFG", value=d.vanilla[1], elem_id="edit-cfg-vanilla")
                n_tok = gr.Number(label="tokens n_max", value=d.tokens[0], precision=0, elem_id="edit-nmax-tokens")
                c_tok = gr.Number(label="tokens target CFG", value=d.tokens[1], elem_id="edit-cfg-tokens")
            gr.Markdown(f"Defaults: the paper's FlowEdit presets per arm ({d.edit_steps} steps; vanilla n_max "
                        f"{d.vanilla[0]} / target CFG {d.vanilla[1]:g}, tokens {d.tokens[0]} / {d.tokens[1]:g}).")
            edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-run")
            edit_status = gr.Markdown(elem_id="edit-status")
            with gr.Row():
                with gr.Column():
                    ev_img = _image("edited, vanilla", "edit-vanilla")
                    ev_note = gr.Markdown(elem_id="edit-vanilla-note")
                with gr.Column():
                    et_img = _image("edited, with tokens", "edit-tokens")
                    et_note = gr.Markdown(elem_id="edit-tokens-note")

        def on_generate(prompt_, seeds_, cfg_, steps_, size_, progress=gr.Progress()):
            with page_errors():
                r = jobs.generate(bench, prompt_, seeds_, cfg_, steps_, size_, progress=lambda f, t: progress(f, desc=t))
            status = (f"{len(r.seeds)} seed(s) x 2 arms in {r.seconds:.1f} s "
                      f"({r.seconds / (2 * len(r.seeds)):.2f} s per image)")
            return (r.vanilla[0], r.tokens[0], r.difference, r.grid, r.verdicts[0], r.verdicts[1],
                    f"mean |vanilla - tokens| = {r.mean_difference:.2f} / 255 (seed {r.seeds[0]})", status)

        def on_preview(path):
            if not path:
                return None
            with page_errors():
                return jobs.open_upload(path)

        def on_edit(path, sp, tp, scfg, nv, cv, nt, ct, progress=gr.Progress()):
            with page_errors():
                r = jobs.edit(bench, path, sp, tp, scfg, (nv, cv), (nt, ct),
                              progress=lambda f, t: progress(f, desc=t))
            status = f"both arms in {r.seconds:.1f} s" + (f". {r.lpips_missing}" if r.lpips_missing else "")
            return r.source, r.vanilla, r.tokens, r.notes[0], r.notes[1], status

        def on_load(model, tokens, progress=gr.Progress()):
            progress(0, desc=f"loading {model}")
            with page_errors():
                return bench.load(model, tokens)

        def on_loaded():
            n = bench.defaults
            return n.prompt, n.cfg, n.steps, n.size, n.src_cfg, n.vanilla[0], n.vanilla[1], n.tokens[0], n.tokens[1]

        # one job at a time over every button: they share the model (gradio's concurrency group)
        queued = dict(concurrency_limit=1, concurrency_id="model")
        gen_btn.click(on_generate, [prompt, seeds, cfg, steps, size],
                      [van_img, tok_img, diff_img, grid_img, van_note, tok_note, diff_note, gen_status], **queued)
        # cheap (opens the file): not behind a running job; queued so that its errors reach the page
        upload.change(on_preview, upload, source_view, concurrency_limit=4, concurrency_id="preview")
        edit_btn.click(on_edit, [upload, src_prompt, tar_prompt, src_cfg, n_van, c_van, n_tok, c_tok],
                       [source_view, ev_img, et_img, ev_note, et_note, edit_status], **queued)
        # the form takes the new model's defaults only once it has loaded (a failed load changes nothing)
        load_btn.click(on_load, [model_box, tokens_box], model_status, **queued).success(
            on_loaded, None, [prompt, cfg, steps, size, src_cfg, n_van, c_van, n_tok, c_tok], queue=False)
    return app


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for `--port 0`).

    Args:
        host: the address the server will listen on.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(model: str, tokens: str | None = None, *, host: str = "127.0.0.1", port: int = 7860,
          device: str | None = None, dtype: str | None = None, max_sequence_length: int | None = None,
          metrics_config: str | None = None, train_steps: int = QUICK_TRAIN_STEPS, block: bool = True,
          started: float | None = None, uncond_tokens: str = "positive") -> Any:
    """Load the model, build the page and serve it (until Ctrl-C when `block`).

    Args:
        model, tokens: what to load first (`Workbench.load`).
        host, port: where to listen (port 0: any free port).
        device, dtype, max_sequence_length, metrics_config, train_steps, uncond_tokens: see
            `softrepa.ui.bench.Workbench`.
        block: wait for Ctrl-C (the CLI); False returns the running app (tests, notebooks).
        started: `time.perf_counter()` when the command started (the startup time printed).
    Returns:
        The launched `gr.Blocks` (its `local_url` says where it listens).
    """
    t0 = started if started is not None else time.perf_counter()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes, one line each
    bench = Workbench(device, dtype, max_sequence_length, metrics_config, train_steps, uncond_tokens)
    print(f"softrepa ui: loading {model or DEFAULT_MODEL} ...", flush=True)
    print(f"softrepa ui: {bench.load(model, tokens)}", flush=True)
    examples = tempfile.mkdtemp(prefix="softrepa-ui-examples-")
    app = build_app(bench, examples)
    app.queue(default_concurrency_limit=1, max_size=32)
    port = free_port(host) if port == 0 else port
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, show_error=True, quiet=True,
               max_file_size=f"{jobs.MAX_UPLOAD_MB}mb", allowed_paths=[examples], ssr_mode=False, pwa=False,
               mcp_server=False, enable_monitoring=False, footer_links=[], css=CSS)
    age = process_age()  # includes starting Python and importing torch, diffusers and gradio
    ready = f"{age:.1f} s after the process started" if age is not None else f"{time.perf_counter() - t0:.1f} s"
    print(f"softrepa ui: serving on {app.local_url} (ready {ready}; Ctrl-C stops)", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return app


__all__ = ["CSS", "build_app", "free_port", "page_errors", "process_age", "serve"]
