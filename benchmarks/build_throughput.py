"""Dataset-builder throughput: images/s per stage and end to end, batched vs one image at a time, in one run.

    python benchmarks/build_throughput.py                  # tiny random-weight models on CPU, 32 DreamBench photos
    python benchmarks/build_throughput.py --device cuda    # the same models on the GPU

Both runs build the same inputs (real DreamBench photos, 512 px, cycled to ``--images``) into fresh work folders
with the local engine: one with the stage batch sizes of ``--batch``, one with every batch size 1. Per-stage
figures come from the build's own report (seconds each stage spent reading its inputs, decoding images and
running its stage function; the caption stage is timed alone, see :func:`caption_rate`); end to end is the wall
time of the whole build, the report and its sample sheet included. The tiny models measure the builder's own overhead
(decoding, pre/post-processing, shard writing), not the cost of the real model sizes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model builders live with the tests
DREAMBENCH = ROOT.parent / "shared" / "reference" / "dreambench"

PERMISSIVE = ["models.captioner=none", "progress=false", "report_samples=1", "stages.box_threshold=0.0",
              "stages.text_threshold=0.0", "filter.min_side=256", "filter.max_boxes=10", "filter.max_identical=10",
              "filter.max_white_share=1.0", "filter.box_ratio_min=0.0", "filter.box_ratio_max=1.0",
              "filter.min_logit=0.0", "filter.min_mask_share=0.0"]


def make_inputs(folder: Path, count: int) -> Path:
    photos = sorted(DREAMBENCH.glob("*/0[0-3].jpg"))
    if not photos:
        sys.exit(f"no DreamBench photos under {DREAMBENCH}")
    folder.mkdir(parents=True)
    for i in range(count):
        source = photos[i % len(photos)]
        shutil.copy(source, folder / f"{i:05d}.jpg")
        (folder / f"{i:05d}.txt").write_text(f"a photo of a dog and a {source.parent.name.split('_')[0]}")
    return folder


def caption_rate(inputs: Path, captioner, batch: int) -> float:
    """Images/s of the caption stage alone (a random BLIP-2 writes random words, which would leave the later
    stages nothing to do, so the builds below keep the inputs' captions)."""
    from PIL import Image

    from lambda_eclipse.dataset.caption import caption_images

    images = [Image.open(p).convert("RGB") for p in sorted(inputs.glob("*.jpg"))]
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        caption_images(captioner, images[i : i + batch], max_new_tokens=20)
    return len(images) / (time.perf_counter() - start)


def run(inputs: Path, out: Path, batch: int, device: str, models: dict) -> dict:
    from lambda_eclipse.dataset import build_dataset, load_build_config

    sizes = [f"stages.{k}_batch={batch}" for k in ("caption", "ground", "segment", "features")]
    config = load_build_config(None, [f"input.path={inputs}", f"output_dir={out}", "shard_size=1000",
                                      f"models.device={device}", *PERMISSIVE, *sizes])
    start = time.perf_counter()
    build_dataset(config, models)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "images": report["images_in"], "stages": report["throughput"],
            "images_out": report["images_out"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="input images (DreamBench photos, cycled)")
    parser.add_argument("--batch", type=int, default=16, help="stage batch size of the batched run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dataset_tiny import tiny_models

    models = tiny_models(captioner=True)
    for bundle in models.values():
        if hasattr(bundle, "model"):
            bundle.model.to(args.device)
    if hasattr(models["encoders"], "text_encoder"):
        models["encoders"].text_encoder.to(args.device)
        models["encoders"].image_encoder.to(args.device)
    work = Path(tempfile.mkdtemp(prefix="build-throughput-"))
    try:
        inputs = make_inputs(work / "inputs", args.images)
        results = {b: run(inputs, work / f"run-b{b}", b, args.device, models) for b in (args.batch, 1)}
        for b in (args.batch, 1):
            results[b]["stages"]["caption"]["images_per_s"] = caption_rate(inputs, models["captioner"], b)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    batched, single = results[args.batch], results[1]
    print(f"{args.images} images, {batched['images_out']} stored; tiny models on {args.device}, "
          f"{args.threads} thread(s)")
    print(f"{'stage':<10} {'batch ' + str(args.batch) + ' img/s':>16} {'batch 1 img/s':>15} {'ratio':>7}")
    for stage, t in batched["stages"].items():
        a, b = t["images_per_s"], single["stages"][stage]["images_per_s"]
        if a and b:
            print(f"{stage:<10} {a:>16.1f} {b:>15.1f} {a / b:>7.2f}")
    a, b = batched["images"] / batched["wall_s"], single["images"] / single["wall_s"]
    print(f"{'end2end':<10} {a:>16.1f} {b:>15.1f} {a / b:>7.2f}   (whole build + report; model loading excluded)")


if __name__ == "__main__":
    main()
