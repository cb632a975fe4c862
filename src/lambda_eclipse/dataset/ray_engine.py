"""`engine: ray`: the same stage functions as the local engine, run as Ray Data ``map_batches`` over shards.

One Ray row is one input shard. Each model stage runs in an actor pool (``ray.actors`` actors, each holding its
model once, with ``ray.gpus_<stage>`` of a GPU); a stage without a model (``filter``, ``crop``, ``caption`` when the
inputs' captions are kept) runs as plain Ray tasks, on worker processes Ray reuses from stage to stage (an actor
starts a process of its own, seconds of imports each). Either reads its shard's inputs from the work folder, applies
:func:`~lambda_eclipse.dataset.stages.run_stage` and writes the stage's shard file itself: the very files the
local engine writes, so the two engines resume each other's runs. The feature store has one writer, the driver,
which commits the features of each shard in shard order (Ray keeps the order), so both engines write the same
store. The work folder must be on a file system every Ray node sees.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np

from ..errors import UserError
from .stages import MODEL_STAGES, StageModels, run_stage


def _run_shards(batch: dict[str, np.ndarray], work, stage: str, models: StageModels) -> dict[str, np.ndarray]:
    """Apply ``stage`` to the shards of one Ray batch; write their shard files (features: return them instead)."""
    import torch

    torch.set_num_threads(1)  # one CPU per actor or task: Ray schedules the parallelism
    results = []
    for shard in batch["shard"].tolist():
        start = time.perf_counter()
        records, images = work.inputs(stage, shard)
        live = sum(1 for r in records if not r.dropped)
        records, drops, samples = run_stage(stage, records, images, models, work.config)
        seconds = time.perf_counter() - start
        if stage == "features":  # the driver owns the store, and writes this shard file after it
            payload = pickle.dumps((records, samples))
        else:
            from .records import write_shard

            write_shard(work.shard_path(stage, shard), records)
            payload = b""
        results.append((shard, seconds, live, pickle.dumps(dict(drops)), payload))
    return {key: np.array([r[i] for r in results], dtype=object)
            for i, key in enumerate(("shard", "seconds", "live", "drops", "payload"))}


def _run_model_free(batch: dict[str, np.ndarray], work, stage: str) -> dict[str, np.ndarray]:
    """A stage without a model as plain Ray tasks: Ray reuses task workers, so it pays no process start-up."""
    return _run_shards(batch, work, stage, StageModels(work.config))


class _StageWorker:
    """A Ray actor: one stage, its model loaded once, applied to whole shards."""

    def __init__(self, work, stage: str, given: dict[str, Any]) -> None:
        self.work, self.stage = work, stage
        self.models = StageModels(work.config, dict(given))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run_shards(batch, self.work, self.stage, self.models)


def stage_model(stage: str, config) -> str | None:
    """The model ``stage`` loads under ``config`` (spaCy's pipeline for ``nouns``), or None when it loads none."""
    if stage == "nouns":
        return "nlp"
    if stage == "caption" and config.models.captioner == "none":
        return None  # the inputs' own captions: nothing to load
    return MODEL_STAGES.get(stage)


def _init_ray(config) -> None:
    try:
        import ray
    except ImportError:
        raise UserError('engine=ray needs Ray; run `pip install "lambda-eclipse[ray]"`') from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if config.ray.address:
            kwargs["address"] = config.ray.address
        elif config.ray.num_cpus:
            kwargs["num_cpus"] = config.ray.num_cpus
        ray.init(**kwargs)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = bool(config.progress)


def run_ray(work, models: StageModels, stages: tuple[str, ...]) -> None:
    """Run ``stages`` over their pending shards on Ray Data (see the module docstring)."""
    import ray

    from .records import write_shard
    from .runner import _stored_ids, open_store

    _init_ray(work.config)
    for stage, pending in work.stages_to_run(stages):
        needs = stage_model(stage, work.config)
        dataset = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
        if needs is None:
            dataset = dataset.map_batches(_run_model_free, fn_args=(work, stage), batch_size=1, num_cpus=1,
                                          batch_format="numpy")
        else:
            given = {needs: models.given[needs]} if needs in models.given else {}  # ship only this stage's model
            gpus = getattr(work.config.ray, f"gpus_{stage}", 0.0)
            dataset = dataset.map_batches(
                _StageWorker, fn_constructor_args=(work, stage, given), batch_size=1,
                concurrency=work.config.ray.actors if stage in MODEL_STAGES else 1, num_gpus=gpus or None,
                num_cpus=1, batch_format="numpy",
            )
        writer = open_store(work, models) if stage == "features" else None
        done_ids = _stored_ids(work) if writer else set()
        for row in dataset.iter_rows():
            shard, drops = int(row["shard"]), pickle.loads(row["drops"])
            if writer is not None:
                records, samples = pickle.loads(row["payload"])
                for sample in samples:
                    if sample.source_id not in done_ids:
                        writer.add(sample)
                writer.flush()
                write_shard(work.shard_path(stage, shard), records)
            work.manifest["stats"].setdefault(stage, {})[str(shard)] = {
                "seconds": round(float(row["seconds"]), 4), "images": int(row["live"]), "drops": drops}
            work.save_manifest()
        if writer is not None:
            writer.close()
