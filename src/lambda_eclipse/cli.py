"""`lambda-eclipse <command>`: a thin argparse layer over typed functions callable from Python.

Every command is a function (:func:`generate`, :func:`encode_subject`, :func:`interpolate` here; the training, data,
evaluation and demo commands in :mod:`lambda_eclipse.cli_tools`) and :func:`main` is the one entry point. This module imports nothing heavy at the top: ``--help`` and parse
errors never load torch or diffusers; each command imports what it needs when it runs.

Every user mistake surfaces as :class:`~lambda_eclipse.errors.UserError` and becomes one line on stderr with exit
status 2; nothing is written before all inputs have been checked.
"""

from __future__ import annotations

import argparse
import os

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError, one_line

if TYPE_CHECKING:  # annotations only: PIL is not imported at parse time
    from PIL.Image import Image

# The offline miniature model family ships as package data (``src/lambda_eclipse/models``; a checkout's top-level
# ``models/`` is a symlink to it), so it resolves the same in a checkout and in a wheel install.
PACKAGE_MODELS = Path(__file__).resolve().parent / "models"
BUNDLED_MODEL = PACKAGE_MODELS / "miniworld"
BUNDLED_ORACLE = PACKAGE_MODELS / "miniworld-oracle"  # the concept judge of `miniworld eval`

# How the pipeline's check_inputs names the arguments it complains about, in the flags' words.
_FLAG_NAMES = {"num_images_per_prompt": "-n", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
               "height": "--height", "width": "--width", "edge_image": "--edge",
               "subject_scale": "--subject-scale", "edge_strength": "--edge-strength"}


def default_model() -> str:
    """The model `generate` and `encode-subject` use without --model, first found of:

    1. ``$LAMBDA_ECLIPSE_MODEL`` (a model folder or Hub id), when set and not empty;
    2. the bundled offline miniature model, package data at ``lambda_eclipse/models/miniworld`` (in a checkout
       also reachable as ``models/miniworld``);
    3. the released Hub stack: the λ-ECLIPSE prior (:data:`lambda_eclipse.hub.DEFAULT_PRIOR`) composed with the
       Kandinsky 2.2 encoders and decoder.
    """
    if os.environ.get("LAMBDA_ECLIPSE_MODEL"):
        return os.environ["LAMBDA_ECLIPSE_MODEL"]
    if (BUNDLED_MODEL / "model_index.json").is_file():
        return str(BUNDLED_MODEL)
    from .hub import DEFAULT_PRIOR

    return DEFAULT_PRIOR


def resolve_model(model: str | None) -> str:
    """``--model`` or :func:`default_model`; an implicit fallback to the Hub stack (a wheel without the bundled
    model) is taken only when that stack is already in the local Hugging Face cache: never a silent multi-GB
    download, nor 30 s of retries offline ending in a misleading error."""
    if model:
        return model
    chosen = default_model()
    from .hub import DEFAULT_PRIOR

    if chosen == DEFAULT_PRIOR and not os.environ.get("LAMBDA_ECLIPSE_MODEL"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(DEFAULT_PRIOR, "config.json"), str):
            raise UserError(f"this install has no bundled model ({BUNDLED_MODEL} is missing) and the Hub stack is not "
                            f"downloaded; pass --model FOLDER, or --model {DEFAULT_PRIOR} to download it (several GB)")
    return chosen


def parse_subject(spec: str) -> tuple[str, str]:
    """'WORD=PATH' -> (word, path)."""
    word, sep, path = spec.partition("=")
    if not sep or not word.strip() or not path.strip():
        raise UserError(f"malformed subject {spec!r}; write it as WORD=PATH, e.g. --subject dog=dog.png")
    return word.strip(), path.strip()


def parse_subjects(specs: list[str]) -> dict[str, str | list[str]]:
    """Repeated --subject WORD=PATH -> {word: path}; the same word again adds a picture of that subject
    ({word: [path, path]}, combined by their normalized mean). Words that differ only in spelling ("Dog", "dog!")
    are left for the pipeline's check_inputs, which refuses them."""
    subjects: dict[str, str | list[str]] = {}
    for spec in specs:
        word, path = parse_subject(spec)
        if word in subjects:
            previous = subjects[word]
            subjects[word] = (previous if isinstance(previous, list) else [previous]) + [path]
        else:
            subjects[word] = path
    return subjects


def check_decoder_paths(unet: str | None, lora: str | None) -> None:
    """``--unet DIR`` / ``--lora FILE`` exist (every command that decodes takes them); read later by
    :func:`lambda_eclipse.adapters.apply_decoder_adapters`."""
    if unet is not None and not Path(unet).is_dir():
        raise UserError(f"--unet {unet!r} is not a folder; give the unet/ folder (or run folder) finetune-decoder wrote")
    if lora is not None and not Path(lora).is_file():
        raise UserError(f"--lora {lora!r} does not exist; give the lora.safetensors finetune-decoder wrote")


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    """--unet / --lora / --lora-scale: a fine-tuned decoder, for every command that decodes."""
    parser.add_argument("--unet", metavar="DIR", help="a fine-tuned decoder UNet (finetune-decoder's run folder or unet/)")
    parser.add_argument("--lora", metavar="FILE", help="a decoder LoRA (finetune-decoder's lora.safetensors)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None, low_memory: bool | str = False):
    """Load a :class:`LambdaEclipsePipeline`, turning load failures into one-line user errors.

    ``low_memory``: False (every component on the device), True ("auto") or a mode of
    :data:`lambda_eclipse.memory.MODE_CHOICES` (resident, prior-then-decoder, model, sequential, auto).
    """
    import torch

    from .checks import resolve_device
    from .pipeline import LambdaEclipsePipeline

    dtypes = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UserError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    resolved = resolve_device(device)  # before loading: a missing GPU is a one-line error, not a late traceback
    import diffusers
    import transformers

    # Loading bars of every component would bury the generation bar and the one-line errors.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    def load(name: str, **kwargs):
        try:
            return LambdaEclipsePipeline.from_pretrained(name, **kwargs)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, ImportError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot load model {name!r} ({first}); give a local model folder or a Hub id you can reach") from None

    from .memory import load_with_memory_mode

    mode = "auto" if low_memory is True else (low_memory or "resident")
    pipe, _ = load_with_memory_mode(load, model, resolved, mode, dtypes[dtype])
    return pipe


# ---------------------------------------------------------------------------------------------------- generate
@dataclass
class GenerateArgs:
    """Arguments of `lambda-eclipse generate`."""

    prompt: str
    subjects: dict[str, str | list[str]] = field(default_factory=dict)  # word -> image path(s) or .safetensors
    edge: str | None = None
    subject_scale: float = 1.0
    edge_strength: float = 1.0
    num_images: int = 1
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None
    model: str | None = None
    out: str = "outputs"
    device: str | None = None
    dtype: str | None = None
    low_memory: bool | str = False  # False, True (auto) or a memory mode (lambda_eclipse.memory)
    progress: bool = True
    batch_size: int = 4  # images per pipeline call; each batch is written as soon as it is made
    unet: str | None = None  # a fine-tuned decoder UNet folder (finetune-decoder's run folder or its unet/)
    lora: str | None = None  # a decoder LoRA file (finetune-decoder's lora.safetensors)
    lora_scale: float = 1.0
    segment: bool = False  # cut each subject picture's subject out onto white first (saved beside the outputs)


def _check_generate_args(args: GenerateArgs) -> tuple[dict[str, Image | str], Image | None]:
    """Check what `generate` was given before any model loads: the flags (by the pipeline's check_inputs, without
    a model), then the files. Returns (subjects, edge map), each image decoded here once into a PIL image that the
    pipeline then takes as is; ``.safetensors`` embeddings stay paths."""
    from .encoders import load_image
    from .inputs import check_inputs

    from .checks import check_output_path

    check_output_path(args.out, "folder", "--out")
    if isinstance(args.batch_size, bool) or not isinstance(args.batch_size, int) or args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive whole number, got {args.batch_size!r}")
    check_inputs(args.prompt, args.subjects, args.edge, args.num_images, args.steps, args.guidance, args.height,
                 args.width, args.scheduler, names=_FLAG_NAMES, subject_scale=args.subject_scale,
                 edge_strength=args.edge_strength)
    subjects: dict[str, Image | str | list] = {}
    for word, paths in args.subjects.items():
        loaded = []
        for path in paths if isinstance(paths, list) else [paths]:
            if not path.endswith(".safetensors"):
                loaded.append(load_image(path, what=f"subject {word!r} image"))
            elif Path(path).is_file():
                loaded.append(path)
            else:
                raise UserError(f"subject embedding file {path!r} does not exist; check the path")
        subjects[word] = loaded if isinstance(paths, list) else loaded[0]
    edge = None if args.edge is None else load_image(args.edge, what="edge image")
    check_decoder_paths(args.unet, args.lora)
    return subjects, edge


def generate(args: GenerateArgs, on_saved=None) -> list[Path]:
    """Generate images and save them as PNGs with prompt, subjects, seed and settings in their text metadata.

    Images are made ``args.batch_size`` at a time and each batch is written before the next starts (``on_saved``
    is called with each path as it is written), so a long run keeps what it made if stopped. Image *i* has its own
    generator seeded ``args.seed + i``, so the images do not depend on the batch size.
    """
    subjects, edge = _check_generate_args(args)
    if args.segment:
        from .dataset.subject import segment_subjects

        subjects = segment_subjects(subjects, args.out, device=args.device)
    import torch

    from .adapters import apply_decoder_adapters
    from .outputs import image_stem, save_png

    model = resolve_model(args.model)
    pipe = load_pipeline(model, args.device, args.dtype, args.low_memory)
    apply_decoder_adapters(pipe, args.unet, args.lora, args.lora_scale)
    seeds = [args.seed + i for i in range(args.num_images)]
    batches = [seeds[i : i + args.batch_size] for i in range(0, len(seeds), args.batch_size)]

    def call(batch: list[int]) -> dict:
        return dict(subjects=subjects or None, edge_image=edge, num_images_per_prompt=len(batch),
                    num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                    width=args.width, scheduler=args.scheduler,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in batch],
                    subject_scale=args.subject_scale, edge_strength=args.edge_strength)

    pipe.check_inputs(args.prompt, **call(batches[0]), names=_FLAG_NAMES)  # this model's checks, in flags
    from tqdm.auto import tqdm

    overall = tqdm(total=len(seeds), desc="images", unit="img", disable=not args.progress or len(batches) == 1)
    pipe.set_progress_bar_config(disable=not args.progress, leave=len(batches) == 1)
    written = []
    for batch in batches:
        images = pipe(args.prompt, **call(batch)).images
        settings = {"model": model, "steps": args.steps, "guidance": args.guidance,
                    "scheduler": args.scheduler or "default", "height": images[0].height, "width": images[0].width,
                    "edge": args.edge}
        settings.update({k: v for k, v in (("unet", args.unet), ("lora", args.lora)) if v is not None})
        settings.update({k: v for k, v in (("subject_scale", args.subject_scale), ("edge_strength", args.edge_strength))
                         if v != 1.0})  # only when set, so that earlier requests keep their names
        if args.lora is not None:
            settings["lora_scale"] = args.lora_scale
        request = {"subjects": args.subjects, **settings}
        for seed, image in zip(batch, images):
            metadata = {"prompt": args.prompt, "subjects": args.subjects, "seed": str(seed), "settings": settings}
            path = save_png(image, args.out, image_stem(args.prompt, request, seed), metadata)
            written.append(path)
            if on_saved is not None:
                on_saved(path)
        overall.update(len(batch))
    overall.close()
    return written


def encode_subject(spec: str | list[str], out: str, model: str | None = None, device: str | None = None,
                   segment: bool = False) -> Path:
    """Encode WORD=IMAGE once into a .safetensors subject embedding that `generate` accepts in place of the image;
    several WORD=IMAGE of one word are combined (normalized mean)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    pairs = [parse_subject(s) for s in specs]
    word = pairs[0][0]
    if any(w != word for w, _ in pairs):
        raise UserError(f"encode-subject takes pictures of one subject; got words {sorted({w for w, _ in pairs})}")
    if not out.endswith(".safetensors"):
        raise UserError(f"--out {out!r} must end in .safetensors")
    from .checks import check_output_path
    from .encoders import load_image

    check_output_path(out, "file", "--out")
    images = [load_image(path, what=f"subject {word!r} image") for _, path in pairs]
    if segment:
        from .dataset.subject import segment_subjects

        images = [segment_subjects({word: image}, str(Path(out).parent), device=device)[word] for image in images]
    pipe = load_pipeline(resolve_model(model), device)
    pipe.save_subject_embedding(word, images if len(images) > 1 else images[0], out)
    return Path(out)


# ---------------------------------------------------------------------------------------------------- interpolate
@dataclass
class InterpolateArgs:
    """Arguments of `lambda-eclipse interpolate`: 2 corners (a line) or 4 (a grid: top-left, top-right,
    bottom-left, bottom-right), each ``{"prompt": str, "subjects": {word: [paths]}, "edge_image": path | None}``."""

    corners: list[dict]
    steps: int = 5
    path: str = "slerp"
    spacing: str = "uniform"
    probes: int | None = None
    seed: int = 0
    num_inference_steps: int = 50
    guidance: float = 7.5
    scheduler: str | None = None
    subject_scale: float = 1.0
    model: str | None = None
    out: str = "outputs"
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    unet: str | None = None  # a fine-tuned decoder (as for generate)
    lora: str | None = None
    lora_scale: float = 1.0


def interpolate(args: InterpolateArgs) -> dict:
    """Interpolate between corners; writes the frames, a labelled grid, a GIF of a line and the embeddings
    (:func:`lambda_eclipse.interpolation_io.write_interpolation`) and returns their paths."""
    from .encoders import load_image
    from .interpolation import Corner, check_corners, default_probes
    from .inputs import check_inputs

    from .checks import check_output_path

    check_output_path(args.out, "folder", "--out")
    check_decoder_paths(args.unet, args.lora)
    check_corners(args.corners, args.steps, args.path, args.spacing, args.probes)
    corners = []
    for k, c in enumerate(args.corners):
        check_inputs(c["prompt"], c["subjects"], c.get("edge_image"), 1, args.num_inference_steps, args.guidance,
                     scheduler=args.scheduler, names=_FLAG_NAMES, subject_scale=args.subject_scale)
        subjects = {w: [p if p.endswith(".safetensors") else load_image(p, what=f"corner {k + 1} subject {w!r} image")
                        for p in paths] for w, paths in c["subjects"].items()}
        edge = None if c.get("edge_image") is None else load_image(c["edge_image"], what=f"corner {k + 1} edge image")
        corners.append(Corner(c["prompt"], subjects, edge))
    from .interpolation_io import write_interpolation

    from .adapters import apply_decoder_adapters

    model = resolve_model(args.model)
    pipe = load_pipeline(model, args.device, args.dtype)
    apply_decoder_adapters(pipe, args.unet, args.lora, args.lora_scale)
    pipe.set_progress_bar_config(disable=not args.progress)
    settings = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance,
                    scheduler=args.scheduler, subject_scale=args.subject_scale)
    decoder = {k: v for k, v in (("unet", args.unet), ("lora", args.lora)) if v is not None}
    if args.lora is not None:
        decoder["lora_scale"] = args.lora_scale
    result = pipe.interpolate(corners, steps=args.steps, path=args.path, seed=args.seed, spacing=args.spacing,
                              probes=args.probes, **settings)
    records = [Corner(c["prompt"], {w: p if len(p) > 1 else p[0] for w, p in c["subjects"].items()}, c.get("edge_image"))
               for c in args.corners]  # the metadata names the files, not the decoded images
    # recorded only when set, so that earlier requests keep their file names
    spacing = {} if args.spacing == "uniform" else {"spacing": args.spacing,
                                                    "probes": args.probes or default_probes(args.steps)}
    return write_interpolation(result, records, args.out, {"model": model, **settings, **decoder, **spacing}, args.seed,
                               args.path, args.steps)


class _CornerAction(argparse.Action):
    """--corner PROMPT starts a corner; the --subject/--edge flags after it belong to it."""

    def __call__(self, parser, ns, value, option=None):
        if option == "--corner":
            ns.corners = (ns.corners or []) + [{"prompt": value, "subjects": {}, "edge_image": None}]
            return
        if not ns.corners:
            parser.error(f"{option} {value!r} comes before any --corner; put each corner's flags after its --corner")
        if option == "--edge":
            ns.corners[-1]["edge_image"] = value
        else:
            try:
                word, path = parse_subject(value)
            except UserError as error:
                parser.error(str(error))
            ns.corners[-1]["subjects"].setdefault(word, []).append(path)  # repeated word: several pictures


def _interpolate_command(ns: argparse.Namespace) -> None:
    written = interpolate(InterpolateArgs(
        corners=ns.corners or [], steps=ns.frames, path=ns.path, spacing=ns.spacing, probes=ns.probes, seed=ns.seed,
        num_inference_steps=ns.steps, guidance=ns.guidance, scheduler=ns.scheduler, subject_scale=ns.subject_scale, model=ns.model, out=ns.out,
        device=ns.device, dtype=ns.dtype, progress=not ns.quiet, unet=ns.unet, lora=ns.lora, lora_scale=ns.lora_scale))
    for key in ("grid", "gif", "embeddings"):
        if written[key] is not None:
            print(written[key])
    print(f"{len(written['frames'])} frames in {ns.out}")


def miniworld_interpolation_eval(out: str, model: str | None = None, oracle: str | None = None, **config) -> dict:
    """Interpolation lines, the grid's corners vs `generate`, the subject-scale curve and one vs several pictures in
    the miniature world (:mod:`lambda_eclipse.miniworld.interpolation_eval`); writes ``out/metrics.md``."""
    from .miniworld.interpolation_eval import InterpolationEvalConfig, run_interpolation_eval

    return run_interpolation_eval(model or str(BUNDLED_MODEL), oracle or str(BUNDLED_ORACLE), out,
                                  InterpolationEvalConfig(**config))


def add_interpolation_commands(commands, world) -> None:
    """The parsers of `interpolate` and `miniworld interpolation-eval`."""
    inter = commands.add_parser("interpolate", help="frames between 2 corners (a line) or 4 (a grid) of prompts+subjects")
    inter.add_argument("--corner", action=_CornerAction, dest="corners", metavar="PROMPT", required=True,
                       help="start a corner (2 or 4; a grid's order: top-left, top-right, bottom-left, bottom-right)")
    inter.add_argument("--subject", action=_CornerAction, dest="corners", metavar="WORD=PATH",
                       help="a subject of the last corner (repeat a word for several pictures of it)")
    inter.add_argument("--edge", action=_CornerAction, dest="corners", metavar="PATH", help="the last corner's edge image")
    inter.add_argument("--frames", type=int, default=5, help="frames per side, corners included (default 5)")
    inter.add_argument("--path", choices=["slerp", "lerp"], default="slerp", help="slerp (default) or lerp (the paper's)")
    inter.add_argument("--spacing", choices=["uniform", "perceptual"], default="uniform",
                       help="frames at even path steps (default) or at even CLIP-I steps (decodes --probes per side)")
    inter.add_argument("--probes", type=int, help="perceptual spacing: decodes per line or grid edge (default 5·(frames-1)+1)")
    inter.add_argument("--seed", type=int, default=0, help="seed of every corner's prior and of the decoder noise")
    inter.add_argument("--steps", type=int, default=50, help="decoder steps (default 50)")
    inter.add_argument("--guidance", type=float, default=7.5, help="decoder guidance scale (default 7.5)")
    inter.add_argument("--scheduler", choices=["ddpm", "ddim"], help="decoder scheduler (default: the model's own)")
    inter.add_argument("--subject-scale", type=float, default=1.0, help="0 text only .. 1 the paper .. 2 (default 1)")
    inter.add_argument("--model", help="model folder or Hub id (default as for generate)")
    inter.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    inter.add_argument("--device")
    inter.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    inter.add_argument("--quiet", action="store_true", help="no progress bar")
    add_decoder_arguments(inter)
    inter.set_defaults(func=_interpolate_command)

    ev = world.add_parser("interpolation-eval", help="measure interpolation, subject scale and several pictures")
    ev.add_argument("--out", required=True, help="output folder (metrics.md, lines.png, grid/); rerun to resume")
    ev.add_argument("--model", help=f"pipeline folder (default {BUNDLED_MODEL})")
    ev.add_argument("--oracle", help=f"oracle folder (default {BUNDLED_ORACLE})")
    ev.add_argument("--num-lines", type=int, default=20)
    ev.add_argument("--threads", type=int, default=1)
    ev.set_defaults(func=_interpolation_eval_command)


def _interpolation_eval_command(ns: argparse.Namespace) -> None:
    miniworld_interpolation_eval(ns.out, ns.model, ns.oracle, num_lines=ns.num_lines, threads=ns.threads)
    print(Path(ns.out) / "metrics.md")


def _generate_command(ns: argparse.Namespace) -> None:
    args = GenerateArgs(
        prompt=ns.prompt, subjects=parse_subjects(ns.subject), edge=ns.edge, num_images=ns.n, seed=ns.seed,
        subject_scale=ns.subject_scale, edge_strength=ns.edge_strength,
        steps=ns.steps, guidance=ns.guidance, scheduler=ns.scheduler, height=ns.height, width=ns.width,
        model=ns.model, out=ns.out, device=ns.device, dtype=ns.dtype, low_memory=ns.low_memory,
        progress=not ns.quiet, batch_size=ns.batch_size, unet=ns.unet, lora=ns.lora, lora_scale=ns.lora_scale,
        segment=ns.segment,
    )
    generate(args, on_saved=lambda path: print(path, flush=True))  # each path as soon as its file is complete


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lambda-eclipse", description="λ-ECLIPSE personalized text-to-image generation")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate personalized images from a prompt and subject images")
    gen.add_argument("prompt", help="text prompt; each subject word must occur in it")
    gen.add_argument("--subject", action="append", default=[], metavar="WORD=PATH",
                     help="bind WORD of the prompt to the subject in image PATH (or a .safetensors from encode-subject); "
                          "repeat a word for several pictures of one subject")
    gen.add_argument("--edge", metavar="PATH", help="condition on the Canny edges of this image")
    gen.add_argument("--subject-scale", type=float, default=1.0,
                     help="how strongly the subjects pull the image: 0 text only .. 1 the paper (default) .. 2")
    gen.add_argument("--edge-strength", type=float, default=1.0, help="0 no edge .. 1 the edge map (default) .. 2")
    gen.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    gen.add_argument("--batch-size", type=int, default=4, help="images per batch; each batch is written as it is "
                                                                "made (default 4)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    gen.add_argument("--steps", type=int, default=50, help="decoder steps (default 50)")
    gen.add_argument("--guidance", type=float, default=7.5, help="decoder guidance scale (default 7.5)")
    gen.add_argument("--scheduler", choices=["ddpm", "ddim"], help="decoder scheduler (default: the model's own)")
    gen.add_argument("--height", type=int, help="image height in px (default: the decoder's native size)")
    gen.add_argument("--width", type=int, help="image width in px")
    gen.add_argument("--model", help="model folder or Hub id (default: $LAMBDA_ECLIPSE_MODEL, else the bundled "
                                     "offline model, else the Hub stack)")
    gen.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    gen.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    gen.add_argument("--low-memory", nargs="?", const="auto", default=False, metavar="MODE",
                     choices=["auto", "resident", "prior-then-decoder", "model", "sequential"],
                     help="auto (default when given: the fastest that fits the free memory), prior-then-decoder "
                          "(free the encoders before the decoder loads), model or sequential (GPU offload), resident")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    add_decoder_arguments(gen)
    gen.add_argument("--segment", action="store_true", help="cut each subject out of its photo onto white first "
                                                            "(Grounding DINO + SAM; the cut-out is saved beside the outputs)")
    gen.set_defaults(func=_generate_command)

    enc = commands.add_parser("encode-subject", help="save a subject's CLIP image embedding for reuse")
    enc.add_argument("subject", metavar="WORD=IMAGE", nargs="+", help="one or more pictures of the subject")
    enc.add_argument("--out", required=True, metavar="FILE.safetensors")
    enc.add_argument("--model", help="model folder or Hub id (default as for generate)")
    enc.add_argument("--device")
    enc.add_argument("--segment", action="store_true", help="cut the subject out of the photo onto white first")
    enc.set_defaults(func=lambda ns: print(encode_subject(ns.subject, ns.out, ns.model, ns.device, ns.segment)))

    from .cli_tools import add_tool_parsers  # the training, data, evaluation and demo commands

    world = add_tool_parsers(commands)
    add_interpolation_commands(commands, world)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """The one entry point: parse ``argv`` (default ``sys.argv[1:]``), run the command, return the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        ns.func(ns)
    except UserError as error:
        print(f"lambda-eclipse: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lambda-eclipse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
