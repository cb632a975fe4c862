"""`lambda-eclipse demo`: the web demo (Gradio), every generation knob in a browser, offline on the bundled model.

The page is a thin layer over plain functions that tests call without a browser:
:func:`form_request` turns the form's values into the pipeline's call arguments (the one place a new knob is
added), :func:`run_generate` runs one request and saves its PNGs through :func:`lambda_eclipse.outputs.save_png`,
:func:`run_interpolate` runs the Interpolate tab's request and writes it with the `interpolate` command's writer,
and :func:`build_demo` lays out the page (two tabs; each endpoint's API parameters are named). User mistakes (a word not in the prompt, an unreadable upload, a bad
size) are :class:`~lambda_eclipse.errors.UserError` and become a message in the page (``gr.Error``), never a
traceback; one request at a time reaches the model (Gradio's queue), so two visitors never collide.

Gradio is an optional dependency (the ``demo`` extra) and is imported only inside the functions that build the page.
"""

from __future__ import annotations

import inspect
import math
import numbers
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

# A checkout's examples/ (the wheel does not ship them; the Examples block is left out when they are missing).
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = [  # prompt, [(word, image file in examples/)], number of images
    ("a photo of a ball left of a paper plane over a teal grid background",
     [("ball", "ball.png"), ("paper plane", "paper-plane.png")], 4),
    ("a star above a ball on a lavender gradient background", [("star", "star.png"), ("ball", "ball.png")], 4),
    ("a picture of a star on a beige plain background", [("star", "star.png")], 4),
]
SCHEDULER_DEFAULT = "model default"
# The interpolation's grid and GIF are as small as the model's images: shown enlarged, pixels kept sharp.
PAGE_CSS = "#grid img, #gif img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
# How check_inputs names the arguments it complains about, in the page's labels.
FIELD_NAMES = {"num_images_per_prompt": "number of images", "num_inference_steps": "steps",
               "guidance_scale": "guidance", "height": "height", "width": "width", "edge_image": "edge image",
               "subject_scale": "subject scale", "edge_strength": "edge strength"}


@dataclass
class DemoConfig:
    """Settings of `lambda-eclipse demo`."""

    model: str | None = None
    """Model folder or Hub id (default: as for `generate`: $LAMBDA_ECLIPSE_MODEL, else the bundled model)."""
    host: str = "127.0.0.1"
    """Address to serve on (127.0.0.1: this machine only; 0.0.0.0: the network)."""
    port: int = 7860
    """Port to serve on."""
    out: str | None = None
    """Folder that keeps every generated PNG (default: a new temporary folder)."""
    device: str | None = None
    """cuda, mps or cpu (default: the best available)."""
    max_subjects: int = 6
    """Subject rows the page offers (add/remove buttons show and hide them)."""
    unet: str | None = None
    """A fine-tuned decoder UNet (finetune-decoder's run folder or its unet/) used instead of the model's."""
    lora: str | None = None
    """A decoder LoRA file (finetune-decoder's lora.safetensors) added to the decoder."""
    lora_scale: float = 1.0
    """The LoRA's strength."""


@dataclass
class GenerateForm:
    """The Generate tab's values for one request (what a person typed and uploaded)."""

    prompt: str
    subjects: list[tuple[str, list[str]]] = field(default_factory=list)  # (word, uploaded image paths) per row
    edge: str | None = None  # uploaded edge-map picture
    seed: int = 0  # image i uses seed + i
    num_images: int = 4
    steps: int = 25
    guidance: float = 4.0
    scheduler: str | None = None  # None: the model's own
    height: int | None = None  # None: the decoder's native size
    width: int | None = None
    subject_scale: float = 1.0  # 0 text only .. 1 the paper .. 2
    edge_strength: float = 1.0  # 0 no edge .. 1 the edge map .. 2
    segment: bool = False  # cut each subject out of its picture onto white first (when the segmenter loads)
    edge_is_map: bool = False  # the edge picture is an edge map already (used as is, not Canny'd)


def _whole_number(value: Any, label: str) -> int:
    """A form number (Gradio sends floats) -> int; a fraction, NaN or text is a user mistake."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value != int(value):
        raise UserError(f"{label} must be a whole number, got {value!r}")
    return int(value)


def form_from_values(prompt: str, words: list[str | None], files: list[Any], edge: str | None, seed: Any,
                     num_images: Any, steps: Any, guidance: Any, scheduler: str | None, height: Any,
                     width: Any, subject_scale: Any = 1.0, edge_strength: Any = 1.0, segment: Any = False,
                     edge_is_map: Any = False) -> GenerateForm:
    """The page's raw values -> a :class:`GenerateForm`. Blank subject rows are skipped; a row with a word and no
    image, or images and no word, is a mistake. ``files``: per row, None, one path or a list of paths."""
    subjects = []
    for index, (word, paths) in enumerate(zip(words, files), start=1):
        word = (word or "").strip()
        paths = [] if paths is None else [paths] if isinstance(paths, (str, Path)) else list(paths)
        paths = [str(getattr(p, "name", p)) for p in paths]  # Gradio 4 passed tempfile wrappers
        if not word and not paths:
            continue
        if not paths:
            raise UserError(f"subject {word!r} (row {index}) has no image; upload a picture of it or clear the word")
        if not word:
            raise UserError(f"subject row {index} has images but no word; type the prompt's word for that subject")
        subjects.append((word, paths))
    return GenerateForm(
        prompt=prompt or "", subjects=subjects, edge=edge or None, seed=_whole_number(seed, "seed"),
        num_images=_whole_number(num_images, "number of images"), steps=_whole_number(steps, "steps"),
        guidance=guidance, scheduler=None if scheduler in (None, "", SCHEDULER_DEFAULT) else scheduler,
        height=None if height in (None, "") else _whole_number(height, "height"),
        width=None if width in (None, "") else _whole_number(width, "width"),
        subject_scale=subject_scale, edge_strength=edge_strength, segment=bool(segment), edge_is_map=bool(edge_is_map),
    )


def form_request(form: GenerateForm, pipe=None) -> tuple[dict[str, Any], list[int]]:
    """A form -> (keyword arguments of ``pipe(form.prompt, **kwargs)``, the seed of each image).

    Every upload is decoded here (an unreadable one is a :class:`UserError` naming the subject) and every value
    checked by the pipeline's ``check_inputs`` (with ``pipe``: also this model's checks), so nothing runs on a
    bad request. A subject with several images passes them as a list. New knobs of the pipeline are added here.
    """
    import torch

    from .encoders import load_image
    from .inputs import check_inputs

    subjects: dict[str, Any] = {}
    for word, paths in form.subjects:
        images = [load_image(path, what=f"subject {word!r} image") for path in paths]
        subjects[word] = images[0] if len(images) == 1 else images
    edge = None if form.edge is None else load_image(form.edge, what="edge image")
    seeds = [form.seed + i for i in range(max(form.num_images, 0))]
    kwargs = dict(
        subjects=subjects or None, edge_image=edge, num_images_per_prompt=form.num_images,
        num_inference_steps=form.steps, guidance_scale=form.guidance, height=form.height, width=form.width,
        scheduler=form.scheduler, subject_scale=form.subject_scale, edge_strength=form.edge_strength,
        edge_is_map=form.edge_is_map,
    )
    check_inputs(form.prompt, **kwargs, pipeline=pipe, names=FIELD_NAMES)
    try:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    except RuntimeError as error:  # a seed outside what torch takes
        raise UserError(f"seed {form.seed} cannot seed a generator ({error}); use a seed from 0 to 2**63") from None
    return {**kwargs, "generator": generators}, seeds


def describe(seed: int, settings: dict[str, Any]) -> str:
    """One image's caption in the gallery: its seed and the settings that made it."""
    return (f"seed {seed} · {settings['steps']} steps · guidance {settings['guidance']} · "
            f"{settings['scheduler']} · {settings['width']}×{settings['height']}"
            + "".join(f" · {k.replace('_', ' ')} {settings[k]}" for k in ("subject_scale", "edge_strength", "lora_scale")
                      if k in settings))


def segment_or_note(subjects: dict[str, Any], out: str | Path, segment: Callable | None = None) -> tuple[dict, str]:
    """``subjects`` with each picture cut out onto white by :func:`~lambda_eclipse.dataset.subject.segment_subjects`
    (``segment``: that function, or a stand-in), or as given with a note saying why (the detector/segmenter cannot
    load, the word is not found): the page shows the note and generates with the pictures as uploaded."""
    if segment is None:
        from .dataset.subject import segment_subjects as segment
    try:
        return segment(subjects, str(out)), ""
    except UserError as error:
        return subjects, f"segmentation skipped, pictures used as uploaded: {error}"


def run_generate(pipe, form: GenerateForm, out: str | Path, model: str = "",
                 on_step: Callable[[int, int], None] | None = None, decoder: dict[str, Any] | None = None,
                 on_note: Callable[[str], None] | None = None, segment: Callable | None = None) -> list[tuple[Path, str]]:
    """Generate one form's images and save each as a PNG with its prompt, subjects, seed and settings in its
    metadata (the CLI's keys). ``on_step(done, total)`` is called after every decoder step; ``decoder``: the
    fine-tuned UNet/LoRA in use (written into the settings); ``on_note(text)``: a message for the page (a
    segmentation that could not run). Returns (PNG path, caption) per image."""
    from .outputs import image_stem, save_png

    kwargs, seeds = form_request(form, pipe)
    if form.segment and kwargs["subjects"]:
        kwargs["subjects"], note = segment_or_note(kwargs["subjects"], out, segment)
        if note and on_note is not None:
            on_note(note)

    def callback(decoder, step: int, timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, form.steps)
        return tensors

    images = pipe(form.prompt, **kwargs, callback_on_step_end=callback).images
    subjects = {word: [Path(p).name for p in paths] for word, paths in form.subjects}
    settings = {"model": model, "steps": form.steps, "guidance": form.guidance,
                "scheduler": form.scheduler or "default", "height": images[0].height, "width": images[0].width,
                "edge": None if form.edge is None else Path(form.edge).name, **(decoder or {})}
    # as `generate` writes them: only when set, so that earlier requests keep their names
    settings.update({k: v for k, v in (("subject_scale", form.subject_scale), ("edge_strength", form.edge_strength))
                     if v != 1.0})
    settings.update({k: True for k in ("segment", "edge_is_map") if getattr(form, k)})
    request = {"subjects": subjects, **settings}
    saved = []
    for seed, image in zip(seeds, images):
        metadata = {"prompt": form.prompt, "subjects": subjects, "seed": str(seed), "settings": settings}
        saved.append((save_png(image, out, image_stem(form.prompt, request, seed), metadata), describe(seed, settings)))
    return saved


CORNER_NAMES = ("start / top-left", "end / top-right", "bottom-left", "bottom-right")


@dataclass
class InterpolateForm:
    """The Interpolate tab's values: 2 corners (a line) or 4 (a grid), each a prompt and one optional subject."""

    corners: list[tuple[str, list[tuple[str, list[str]]]]]  # (prompt, [(word, picture paths)]) per corner
    frames: int = 5  # frames per side, corners included
    path: str = "slerp"
    seed: int = 0
    steps: int = 25
    guidance: float = 4.0
    subject_scale: float = 1.0
    spacing: str = "uniform"  # frames at even path steps, or "perceptual": at even CLIP-I steps


def interpolate_form_from_values(corner_count: Any, prompts: list[str | None], words: list[str | None],
                                 files: list[Any], frames: Any, path: str, seed: Any, steps: Any, guidance: Any,
                                 subject_scale: Any = 1.0, spacing: str = "uniform") -> InterpolateForm:
    """The Interpolate tab's raw values -> an :class:`InterpolateForm` (the first 2 or 4 corners; a corner's word
    without pictures, or pictures without a word, is a mistake)."""
    count = _whole_number(corner_count, "corners")
    if count not in (2, 4):
        raise UserError(f"an interpolation takes 2 corners (a line) or 4 (a grid), got {count}; choose 2 or 4")
    corners = []
    for k in range(count):
        name = f"corner {k + 1} ({CORNER_NAMES[k]})"
        form = form_from_values(prompts[k] or "", [words[k]], [files[k]], None, 0, 1, 1, 1.0, None, None, None)
        if not form.prompt.strip():
            raise UserError(f"{name} has no prompt; type one for each corner")
        corners.append((form.prompt, form.subjects))
    return InterpolateForm(corners, frames=_whole_number(frames, "frames per side"), path=path,
                           seed=_whole_number(seed, "seed"), steps=_whole_number(steps, "steps"), guidance=guidance,
                           subject_scale=subject_scale, spacing=spacing)


def run_interpolate(pipe, form: InterpolateForm, out: str | Path, model: str = "",
                    decoder: dict[str, Any] | None = None) -> dict[str, Any]:
    """Interpolate between a form's corners and write the frames, the grid, the GIF (2 corners) and the embeddings
    with the `interpolate` command's writer (:func:`~lambda_eclipse.interpolation_io.write_interpolation`);
    returns its ``{"frames", "grid", "gif", "embeddings"}`` paths."""
    from .encoders import load_image
    from .interpolation import Corner
    from .interpolation_io import write_interpolation

    corners, records = [], []
    for k, (prompt, subjects) in enumerate(form.corners):
        images = {w: [load_image(p, what=f"corner {k + 1} subject {w!r} image") for p in paths] for w, paths in subjects}
        corners.append(Corner(prompt, {w: v[0] if len(v) == 1 else v for w, v in images.items()} or None))
        # the metadata names the uploaded files, not the decoded pictures
        records.append(Corner(prompt, {w: [Path(p).name for p in paths] for w, paths in subjects} or None))
    settings = dict(num_inference_steps=form.steps, guidance_scale=form.guidance, subject_scale=form.subject_scale)
    result = pipe.interpolate(corners, steps=form.frames, path=form.path, seed=form.seed, spacing=form.spacing,
                              **settings)
    if form.spacing != "uniform":  # recorded only when set, so that earlier requests keep their file names
        settings["spacing"] = form.spacing
    return write_interpolation(result, records, out, {"model": model, **settings, **(decoder or {})}, form.seed,
                               form.path, form.frames)


# ---------------------------------------------------------------------------------------------------- the page
def _require_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise UserError("the demo needs Gradio; install it with pip install 'lambda-eclipse[demo]'") from None
    return gr


def _page_error(gr, error: UserError):
    """A user mistake as a message in the page (no server-side traceback where Gradio lets us say so)."""
    try:
        return gr.Error(str(error), print_exception=False)
    except TypeError:  # Gradio before 5.x's print_exception
        return gr.Error(str(error))


def build_demo(pipe, config: DemoConfig | None = None, model: str = ""):
    """The page (a ``gr.Blocks``) around a loaded pipeline; :func:`launch_demo` serves it. ``model``: the folder
    or Hub id it was loaded from (shown, and written into each PNG's metadata)."""
    gr = _require_gradio()
    from .cli import BUNDLED_MODEL
    from .encoders import canny_edges, load_image, prepare_subject_image

    config = config or DemoConfig()
    out = Path(config.out or tempfile.mkdtemp(prefix="lambda-eclipse-demo-"))
    step_px = pipe.movq_scale_factor**2  # check_inputs' size step
    native_h, native_w = pipe._default_size(None, None)
    rows_max = max(1, config.max_subjects)
    bundled = bool(model) and Path(model).resolve() == BUNDLED_MODEL
    shown_model = "the bundled miniature model (offline)" if bundled else f"`{model or 'a loaded pipeline'}`"
    decoder = {k: v for k, v in (("unet", config.unet), ("lora", config.lora)) if v is not None}
    if config.lora is not None:
        decoder["lora_scale"] = config.lora_scale
    if decoder:
        shown_model += ", decoder: " + ", ".join(f"{k} `{v}`" for k, v in decoder.items())

    def shown(paths, what: str, prepare) -> list:
        """Uploaded pictures as the model sees them (composited on white / their edge map); errors in the page."""
        paths = [] if not paths else [paths] if isinstance(paths, (str, Path)) else paths
        try:
            return [prepare(load_image(str(getattr(p, "name", p)), what=what)) for p in paths]
        except UserError as error:
            raise _page_error(gr, error) from None

    def generate(*values):
        # Called with the components' values in GENERATE_PARAMETERS' order, then Gradio's progress tracker.
        *values, progress = values
        prompt, rows_shown, values = values[0], values[1], values[2:]
        # Rows past the shown count are hidden (removed) rows: their leftover values never join a request.
        shown_rows = min(max(int(rows_shown or 1), 1), rows_max)
        words, files = list(values[:shown_rows]), list(values[rows_max:rows_max + shown_rows])
        started, notes = time.perf_counter(), []
        try:
            form = form_from_values(prompt, words, files, *values[2 * rows_max:])
            progress(0, desc="encoding the prompt and subjects")
            saved = run_generate(pipe, form, out, model, decoder=decoder, on_note=notes.append,
                                 on_step=lambda done, total: progress((done, total), desc="decoding", unit="steps"))
        except UserError as error:
            raise _page_error(gr, error) from None
        for text in notes:
            gr.Warning(text)
        seconds = time.perf_counter() - started
        gallery = [(str(path), caption) for path, caption in saved]
        note = "\n\n".join([f"{len(saved)} image{'s' * (len(saved) != 1)} in {seconds:.1f} s", *notes])
        return gallery, [str(path) for path, _ in saved], note

    settings_names = ["edge", "seed", "num_images", "steps", "guidance", "scheduler", "height", "width",
                      "subject_scale", "edge_strength", "segment", "edge_is_map"]
    # The API's parameter names (Gradio reads them from the signature; a *values function would show param_N).
    generate.__signature__ = _named_signature(
        ["prompt", "subject_rows", *[f"word_{i + 1}" for i in range(rows_max)],
         *[f"pictures_{i + 1}" for i in range(rows_max)], *settings_names], gr.Progress())

    def interpolate(*values):
        *values, progress = values  # named as below, then Gradio's progress tracker
        corner_count, values = values[0], values[1:]
        prompts, words, files = values[:4], values[4:8], values[8:12]
        started = time.perf_counter()
        try:
            form = interpolate_form_from_values(corner_count, prompts, words, files, *values[12:])
            progress(0, desc="interpolating")
            written = run_interpolate(pipe, form, out, model, decoder)
        except UserError as error:
            raise _page_error(gr, error) from None
        files_out = [str(p) for p in [written["grid"], written["gif"], *written["frames"], written["embeddings"]] if p]
        note = f"{len(written['frames'])} frames in {time.perf_counter() - started:.1f} s"
        return str(written["grid"]), None if written["gif"] is None else str(written["gif"]), files_out, note

    interpolate.__signature__ = _named_signature(
        ["corners", *[f"{what}_{k + 1}" for what in ("prompt", "word", "pictures") for k in range(4)],
         "frames", "path", "seed", "steps", "guidance", "subject_scale", "spacing"], gr.Progress())

    css_in_launch = "css" in inspect.signature(gr.Blocks.launch).parameters  # Gradio 6 moved it there
    with gr.Blocks(title="λ-ECLIPSE", **({} if css_in_launch else {"css": PAGE_CSS})) as demo:
        gr.Markdown("# λ-ECLIPSE\nPersonalized text-to-image in the CLIP latent space. Type a prompt, bind its "
                    "words to pictures of your subjects (shown on white, as the model sees them), and generate. "
                    f"Model: {shown_model}.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="prompt", elem_id="prompt", lines=2,
                                        placeholder="a photo of a ball left of a paper plane over a teal grid background")
                    count = gr.Number(value=1, precision=0, visible=False, label="subjects", elem_id="subject-count")
                    rows, words, files, previews = [], [], [], []
                    for i in range(rows_max):
                        with gr.Row(visible=i == 0, elem_id=f"subject-row-{i}") as row:
                            words.append(gr.Textbox(label=f"subject {i + 1}: word of the prompt", placeholder="ball",
                                                    elem_id=f"subject-word-{i}", scale=1))
                            files.append(gr.File(label=f"subject {i + 1}: its picture(s)", file_count="multiple",
                                                 file_types=["image"], elem_id=f"subject-files-{i}", scale=1))
                            previews.append(gr.Gallery(label=f"subject {i + 1} as the model sees it", columns=4,
                                                       height=120, elem_id=f"subject-preview-{i}", scale=1))
                        rows.append(row)
                    with gr.Row():
                        add = gr.Button("add subject", size="sm", elem_id="add-subject")
                        remove = gr.Button("remove subject", size="sm", elem_id="remove-subject")
                    with gr.Accordion("edge map (optional)", open=False):
                        with gr.Row():
                            edge = gr.Image(label="layout picture", type="filepath", elem_id="edge")
                            edge_preview = gr.Image(label="its Canny edges, as the prior sees them", interactive=False)
                        edge_is_map = gr.Checkbox(False, label="the picture is an edge map already (used as is)",
                                                  elem_id="edge-is-map")
                with gr.Column(scale=2):
                    with gr.Row():
                        seed = gr.Number(label="seed (image i uses seed + i)", value=0, precision=0, elem_id="seed")
                        num_images = gr.Slider(1, 16, value=4, step=1, label="number of images", elem_id="num-images")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=25, step=1, label="steps", elem_id="steps")
                        guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="guidance", elem_id="guidance")
                    scheduler = gr.Dropdown([SCHEDULER_DEFAULT, "ddpm", "ddim"], value=SCHEDULER_DEFAULT,
                                            label="scheduler", elem_id="scheduler")
                    with gr.Row():
                        height = gr.Slider(step_px, 2 * native_h, value=native_h, step=step_px, label="height (px)")
                        width = gr.Slider(step_px, 2 * native_w, value=native_w, step=step_px, label="width (px)")
                    with gr.Row():
                        subject_scale = gr.Slider(0, 2, value=1.0, step=0.05, elem_id="subject-scale",
                                                  label="subject scale (0 text only, 1 the paper, 2)")
                        edge_strength = gr.Slider(0, 2, value=1.0, step=0.05, elem_id="edge-strength",
                                                  label="edge strength (0 no edge, 1 the edge map, 2)")
                    segment = gr.Checkbox(False, elem_id="segment", label="cut each subject out of its picture "
                                          "(Grounding DINO + SAM, when they can load; else used as uploaded)")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
            note = gr.Markdown(elem_id="timing")
            gallery = gr.Gallery(label="images (seed and settings below each)", columns=4, height="auto",
                                 elem_id="gallery")
            downloads = gr.File(label="PNG files (prompt, subjects, seed and settings in their metadata)",
                                file_count="multiple", elem_id="downloads")

            settings = [edge, seed, num_images, steps, guidance, scheduler, height, width, subject_scale,
                        edge_strength, segment, edge_is_map]  # in settings_names' order
            inputs = [prompt, count, *words, *files, *settings]
            outputs = [gallery, downloads, note]
            # Every way of generating shares one queue slot: one request at a time reaches the model (the pipeline's
            # scheduler is one object, stepped by each run), the others wait and see their place in the queue.
            one_at_a_time = dict(concurrency_id="model", concurrency_limit=1)
            run.click(generate, inputs, outputs, api_name="generate", **one_at_a_time)
            prompt.submit(generate, inputs, outputs, api_name=False, **one_at_a_time)

            def show_rows(n):
                n = min(max(int(n or 1), 1), rows_max)
                return [gr.update(visible=i < n) for i in range(rows_max)]

            count.change(show_rows, count, rows, api_name=False)
            add.click(lambda n: min(int(n or 1) + 1, rows_max), count, count, api_name=False)
            remove.click(lambda n: max(int(n or 1) - 1, 1), count, count, api_name=False)
            for upload, preview in zip(files, previews):
                upload.change(lambda paths: shown(paths, "subject image", prepare_subject_image), upload, preview,
                              api_name=False)

            def show_edge(path, is_map):
                return (shown(path, "edge image", (lambda image: image.convert("RGB")) if is_map else canny_edges)
                        or [None])[0]

            edge_is_map.change(show_edge, [edge, edge_is_map], edge_preview, api_name=False)
            edge.change(show_edge, [edge, edge_is_map], edge_preview, api_name=False)

            used = max(len(subjects) for _, subjects, _ in EXAMPLES)
            if EXAMPLES_DIR.is_dir() and used <= rows_max:
                table = []
                for text, subjects, n in EXAMPLES:
                    padded = subjects + [("", None)] * (used - len(subjects))
                    table.append([text, len(subjects), *[w for w, _ in padded],
                                  *[None if f is None else [str(EXAMPLES_DIR / f)] for _, f in padded], n])
                examples = gr.Examples(table, [prompt, count, *words[:used], *files[:used], num_images],
                                       label="examples (offline, on the loaded model): click one to generate it")
                # One click fills the form and generates with the form's other settings (nothing is cached).
                examples.load_input_event.then(generate, inputs, outputs, api_name=False, **one_at_a_time)

        with gr.Tab("Interpolate"):
            gr.Markdown("Frames between 2 corners (a line, and its GIF) or 4 (a grid, the paper's Figure 7), each "
                        "corner a prompt with an optional subject; every frame decodes the same seed's noise.")
            corner_count = gr.Radio([2, 4], value=2, label="corners", elem_id="corner-count")
            corner_boxes, c_prompts, c_words, c_files = [], [], [], []
            with gr.Row():
                for k in range(4):
                    with gr.Column(visible=k < 2, min_width=220, elem_id=f"corner-{k}") as box:
                        c_prompts.append(gr.Textbox(label=f"corner {k + 1} ({CORNER_NAMES[k]}): prompt", lines=2,
                                                    elem_id=f"corner-prompt-{k}"))
                        c_words.append(gr.Textbox(label="its subject word (optional)", elem_id=f"corner-word-{k}"))
                        c_files.append(gr.File(label="the subject's picture(s)", file_count="multiple",
                                               file_types=["image"], elem_id=f"corner-files-{k}"))
                    corner_boxes.append(box)
            with gr.Row():
                frames = gr.Slider(2, 9, value=5, step=1, label="frames per side (corners included)", elem_id="frames")
                path = gr.Radio(["slerp", "lerp"], value="slerp", label="path (slerp: on the sphere; lerp: the "
                                "paper's straight line)", elem_id="path")
                i_seed = gr.Number(label="seed (every frame)", value=0, precision=0, elem_id="interpolate-seed")
            with gr.Row():
                i_steps = gr.Slider(1, 100, value=25, step=1, label="steps", elem_id="interpolate-steps")
                i_guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="guidance")
                i_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="subject scale")
                i_spacing = gr.Radio(["uniform", "perceptual"], value="uniform", elem_id="spacing",
                                     label="frame spacing (perceptual: even CLIP-I steps; ~5× the decodes)")
            i_run = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
            i_note = gr.Markdown(elem_id="interpolate-timing")
            with gr.Row():
                grid = gr.Image(label="grid (corners labelled)", type="filepath", interactive=False, elem_id="grid",
                                height=360)
                gif = gr.Image(label="GIF of the line (2 corners)", type="filepath", interactive=False, elem_id="gif",
                               height=360)
            i_files = gr.File(label="frames (PNG, corners and weights in their metadata), grid, GIF, embeddings",
                              file_count="multiple", elem_id="interpolate-downloads")
            corner_count.change(lambda n: [gr.update(visible=k < int(n)) for k in range(4)], corner_count,
                                corner_boxes, api_name=False)
            i_run.click(interpolate, [corner_count, *c_prompts, *c_words, *c_files, frames, path, i_seed, i_steps,
                                      i_guidance, i_scale, i_spacing], [grid, gif, i_files, i_note], api_name="interpolate",
                        **one_at_a_time)
    return demo


def _named_signature(names: list[str], progress) -> inspect.Signature:
    """A signature of positional parameters ``names`` then ``progress=<gr.Progress>``: how Gradio names an
    endpoint's parameters in its API (and where it passes its progress tracker)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([*(inspect.Parameter(n, kind) for n in names),
                              inspect.Parameter("progress", kind, default=progress)])


def launch_demo(config: DemoConfig, block: bool = True, pipe=None):
    """Load the model (unless ``pipe`` is given), build the page and serve it on ``config.host:config.port``.
    ``block=False`` returns the running ``gr.Blocks`` (tests close it with ``.close()``)."""
    _require_gradio()
    from .cli import default_model, load_pipeline

    model = config.model or default_model()
    if pipe is None:
        pipe = load_pipeline(model, config.device)
    from .adapters import apply_decoder_adapters

    apply_decoder_adapters(pipe, config.unet, config.lora, config.lora_scale)
    pipe.set_progress_bar_config(disable=True)
    demo = build_demo(pipe, config, model)
    demo.queue(default_concurrency_limit=1, max_size=64)  # generation shares one slot (see build_demo)
    allowed = [str(EXAMPLES_DIR)] + ([str(Path(config.out).resolve())] if config.out else [])
    css = {"css": PAGE_CSS} if "css" in inspect.signature(demo.launch).parameters else {}  # Gradio 6
    demo.launch(server_name=config.host, server_port=config.port, prevent_thread_lock=not block, quiet=not block,
                allowed_paths=allowed, show_error=False, **css)
    return demo
