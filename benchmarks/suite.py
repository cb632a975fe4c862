"""The performance suite: the real architectures (random weights) on cpu or cuda, every figure in one JSON + table.

    python benchmarks/suite.py --device cuda                # full size: the GPU run (about 10 minutes on an H100-class card)
    python benchmarks/suite.py --device cpu --quick         # reduced sizes: every measurement, about a minute
    python benchmarks/suite.py --device cpu                 # full-size generation (2 steps) per memory mode on a CPU

Sections (each measurement runs in its own subprocess, so peak RSS / VRAM is that measurement's alone):
  generation     seconds per image and peak memory per memory mode (resident, prior-then-decoder, model and
                 sequential offload; the last two on GPUs only), 1 and 4 images; on CUDA also the classic
                 (pre-SDPA) attention and torch.compile of the UNet, resident
  encoders       the dataset builder's CLIP-feature stage (image, two subject crops, edge map, caption): records/s
  prior_forward  the prior's forward, ours vs the released code's way
  prior_train    the prior's training step at the paper's batch (512 on a GPU) in bf16: samples/s, FLOPs counted
                 per step, MFU, and projected device-hours of the paper's 100 K steps × 1,024 samples (paper: 74
                 A100-hours)
  unet_train     the decoder fine-tuning step (Eq. 2), full vs peft LoRA
Writes ``--out``/<device>[-quick].json and .md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fullsize import build_pipeline_folder  # noqa: E402
from suite_report import markdown  # noqa: E402

PROFILES = {
    # what each size measures; a CPU's full-size run keeps generation, encoders and the prior at full size and the
    # UNet training step at quick size (full fine-tuning of the 1.25 B UNet needs ~20 GB for weights + AdamW alone)
    "full": dict(size="full", steps=50, images=[1, 4], prior_batches=[1, 64, 512], prior_train_batch=512,
                 unet_size="full", unet_batch=4, encoder_batch=16, repeats=3),
    "cpu-full": dict(size="full", steps=2, images=[1], prior_batches=[1, 64], prior_train_batch=64,
                     unet_size="quick", unet_batch=1, encoder_batch=1, repeats=2),
    "quick": dict(size="quick", steps=2, images=[1], prior_batches=[1, 64], prior_train_batch=64,
                  unet_size="quick", unet_batch=1, encoder_batch=2, repeats=3),
    "tiny": dict(size="tiny", steps=2, images=[1], prior_batches=[2], prior_train_batch=8,
                 unet_size="tiny", unet_batch=1, encoder_batch=1, repeats=1),
}
SECTIONS = ("generation", "encoders", "prior_forward", "prior_train", "unet_train")


def available_bytes() -> int:
    """The host's available RAM (the same reading as ``--low-memory auto`` on a CPU)."""
    from lambda_eclipse.memory import free_memory_bytes

    return free_memory_bytes("cpu")


def run_task(task: str, kwargs: dict, isolate: bool, kill_below: int) -> dict:
    """One measurement, in a subprocess when ``isolate`` (killed if the machine's free RAM falls under
    ``kill_below``, so a shared machine never swaps or OOMs), else in this process."""
    if not isolate:
        import suite_tasks

        kwargs = dict(kwargs)
        if kwargs.get("threads"):
            torch.set_num_threads(kwargs.pop("threads"))
        return {**suite_tasks.TASKS[task](**{k: v for k, v in kwargs.items() if k != "threads"}), "isolated": False}
    cmd = [sys.executable, str(HERE / "suite_tasks.py"), task, json.dumps(kwargs)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lowest = available_bytes()
    while child.poll() is None:
        time.sleep(0.5)
        lowest = min(lowest, available_bytes())
        if lowest < kill_below:
            child.kill()
            child.wait()
            return {"error": f"stopped: free RAM fell to {lowest / 2**30:.1f} GiB", **kwargs}
    out, err = child.communicate()
    for line in out.splitlines():
        if line.startswith("SUITE_RESULT "):
            return {**json.loads(line[len("SUITE_RESULT "):]), "isolated": True,
                    "machine_free_ram_low_bytes": lowest}
    tail = (err.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:300], **{k: v for k, v in kwargs.items() if k != "model"}}


def plan(device: str, profile: dict, model: str, dtype: str, sections: list[str], threads: int | None) -> list[tuple]:
    """(section, task, kwargs) for every measurement of this run, cheapest first within a section."""
    extra = {"threads": threads} if threads else {}
    gpu = device.startswith("cuda")
    runs = []
    if "generation" in sections:
        modes = ["resident", "prior-then-decoder"] + (["model", "sequential"] if gpu else [])
        for images in profile["images"]:
            for mode in modes:
                runs.append(("generation", "generation", dict(model=model, mode=mode, device=device, dtype=dtype,
                                                              images=images, steps=profile["steps"],
                                                              warmup=gpu and mode != "prior-then-decoder", **extra)))
        if gpu:
            for variant in (dict(attention="classic"), dict(compile_unet=True)):
                runs.append(("generation", "generation", dict(model=model, mode="resident", device=device, dtype=dtype,
                                                              images=1, steps=profile["steps"], warmup=True,
                                                              **variant, **extra)))
    if "encoders" in sections:
        runs.append(("encoders", "encoders", dict(model=model, device=device, dtype=dtype,
                                                  batch=profile["encoder_batch"], repeats=profile["repeats"], **extra)))
    if "prior_forward" in sections:
        runs.append(("prior_forward", "prior_forward", dict(size=profile["size"], device=device, dtype="bfloat16",
                                                            batches=profile["prior_batches"], repeats=profile["repeats"],
                                                            **extra)))
    if "prior_train" in sections:
        runs.append(("prior_train", "prior_train", dict(size=profile["size"], device=device,
                                                        batch=profile["prior_train_batch"], steps=profile["repeats"],
                                                        **extra)))
    if "unet_train" in sections:
        for method in ("lora", "full"):
            runs.append(("unet_train", "unet_train", dict(size=profile["unet_size"], device=device, method=method,
                                                          batch=profile["unet_batch"], steps=profile["repeats"], **extra)))
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (every measurement in about a minute on a CPU)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the fast test tier's sizes
    parser.add_argument("--dtype", help="generation dtype (default float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", default=str(HERE / "results"), help="folder of <device>[-quick].json and .md")
    parser.add_argument("--work", default=os.environ.get("LAMBDA_ECLIPSE_SUITE_WORK", "/tmp/lambda-eclipse-suite"),
                        help="where the random-weight pipeline folders are built (7.8 GB at full size in 16-bit)")
    parser.add_argument("--threads", type=int, help="torch threads per measurement (default: torch's)")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (memory figures then accumulate)")
    parser.add_argument("--min-free-gb", type=float, default=None,
                        help="skip a measurement when free RAM is below this; stop one when free RAM falls below "
                             "half of it (default 8 for a full-size CPU run, else 0)")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    name = "tiny" if args.tiny else "quick" if args.quick else "full" if gpu else "cpu-full"
    profile = PROFILES[name]
    dtype = args.dtype or ("float16" if gpu else "bfloat16")
    min_free = (args.min_free_gb if args.min_free_gb is not None else 8.0 if name == "cpu-full" else 0.0) * 2**30
    started = time.time()
    model = str(build_pipeline_folder(Path(args.work) / f"{profile['size']}-{dtype}", profile["size"], getattr(torch, dtype),
                                      args.device if gpu else "cpu"))
    build_s = time.time() - started
    results: dict[str, list] = {s: [] for s in args.sections}
    for section, task, kwargs in plan(args.device, profile, model, dtype, args.sections, args.threads):
        if not args.in_process and min_free and available_bytes() < min_free:
            result = {"error": f"skipped: free RAM {available_bytes() / 2**30:.1f} GiB < {min_free / 2**30:.0f} GiB",
                      **{k: v for k, v in kwargs.items() if k != "model"}}
        else:
            result = run_task(task, kwargs, not args.in_process, min_free / 2)
        results[section].append(result)
        print(section, json.dumps({k: v for k, v in result.items() if k != "model"}), flush=True)
    report = {
        "device": args.device, "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "profile": name, "sizes": profile, "dtype": dtype, "threads": args.threads or torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "build_s": build_s,
        "total_s": time.time() - started, "results": results,
    }
    from lambda_eclipse.atomic import atomic_write

    stem = args.device.split(":")[0] + ("" if name in ("full", "cpu-full") else f"-{name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    atomic_write(out / f"{stem}.md", markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
