"""The evaluation harness on tiny models built from configs and on real DreamBench photos (tests/data/dreambench:
4 of the 30 subjects, CC-BY-4.0, credits in references_and_licenses.txt)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lambda_eclipse.errors import UserError
from lambda_eclipse.eval import EvalSpec, GenerationConfig, evaluate
from lambda_eclipse.eval.metrics import ClipJudge, DinoJudge, Judges, load_judges
from lambda_eclipse.eval.suites import build_suite

DATA = Path(__file__).parent / "data" / "dreambench"
SUBJECTS = ("cat", "dog6", "vase", "red_cartoon")
FAST = GenerationConfig(steps=1, guidance=4.0, images_per_prompt=2, batch_prompts=3)


def tiny_judges() -> Judges:
    from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, ViTConfig, ViTImageProcessorPil,
                              ViTModel)

    from tiny import tiny_tokenizer

    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              image_size=32, patch_size=8), add_pooling_layer=True).eval()
    tokenizer = tiny_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)).eval()
    return Judges(DinoJudge(dino, ViTImageProcessorPil(size={"height": 32, "width": 32}), "tiny-dino"),
                  ClipJudge(clip, CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                            tokenizer, "tiny-clip"))


@pytest.fixture(scope="module")
def judges():
    return tiny_judges()


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_metrics_match_a_direct_computation(judges):
    """DINO is the last layer's CLS token (not the pooler), CLIP the projected embeddings, raw cosines."""
    images = _images(3)
    dino, clip = judges.dino, judges.clip
    pixels = dino.processor(images=images, return_tensors="pt").pixel_values
    out = dino.model(pixel_values=pixels)
    expected = F.normalize(out.last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(dino.embed(images), expected, atol=1e-5)
    assert not torch.allclose(dino.embed(images), F.normalize(out.pooler_output, dim=-1), atol=1e-2)
    pixels = clip.processor(images=images, return_tensors="pt").pixel_values
    direct = F.normalize(clip.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert torch.allclose(clip.embed_images(images), direct, atol=1e-5)
    unprojected = clip.model.vision_model(pixel_values=pixels).pooler_output
    assert unprojected.shape[-1] != direct.shape[-1]  # the projection is applied (32 -> 16)
    tokens = clip.tokenizer(["a cat on the beach"], padding=True, return_tensors="pt")
    text = F.normalize(clip.model.get_text_features(**tokens).pooler_output, dim=-1)
    assert torch.allclose(clip.embed_texts(["a cat on the beach"]), text, atol=1e-5)


def test_judge_that_fails_to_load_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot load the DINO judge"):
        load_judges(str(tmp_path / "no-such-judge"), None)


def _spec(out, **kw) -> EvalSpec:
    base = dict(suite="dreambench", out=str(out), dataset_dir=str(DATA), subjects=SUBJECTS, limit=3,
                generation=FAST, progress=False)
    return EvalSpec(**{**base, **kw})


def _pngs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def test_dreambench_end_to_end_resume_and_shards(tiny_pipe, judges, tmp_path):
    """--limit on the real photos: images, reports, grids; a rerun makes nothing; 2 shards merge to the same."""
    spec = _spec(tmp_path / "run", limit=4)  # 4 prompts: cat's 3 batches of <=3 prompts... across 2 subjects
    done = evaluate(tiny_pipe, spec, judges, "tiny")
    result = done["result"]
    assert done["generation"]["made"] == 8 and result["images"] == 8 and result["prompts"] == 4
    for name in ("metrics.json", "metrics.md", "per_subject.csv", "per_image.csv", "plot.png", "grids/cat.png"):
        assert (tmp_path / "run" / name).is_file(), name
    md = (tmp_path / "run" / "metrics.md").read_text()
    assert "paper: λ-ECLIPSE* (Kv2.2, 34M prior, zero-shot) | 0.6130 | 0.7830 | 0.3070" in md
    overall = result["overall"]["all"]
    assert set(overall) == {"dino", "clip_i", "clip_t"} and overall["dino"]["n"] == 4
    assert all(-1 <= v["mean"] <= 1 for v in overall.values())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["judges"]["clip"] == "tiny-clip"
    first = _pngs(tmp_path / "run")
    assert len(first) == 8 and all("cat/p0" in k for k in first)
    native = tiny_pipe.unet.config.sample_size * tiny_pipe.movq_scale_factor
    assert Image.open(tmp_path / "run" / next(iter(first))).size == (native, native)
    # the grid: the subject picture and 2 images per row, one row (with its caption) per prompt
    assert Image.open(tmp_path / "run" / "grids" / "cat.png").size == (3 * 132, 4 * 146)
    # a rerun generates nothing
    again = evaluate(tiny_pipe, EvalSpec(**{**spec.__dict__, "score": False}), None, "tiny")
    assert again["generation"] == {**again["generation"], "made": 0, "skipped": 8}
    # two shards into one folder, then one merge (scoring), equal to the unsharded run, image for image
    shards = tmp_path / "sharded"
    for rank in (0, 1):
        evaluate(tiny_pipe, _spec(shards, limit=4, rank=rank, world=2, score=False), None, "tiny")
    merged = evaluate(tiny_pipe, _spec(shards, limit=4), judges, "tiny")
    assert merged["generation"]["made"] == 0
    assert _pngs(shards) == first
    assert merged["result"]["overall"] == result["overall"]
    # compare: both runs side by side, one row per kind, and the plot
    from lambda_eclipse.eval import compare_runs

    table = compare_runs([f"one={tmp_path / 'run'}", f"two={shards}"], tmp_path / "cmp")
    row = f"{overall['dino']['mean']:.4f} | {overall['clip_i']['mean']:.4f} | {overall['clip_t']['mean']:.4f} | 8 |"
    assert f"| one | all | `tiny` | {row}" in table and f"| two | all | `tiny` | {row}" in table
    assert (tmp_path / "cmp" / "compare.png").is_file()


def test_resume_after_a_kill_loses_only_the_batch_in_flight(tiny_pipe, tmp_path, monkeypatch):
    """A run killed in its second batch keeps the first batch; the rerun makes only what is missing."""
    import lambda_eclipse.eval.runner as runner

    spec = _spec(tmp_path / "run", limit=4, score=False)
    real, calls = runner.generate_batch, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_pipe, spec, None, "tiny")
    monkeypatch.setattr(runner, "generate_batch", real)
    assert len(_pngs(tmp_path / "run")) == 6  # batch 1: 3 prompts × 2 images
    done = evaluate(tiny_pipe, spec, None, "tiny")
    assert done["generation"]["made"] == 2 and done["generation"]["skipped"] == 6
    names = list(_pngs(tmp_path / "run"))
    assert len(names) == 8 and not any(n.endswith("-1.png") for n in names)  # none twice


def test_multibench_and_canny_suites_end_to_end(tiny_pipe, judges, tmp_path):
    """Multibench prompts bind 2-3 subjects of distinct classes; the Canny suite reports the relative DINO drop."""
    from lambda_eclipse.eval.suites import multibench

    suite = multibench(DATA, list(SUBJECTS), 1, prompts={2: 2, 3: 1})
    assert [len(j.subjects) for j in suite.jobs] == [2, 2, 3]
    for job in suite.jobs:
        words = [suite.subjects[s].word for s in job.subjects]
        assert len(set(words)) == len(words) and all(w in job.prompt for w in words)
        assert suite.subjects[job.subjects[0]].live  # pets take the first slot of these templates
    result = evaluate(tiny_pipe, EvalSpec("multibench", str(tmp_path / "mb"), generation=FAST, progress=False),
                      judges, "tiny", suite)["result"]
    assert set(result["overall"]) == {"all", "2 subjects", "3 subjects"} and result["images"] == 3
    assert "paper: λ-ECLIPSE, 3 subjects | 0.3420" in (tmp_path / "mb" / "metrics.md").read_text()

    canny = evaluate(tiny_pipe, _spec(tmp_path / "canny", suite="dreambench-canny", limit=1), judges, "tiny")
    result = canny["result"]
    assert canny["generation"]["made"] == 1 + 2 + 2  # per prompt: edge source, without and with edges
    assert set(result["overall"]) == {"all", "without edges", "with edges"}
    d = result["overall"]
    assert result["dino_drop"] == pytest.approx(1 - d["with edges"]["dino"]["mean"] / d["without edges"]["dino"]["mean"])
    assert "DINO drop" in (tmp_path / "canny" / "metrics.md").read_text()


def test_bad_input_is_one_line_and_writes_nothing(tiny_pipe, tmp_path):
    from lambda_eclipse.eval.suites import Job

    partial = tmp_path / "partial"
    (partial / "cat").mkdir(parents=True)
    shutil.copy(DATA / "cat" / "00.jpg", partial / "cat" / "00.jpg")
    with pytest.raises(UserError, match="missing subject 'cat'"):
        build_suite("dreambench", partial, ["cat"])
    with pytest.raises(UserError, match="unknown suite"):
        build_suite("dreambench2", DATA)
    suite = build_suite("dreambench", DATA, ["cat"], 1)
    suite.jobs[0:1] = [Job("cat/p00", "a kitten on the beach", ("cat",), 1)]
    with pytest.raises(UserError, match="does not occur in the prompt"):
        evaluate(tiny_pipe, _spec(tmp_path / "bad", score=False), None, "tiny", suite)
    assert not (tmp_path / "bad").exists()
    evaluate(tiny_pipe, _spec(tmp_path / "run", limit=1, score=False), None, "tiny")
    with pytest.raises(UserError, match="holds a run with another suite .* delete that folder to start fresh"):
        evaluate(tiny_pipe, _spec(tmp_path / "run", suite="multibench", limit=1, score=False), None, "tiny")
    with pytest.raises(UserError, match="another generation"):
        evaluate(tiny_pipe, _spec(tmp_path / "run", limit=1, score=False, generation=GenerationConfig(steps=3)),
                 None, "tiny")


def test_photos_load_upright_with_exif_orientation(tmp_path):
    """A DreamBench-style photo saved with an EXIF rotation tag is scored upright (as displayed)."""
    from lambda_eclipse.encoders import load_image

    photo = Image.open(DATA / "dog6" / "00.jpg")
    rotated = photo.transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that says "turn it back to display it"
    rotated.save(tmp_path / "00.jpg", exif=exif)
    loaded = load_image(tmp_path / "00.jpg")
    assert loaded.size == photo.size
    assert abs(torch.tensor(list(loaded.convert("L").getdata()), dtype=torch.float)
               - torch.tensor(list(photo.convert("L").getdata()), dtype=torch.float)).mean() < 8


def test_cli_evaluate_end_to_end_and_errors(tiny_pipe, judges, tmp_path, capsys):
    """`lambda-eclipse evaluate dreambench` with judges and model from folders; bad input exits 2 in one line."""
    from lambda_eclipse.cli import main

    tiny_pipe.save_pretrained(tmp_path / "model")
    for part, folder in ((judges.dino.model, "dino"), (judges.dino.processor, "dino"), (judges.clip.model, "clip"),
                         (judges.clip.processor, "clip"), (judges.clip.tokenizer, "clip")):
        part.save_pretrained(tmp_path / folder)
    base = ["evaluate", "dreambench", "--model", str(tmp_path / "model"), "--dataset-dir", str(DATA),
            "--subjects", "red_cartoon", "--steps", "1", "-n", "1", "--quiet", "--judge-dino", str(tmp_path / "dino"),
            "--judge-clip", str(tmp_path / "clip"), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "run"), "--limit", "2"]) == 0
    assert "2 images made" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["prompts"] == 2 and result["judges"]["dino"] == str(tmp_path / "dino")
    for bad, message in (
        (["--out", str(tmp_path / "x"), "--judge-dino", str(tmp_path / "nope")], "cannot load the DINO judge"),
        (["--out", str(tmp_path / "x"), "--subjects", "teapot"], "missing subject 'teapot'"),
        (["--out", str(tmp_path / "x"), "--shard", "2/2"], "--shard '2/2'"),
    ):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_compare_reads_miniworld_runs_with_their_lambda_sweep(tmp_path):
    """The shipped miniworld report compares as one row per condition and per swept prior (Table 6's sweep)."""
    from lambda_eclipse.eval import compare_runs

    docs = Path(__file__).parents[1] / "docs" / "miniworld-eval"
    m = json.loads((docs / "metrics.json").read_text())
    table = compare_runs([f"shipped={docs}"], tmp_path)
    sweep = m["lambda_sweep"]["λ=0.5"]["metrics"]
    row = next(line for line in table.splitlines() if "with_subjects λ=0.5" in line)
    assert f"{sweep['dino_subject']['all']['mean']:.4f} | {sweep['clip_i_subject']['all']['mean']:.4f} | " \
           f"{sweep['clip_t']['all']['mean']:.4f} | {sweep['colour']['all']['mean']:.4f}" in row
    assert (tmp_path / "compare.png").is_file()
    with pytest.raises(UserError, match="holds no scored run"):
        compare_runs([str(docs), str(tmp_path)])


@pytest.mark.skipif(not (Path(__file__).parents[2] / "shared" / "reference" / "dreambench").is_dir(),
                    reason="the full DreamBench copy lives outside the repository")
def test_full_dreambench_protocol():
    """With the whole dataset: 30 subjects, 158 pictures, 750 prompts (3,000 images at 4 per prompt)."""
    suite = build_suite("dreambench", Path(__file__).parents[2] / "shared" / "reference" / "dreambench")
    assert len(suite.subjects) == 30 and sum(len(s.images) for s in suite.subjects.values()) == 158
    assert len(suite.jobs) == 750 and sum(j.images for j in suite.jobs) == 3000
    assert suite.jobs[0].prompt == "a backpack in the jungle"


def test_segment_cuts_each_reference_out_once_and_records_it(tiny_pipe, tmp_path):
    """--segment: each subject's condition picture is cut out onto white (saved for checking) before encoding,
    once per run, and the result says how the references were prepared."""
    from dataset_tiny import tiny_detector, tiny_segmenter

    from lambda_eclipse.eval.runner import SubjectCache, subject_preparation

    suite = build_suite("dreambench", DATA, ["cat"], 1)
    plain = SubjectCache(tiny_pipe, suite)(("cat",))
    cache = SubjectCache(tiny_pipe, suite, tmp_path / "seg", tiny_detector(), tiny_segmenter(), threshold=0.0)
    cut = cache(("cat",))
    cache(("cat",))  # cached: not segmented again
    assert len(list((tmp_path / "seg").glob("segmented-*.png"))) == 1
    word = suite.subjects["cat"].word
    assert not torch.allclose(plain[word], cut[word])
    assert "segmented" in subject_preparation(GenerationConfig(segment=True))
    assert "as given" in subject_preparation(GenerationConfig())
