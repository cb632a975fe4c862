"""The web demo's latency on the bundled model: start-up, then 4 images through its API, against the direct call.

Starts `lambda-eclipse demo` as a subprocess on a free loopback port, times how long until it answers, then sends
the README's request (two subjects, 4 images, 25 steps, guidance 4) through ``gradio_client`` ``--repeats`` times
and, in this process, times the same request as a direct pipeline call (the baseline). Prints each figure, the
machine's load average, and last `demo_overhead_ratio: X` (demo seconds / direct seconds, medians).

    python benchmarks/demo_latency.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a ball left of a paper plane over a teal grid background"
SUBJECTS = [("ball", ROOT / "examples" / "ball.png"), ("paper plane", ROOT / "examples" / "paper-plane.png")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, demo and baseline alike")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED")})
    print(f"cpus={os.cpu_count()} threads={args.threads} load_average_before={os.getloadavg()}")

    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "lambda_eclipse.cli", "demo", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the demo exited during start-up")
                time.sleep(0.2)
        print(f"start_up_s: {time.perf_counter() - started:.1f}")

        from gradio_client import Client, handle_file

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        rows = 6  # DemoConfig.max_subjects
        values = [PROMPT, len(SUBJECTS), *[w for w, _ in SUBJECTS], *[""] * (rows - 2),
                  *[[handle_file(str(p))] for _, p in SUBJECTS], *[None] * (rows - 2),
                  None, 0, 4, 25, 4.0, "model default", 32, 32, 1.0, 1.0, False, False]  # ..., subject scale, edge strength, segment, edge is a map
        demo_times = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            gallery, _, note = client.predict(*values, api_name="/generate")
            demo_times.append(time.perf_counter() - tick)
            assert len(gallery) == 4, gallery
            print(f"demo_4_images_s: {demo_times[-1]:.2f} (page says: {note})")
    finally:
        server.terminate()
        server.wait(timeout=30)

    import torch

    from lambda_eclipse.cli import BUNDLED_MODEL, load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(str(BUNDLED_MODEL), "cpu")
    pipe.set_progress_bar_config(disable=True)
    direct_times = []
    for _ in range(args.repeats):
        tick = time.perf_counter()
        images = pipe(PROMPT, subjects={w: str(p) for w, p in SUBJECTS}, num_images_per_prompt=4,
                      num_inference_steps=25, guidance_scale=4.0,
                      generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
        direct_times.append(time.perf_counter() - tick)
        assert len(images) == 4
        print(f"direct_4_images_s: {direct_times[-1]:.2f}")
    print(f"load_average_after={os.getloadavg()}")
    demo, direct = statistics.median(demo_times), statistics.median(direct_times)
    print(f"median demo {demo:.2f} s, direct {direct:.2f} s")
    print(f"demo_overhead_ratio: {demo / direct:.2f}")


if __name__ == "__main__":
    main()
