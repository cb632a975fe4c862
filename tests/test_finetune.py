"""finetune-decoder (Eq. 2, full or LoRA): data layout, loss, exports, LoRA load/unload, generate --unet/--lora,
one-line refusals that write nothing, and (slow) bitwise resume of a SIGKILLed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lambda_eclipse.adapters import load_lora, unload_lora
from lambda_eclipse.cli import main
from lambda_eclipse.errors import UserError
from lambda_eclipse.train.concepts import find_concepts, prepare_training_image
from lambda_eclipse.train.finetune import finetune_decoder, load_finetune_config, prepare_finetune


def _png(path: Path, seed: int, size=(20, 24), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    for c, name in enumerate(("dog", "backpack")):
        for k in range(3):
            _png(root / name / f"{k}.png", 10 * c + k, mode="RGBA" if k == 0 else "RGB")
    return root


def _config(model_dir, concepts, out, *extra):
    return load_finetune_config(None, [f"data.concepts_dir={concepts}", f"model.decoder={model_dir}",
                                       f"model.encoders={model_dir}", "data.batch_size=3", "mixed_precision=no",
                                       "log_with=none", "progress=false", "optim.lr=1e-2", *extra],
                                output_dir=str(out), max_steps=2)


@pytest.fixture(scope="module")
def runs(model_dir, concepts, tmp_path_factory):
    """One full and one LoRA run of 2 steps on the tiny decoder: {mode: run folder}."""
    root = tmp_path_factory.mktemp("runs")
    return {mode: finetune_decoder(_config(model_dir, concepts, root / mode, f"mode={mode}", "lora.rank=2"))
            for mode in ("full", "lora")}


def test_concept_layouts(tmp_path, concepts):
    found = find_concepts(concepts)
    assert found.names == ("backpack", "dog") and len(found.paths) == 6
    assert [found.names[i] for i in found.concept] == ["backpack"] * 3 + ["dog"] * 3
    single = find_concepts(concepts / "dog")  # a folder of images is one concept
    assert single.names == ("dog",) and len(single.paths) == 3
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"cat: [{concepts / 'dog' / '0.png'}]\nbag: ['{concepts / 'backpack' / '1.png'}']\n")
    assert find_concepts(manifest=manifest).names == ("cat", "bag")
    assert find_concepts(concepts).fingerprint() != single.fingerprint()


@pytest.mark.parametrize("setup, message", [
    (lambda root: (root / "empty").mkdir(parents=True), "concept 'empty' has no images"),
    (lambda root: (root / "bad").mkdir(parents=True) or (root / "bad" / "x.png").write_bytes(b"nope"),
     "is not an image"),
])
def test_bad_concept_folders_are_one_line(tmp_path, setup, message):
    _png(tmp_path / "ok" / "a.png", 0)
    setup(tmp_path)
    with pytest.raises(UserError, match=message):
        find_concepts(tmp_path)


def test_training_images_keep_aspect_and_sit_on_white():
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (18, 0, 22, 20))  # a red bar in the middle
    out = np.asarray(prepare_training_image(image, 10))
    assert out.shape == (10, 10, 3)
    assert (out[:, 0] == 255).all()  # transparent -> white, not black
    assert out[5, 5, 0] > 200 and out[5, 5, 1] < 80  # the centre (bar) survives the centre crop
    assert (out[:, 4:6, 1] < 120).all() and (out[:, 8:, 1] > 200).all()  # the bar stays 2 px wide: aspect kept


def test_loss_is_eq2_on_cached_batches_of_several_embeddings(model_dir, concepts, tmp_path):
    objective = prepare_finetune(_config(model_dir, concepts, tmp_path / "run", "loss.cond_dropout=0"))
    assert objective.latents.shape[0] == objective.embeds.shape[0] == 6  # encoded once, cached
    assert list((tmp_path / "run" / "cache").glob("encoded-*.safetensors"))
    unet = objective.build_model().eval()
    latents, embeds = objective.latents[:3], objective.embeds[:3]  # (B, D) conditions, B = 3
    from lambda_eclipse.train.checkpoint import RunState

    state = RunState(generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    torch.rand(3, generator=draws)  # the dropout draw (all kept at 0)
    t = torch.randint(0, 1000, (3,), generator=draws)
    noise = torch.randn(latents.shape, generator=draws)
    with torch.no_grad():
        loss = objective.losses(unet, {"latents": latents, "embeds": embeds}, state)["loss"]
        noisy = objective.scheduler.add_noise(latents, noise, t)
        predicted = unet(noisy, t, None, added_cond_kwargs={"image_embeds": embeds}).sample[:, :4]
    assert objective.scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(predicted, noise))


def test_full_run_exports_a_unet_that_generate_uses(runs, model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    tuned = UNet2DConditionModel.from_pretrained(runs["full"] / "unet")
    base = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters()))
    assert (runs["full"] / "concepts.json").is_file() and not (runs["full"] / "lora.safetensors").exists()
    images = {}
    for name, flags in (("base", []), ("tuned", ["--unet", runs["full"]])):
        assert main(["generate", "a dog", "--model", str(model_dir), "--steps", "2", "--quiet",
                     "--out", str(tmp_path / name), *map(str, flags)]) == 0
        images[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))))
    assert not np.array_equal(images["base"], images["tuned"])


def test_lora_saves_small_loads_scales_and_unloads(runs, model_dir, tiny_pipe, tmp_path):
    lora = runs["lora"] / "lora.safetensors"
    assert lora.stat().st_size < 0.2 * (model_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert not (runs["lora"] / "unet").exists()
    from lambda_eclipse.pipeline import LambdaEclipsePipeline

    pipe = LambdaEclipsePipeline.from_pretrained(model_dir)
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 32)

    def forward():
        with torch.no_grad():
            return pipe.unet(x, t, None, added_cond_kwargs={"image_embeds": e}).sample

    before = forward()
    pipe.load_lora(lora)
    with_lora = forward()
    assert not torch.allclose(before, with_lora)
    pipe.load_lora(lora, scale=0.0)  # reloading replaces it; scale 0 is the base model
    torch.testing.assert_close(forward(), before)
    pipe.load_lora(lora, scale=1.0)
    torch.testing.assert_close(forward(), with_lora)
    pipe.unload_lora()
    assert torch.equal(forward(), before)
    assert main(["generate", "a dog", "--model", str(model_dir), "--steps", "2", "--quiet", "--lora", str(lora),
                 "--lora-scale", "0.5", "--out", str(tmp_path / "g")]) == 0
    meta = Image.open(next((tmp_path / "g").glob("*.png"))).text
    assert '"lora_scale": 0.5' in meta["settings"]


def test_pipeline_takes_a_fine_tuned_unet(runs, model_dir):
    from lambda_eclipse.adapters import load_unet
    from lambda_eclipse.pipeline import LambdaEclipsePipeline

    unet = load_unet(runs["full"])
    pipe = LambdaEclipsePipeline.from_pretrained(model_dir, unet=unet)
    assert pipe.unet is unet


def test_a_lora_of_another_unet_is_refused(runs, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", addition_embed_type="image", encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", norm_num_groups=8)
    with pytest.raises(UserError, match="trained on another UNet .block_out_channels"):
        load_lora(other, runs["lora"] / "lora.safetensors")
    not_lora = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(not_lora))
    with pytest.raises(UserError, match="is not a LoRA written by finetune-decoder"):
        load_lora(other, not_lora)
    unload_lora(other)  # no adapter: a no-op


@pytest.mark.parametrize("extra, prepare, message", [
    (["optim.lrr=1"], None, "unknown config key 'optim.lrr'; see `lambda-eclipse finetune-decoder --help-config`"),
    (["mode=half"], None, "mode must be full or lora"),
    ([], "file", "is a file; give a folder"),
    (["model.decoder={nounet}"], None, "has no unet/ folder"),
    (["data.concepts_dir={empty}"], None, "has no images"),
])
def test_bad_input_is_one_line_and_writes_nothing(extra, prepare, message, model_dir, concepts, tmp_path, capsys):
    nounet, empty = tmp_path / "nounet", tmp_path / "empty"
    for folder in ("scheduler", "movq"):
        (nounet / folder).mkdir(parents=True)
    (empty / "cat").mkdir(parents=True)
    out = tmp_path / "out"
    if prepare == "file":
        out.write_text("x")
    args = [f"data.concepts_dir={concepts}", f"model.decoder={model_dir}", f"model.encoders={model_dir}",
            *[e.format(nounet=nounet, empty=empty) for e in extra]]
    assert main(["finetune-decoder", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert out.is_file() if prepare == "file" else not out.exists()


def test_generate_refuses_missing_adapters(model_dir, tmp_path, capsys):
    for flags, message in ((["--lora", tmp_path / "none.safetensors"], "--lora"), (["--unet", tmp_path / "no"], "--unet")):
        assert main(["generate", "a dog", "--model", str(model_dir), "--out", str(tmp_path / "o"), *map(str, flags)]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_config_lists_the_paper_defaults(capsys):
    assert main(["finetune-decoder", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "optim.lr" in text and "1e-05" in text and "lora.target_modules" in text and "mode" in text
    config = load_finetune_config(None, ["lora.target_modules=to_q,to_v"])
    assert config.lora.target_modules == ("to_q", "to_v") and config.optim.warmup_steps == 0


def test_shipped_finetune_configs_parse():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("finetune-decoder-*.yaml")):
        assert load_finetune_config(path).max_steps > 0
    assert load_finetune_config(root / "finetune-decoder-dreambench.yaml").optim.lr == 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sigkilled_finetune_resumes_bitwise(mode, model_dir, concepts, tmp_path):
    """`lambda-eclipse finetune-decoder` killed with SIGKILL after a checkpoint, then rerun, equals an uninterrupted run."""
    from safetensors.torch import load_file

    args = [f"data.concepts_dir={concepts}", f"model.decoder={model_dir}", f"model.encoders={model_dir}",
            "data.batch_size=2", "mixed_precision=no", "log_with=none", "progress=false", f"mode={mode}",
            "optim.grad_accum_steps=2", "optim.ema_decay=0.9", "lora.rank=2"]

    def command(out):
        return [sys.executable, "-m", "lambda_eclipse.cli", "finetune-decoder", "--output-dir", str(out),
                "--max-steps", "40", "checkpoint_every=5", *args]

    def weights(run):
        path = run / ("lora.safetensors" if mode == "lora" else "unet/diffusion_pytorch_model.safetensors")
        return load_file(str(path))

    subprocess.run(command(tmp_path / "full"), check=True, capture_output=True)
    victim = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-000010").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "concepts.json").exists(), "killed too late to test resuming"
    subprocess.run(command(tmp_path / "killed"), check=True, capture_output=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_miniworld_measurement_picks_disjoint_held_out_concepts():
    from lambda_eclipse.miniworld.finetune_eval import split_instances
    from lambda_eclipse.miniworld.scenes import RESERVED_INSTANCES

    tuned, control = split_instances()
    assert len(tuned) == len(control) == 8 and not set(tuned) & set(control)
    assert set(tuned) | set(control) <= RESERVED_INSTANCES and len({c[0] for c in tuned}) == 8  # one per shape


def test_hardest_concepts_are_the_lowest_zero_shot_rates_and_the_next_ones_are_control():
    from lambda_eclipse.miniworld.finetune_eval import hardest_instances
    from lambda_eclipse.miniworld.scenes import RESERVED_INSTANCES

    names = sorted("-".join(i) for i in RESERVED_INSTANCES)
    scores = {name: (k * 7 % len(names)) / len(names) for k, name in enumerate(names)}  # a shuffled ranking
    tuned, control = hardest_instances(scores, 8)
    ranked = sorted(names, key=lambda n: scores[n])
    assert ["-".join(c) for c in tuned] == ranked[:8] and ["-".join(c) for c in control] == ranked[8:16]
    assert max(scores["-".join(c)] for c in tuned) < min(scores["-".join(c)] for c in control)


def test_miniworld_concepts_folder_paints_the_concepts_in_a_new_colour(tmp_path):
    import numpy as np
    from PIL import Image

    from lambda_eclipse.miniworld.finetune_eval import write_concepts_folder, split_instances
    from lambda_eclipse.miniworld.scenes import iter_scenes, render_scene

    concept = split_instances()[0][0]
    lime = (0.0, 255.0, 30.0)
    plain = write_concepts_folder([concept], 1, 7002, 32, tmp_path / "plain")
    painted = write_concepts_folder([concept], 1, 7002, 32, tmp_path / "painted", colour=lime)
    scene = next(s for s in iter_scenes(7002, 32, "heldout") if concept in [(o.shape, o.colour, o.texture) for o in s.objects])
    i = [(o.shape, o.colour, o.texture) for o in scene.objects].index(concept)
    name = "-".join(concept) + "/000.png"
    assert np.array_equal(np.asarray(Image.open(plain / name)), scene.image)
    want = render_scene(scene.seed, 32, "heldout", recolour={i: lime}).image
    assert np.array_equal(np.asarray(Image.open(painted / name)), want) and not np.array_equal(want, scene.image)


@pytest.mark.slow  # scans a few hundred scenes (~4 s)
def test_miniworld_measurement_prompts_hold_the_concept_and_are_balanced():
    from lambda_eclipse.miniworld.finetune_eval import eval_prompts, split_instances

    tuned, control = split_instances()
    prompts = eval_prompts(tuned[:1], control, 2, 7001, 32)
    assert len(prompts) == 2
    for scene, i in prompts:
        keys = [(o.shape, o.colour, o.texture) for o in scene.objects]
        assert keys[i] == tuned[0] and not set(keys) & set(control)
    assert sorted(len(s.objects) for s, _ in prompts) == [1, 2]  # balanced over object counts


def test_a_run_folder_refuses_another_run(runs, model_dir, concepts):
    with pytest.raises(UserError, match="another mode config"):
        finetune_decoder(_config(model_dir, concepts, runs["full"], "mode=lora"))
    caches = sorted((runs["full"] / "cache").iterdir())
    with pytest.raises(UserError, match="another data.resolution"):
        finetune_decoder(_config(model_dir, concepts, runs["full"], "data.resolution=8"))
    assert sorted((runs["full"] / "cache").iterdir()) == caches  # refused before encoding anything


def test_interpolate_and_evaluate_take_the_fine_tuned_decoder(runs, model_dir, tmp_path, capsys):
    """Every command that decodes takes --unet/--lora: interpolate decodes with the tuned UNet (and records it),
    evaluate refuses a missing adapter in one line before loading anything."""
    frames = {}
    for name, flags in (("base", []), ("tuned", ["--unet", runs["full"]])):
        out = tmp_path / name
        assert main(["interpolate", "--corner", "a dog", "--corner", "a cat", "--frames", "2", "--steps", "2",
                     "--model", str(model_dir), "--out", str(out), "--quiet", *map(str, flags)]) == 0
        (frame,) = [p for p in sorted(out.glob("*.png")) if "grid" not in p.name][:1]
        frames[name] = (np.asarray(Image.open(frame)), Image.open(frame).text)
    assert not np.array_equal(frames["base"][0], frames["tuned"][0])
    assert str(runs["full"]) in json.dumps(frames["tuned"][1]) and "unet" not in frames["base"][1].get("settings", "")
    capsys.readouterr()
    assert main(["evaluate", "dreambench", "--dataset-dir", str(tmp_path), "--out", str(tmp_path / "ev"),
                 "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "--lora" in capsys.readouterr().err and not (tmp_path / "ev").exists()


def test_fine_tuned_decoder_survives_prior_then_decoder_memory_mode(runs, model_dir):
    """--low-memory prior-then-decoder loads the decoder only after the prior: the fine-tuned UNet must be the one
    that decodes (not the base UNet loaded by the swap)."""
    from lambda_eclipse.adapters import apply_decoder_adapters
    from lambda_eclipse.cli import load_pipeline

    images = {}
    for mode in ("resident", "prior-then-decoder"):
        pipe = apply_decoder_adapters(load_pipeline(str(model_dir), "cpu", None, mode), unet=runs["full"])
        pipe.set_progress_bar_config(disable=True)
        images[mode] = pipe("a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                            output_type="np").images
    base = load_pipeline(str(model_dir), "cpu", None, "resident")
    base.set_progress_bar_config(disable=True)
    plain = base("a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(images["prior-then-decoder"], images["resident"], atol=1e-4)
    assert not np.allclose(plain, images["resident"], atol=1e-3)


def test_miniworld_measurement_report_separates_the_decoder_and_the_object_counts(tmp_path):
    """The report has the decoder-alone section, the per-object-count rows and the noise line; the plot is drawn."""
    from lambda_eclipse.miniworld.finetune_eval import FIGURES, plot_figures, write_markdown

    def point(v):
        return {k: v for k, _ in FIGURES}

    sets = ("finetuned", "control", "scene_embedding")
    metrics = {"config": {"images_per_prompt": 2}, "finetuned_concepts": ["a"], "control_concepts": ["b"],
               "prompts": {k: 48 for k in sets},
               "results": {"full": {"0": {k: point(0.25) for k in sets}, "100": {k: point(0.5) for k in sets}},
                           "lora": {"0": {k: point(0.25) for k in sets}, "100": {k: point(0.75) for k in sets}}}}
    text = write_markdown(metrics)
    assert "decoded from the held-out scene's own CLIP embedding" in text and "over 96 images is 5.1 points" in text
    row = next(line for line in text.splitlines() if line.startswith("| ... in scenes of 2 objects"))
    assert row.split(" | ")[1:] == ["0.250", "0.500", "0.750 |"]  # bundle, full @100, lora @100
    plot_figures(metrics, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
