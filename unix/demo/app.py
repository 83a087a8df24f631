"""`unix demo`: a Gradio page over the same inference code as the CLI (report, generate).

One model per process, loaded once; requests wait in Gradio's queue and run one at a time, so
concurrent users wait instead of competing for the model. Every input goes through the checks the
CLI uses; a bad upload or value becomes a message in the page (gr.Error), never a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from unix.errors import UserError

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAX_SEED = 2**31 - 1


def example_images() -> list[str]:
    return sorted(str(p) for p in EXAMPLES.glob("*.png")) if EXAMPLES.is_dir() else []


def example_prompts() -> list[str]:
    path = EXAMPLES / "prompts.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def _read(path: str):
    """The CLI's reader; an error names the uploaded file, not Gradio's temporary copy of it."""
    from unix.infer.io import read_image

    try:
        return read_image(path)
    except UserError as e:
        raise UserError(str(e).replace(str(path), Path(path).name)) from None


class Demo:
    """The page's actions, plain functions of their inputs: testable without a browser."""

    def __init__(self, pipe):
        self.pipe = pipe

    def preview(self, image_path: str | None):
        """The uploaded file as the model's reader sees it (gray, 8-bit), for the page to show."""
        import numpy as np

        if not image_path:
            return None
        return (_read(image_path) * 255).round().astype(np.uint8)

    def report(self, image_path: str | None, instruction: str) -> str:
        from unix.infer import ReportSettings

        if not image_path:
            raise UserError("upload a chest X-ray first (PNG, JPG or DICOM)")
        image = _read(image_path)  # the CLI's reader: a bad file is named here
        instruction = (instruction or "").strip()
        settings = ReportSettings(instruction=instruction) if instruction else ReportSettings()
        report = self.pipe.reports([image_path], settings)[0]
        far = self.far_from_training(image)
        return report if not far else "Note: this image is far from the images these weights were trained on (" + \
            "; ".join(far) + "): read the report with that in mind.\n\n" + report

    def far_from_training(self, image) -> list[str]:
        """The CLI's out-of-domain reasons for an image (nothing when the folder has no statistics)."""
        from unix.infer.domain import far_from_training, read_input_stats

        if not hasattr(self, "_stats"):
            self._stats = read_input_stats(self.pipe.folder)
        return [] if self._stats is None else far_from_training(image, self._stats)

    def generate(self, prompt: str, seed: float, guidance: float, steps: float, size: str, progress=None):
        prompt = (prompt or "").strip()
        if not prompt:
            raise UserError("write a prompt first (e.g. a FINDINGS / IMPRESSION report)")
        seed, steps = int(seed), int(steps)
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and {MAX_SEED}")
        if steps < 2:
            raise UserError("steps must be at least 2")
        if not guidance >= 1.0 or guidance != guidance or guidance == float("inf"):
            raise UserError("guidance must be a finite number >= 1")
        size = int(size)
        try:
            self.pipe.cfg.token_grid(size)
        except ValueError as e:
            raise UserError(f"size: {e}") from None
        settings = self.pipe.image_settings(size=size, guidance=float(guidance), steps=steps)
        on_step = (lambda done, total: progress(done / total, desc=f"denoising step {done}/{total}")) if progress else None
        return self.pipe.images([prompt], [seed], settings, on_step)[0]

    def sizes(self) -> list[str]:
        out = []
        for s in (128, 256, 384, 512):
            try:
                self.pipe.cfg.token_grid(s)
                out.append(str(s))
            except ValueError:
                continue
        return out or [str(self.pipe.cfg.max_image_size)]


def _shown(fn):
    """Run `fn`; a UserError (or an unreadable upload) becomes a message in the page."""
    import gradio as gr

    def run(*args):
        try:
            return fn(*args)
        except UserError as e:
            raise gr.Error(str(e)) from None

    return run


def build_app(pipe, title: str = "UniX demo"):
    import gradio as gr

    demo = Demo(pipe)
    defaults = pipe.image_settings()
    sizes = demo.sizes()
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nWeights: `{pipe.folder}`. A research model; not for clinical use.")
        with gr.Tab("Report"):
            with gr.Row():
                with gr.Column():
                    # a file, not gr.Image: DICOM uploads work, and a bad file reaches our reader,
                    # whose message names the problem
                    image = gr.File(label="Chest X-ray (PNG, JPG, DICOM)", type="filepath", elem_id="report-image")
                    shown = gr.Image(label="As the model reads it", type="numpy", image_mode="L", interactive=False,
                                     elem_id="report-preview")
                with gr.Column():
                    instruction = gr.Textbox(label="Instruction (empty: the paper's FINDINGS and IMPRESSION instruction)",
                                             elem_id="report-instruction")
                    report_button = gr.Button("Write report", variant="primary", elem_id="report-button")
                    report = gr.Textbox(label="Report", lines=8, elem_id="report-text")
            if example_images():
                gr.Examples(example_images(), inputs=[image])
            image.change(_shown(demo.preview), image, shown)
            report_button.click(_shown(demo.report), [image, instruction], report, api_name="report")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt (a report)", lines=4, elem_id="generate-prompt")
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED)
                    guidance = gr.Slider(1.0, 8.0, value=float(defaults.guidance), step=0.1, label="Guidance")
                    steps = gr.Slider(2, 100, value=int(defaults.steps), step=1, label="Steps")
                    size = gr.Dropdown(sizes, value=sizes[-1], label="Size (px)")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                output = gr.Image(label="Generated X-ray", type="numpy", image_mode="L", elem_id="generate-image")
            if example_prompts():
                gr.Examples([[p] for p in example_prompts()], inputs=[prompt])
            def generate(prompt, seed, guidance, steps, size, progress=gr.Progress()):
                return _shown(demo.generate)(prompt, seed, guidance, steps, size, progress)

            generate_button.click(generate, [prompt, seed, guidance, steps, size], output, api_name="generate")
    return app
