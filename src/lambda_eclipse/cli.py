"""`lambda-eclipse <command>`: a thin argparse layer over typed functions callable from Python.

Every user mistake surfaces as :class:`~lambda_eclipse.errors.UserError` and becomes one line on stderr with exit
status 2; nothing is written before all inputs have been checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# The bundled offline miniature model (models/miniworld in a source checkout), else the released Hub stack.
BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "models" / "miniworld"
BUNDLED_ORACLE = BUNDLED_MODEL.with_name("miniworld-oracle")  # the concept judge of `miniworld eval`
HUB_MODEL = "ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0"


def default_model() -> str:
    """The model `generate` uses without --model: $LAMBDA_ECLIPSE_MODEL, the bundled miniature model, or the Hub."""
    if os.environ.get("LAMBDA_ECLIPSE_MODEL"):
        return os.environ["LAMBDA_ECLIPSE_MODEL"]
    return str(BUNDLED_MODEL) if (BUNDLED_MODEL / "model_index.json").is_file() else HUB_MODEL


def parse_subject(spec: str) -> tuple[str, str]:
    """'WORD=PATH' -> (word, path)."""
    word, sep, path = spec.partition("=")
    if not sep or not word.strip() or not path.strip():
        raise UserError(f"malformed subject {spec!r}; write it as WORD=PATH, e.g. --subject dog=dog.png")
    return word.strip(), path.strip()


def parse_subjects(specs: list[str]) -> dict[str, str]:
    from .conditioning import normalize_subject_word

    subjects: dict[str, str] = {}
    seen: set[str] = set()
    for spec in specs:
        word, path = parse_subject(spec)
        key = normalize_subject_word(word)
        if key in seen:
            raise UserError(f"subject word {key!r} is given twice; give each subject word once")
        seen.add(key)
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


@dataclass
class GenerateArgs:
    """Arguments of `lambda-eclipse generate`."""

    prompt: str
    subjects: dict[str, str] = field(default_factory=dict)
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


def _check_generate_args(args: GenerateArgs) -> None:
    from .encoders import load_image

    if not args.prompt or not args.prompt.strip():
        raise UserError("the prompt is empty; give a text prompt such as 'a dog on the beach'")
    for name, value in (("--steps", args.steps), ("-n", args.num_images)):
        if value <= 0:
            raise UserError(f"{name} must be a positive whole number, got {value}")
    if not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number, got {args.guidance}")
    if args.scheduler not in (None, "ddpm", "ddim"):
        raise UserError(f"unknown scheduler {args.scheduler!r}; choose ddpm or ddim")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {args.out!r} is a file; give a folder for --out")
    for word, path in args.subjects.items():
        if not path.endswith(".safetensors"):
            load_image(path, what=f"subject {word!r} image")
        elif not Path(path).is_file():
            raise UserError(f"subject embedding file {path!r} does not exist; check the path")
    if args.edge is not None:
        load_image(args.edge, what="edge image")


def generate(args: GenerateArgs) -> list[Path]:
    """Generate images and save them as PNGs with prompt, subjects, seed and settings in their text metadata."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    _check_generate_args(args)
    model = args.model or default_model()
    pipe = load_pipeline(model, args.device, args.dtype, args.low_memory)
    pipe.set_progress_bar_config(disable=not args.progress)
    seeds = [args.seed + i for i in range(args.num_images)]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    images = pipe(
        args.prompt, subjects=args.subjects or None, edge_image=args.edge, num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
        scheduler=args.scheduler, generator=generators,
    ).images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:48] or "image"
    settings = {"model": model, "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler or "default",
                "height": images[0].height, "width": images[0].width, "edge": args.edge}
    written = []
    for seed, image in zip(seeds, images):
        info = PngInfo()
        info.add_text("prompt", args.prompt)
        info.add_text("subjects", json.dumps(args.subjects))
        info.add_text("seed", str(seed))
        info.add_text("settings", json.dumps(settings))
        path = out / f"{slug}-seed{seed}.png"
        temporary = path.with_name(path.name + ".tmp")
        image.save(temporary, format="PNG", pnginfo=info)
        os.replace(temporary, path)
        written.append(path)
    return written


def encode_subject(spec: str, out: str, model: str | None = None, device: str | None = None) -> Path:
    """Encode WORD=IMAGE once into a .safetensors subject embedding that `generate` accepts in place of the image."""
    from .encoders import load_image

    word, path = parse_subject(spec)
    load_image(path, what=f"subject {word!r} image")
    if not out.endswith(".safetensors"):
        raise UserError(f"--out {out!r} must end in .safetensors")
    if Path(out).is_dir():
        raise UserError(f"--out {out!r} is a folder; give a file name ending in .safetensors")
    pipe = load_pipeline(model or default_model(), device)
    pipe.save_subject_embedding(word, path, out)
    return Path(out)


# ---------------------------------------------------------------------------------------------------- parser
def _generate_command(ns: argparse.Namespace) -> None:
    args = GenerateArgs(
        prompt=ns.prompt, subjects=parse_subjects(ns.subject), edge=ns.edge, num_images=ns.n, seed=ns.seed,
        steps=ns.steps, guidance=ns.guidance, scheduler=ns.scheduler, height=ns.height, width=ns.width,
        model=ns.model, out=ns.out, device=ns.device, dtype=ns.dtype, low_memory=ns.low_memory,
        progress=not ns.quiet,
    )
    for path in generate(args):
        print(path)


def _encode_subject_command(ns: argparse.Namespace) -> None:
    print(encode_subject(ns.subject, ns.out, ns.model, ns.device))


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
    gen.add_argument("--model", help="model folder or Hub id (default: the bundled offline model, else the Hub stack)")
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
    enc.set_defaults(func=_encode_subject_command)

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
    synth.set_defaults(func=_features_synth_command)
    world = commands.add_parser("miniworld", help="the miniature world: build the offline model family, evaluate").add_subparsers(
        dest="miniworld_command", required=True, parser_class=_Parser)
    build = world.add_parser("build", help="train the whole miniature family (resumes when rerun)")
    build.add_argument("--out", default="runs/miniworld", help="work folder (default runs/miniworld)")
    build.add_argument("--install", help="also write the finished bundle here (the repo ships it as models/miniworld)")
    build.add_argument("--smoke", action="store_true", help="a minutes-long reduced build that checks the chain")
    build.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    build.set_defaults(func=_miniworld_build_command)
    evaluate = world.add_parser("eval", help="generate on held-out instances and prompts and score them")
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_miniworld_eval_command)
    return parser


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .miniworld.evaluate import add_eval_arguments

    add_eval_arguments(parser, str(BUNDLED_MODEL), str(BUNDLED_ORACLE))


def _miniworld_build_command(ns: argparse.Namespace) -> None:
    from dataclasses import replace

    from .miniworld.bundle import MiniworldBuild, build_miniworld

    plan = MiniworldBuild.smoke() if ns.smoke else MiniworldBuild()
    print(build_miniworld(ns.out, replace(plan, threads=ns.threads), install=ns.install))


def _miniworld_eval_command(ns: argparse.Namespace) -> None:
    from .miniworld.evaluate import eval_command

    eval_command(ns)


def _train_prior_command(ns: argparse.Namespace) -> None:
    from .train.config import config_help, load_config

    if ns.help_config:
        print("config keys (override with section.key=value):\n" + config_help())
        return
    from .train import train_prior

    config = load_config(ns.config, ns.overrides, output_dir=ns.output_dir, max_steps=ns.max_steps,
                         checkpoint_every=ns.checkpoint_every)
    out = train_prior(config)
    print(out / "prior")


def _features_validate_command(ns: argparse.Namespace) -> None:
    from .features import format_report, validate_feature_store

    report = validate_feature_store(ns.directory)
    print(format_report(report))
    if report.problems:
        raise UserError(f"{len(report.problems)} corrupt or truncated shard(s) in {ns.directory}; rebuild or remove them")


def _features_synth_command(ns: argparse.Namespace) -> None:
    from .features import synthesize_features

    synthesize_features(ns.out, num_samples=ns.num_samples, dim=ns.dim, max_text_len=ns.max_text_len, seed=ns.seed)
    print(ns.out)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
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
