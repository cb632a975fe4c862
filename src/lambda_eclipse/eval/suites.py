"""Benchmark suites: what to generate (jobs), from which subject pictures, scored against which references.

* ``dreambench``: 30 subjects × 25 prompts × 4 images (DreamBooth protocol, FACTS §4a; ``dreambench.json``).
  The prompt is the template with the class noun and no rare token ("a stuffed animal in the snow"); the class
  noun is the subject word bound to the subject's picture; CLIP-T reads the same prompt.
* ``multibench``: 2- and 3-subject prompts from the paper's templates (appendix F, ``multibench.md``) filled with
  DreamBench subjects of distinct classes. The authors' own Multibench images and prompt list are not public, so
  this is a reconstruction: same templates and prompt counts, DreamBench subjects in every slot.
* ``dreambench-canny``: Table 5. Per DreamBench prompt, an image generated without subjects gives the Canny edge
  map; the subject-driven generation then runs under it. The suite also generates the same prompts without the
  edge map, so the report states the relative DINO drop from one run.

A job is one (subjects, prompt) pair; its key names its images, so reruns and shards find them.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

PROTOCOL = Path(__file__).resolve().parent / "dreambench.json"
SUITES = ("dreambench", "multibench", "dreambench-canny", "miniworld")

# Multibench templates (paper appendix F); each slot's kind: "live" (a pet), "object", or "any".
TWO_SUBJECT = [
    ("{} in the {}", ("live", "object")), ("{} wearing a {}", ("live", "wearable")),
    ("{} chasing a {}", ("live", "object")), ("{} looking at a {}", ("live", "object")),
    ("{} is sitting on a {}", ("live", "object")), ("{} standing on a {}", ("live", "object")),
    ("{} and {} playing in the garden", ("any", "any")), ("{} and {} on top of the mountain", ("any", "any")),
    ("{} and {} in the jungle", ("any", "any")), ("{} and {} in the snow", ("any", "any")),
    ("{} and {} on the beach", ("any", "any")), ("{} and {} on a cobblestone street", ("any", "any")),
    ("{} and {} standing next to each other", ("any", "any")),
]
THREE_SUBJECT = [
    ("{} with a {} and {}", ("live", "object", "object")), ("{} is playing with {} in {}", ("live", "any", "object")),
    ("{} with {} in front of {}", ("live", "any", "object")),
    ("{} with a {} and a view of the {}", ("live", "object", "object")),
    ("{} with a {} and {} in the background", ("live", "object", "object")),
]
WEARABLE = {"glasses", "sneaker", "boot", "backpack"}
MULTIBENCH_PROMPTS = {2: 904, 3: 1476}  # the paper's prompt counts


@dataclass(frozen=True)
class Subject:
    """One benchmark subject: its id, the word bound in prompts (the class noun), and its pictures."""

    id: str
    word: str
    images: tuple[Path, ...]
    live: bool = False
    condition_index: int = 0  # which picture the generator is given (all of them are the scoring references)

    @property
    def condition_image(self) -> Path:
        return self.images[self.condition_index]


@dataclass(frozen=True)
class Job:
    """One prompt of a suite: generate ``images`` images of ``prompt`` with ``subjects`` bound (none if empty).

    ``key`` is unique in the suite and names the job's image folder; ``edge_from`` is the key of the job whose
    first image gives the Canny edge map; ``kind`` groups jobs in the report ("1 subject", "with edges", ...).
    """

    key: str
    prompt: str
    subjects: tuple[str, ...] = ()
    images: int = 4
    edge_from: str | None = None
    kind: str = "all"
    scored: bool = True


@dataclass
class Suite:
    name: str
    subjects: dict[str, Subject]
    jobs: list[Job]
    notes: dict[str, str] = field(default_factory=dict)

    def words(self, job: Job) -> dict[str, str]:
        """Subject word -> subject id of a job."""
        return {self.subjects[s].word: s for s in job.subjects}


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def load_protocol() -> dict:
    return json.loads(PROTOCOL.read_text())


DREAMBENCH_REPO = "https://github.com/google/dreambooth"


def download_dreambench(cache_dir: str | Path) -> Path:
    """Clone DreamBench's public repository (``git``, shallow) into ``cache_dir`` once; returns its dataset/ folder.
    The clone lands under a temporary name and is moved into place whole, so an interrupted download leaves nothing."""
    import shutil
    import subprocess

    from ..atomic import atomic_dir

    target = Path(cache_dir) / "dreambooth"
    if not (target / "dataset").is_dir():
        if shutil.which("git") is None:
            raise UserError(f"--download needs git on PATH; or clone {DREAMBENCH_REPO} yourself and give --dataset-dir")
        with atomic_dir(target) as temporary:
            done = subprocess.run(["git", "clone", "--depth", "1", DREAMBENCH_REPO, str(temporary / "repo")],
                                  capture_output=True, text=True)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["git failed"])[-1]
                raise UserError(f"cannot download DreamBench from {DREAMBENCH_REPO} ({last}); give --dataset-dir")
            for item in (temporary / "repo").iterdir():
                item.rename(temporary / item.name)
            (temporary / "repo").rmdir()
    return target / "dataset"


def dreambench_subjects(dataset_dir: str | Path, ids: list[str] | None = None) -> dict[str, Subject]:
    """The DreamBench subjects (all, or ``ids``) from a copy of the dataset folder; every picture must exist."""
    protocol = load_protocol()
    root = Path(dataset_dir)
    if not root.is_dir():
        raise UserError(f"DreamBench folder {str(root)!r} does not exist; give --dataset-dir (the dataset/ folder "
                        "of github.com/google/dreambooth)")
    known = {s["subject_id"]: s for s in protocol["subjects"]}
    wanted = ids or list(known)
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise UserError(f"unknown DreamBench subject(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    subjects = {}
    for sid in wanted:
        spec = known[sid]
        paths = tuple(root / sid / name for name in spec["images"])
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"DreamBench folder {str(root)!r} is missing subject {sid!r} ({', '.join(missing)}); "
                            "give a complete copy of the dataset/ folder or choose --subjects")
        subjects[sid] = Subject(sid, spec["class"], paths, bool(spec["live"]))
    return subjects


def dreambench_prompts(subject: Subject) -> list[str]:
    """The 25 prompts of a subject, the class noun in place of the rare token and the class."""
    templates = load_protocol()["prompts"]["live" if subject.live else "object"]
    return [_clean(t.format("", subject.word)) for t in templates]


def dreambench(dataset_dir: str | Path, subjects: list[str] | None = None, images_per_prompt: int = 4) -> Suite:
    chosen = dreambench_subjects(dataset_dir, subjects)
    jobs = [Job(f"{sid}/p{k:02d}", prompt, (sid,), images_per_prompt, kind="live" if s.live else "object")
            for sid, s in chosen.items() for k, prompt in enumerate(dreambench_prompts(s))]
    return Suite("dreambench", chosen, jobs, {"prompt": "DreamBench template with the class noun, no rare token"})


def dreambench_canny(dataset_dir: str | Path, subjects: list[str] | None = None, images_per_prompt: int = 4) -> Suite:
    """Per prompt: ``plain`` (no subject, 1 image: the edge source), ``subject`` (no edges) and ``canny``."""
    base = dreambench(dataset_dir, subjects, images_per_prompt)
    jobs = []
    for job in base.jobs:
        sid, p = job.key.split("/")
        plain = Job(f"plain/{sid}/{p}", job.prompt, (), 1, kind="no subject (edge source)", scored=False)
        jobs += [plain, Job(f"subject/{sid}/{p}", job.prompt, job.subjects, images_per_prompt, kind="without edges"),
                 Job(f"canny/{sid}/{p}", job.prompt, job.subjects, images_per_prompt, plain.key, kind="with edges")]
    notes = {**base.notes, "edges": "Canny edges of the same pipeline's image without subjects (the paper used SD v1.5)"}
    return Suite("dreambench-canny", base.subjects, jobs, notes)


def multibench(dataset_dir: str | Path, subjects: list[str] | None = None, images_per_prompt: int = 4,
               prompts: dict[int, int] | None = None, seed: int = 0) -> Suite:
    """Prompts from the paper's templates, slots filled with DreamBench subjects of distinct classes (kinds
    respected: pets first, wearables after "wearing"), ``prompts`` per subject count spread over the templates."""
    chosen = dreambench_subjects(dataset_dir, subjects)
    counts = prompts or MULTIBENCH_PROMPTS
    rng = random.Random(seed)

    def fits(kind: str, s: Subject) -> bool:
        return {"live": s.live, "object": not s.live, "wearable": s.word in WEARABLE, "any": True}[kind]

    jobs: list[Job] = []
    for n, templates in ((2, TWO_SUBJECT), (3, THREE_SUBJECT)):
        # every composition each template admits (distinct subjects of distinct classes, slot kinds respected),
        # shuffled once, then taken round-robin over the templates until the count is reached or all are used
        options = []
        for template, kinds in templates:
            pools = [[s for s in chosen.values() if fits(kind, s)] for kind in kinds]
            combos = [c for c in itertools.product(*pools) if len({p.word for p in c}) == n]
            rng.shuffle(combos)
            options.append((template, combos))
        k = 0
        while k < counts.get(n, 0) and any(combos for _, combos in options):
            for template, combos in options:
                if combos and k < counts.get(n, 0):
                    picks = combos.pop()
                    jobs.append(Job(f"{n}subj/p{k:04d}", _clean(template.format(*[p.word for p in picks])),
                                    tuple(p.id for p in picks), images_per_prompt, kind=f"{n} subjects"))
                    k += 1
    if not jobs:
        raise UserError("these subjects cannot fill the Multibench templates (a pet and objects of distinct classes "
                        "are needed); choose more --subjects")
    notes = {"construction": "paper templates (appendix F) with DreamBench subjects of distinct classes; the "
                             "authors' Multibench images and prompt list are not public",
             "seed": str(seed), "prompts": json.dumps({f"{n} subjects": sum(j.kind == f"{n} subjects" for j in jobs)
                                                        for n in (2, 3)})}
    return Suite("multibench", chosen, jobs, notes)


def build_suite(name: str, dataset_dir: str | Path | None, subjects: list[str] | None = None,
                images_per_prompt: int = 4, **kwargs) -> Suite:
    """A suite by name (``miniworld`` is built by :mod:`lambda_eclipse.eval.miniworld_suite`)."""
    builders = {"dreambench": dreambench, "multibench": multibench, "dreambench-canny": dreambench_canny}
    if name not in builders:
        raise UserError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    if dataset_dir is None:
        raise UserError(f"the {name} suite needs the DreamBench photos; give --dataset-dir")
    return builders[name](dataset_dir, subjects, images_per_prompt, **kwargs)
