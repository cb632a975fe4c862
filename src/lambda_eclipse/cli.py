"""`lambda-eclipse <command>`: a thin argparse layer over typed functions callable from Python.

Every command is a function (:func:`generate`, :func:`encode_subject`, :func:`train_prior`, :func:`miniworld_eval`,
...) and :func:`main` is the one entry point. This module imports nothing heavy at the top: ``--help`` and parse
errors never load torch or diffusers; each command imports what it needs when it runs.

Every user mistake surfaces as :class:`~lambda_eclipse.errors.UserError` and becomes one line on stderr with exit
status 2; nothing is written before all inputs have been checked.
"""

from __future__ import annotations

import argparse
import json
import os

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # annotations only: PIL is not imported at parse time
    from PIL.Image import Image

# The offline miniature model family ships as package data (``src/lambda_eclipse/models``; a checkout's top-level
# ``models/`` is a symlink to it), so it resolves the same in a checkout and in a wheel install.
PACKAGE_MODELS = Path(__file__).resolve().parent / "models"
BUNDLED_MODEL = PACKAGE_MODELS / "miniworld"
BUNDLED_ORACLE = PACKAGE_MODELS / "miniworld-oracle"  # the concept judge of `miniworld eval`

# How the pipeline's check_inputs names the arguments it complains about, in the flags' words.
_FLAG_NAMES = {"num_images_per_prompt": "-n", "num_inference_steps": "--steps", "guidance_scale": "--guidance",
               "height": "--height", "width": "--width", "edge_image": "--edge"}


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


def parse_subject(spec: str) -> tuple[str, str]:
    """'WORD=PATH' -> (word, path)."""
    word, sep, path = spec.partition("=")
    if not sep or not word.strip() or not path.strip():
        raise UserError(f"malformed subject {spec!r}; write it as WORD=PATH, e.g. --subject dog=dog.png")
    return word.strip(), path.strip()


def parse_subjects(specs: list[str]) -> dict[str, str]:
    """Repeated --subject WORD=PATH -> {word: path}. Words that differ only in spelling ("Dog", "dog!") are left for
    the pipeline's check_inputs; the very same word twice is a flag mistake that a dict would hide."""
    subjects: dict[str, str] = {}
    for spec in specs:
        word, path = parse_subject(spec)
        if word in subjects:
            raise UserError(f"subject word {word!r} is given twice; give each subject word once")
        subjects[word] = path
    return subjects


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None, low_memory: bool = False):
    """Load a :class:`LambdaEclipsePipeline`, turning load failures into one-line user errors."""
    import torch

    from .pipeline import LambdaEclipsePipeline

    dtypes = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UserError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    kwargs = {"torch_dtype": dtypes[dtype]} if dtype else {}
    import diffusers
    import transformers

    # Loading bars of every component would bury the generation bar and the one-line errors.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = LambdaEclipsePipeline.from_pretrained(model, **kwargs)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load model {model!r} ({first}); give a local model folder or a Hub id you can reach") from None
    device = device or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if low_memory and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


# ---------------------------------------------------------------------------------------------------- generate
@dataclass
class GenerateArgs:
    """Arguments of `lambda-eclipse generate`."""

    prompt: str
    subjects: dict[str, str] = field(default_factory=dict)  # word -> image path or .safetensors embedding
    edge: str | None = None
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
    low_memory: bool = False
    progress: bool = True


def _check_generate_args(args: GenerateArgs) -> tuple[dict[str, Image | str], Image | None]:
    """Check what `generate` was given before any model loads: the flags (by the pipeline's check_inputs, without
    a model), then the files. Returns (subjects, edge map), each image decoded here once into a PIL image that the
    pipeline then takes as is; ``.safetensors`` embeddings stay paths."""
    from .encoders import load_image
    from .pipeline import check_inputs

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {args.out!r} is a file; give a folder for --out")
    check_inputs(args.prompt, args.subjects, args.edge, args.num_images, args.steps, args.guidance, args.height,
                 args.width, args.scheduler, names=_FLAG_NAMES)
    subjects: dict[str, Image | str] = {}
    for word, path in args.subjects.items():
        if not path.endswith(".safetensors"):
            subjects[word] = load_image(path, what=f"subject {word!r} image")
        elif Path(path).is_file():
            subjects[word] = path
        else:
            raise UserError(f"subject embedding file {path!r} does not exist; check the path")
    edge = None if args.edge is None else load_image(args.edge, what="edge image")
    return subjects, edge


def generate(args: GenerateArgs) -> list[Path]:
    """Generate images and save them as PNGs with prompt, subjects, seed and settings in their text metadata."""
    subjects, edge = _check_generate_args(args)
    import torch

    from .outputs import image_stem, save_png

    model = args.model or default_model()
    pipe = load_pipeline(model, args.device, args.dtype, args.low_memory)
    pipe.set_progress_bar_config(disable=not args.progress)
    seeds = [args.seed + i for i in range(args.num_images)]
    call = dict(
        subjects=subjects or None, edge_image=edge, num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
        scheduler=args.scheduler, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    )
    pipe.check_inputs(args.prompt, **call, names=_FLAG_NAMES)  # this model's checks (size step, prior kind), in flags
    images = pipe(args.prompt, **call).images
    settings = {"model": model, "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler or "default",
                "height": images[0].height, "width": images[0].width, "edge": args.edge}
    request = {"subjects": args.subjects, **settings}
    written = []
    for seed, image in zip(seeds, images):
        metadata = {"prompt": args.prompt, "subjects": args.subjects, "seed": str(seed), "settings": settings}
        path = save_png(image, args.out, image_stem(args.prompt, request, seed), metadata)
        written.append(path)
    return written


def encode_subject(spec: str, out: str, model: str | None = None, device: str | None = None) -> Path:
    """Encode WORD=IMAGE once into a .safetensors subject embedding that `generate` accepts in place of the image."""
    word, path = parse_subject(spec)
    if not out.endswith(".safetensors"):
        raise UserError(f"--out {out!r} must end in .safetensors")
    if Path(out).is_dir():
        raise UserError(f"--out {out!r} is a folder; give a file name ending in .safetensors")
    from .encoders import load_image

    image = load_image(path, what=f"subject {word!r} image")
    pipe = load_pipeline(model or default_model(), device)
    pipe.save_subject_embedding(word, image, out)
    return Path(out)


# ---------------------------------------------------------------------------------------------------- tooling
def train_prior(config: str | None = None, output_dir: str | None = None, max_steps: int | None = None,
                checkpoint_every: int | None = None, overrides: list[str] | None = None) -> Path:
    """Train (or resume) a prior run; returns the released prior folder."""
    from .train import load_config
    from .train import train_prior as run_training

    resolved = load_config(config, overrides or [], output_dir=output_dir, max_steps=max_steps,
                           checkpoint_every=checkpoint_every)
    return run_training(resolved) / "prior"


def features_validate(directory: str):
    """Validate a feature store; returns its report (``report.problems`` lists corrupt or truncated shards)."""
    from .features import validate_feature_store

    return validate_feature_store(directory)


def features_synth(out: str, num_samples: int = 4096, dim: int = 64, max_text_len: int = 32, seed: int = 0) -> Path:
    """Write a synthetic feature store with learnable structure."""
    from .features import synthesize_features

    synthesize_features(out, num_samples=num_samples, dim=dim, max_text_len=max_text_len, seed=seed)
    return Path(out)


def miniworld_build(out: str = "runs/miniworld", install: str | None = None, smoke: bool = False,
                    threads: int = 2) -> Path:
    """Train the whole miniature family (resumes when rerun); ``install`` also writes the finished bundle there."""
    from dataclasses import replace

    from .miniworld.bundle import MiniworldBuild, build_miniworld

    plan = MiniworldBuild.smoke() if smoke else MiniworldBuild()
    return build_miniworld(out, replace(plan, threads=threads), install=install)


def miniworld_eval(out: str, model: str | None = None, oracle: str | None = None, num_prompts: int = 48,
                   seed: int = 0, images_per_prompt: int = 2, steps: int = 25, guidance: float = 4.0,
                   threads: int = 1, priors: dict[str, str] | None = None) -> dict:
    """Score a model on held-out miniworld prompts (default: the bundled model and oracle); returns the metrics
    and writes ``out/metrics.json``, ``metrics.md`` and ``grid.png``."""
    from .miniworld.evaluate import EvalConfig, run_miniworld_eval

    cfg = EvalConfig(images_per_prompt=images_per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                     threads=threads)
    return run_miniworld_eval(model or str(BUNDLED_MODEL), oracle or str(BUNDLED_ORACLE), out, num_prompts, seed,
                              priors or {}, cfg)


def parse_priors(specs: list[str]) -> dict[str, str]:
    """Repeated --prior LABEL=DIR -> {label: dir}; split at the last '=' so labels like "λ=0.5" keep theirs."""
    priors = {}
    for spec in specs:
        label, sep, path = spec.rpartition("=")
        if not sep or not label or not path:
            raise UserError(f"--prior {spec!r}: use LABEL=DIR, e.g. --prior 'λ=0.5=runs/prior-l05'")
        priors[label] = path
    return priors


# ---------------------------------------------------------------------------------------------------- parser
def add_eval_arguments(parser: argparse.ArgumentParser, model: str = str(BUNDLED_MODEL),
                       oracle: str = str(BUNDLED_ORACLE)) -> None:
    """Arguments of `lambda-eclipse miniworld eval` (read by :func:`eval_command`); ``model`` and ``oracle`` are the
    defaults."""
    parser.add_argument("--model", default=model, help=f"pipeline folder with a λ-ECLIPSE prior (default {model})")
    parser.add_argument("--oracle", default=oracle,
                        help=f"oracle folder, written by `miniworld build` (default {oracle})")
    parser.add_argument("--out", required=True, help="output folder: metrics.json, metrics.md, grid.png")
    parser.add_argument("--num-prompts", type=int, default=48, help="held-out prompts (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="held-out scene stream and generator seed (default 0)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25, help="DDIM decoder steps (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="decoder guidance scale (default 4.0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--prior", action="append", default=[], metavar="LABEL=DIR",
                        help="λ sweep: also score the with-subject condition with this prior (repeatable)")


def eval_command(ns: argparse.Namespace) -> dict:
    """Run :func:`miniworld_eval` from parsed :func:`add_eval_arguments` and print where the report went."""
    metrics = miniworld_eval(ns.out, ns.model, ns.oracle, ns.num_prompts, ns.seed, ns.images_per_prompt, ns.steps,
                             ns.guidance, ns.threads, parse_priors(ns.prior))
    print(Path(ns.out) / "metrics.md")
    return metrics


def _generate_command(ns: argparse.Namespace) -> None:
    args = GenerateArgs(
        prompt=ns.prompt, subjects=parse_subjects(ns.subject), edge=ns.edge, num_images=ns.n, seed=ns.seed,
        steps=ns.steps, guidance=ns.guidance, scheduler=ns.scheduler, height=ns.height, width=ns.width,
        model=ns.model, out=ns.out, device=ns.device, dtype=ns.dtype, low_memory=ns.low_memory,
        progress=not ns.quiet,
    )
    for path in generate(args):
        print(path)


def _train_prior_command(ns: argparse.Namespace) -> None:
    if ns.help_config:
        from .train.config import config_help

        print("config keys (override with section.key=value):\n" + config_help())
        return
    print(train_prior(ns.config, ns.output_dir, ns.max_steps, ns.checkpoint_every, ns.overrides))


def _features_validate_command(ns: argparse.Namespace) -> None:
    from .features import format_report

    report = features_validate(ns.directory)
    print(format_report(report))
    if report.problems:
        raise UserError(f"{len(report.problems)} corrupt or truncated shard(s) in {ns.directory}; rebuild or remove them")


# ---------------------------------------------------------------------------------------------------- demo
def demo(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, out: str | None = None) -> None:
    """Serve the web demo (Gradio, the ``demo`` extra) until interrupted; see :mod:`lambda_eclipse.app`."""
    from . import app

    app.launch_demo(app.DemoConfig(model=model, host=host, port=port, out=out), block=True)


def add_demo_parser(commands) -> None:
    """`lambda-eclipse demo` and its flags."""
    web = commands.add_parser("demo", help="the web demo in a browser (needs the demo extra: pip install '.[demo]')")
    web.add_argument("--model", help="model folder or Hub id (default as for generate: the bundled offline model)")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    web.add_argument("--out", help="folder that keeps every generated PNG (default: a temporary folder)")
    web.set_defaults(func=lambda ns: demo(ns.model, ns.host, ns.port, ns.out))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lambda-eclipse", description="λ-ECLIPSE personalized text-to-image generation")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate personalized images from a prompt and subject images")
    gen.add_argument("prompt", help="text prompt; each subject word must occur in it")
    gen.add_argument("--subject", action="append", default=[], metavar="WORD=PATH",
                     help="bind WORD of the prompt to the subject in image PATH (or a .safetensors from encode-subject)")
    gen.add_argument("--edge", metavar="PATH", help="condition on the Canny edges of this image")
    gen.add_argument("-n", type=int, default=1, help="number of images (default 1)")
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
    gen.add_argument("--low-memory", action="store_true", help="keep only the running stage on the GPU")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_generate_command)

    enc = commands.add_parser("encode-subject", help="save a subject's CLIP image embedding for reuse")
    enc.add_argument("subject", metavar="WORD=IMAGE")
    enc.add_argument("--out", required=True, metavar="FILE.safetensors")
    enc.add_argument("--model", help="model folder or Hub id (default as for generate)")
    enc.add_argument("--device")
    enc.set_defaults(func=lambda ns: print(encode_subject(ns.subject, ns.out, ns.model, ns.device)))

    train = commands.add_parser("train-prior", help="train a λ-ECLIPSE prior on a feature store (resumes when rerun)")
    train.add_argument("--config", help="YAML config (configs/prior-debug.yaml, configs/prior-paper.yaml)")
    train.add_argument("--output-dir", help="run folder (checkpoints/, logs/, prior/); rerun to resume")
    train.add_argument("--max-steps", type=int, help="optimizer steps of the whole run")
    train.add_argument("--checkpoint-every", type=int, help="steps between training checkpoints")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=1e-4")
    train.set_defaults(func=_train_prior_command)

    features = commands.add_parser("features", help="feature-store tools").add_subparsers(
        dest="features_command", required=True, parser_class=_Parser)
    check = features.add_parser("validate", help="count samples and find corrupt or truncated shards")
    check.add_argument("directory")
    check.set_defaults(func=_features_validate_command)
    synth = features.add_parser("synth", help="write a synthetic feature store with learnable structure")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num-samples", type=int, default=4096)
    synth.add_argument("--dim", type=int, default=64)
    synth.add_argument("--max-text-len", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=lambda ns: print(features_synth(ns.out, ns.num_samples, ns.dim, ns.max_text_len, ns.seed)))

    world = commands.add_parser("miniworld", help="the miniature world: build the offline model family, evaluate").add_subparsers(
        dest="miniworld_command", required=True, parser_class=_Parser)
    build = world.add_parser("build", help="train the whole miniature family (resumes when rerun)")
    build.add_argument("--out", default="runs/miniworld", help="work folder (default runs/miniworld)")
    build.add_argument("--install", help="also write the finished bundle here (the repo ships it as models/miniworld)")
    build.add_argument("--smoke", action="store_true", help="a minutes-long reduced build that checks the chain")
    build.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    build.set_defaults(func=lambda ns: print(miniworld_build(ns.out, ns.install, ns.smoke, ns.threads)))
    evaluate = world.add_parser("eval", help="generate on held-out instances and prompts and score them")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=eval_command)
    add_demo_parser(commands)
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
        print(f"lambda-eclipse: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lambda-eclipse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
