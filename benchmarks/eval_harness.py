"""Evaluation harness throughput: images/s of the harness (prompts batched through one pipeline call, images
written as made) against a one-prompt-at-a-time loop of the same pipeline, in the same run.

The suite is a miniature DreamBench the bundled model speaks: each of the three subjects in `examples/` (ball,
paper plane, star) under prompts "a photo of a <shape> over a <kind> <colour> background", 4 images per prompt,
the paper's decoder settings scaled down (DDIM, guidance 4). Both sides make the same images (same seeds); the
loop calls the pipeline once per prompt and saves the same way. Prints each figure, then the ratio; the last line
is `speedup_batched_vs_loop: X`.

    python benchmarks/eval_harness.py [--device cuda] [--prompts 8] [--steps 25] [--batch 8] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lambda_eclipse.cli import BUNDLED_MODEL
from lambda_eclipse.eval.runner import GenerationConfig, SubjectCache, generate_suite, image_path
from lambda_eclipse.eval.suites import Job, Subject, Suite
from lambda_eclipse.outputs import save_png

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BACKGROUNDS = [f"{kind} {colour}" for kind in ("plain", "gradient", "grid", "noisy")
               for colour in ("gray", "white", "beige", "teal", "lavender")]


def mini_suite(prompts: int, images: int) -> Suite:
    subjects = {s: Subject(s, s.replace("-", " "), (EXAMPLES / f"{s}.png",)) for s in ("ball", "paper-plane", "star")}
    jobs = [Job(f"{sid}/p{k:02d}", f"a photo of a {s.word} over a {bg.split()[0]} {bg.split()[1]} background",
                (sid,), images) for sid, s in subjects.items() for k, bg in enumerate(BACKGROUNDS[:prompts])]
    return Suite("mini-dreambench", subjects, jobs)


def one_at_a_time(pipe, suite: Suite, out: Path, cfg: GenerationConfig) -> int:
    """The baseline: one pipeline call per prompt (subjects encoded once, as the harness does)."""
    subjects = SubjectCache(pipe, suite)
    made = 0
    for job in suite.jobs:
        generators = [torch.Generator().manual_seed(cfg.seed + k) for k in range(job.images)]
        images = pipe(job.prompt, subjects=subjects(job.subjects), num_images_per_prompt=job.images,
                      num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, scheduler=cfg.scheduler,
                      generator=generators).images
        for k, image in enumerate(images):
            path = image_path(out, job, k, cfg)
            save_png(image, path.parent, path.stem, {"prompt": job.prompt})
            made += 1
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per subject (3 subjects)")
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8, help="prompts per call of the harness")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lambda_eclipse import LambdaEclipsePipeline

    dtype = {} if args.dtype == "float32" else {"torch_dtype": getattr(torch, args.dtype)}
    pipe = LambdaEclipsePipeline.from_pretrained(args.model, **dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    suite = mini_suite(args.prompts, args.images)
    cfg = GenerationConfig(steps=args.steps, guidance=4.0, images_per_prompt=args.images, batch_prompts=args.batch)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    n = len(suite.jobs) * args.images
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} model={args.model} prompts={len(suite.jobs)} "
          f"images={n} steps={args.steps} batch={args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        generate_suite(pipe, mini_suite(1, 1), Path(tmp) / "warm", cfg, progress=False)  # warm-up
        sync()
        start = time.perf_counter()
        one_at_a_time(pipe, suite, Path(tmp) / "loop", cfg)
        sync()
        loop = time.perf_counter() - start
        start = time.perf_counter()
        done = generate_suite(pipe, suite, Path(tmp) / "harness", cfg, progress=False)
        sync()
        harness = time.perf_counter() - start
        assert done["made"] == n
    print(f"loop_images_per_s: {n / loop:.3f}")
    print(f"harness_images_per_s: {n / harness:.3f}")
    print(f"harness_s_per_image: {harness / n:.4f}")
    print(f"speedup_batched_vs_loop: {loop / harness:.2f}")


if __name__ == "__main__":
    main()
