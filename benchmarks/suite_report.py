"""The suite's JSON report -> Markdown tables (what the README quotes)."""

from __future__ import annotations

GB = 1e9  # decimal, as FACTS.md counts bytes


def _gib(value) -> str:
    return "–" if value is None else f"{value / GB:.2f}"


def _num(value, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(report: dict) -> str:
    """Tables for every section present in ``report["results"]``; failed measurements show their error."""
    gpu = report["device"].startswith("cuda")
    mem = "peak VRAM GB" if gpu else "peak RSS GB"
    lines = [f"Device: {report['device_name']} ({report['device']}, {report['threads']} threads), profile "
             f"{report['profile']} (model size {report['sizes']['size']}), {report['dtype']}, torch {report['torch']}, "
             f"diffusers {report['diffusers']}, {report['date']}.", ""]
    r = report["results"]

    def errors(rows, key):
        return [f"- {row.get(key, '')}: {row['error']}" for row in rows if "error" in row]

    if r.get("generation"):
        lines += ["| memory mode | images | steps | attention | s / image | load s | " + mem + " |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["generation"]:
            if "error" in row:
                continue
            attention = row["attention"] + (" + compile" if row["compile"] else "")
            peak = row.get("peak_vram_allocated_bytes") if gpu else row["peak_rss_bytes"]
            lines.append(f"| {row['mode']} | {row['images']} | {row['steps']} | {attention} | "
                         f"{row['seconds_per_image']:.2f} | {row['load_s']:.1f} | {_gib(peak)} |")
        lines += errors(r["generation"], "mode") + [""]
    if r.get("encoders"):
        lines += ["| CLIP-feature stage (image + 2 subject crops + edge map + caption) | batch | records / s | " + mem + " |",
                  "|---|---|---|---|"]
        for row in r["encoders"]:
            if "error" not in row:
                peak = row.get("peak_vram_allocated_bytes") if gpu else row["peak_rss_bytes"]
                lines.append(f"| dataset.features.encode_records | {row['batch']} | {row['records_per_s']:.3g} | {_gib(peak)} |")
        lines += errors(r["encoders"], "batch") + [""]
    if r.get("prior_forward"):
        lines += ["| prior forward (bf16) | batch | ours samples / s | released-style samples / s | speedup |",
                  "|---|---|---|---|---|"]
        for row in r["prior_forward"]:
            for b in row.get("rows", []):
                lines.append(f"| | {b['batch']} | {b['ours_samples_per_s']:.1f} | {b['released_samples_per_s']:.1f} | "
                             f"{b['speedup']:.2f} |")
        lines += errors(r["prior_forward"], "size") + [""]
    if r.get("prior_train"):
        lines += ["| prior training step (bf16 autocast) | batch | samples / s | TFLOP/s | MFU | device-hours for 100 K × 1,024 "
                  "(paper: 74 A100-h) | " + mem + " |", "|---|---|---|---|---|---|---|"]
        for row in r["prior_train"]:
            if "error" not in row:
                peak = row.get("peak_vram_allocated_bytes") if gpu else row["peak_rss_bytes"]
                lines.append(f"| Eq. 1, λ binding, AdamW | {row['batch']} | {row['samples_per_s']:.1f} | "
                             f"{row['achieved_tflops']:.3f} | {_num(row['mfu'], '.1%')} | "
                             f"{row['projected_device_hours_paper_run']:.1f} | {_gib(peak)} |")
        lines += errors(r["prior_train"], "batch") + [""]
    if r.get("unet_train"):
        lines += ["| decoder fine-tuning step (Eq. 2, bf16 autocast) | batch | latents | trainable params | s / step | "
                  + mem + " |", "|---|---|---|---|---|---|"]
        for row in r["unet_train"]:
            if "error" not in row:
                peak = row.get("peak_vram_allocated_bytes") if gpu else row["peak_rss_bytes"]
                lines.append(f"| {row['method']} | {row['batch']} | {row['latent_side']}² | "
                             f"{row['trainable_params'] / 1e6:.1f} M | {row['seconds_per_step']:.2f} | {_gib(peak)} |")
        lines += errors(r["unet_train"], "method") + [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Re-render the tables of a saved report: ``python benchmarks/suite_report.py results/cpu.json``."""
    import json
    import sys
    from pathlib import Path

    from lambda_eclipse.atomic import atomic_write

    path = Path(sys.argv[1])
    text = markdown(json.loads(path.read_text()))
    atomic_write(path.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
