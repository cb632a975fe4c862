"""The commands of `lambda-eclipse` beyond generation: training (`train-prior`, `finetune-decoder`), data
(`features`, `build-dataset`), evaluation (`evaluate`, `miniworld`) and the web `demo`.

Each is a typed function callable from Python plus its parser lines; :func:`add_tool_parsers` registers them on
:func:`lambda_eclipse.cli.build_parser`'s subcommands. Like ``cli``, this module imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import (BUNDLED_MODEL, BUNDLED_ORACLE, _Parser, add_decoder_arguments, check_decoder_paths, load_pipeline,
                  resolve_model)
from .errors import UserError


def train_prior(config: str | None = None, output_dir: str | None = None, max_steps: int | None = None,
                checkpoint_every: int | None = None, overrides: list[str] | None = None) -> Path:
    """Train (or resume) a prior run; returns the released prior folder."""
    from .train import load_config
    from .train import train_prior as run_training

    from .checks import check_output_path

    resolved = load_config(config, overrides or [], output_dir=output_dir, max_steps=max_steps,
                           checkpoint_every=checkpoint_every)
    check_output_path(resolved.output_dir, "folder", "--output-dir")
    return run_training(resolved) / "prior"


def features_validate(directory: str):
    """Validate a feature store; returns its report (``report.ok``; ``report.bad_shards`` lists damaged shards)."""
    from .features import validate_feature_store

    return validate_feature_store(directory)


def features_synth(out: str, num_samples: int = 4096, dim: int = 64, max_text_len: int = 32, seed: int = 0) -> Path:
    """Write a synthetic feature store with learnable structure."""
    from .checks import check_output_path
    from .features import synthesize_features

    check_output_path(out, "folder", "--out")
    synthesize_features(out, num_samples=num_samples, dim=dim, max_text_len=max_text_len, seed=seed)
    return Path(out)


def miniworld_build(out: str = "runs/miniworld", install: str | None = None, smoke: bool = False,
                    threads: int = 2) -> Path:
    """Train the whole miniature family (resumes when rerun); ``install`` also writes the finished bundle there."""
    from dataclasses import replace

    from .checks import check_output_path
    from .miniworld.bundle import MiniworldBuild, build_miniworld

    check_output_path(out, "folder", "--out")
    if install is not None:
        check_output_path(install, "folder", "--install")
    plan = MiniworldBuild.smoke() if smoke else MiniworldBuild()
    return build_miniworld(out, replace(plan, threads=threads), install=install)


def miniworld_eval(out: str, model: str | None = None, oracle: str | None = None, num_prompts: int = 48,
                   seed: int = 0, images_per_prompt: int = 2, steps: int = 25, guidance: float = 4.0,
                   threads: int = 1, priors: dict[str, str] | None = None) -> dict:
    """Score a model on held-out miniworld prompts (default: the bundled model and oracle); returns the metrics
    and writes ``out/metrics.json``, ``metrics.md`` and ``grid.png``."""
    from .checks import check_output_path
    from .miniworld.evaluate import EvalConfig, run_miniworld_eval

    check_output_path(out, "folder", "--out")
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


# ---------------------------------------------------------------------------------------------------- evaluate
def load_eval_pipeline(model: str, device: str | None = None, dtype: str | None = None, low_memory: bool = False,
                       unet: str | None = None, lora: str | None = None, lora_scale: float = 1.0):
    """The pipeline `evaluate` scores: :func:`load_pipeline`; options that change the model (a fine-tuned UNet,
    a LoRA) are applied here, so every suite sees the same assembled model."""
    from .adapters import apply_decoder_adapters

    pipe = load_pipeline(model, device, dtype, low_memory)
    apply_decoder_adapters(pipe, unet, lora, lora_scale)
    return pipe


def evaluate_suite(spec, model: str | None = None, device: str | None = None, dtype: str | None = None,
                   low_memory: bool = False, unet: str | None = None, lora: str | None = None,
                   lora_scale: float = 1.0) -> dict:
    """`lambda-eclipse evaluate SUITE`: generate this process's shard (``accelerate launch`` sets rank and world),
    then, on the main process once every shard is done, score the whole run and write the reports.

    ``spec`` is a :class:`lambda_eclipse.eval.EvalSpec`. Judges load before any image is made (a judge that fails
    to load fails first). Returns :func:`lambda_eclipse.eval.evaluate`'s result (of the scoring call, if any).
    """
    from dataclasses import replace

    from accelerate import PartialState

    from .eval import evaluate, load_judges
    from .eval.suites import build_suite

    state = PartialState()
    if spec.world == 1 and state.num_processes > 1:
        spec = replace(spec, rank=state.process_index, world=state.num_processes)
    score = spec.score  # False for a --shard slice: its run is scored by a later run without --shard
    suite = build_suite(spec.suite, spec.dataset_dir, list(spec.subjects) if spec.subjects else None,
                        spec.generation.images_per_prompt)
    judge_device = device or str(state.device)
    judges = load_judges(spec.judge_dino, spec.judge_clip, judge_device) if score and state.is_main_process else None
    model = resolve_model(model)
    pipe = load_eval_pipeline(model, device or str(state.device), dtype, low_memory, unet, lora, lora_scale)
    if unet is not None or lora is not None:  # the run records (and a rerun must match) the assembled decoder
        model = f"{model} (unet={unet}, lora={lora}" + (f" x{lora_scale})" if lora is not None else ")")
    done = evaluate(pipe, replace(spec, score=False), None, model, suite)
    state.wait_for_everyone()
    if score and state.is_main_process:  # the merge: every shard's images are there; generates nothing new
        done = {**evaluate(pipe, replace(spec, rank=0, world=1), judges, model, suite), "generation": done["generation"]}
    return done


def parse_shard(text: str | None) -> tuple[int, int]:
    """'R/W' -> (rank, world); None -> (0, 1)."""
    if text is None:
        return 0, 1
    rank, sep, world = text.partition("/")
    if not sep or not rank.isdigit() or not world.isdigit() or int(world) < 1 or int(rank) >= int(world):
        raise UserError(f"--shard {text!r}: write RANK/WORLD with 0 <= RANK < WORLD, e.g. --shard 0/2")
    return int(rank), int(world)


def _evaluate_command(ns: argparse.Namespace) -> None:
    if ns.suite == "compare":
        from .eval.compare import compare_runs

        print(compare_runs(ns.runs, ns.out), end="")
        return
    if ns.suite == "miniworld":
        eval_command(ns)
        return
    from .eval import EvalSpec, GenerationConfig

    rank, world = parse_shard(ns.shard)
    if (ns.dataset_dir is None) == (ns.download is None):
        raise UserError("give one of --dataset-dir (a local copy of DreamBench) or --download CACHE_DIR")
    if ns.download:
        from .eval.suites import download_dreambench

        ns.dataset_dir = str(download_dreambench(ns.download))
    generation = GenerationConfig(steps=ns.steps, guidance=ns.guidance, scheduler=ns.scheduler,
                                  images_per_prompt=ns.images_per_prompt, seed=ns.seed, height=ns.height,
                                  width=ns.width, batch_prompts=ns.batch, segment=ns.segment)
    subjects = tuple(s.strip() for s in ns.subjects.split(",") if s.strip()) if ns.subjects else None
    spec = EvalSpec(ns.suite, ns.out, ns.dataset_dir, subjects, ns.limit, generation, ns.judge_dino, ns.judge_clip,
                    rank, world, score=not ns.no_score and world == 1, progress=not ns.quiet)
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    check_decoder_paths(ns.unet, ns.lora)
    done = evaluate_suite(spec, ns.model, ns.device, ns.dtype, ns.low_memory, ns.unet, ns.lora, ns.lora_scale)
    g = done["generation"]
    print(f"{g['made']} images made, {g['skipped']} found, in {g['seconds']:.1f} s")
    print(Path(ns.out) / "metrics.md" if done.get("result") else f"{ns.out} (not scored: run without --shard/--no-score to score)")


def add_evaluate_parser(commands) -> None:
    """`lambda-eclipse evaluate SUITE ...` and `lambda-eclipse evaluate compare RUN...`."""
    from .eval import DEFAULT_CLIP, DEFAULT_DINO

    suites = commands.add_parser("evaluate", help="the paper's benchmarks: generate, score, report; compare runs"
                                 ).add_subparsers(dest="suite", required=True, parser_class=_Parser)
    for name, text in (("dreambench", "DreamBench: 30 subjects × 25 prompts (Table 2)"),
                       ("multibench", "2- and 3-subject prompts from the paper's templates (Table 4)"),
                       ("dreambench-canny", "DreamBench under Canny edges of subject-free images (Table 5)")):
        p = suites.add_parser(name, help=text)
        p.add_argument("--model", help="model folder or Hub id (default as for generate)")
        p.add_argument("--out", required=True, help="run folder; rerun to resume (images, metrics.json, metrics.md, "
                                                    "per_subject.csv, plot.png, grids/)")
        p.add_argument("--dataset-dir", help="a copy of DreamBench's dataset/ folder (github.com/google/dreambooth)")
        p.add_argument("--download", metavar="CACHE_DIR", help="instead: clone DreamBench's public repository into "
                                                               "CACHE_DIR once (needs git and the network)")
        p.add_argument("--subjects", help="comma-separated subject ids (default all 30)")
        p.add_argument("--limit", type=int, help="only the first N prompts (a quick pass; rerun without to complete)")
        p.add_argument("--steps", type=int, default=50, help="decoder steps (default 50, the paper's)")
        p.add_argument("--guidance", type=float, default=7.5, help="decoder guidance (default 7.5, the paper's)")
        p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="decoder scheduler (default ddim)")
        p.add_argument("-n", "--images-per-prompt", type=int, default=4, help="images per prompt (default 4)")
        p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed+j (default 0)")
        p.add_argument("--height", type=int)
        p.add_argument("--width", type=int)
        p.add_argument("--batch", type=int, default=8, help="prompts per pipeline call (default 8)")
        p.add_argument("--judge-dino", default=DEFAULT_DINO, help=f"DINO judge, Hub id or folder (default {DEFAULT_DINO})")
        p.add_argument("--judge-clip", default=DEFAULT_CLIP, help=f"CLIP judge for CLIP-I/CLIP-T (default {DEFAULT_CLIP})")
        p.add_argument("--shard", metavar="RANK/WORLD", help="generate only this slice (accelerate launch sets it); "
                                                             "score afterwards with a run without --shard")
        p.add_argument("--no-score", action="store_true", help="generate only")
        p.add_argument("--device", help="cuda, mps or cpu (default: the best available, per rank)")
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights dtype")
        p.add_argument("--low-memory", action="store_true", help="keep only the running stage on the GPU")
        p.add_argument("--threads", type=int, help="torch CPU threads")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--segment", action="store_true", help="cut each subject out of its picture onto white first "
                                                              "(Grounding DINO + SAM), as the paper does")
        add_decoder_arguments(p)
    world = suites.add_parser("miniworld", help="the miniature world's evaluation (concept oracle plug-in)")
    add_eval_arguments(world)
    compare = suites.add_parser("compare", help="several scored runs side by side (table and plot)")
    compare.add_argument("runs", nargs="+", metavar="[LABEL=]RUN", help="run folders written by evaluate")
    compare.add_argument("--out", help="also write compare.md and compare.png here")
    suites.required = True
    for p in suites.choices.values():
        p.set_defaults(func=_evaluate_command)

def build_dataset(config: str | None = None, overrides: list[str] | None = None, stages: list[str] | None = None
                  ) -> Path:
    """Build (or resume) a feature store from raw images (`lambda-eclipse build-dataset`); returns the work folder."""
    from .dataset import build_dataset as run_build
    from .dataset import load_build_config
    from .dataset.stages import STAGES

    resolved = load_build_config(config, overrides or [])
    return run_build(resolved, stages=tuple(stages) if stages else STAGES).parent


def _build_dataset_command(ns: argparse.Namespace) -> None:
    if ns.help_config:
        from .dataset.config import BuildConfig
        from .train.config import config_help

        print("config keys (override with section.key=value):\n" + config_help(BuildConfig))
        return
    if not ns.config and not ns.overrides:
        raise UserError("give --config FILE.yaml or input.path=... (see `lambda-eclipse build-dataset --help-config`)")
    overrides = list(ns.overrides) + ([f"engine={ns.engine}"] if ns.engine else [])
    out = build_dataset(ns.config, overrides, ns.stages.split(",") if ns.stages else None)
    print(out / "report.md" if (out / "report.md").is_file() else out)


def add_build_dataset_parser(commands) -> None:
    data = commands.add_parser("build-dataset", help="images -> captions, subjects, boxes, masks, crops -> a feature "
                                                     "store (resumes when rerun)")
    data.add_argument("--config", help="YAML build config (configs/dataset-paper.yaml)")
    data.add_argument("--engine", choices=["local", "ray"], help="run in-process (default) or on Ray Data")
    data.add_argument("--stages", help="comma-separated stages to run (default all: caption,nouns,ground,segment,"
                                       "filter,crop,features)")
    data.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    data.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. input.path=imgs")
    data.set_defaults(func=_build_dataset_command)


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


def _train_prior_command(ns: argparse.Namespace) -> None:
    if ns.help_config:
        from .train.config import config_help

        print("config keys (override with section.key=value):\n" + config_help())
        return
    print(train_prior(ns.config, ns.output_dir, ns.max_steps, ns.checkpoint_every, ns.overrides))


# ---------------------------------------------------------------------------------------------------- finetune-decoder
def finetune_decoder(config: str | None = None, output_dir: str | None = None, max_steps: int | None = None,
                     overrides: list[str] | None = None) -> Path:
    """Fine-tune (or resume) the decoder UNet on concepts (Eq. 2, full or LoRA); returns the run folder, which
    holds ``unet/`` (full) or ``lora.safetensors`` (lora) for ``generate --unet/--lora``."""
    from .train.finetune import finetune_decoder as run, load_finetune_config

    return run(load_finetune_config(config, overrides or [], output_dir=output_dir, max_steps=max_steps))


def _finetune_decoder_command(ns: argparse.Namespace) -> None:
    if ns.help_config:
        from .train.finetune import finetune_config_help

        print("config keys (override with section.key=value):\n" + finetune_config_help())
        return
    print(finetune_decoder(ns.config, ns.output_dir, ns.max_steps, ns.overrides))


def miniworld_colour_unet(model: str, work: str, threads: int = 1) -> dict:
    """Continue ``model/unet`` on colour-mixed scenes and colour pairs with :class:`ColourRecipe`'s defaults, in
    place; a bundle's UNet stays float16 as it is stored. See :func:`lambda_eclipse.miniworld.unet_recipe.run_colour_stage`."""
    from pathlib import Path

    import torch

    from .miniworld.build import BuildConfig
    from .miniworld.unet_recipe import ColourRecipe, run_colour_stage

    missing = [name for name in ("unet", "movq", "image_encoder") if not (Path(model) / name / "config.json").is_file()]
    if missing:
        raise UserError(f"--model {model!r} lacks {', '.join(missing)}/; give a miniworld bundle or components folder")
    torch.set_num_threads(threads)
    config = BuildConfig()
    bundle = (Path(model) / "model_index.json").is_file()  # bundles store the UNet in float16 (assemble_bundle)
    return run_colour_stage(Path(model), Path(work), ColourRecipe(), config.unet, config.seed, config.size, half=bundle)


def miniworld_finetune_eval(out: str, work: str, model: str | None = None, oracle: str | None = None,
                            threads: int = 1, concepts: str = "first") -> dict:
    """Fine-tune the bundled decoder on 8 held-out concepts (full and LoRA) and score before/after; see
    :mod:`lambda_eclipse.miniworld.finetune_eval`."""
    from dataclasses import replace

    from .miniworld.finetune_eval import FinetuneEvalConfig, run_finetune_eval

    return run_finetune_eval(model or str(BUNDLED_MODEL), oracle or str(BUNDLED_ORACLE), out, work,
                             replace(FinetuneEvalConfig(), threads=threads, concepts=concepts))


def _features_validate_command(ns: argparse.Namespace) -> None:
    from .features import format_report

    report = features_validate(ns.directory)
    print(format_report(report))
    if report.bad_shards:
        raise UserError(f"{len(report.bad_shards)} bad shard(s) in {ns.directory} (listed above); rebuild or remove them")
    if not report.ok:
        raise UserError(f"{ns.directory}: zero-image embedding {report.zero_image_problem}; rebuild the store")


# ---------------------------------------------------------------------------------------------------- demo
def demo(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, out: str | None = None,
         unet: str | None = None, lora: str | None = None, lora_scale: float = 1.0) -> None:
    """Serve the web demo (Gradio, the ``demo`` extra) until interrupted; see :mod:`lambda_eclipse.app`."""
    from . import app

    check_decoder_paths(unet, lora)
    app.launch_demo(app.DemoConfig(model=model, host=host, port=port, out=out, unet=unet, lora=lora,
                                   lora_scale=lora_scale), block=True)


def add_demo_parser(commands) -> None:
    """`lambda-eclipse demo` and its flags."""
    web = commands.add_parser("demo", help="the web demo in a browser (needs the demo extra: pip install '.[demo]')")
    web.add_argument("--model", help="model folder or Hub id (default as for generate: the bundled offline model)")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    web.add_argument("--out", help="folder that keeps every generated PNG (default: a temporary folder)")
    add_decoder_arguments(web)
    web.set_defaults(func=lambda ns: demo(ns.model, ns.host, ns.port, ns.out, ns.unet, ns.lora, ns.lora_scale))


def add_tool_parsers(commands) -> argparse._SubParsersAction:
    """Register the training, data, evaluation and demo commands; returns the ``miniworld`` subcommands, to which
    ``cli`` adds ``interpolation-eval``."""
    train = commands.add_parser("train-prior", help="train a λ-ECLIPSE prior on a feature store (resumes when rerun)")
    train.add_argument("--config", help="YAML config (configs/prior-debug.yaml, configs/prior-paper.yaml)")
    train.add_argument("--output-dir", help="run folder (checkpoints/, logs/, prior/); rerun to resume")
    train.add_argument("--max-steps", type=int, help="optimizer steps of the whole run")
    train.add_argument("--checkpoint-every", type=int, help="steps between training checkpoints")
    train.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=1e-4")
    train.set_defaults(func=_train_prior_command)

    tune = commands.add_parser("finetune-decoder", help="personalize the decoder UNet on concepts, full or LoRA "
                                                        "(Eq. 2; resumes when rerun)")
    tune.add_argument("--config", help="YAML config (configs/finetune-decoder-dreambench.yaml, ...-miniworld.yaml)")
    tune.add_argument("--output-dir", help="run folder (checkpoints/, cache/, unet/ or lora.safetensors); rerun to resume")
    tune.add_argument("--max-steps", type=int, help="optimizer steps of the whole run")
    tune.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    tune.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. mode=lora")
    tune.set_defaults(func=_finetune_decoder_command)

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

    add_build_dataset_parser(commands)

    world = commands.add_parser("miniworld", help="the miniature world: build the offline model family, evaluate").add_subparsers(
        dest="miniworld_command", required=True, parser_class=_Parser)
    build = world.add_parser("build", help="train the whole miniature family (resumes when rerun)")
    build.add_argument("--out", default="runs/miniworld", help="work folder (default runs/miniworld)")
    build.add_argument("--install", help="also write the finished bundle here (the repo ships it as models/miniworld)")
    build.add_argument("--smoke", action="store_true", help="a minutes-long reduced build that checks the chain")
    build.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    build.set_defaults(func=lambda ns: print(miniworld_build(ns.out, ns.install, ns.smoke, ns.threads)))
    colour = world.add_parser("colour-unet", help="continue a bundle's UNet on off-palette object colours, in "
                                                 "place (the build's `colour` stage; resumes when rerun)")
    colour.add_argument("--model", required=True, help="pipeline or components folder whose unet/ is continued")
    colour.add_argument("--work", required=True, help="work folder: encoded scenes, checkpoints")
    colour.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    colour.set_defaults(func=lambda ns: print(json.dumps(miniworld_colour_unet(ns.model, ns.work, ns.threads))))
    evaluate = world.add_parser("eval", help="generate on held-out instances and prompts and score them")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=eval_command)
    tune_eval = world.add_parser("finetune-eval", help="fine-tune the decoder on 8 held-out concepts (full, LoRA) "
                                                       "and score them before and after (resumes when rerun)")
    tune_eval.add_argument("--out", required=True, help="report folder: metrics.json, finetune-eval.png, grid.png")
    tune_eval.add_argument("--work", required=True, help="work folder: concept images, runs, per-step scores")
    tune_eval.add_argument("--model", help=f"pipeline folder (default {BUNDLED_MODEL})")
    tune_eval.add_argument("--oracle", help=f"oracle folder (default {BUNDLED_ORACLE})")
    tune_eval.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    tune_eval.add_argument("--concepts", choices=["first", "hardest"], default="first",
                           help="first: each shape's first reserved instance (default); hardest: the 8 the bundle "
                                "draws worst zero-shot, measured on separate prompts")
    tune_eval.set_defaults(func=lambda ns: print(json.dumps(miniworld_finetune_eval(
        ns.out, ns.work, ns.model, ns.oracle, ns.threads, ns.concepts)["results"], indent=1)))
    add_evaluate_parser(commands)
    add_demo_parser(commands)
    return world
