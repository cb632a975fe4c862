"""`lambda-eclipse build-dataset`: run the stages shard by shard, resumably, and write the report.

Work folder layout::

    sources.jsonl, input.json     every input image, listed once (the shard cut is fixed by it), and where from
    manifest.json                 shards, per-stage fingerprints, done shards and timings
    stages/<stage>/stage.json     the stage's fingerprint and settings
    stages/<stage>/shard-NNNNN.jsonl (+ .safetensors)   one file per input shard, written atomically
    features/                     the feature store (schema v2), one store shard flushed per input shard
    report.md, report.json, samples.png

Resume: a shard is done when its stage file exists; a killed run redoes only the unfinished shard. Changing a
stage's settings (say a filter threshold) changes its fingerprint and those of the stages after it; their folders
are cleared and rerun, while earlier stages are reused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..errors import UserError
from .config import BuildConfig
from .records import Record, read_shard, write_shard
from .sources import SourceRef, list_sources
from .stages import STAGES, StageModels, fingerprints, first_records, load_images, run_stage, stage_settings

SHARD = "shard-{:05d}.jsonl"


class Workdir:
    """The build's folder: sources, manifest, stage shards."""

    def __init__(self, config: BuildConfig) -> None:
        self.config = config
        self.root = Path(config.output_dir)
        self.refs = self._sources()  # before anything is written: a bad input path leaves no folder behind
        n = config.shard_size
        self.shards = [self.refs[i : i + n] for i in range(0, len(self.refs), n)]
        self.by_id = {r.source_id: r for r in self.refs}
        self.fingerprints = fingerprints(config)
        manifest = self.root / "manifest.json"
        self.manifest: dict[str, Any] = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self.manifest.setdefault("stats", {})

    def _sources(self) -> list[SourceRef]:
        """The input listing: made once (the first run's listing fixes the shard cut for every rerun)."""
        listing, origin = self.root / "sources.jsonl", self.root / "input.json"
        limit = self.config.input.limit or None
        if listing.is_file():
            first = json.loads(origin.read_text())["path"] if origin.is_file() else None
            if first != self.config.input.path:
                raise UserError(f"{str(self.root)!r} holds a build of {first!r}, not of {self.config.input.path!r}; "
                                "give another output_dir")
            lines = listing.read_text(encoding="utf-8").splitlines()
            return [SourceRef(**json.loads(line)) for line in lines if line][:limit]
        refs = list_sources(self.config.input.path)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(listing, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in refs))
        atomic_write(origin, json.dumps({"path": self.config.input.path}))
        return refs[:limit]

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def shard_path(self, stage: str, shard: int) -> Path:
        return self.stage_dir(stage) / SHARD.format(shard)

    def prepare(self, stage: str) -> None:
        """Clear a stage whose settings changed (and, for features, its store); record its fingerprint."""
        folder, meta = self.stage_dir(stage), self.stage_dir(stage) / "stage.json"
        fingerprint = self.fingerprints[stage]
        if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
            return
        if folder.exists():
            shutil.rmtree(folder)
        if stage == "features" and (self.root / "features").exists():
            shutil.rmtree(self.root / "features")
        self.manifest["stats"].pop(stage, None)
        atomic_write(meta, json.dumps({"fingerprint": fingerprint, "settings": stage_settings(stage, self.config)},
                                      indent=2))

    def require_previous(self, stage: str) -> None:
        if stage != STAGES[0] and self.pending(STAGES[STAGES.index(stage) - 1]):
            previous = STAGES[STAGES.index(stage) - 1]
            raise UserError(f"stage {stage!r} needs stage {previous!r} finished first; run the build without --stages "
                            f"or include {previous!r}")

    def pending(self, stage: str) -> list[int]:
        return [i for i in range(len(self.shards)) if not self.shard_path(stage, i).is_file()]

    def stages_to_run(self, stages: tuple[str, ...]):
        """Each of ``stages`` that has pending shards, with them: prepared (a stage whose settings changed is
        cleared) and checked to follow a finished stage. Lazy, so a stage is looked at after the one before ran."""
        for stage in stages:
            self.prepare(stage)
            pending = self.pending(stage)
            if pending:
                self.require_previous(stage)
                yield stage, pending

    def inputs(self, stage: str, shard: int) -> tuple[list[Record], list]:
        """The records a stage reads for one shard (decoded from the inputs for the first stage) and their images."""
        if stage == STAGES[0]:
            return first_records(self.shards[shard], self.config.input.max_pixels)
        previous = STAGES[STAGES.index(stage) - 1]
        records = read_shard(self.shard_path(previous, shard))
        if stage == "nouns":
            return records, [None] * len(records)
        # the features stage encodes the target picture (the image itself unless the input gives one)
        return records, load_images(records, self.by_id, self.config.input.max_pixels, target=stage == "features")

    def finish(self, stage: str, shard: int, records: list[Record], drops: Counter, seconds: float, live: int) -> None:
        """Commit one stage shard; ``live`` is how many of its records the stage worked on (for throughput)."""
        write_shard(self.shard_path(stage, shard), records)
        self.manifest["stats"].setdefault(stage, {})[str(shard)] = {
            "seconds": round(seconds, 4), "images": live, "drops": dict(drops)}
        self.save_manifest()

    def save_manifest(self) -> None:
        self.manifest.update({"num_sources": len(self.refs), "num_shards": len(self.shards),
                              "fingerprints": self.fingerprints, "config": asdict(self.config)})
        atomic_write(self.root / "manifest.json", json.dumps(self.manifest, indent=2, ensure_ascii=False))


def open_store(work: Workdir, models: StageModels):
    """The feature store writer, appending to what an interrupted run committed."""
    from ..features import read_index
    from .features import open_feature_store

    store = work.root / "features"
    existing = (store / "index.json").is_file() and bool(read_index(store).shards)
    metadata = {"source": "lambda-eclipse build-dataset", "models": asdict(work.config.models),
                "fingerprint": work.fingerprints["features"]}
    return open_feature_store(models.get("encoders"), store, work.config.store_shard_size, metadata, append=existing)


def run_local(work: Workdir, models: StageModels, stages: tuple[str, ...] = STAGES) -> None:
    """The local engine: each stage over its pending shards, in-process."""
    from tqdm.auto import tqdm

    for stage, pending in work.stages_to_run(stages):
        writer = open_store(work, models) if stage == "features" else None
        done_ids = _stored_ids(work) if writer else set()
        bar = tqdm(total=sum(len(work.shards[i]) for i in pending), desc=stage, unit="img",
                   disable=not work.config.progress)
        for shard in pending:
            start = time.perf_counter()  # a stage's time includes reading its inputs (shards, image decoding)
            records, images = work.inputs(stage, shard)
            live = sum(1 for r in records if not r.dropped)
            records, drops, samples = run_stage(stage, records, images, models, work.config)
            if writer is not None:
                for sample in samples:
                    if sample.source_id not in done_ids:  # committed by a run killed before its shard file
                        writer.add(sample)
                writer.flush()  # one store shard per input shard: the store's state matches the shard files
            work.finish(stage, shard, records, drops, time.perf_counter() - start, live)
            bar.update(len(records))
        bar.close()
        if writer is not None:
            writer.close()


def _stored_ids(work: Workdir) -> set[str]:
    from ..features import stored_source_ids

    return stored_source_ids(work.root / "features") if (work.root / "features" / "index.json").is_file() else set()


def build_dataset(config: BuildConfig, models: dict[str, Any] | None = None, stages: tuple[str, ...] = STAGES
                  ) -> Path:
    """Run (or resume) a build; returns the feature store folder. ``models`` may hold ready models under the
    names ``captioner``, ``nlp``, ``detector``, ``segmenter``, ``encoders`` (tests pass tiny ones)."""
    from .report import write_report

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise UserError(f"unknown stage {sorted(unknown)[0]!r}; stages are {', '.join(STAGES)}")
    work = Workdir(config)
    bundle = StageModels(config, dict(models or {}))
    if config.engine == "ray":
        from .ray_engine import run_ray

        run_ray(work, bundle, stages)
    else:
        run_local(work, bundle, stages)
    if all(not work.pending(s) for s in STAGES):
        write_report(work)
    return work.root / "features"
