"""The concept oracle as a metric plug-in of the evaluation harness (:class:`lambda_eclipse.eval.metrics.MetricPlugin`).

Concept metrics are strict: a subject counts as right only if the oracle finds its shape (presence ≥ 0.5) *and*
reads the subject's colour (texture). Relations need both shapes found.
"""

from __future__ import annotations

from .oracle import Oracle, SceneReading
from .scenes import Scene


def reading_scores(reading: SceneReading, scene: Scene) -> dict[str, list[float]]:
    """One image's concept and composition metrics against the scene it should show: ``{metric: [values]}``
    (one value per subject for the per-subject metrics, per relation for ``relation``)."""
    row: dict[str, list[float]] = {}

    def add(metric: str, value: bool) -> None:
        row.setdefault(metric, []).append(float(value))

    colours_right = []
    for obj in scene.objects:
        r = reading.shapes[obj.shape]
        found = r.present >= 0.5
        colours_right.append(found and r.colour == obj.colour)
        add("subject_found", found)
        add("colour", colours_right[-1])
        add("texture", found and r.texture == obj.texture)
        add("colour_and_texture", found and r.colour == obj.colour and r.texture == obj.texture)
    if len(scene.objects) > 1:
        add("all_colours_right", all(colours_right))
    add("background_colour", reading.background_colour == scene.background_colour)
    add("background_kind", reading.background_kind == scene.background_kind)
    for i, rel, j in scene.relations:
        a, c = scene.objects[i].shape, scene.objects[j].shape
        both = reading.shapes[a].present >= 0.5 and reading.shapes[c].present >= 0.5
        add("relation", both and reading.relation(a, c) == rel)
    return row


class OracleMetric:
    """The miniature world's concept oracle as a plug-in: images (PIL list or uint8 (N, S, S, 3)) and the scene
    each should show -> one row of :func:`reading_scores` per image."""

    name = "miniworld-oracle"

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle

    def read(self, images) -> list[SceneReading]:
        return self.oracle.read(images)

    def score(self, images, jobs: list[Scene]) -> list[dict[str, list[float]]]:
        return self.rows(self.read(images), jobs)

    @staticmethod
    def rows(readings: list[SceneReading], scenes: list[Scene]) -> list[dict[str, list[float]]]:
        """Rows of readings already taken (the evaluation reads each image once for metrics and fidelity)."""
        return [reading_scores(r, s) for r, s in zip(readings, scenes)]
