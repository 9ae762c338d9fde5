"""The Gradio page of ``emag demo`` (thin: every decision is :mod:`.session`'s or the library's).

One page: the condition (prompt, or class for class-conditional models), seed, steps, size where the
model allows it, the method configurations (one per line) with one-click presets; Run and Stop. It shows
the images of every configuration side by side (same initial noise), EMAG's chosen block and scores per
step, the positive / negative predictions decoded from x0 at a few steps, and each image as a PNG with
its parameters. A bad input shows the library's message in the page and the page keeps working.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from ..negatives import choice_figure
from .configs import presets
from .session import Cancelled, DemoSession

CELL = 192  # the side images are shown at (nearest upscaling for tiny models)


def gradio():
    """Gradio, or a clear error naming the extra that installs it."""
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("emag demo needs Gradio: pip install 'emag[demo]'.") from None
    return gr


def _shown(image: Image.Image) -> Image.Image:
    if min(image.size) >= CELL:
        return image
    k = -(-CELL // min(image.size))
    return image.resize((image.width * k, image.height * k), Image.NEAREST)


def outputs_of(results) -> tuple[list, Any, list, list[str], str]:
    """The page's outputs from a comparison: gallery items, the EMAG plot (or None), negatives, PNG paths,
    a status line."""
    gallery = [(_shown(r.image), f"{r.label}\n{r.terms}") for r in results]
    traced = [r for r in results if r.trace and any(row["scores"] for row in r.trace)]
    plot = choice_figure(traced[0].trace) if traced else None
    negatives = [(r.negatives, r.label) for r in results if r.negatives is not None]
    status = f"{len(results)} configuration(s) on the same noise." + (
        f" EMAG's choices: {traced[0].label}." if traced else " No EMAG term ran: no choice plot.")
    return gallery, plot, negatives, [str(r.png) for r in results], status


def build_app(session: DemoSession):
    """The page (a ``gradio.Blocks``) around ``session``."""
    gr = gradio()
    d = session.defaults
    family = session.family
    lines = presets(family, d["cfg"], d["emag_scale"])
    with gr.Blocks(title="emag demo") as app:
        gr.Markdown(f"## emag: guidance methods side by side\nModel: `{session.facts.name}` ({family.label}). "
                    "One method configuration per line, e.g. `CFG 7 + EMAG 1.5`, `CFG 7 + PAG 3 layers=13`, "
                    "`EMAG-Q 1.5`; every line runs on the same initial noise.")
        with gr.Row():
            with gr.Column(scale=1):
                if session.text_conditioned:
                    condition = gr.Textbox(label="Prompt", value="a photo of a cat", elem_id="condition")
                    negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                else:
                    choices = session.class_choices()
                    condition = gr.Dropdown(label="Class", choices=choices, value=choices[0], elem_id="condition")
                    negative = gr.Textbox(visible=False, value="")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=d["seed"], precision=0, elem_id="seed")
                    steps = gr.Number(label="Steps", value=d["steps"], precision=0, elem_id="steps")
                with gr.Row(visible=session.sized):
                    height = gr.Number(label="Height", value=d["height"], precision=0, elem_id="height")
                    width = gr.Number(label="Width", value=d["width"], precision=0, elem_id="width")
                configs = gr.Textbox(label="Method configurations (one per line)", lines=5,
                                     value=next(iter(lines.values())), elem_id="configs")
                with gr.Row():
                    buttons = [(gr.Button(name, size="sm"), text) for name, text in lines.items()]
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    stop = gr.Button("Stop", elem_id="stop")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images (same noise)", columns=4, height="auto", elem_id="images")
                plot = gr.Plot(label="EMAG: score of each candidate block, and the block chosen, per step",
                               elem_id="plot")
                negatives = gr.Gallery(label="x0 of the positive, unconditional and negative branches at a few steps",
                                       columns=2, height=420, object_fit="contain", elem_id="negatives")
                files = gr.File(label="PNGs with their parameters", file_count="multiple", elem_id="files")

        for button, text in buttons:
            button.click(lambda t=text: t, None, configs)

        def compare(configs_text, condition_value, negative_value, seed_value, steps_value, h, w,
                    progress=gr.Progress()):
            try:
                results = session.compare(
                    configs_text, condition_value, int(seed_value), int(steps_value),
                    int(h) if h else None, int(w) if w else None, negative_value or None,
                    progress=lambda f, text: progress(f, desc=text))
            except Cancelled:
                raise gr.Error("Cancelled.") from None
            except (ValueError, TypeError) as exc:
                raise gr.Error(str(exc)) from None
            return outputs_of(results)

        event = run.click(compare, [configs, condition, negative, seed, steps, height, width],
                          [gallery, plot, negatives, files, status])
        stop.click(session.cancel.set, None, None, cancels=[event])
    return app


def launch(session: DemoSession, port: int | None = None, share: bool = False, block: bool = True):
    """Serve the page on localhost (a public link only with ``share``)."""
    app = build_app(session)
    app.queue()
    app.launch(server_name="127.0.0.1", server_port=port, share=share, prevent_thread_lock=not block,
               inbrowser=False)
    return app
