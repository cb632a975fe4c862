"""The prior: released checkpoint layout, released math, trimming."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lambda_eclipse import LambdaEclipsePrior, UserError, prior as prior_module
from lambda_eclipse.prior import LambdaEclipsePriorTransformerOutput
from released_prior import ReleasedPrior
from tiny import randomize

# The released config.json of ECLIPSE-Community/Lambda-ECLIPSE-Prior-v1.0 (FACTS §1a).
RELEASED_CONFIG = {
    "_class_name": "PriorTransformer", "_diffusers_version": "0.20.2", "added_emb_type": "prd",
    "additional_embeddings": 4, "attention_head_dim": 32, "clip_embed_dim": None, "dropout": 0.0,
    "embedding_dim": 1280, "embedding_proj_dim": None, "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear", "norm_in_type": None, "num_attention_heads": 16, "num_embeddings": 77,
    "num_layers": 10,
}


def released_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released parameter names and shapes (FACTS §2a), built independently of our class."""
    g = torch.Generator().manual_seed(seed)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    dim, extra = config["embedding_dim"], config["additional_embeddings"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    sd = {
        "positional_embedding": r(1, config["num_embeddings"] + extra, inner), "prd_embedding": r(1, 1, inner),
        "clip_mean": r(1, dim), "clip_std": r(1, dim),
        "norm_out.weight": 1 + r(inner), "norm_out.bias": r(inner),
        "proj_to_clip_embeddings.weight": r(dim, inner), "proj_to_clip_embeddings.bias": r(dim),
    }
    for name in ["proj_in", "embedding_proj", "encoder_hidden_states_proj"] + (["embedding_control"] if extra == 4 else []):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = r(inner, dim), r(inner)
    for i in range(config["num_layers"]):
        p = f"transformer_blocks.{i}."
        for norm in ["norm1", "norm3"]:
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + r(inner), r(inner)
        for proj in ["to_q", "to_k", "to_v", "to_out.0"]:
            sd[p + f"attn1.{proj}.weight"], sd[p + f"attn1.{proj}.bias"] = r(inner, inner), r(inner)
        sd[p + "ff.net.0.proj.weight"], sd[p + "ff.net.0.proj.bias"] = r(4 * inner, inner), r(4 * inner)
        sd[p + "ff.net.2.weight"], sd[p + "ff.net.2.bias"] = r(inner, 4 * inner), r(inner)
    return sd


def write_released_folder(path, config, sd):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))


def inputs(config, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, d, L = len(lengths), config["embedding_dim"], config["num_embeddings"]
    mask = torch.zeros(b, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return dict(
        hidden_states=torch.randn(b, d, generator=g), proj_embedding=torch.randn(b, d, generator=g),
        encoder_hidden_states=torch.randn(b, L, d, generator=g), attention_mask=mask,
        control_embedding=torch.randn(b, d, generator=g) if config["additional_embeddings"] == 4 else None,
    )


@pytest.mark.parametrize("extra", [4, 3])
def test_released_layout_loads_strictly_and_matches_released_math(tmp_path, extra):
    """Paper-size prior in the released layout; batch with text lengths 5, 17 and 77 (issue 'done when')."""
    config = dict(RELEASED_CONFIG, additional_embeddings=extra)
    sd = released_state_dict(config)
    write_released_folder(tmp_path / "prior", config, sd)
    prior = LambdaEclipsePrior.from_pretrained(tmp_path / "prior").eval()
    assert set(prior.state_dict()) == set(sd)  # strict: no missing, no unexpected keys
    for k, v in prior.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = inputs(config, [5, 17, 77])
    with torch.no_grad():
        ours = prior(**x).predicted_image_embedding
        released = ReleasedPrior(**{k: config[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers",
                                                            "embedding_dim", "num_embeddings", "additional_embeddings")})
        released.load_state_dict(sd, strict=True)
        reference = released(**x)
    assert ours.shape == (3, 1280)
    assert (ours - reference).abs().max() < 1e-4


def test_paper_config_parameter_count():
    prior = LambdaEclipsePrior()
    assert sum(p.numel() for p in prior.parameters()) == 34_849_536
    assert len(prior.state_dict()) == 176


def test_trimmed_equals_full_and_round_trip(tmp_path):
    prior = LambdaEclipsePrior(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=24).eval()
    randomize(prior)
    config = dict(RELEASED_CONFIG, embedding_dim=24, num_attention_heads=2, attention_head_dim=8, num_layers=2)
    x = inputs(config, [3, 9, 4])
    with torch.no_grad():
        full = prior(**x, trim=False).predicted_image_embedding
        trimmed = prior(**x).predicted_image_embedding
        short = prior(**{**x, "encoder_hidden_states": x["encoder_hidden_states"][:, :9],
                         "attention_mask": x["attention_mask"][:, :9]}).predicted_image_embedding
    assert torch.allclose(full, trimmed, atol=1e-5) and torch.allclose(full, short, atol=1e-5)
    prior.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: saved[k] for k in RELEASED_CONFIG if not k.startswith("_")} == {
        k: v for k, v in config.items() if not k.startswith("_")}
    again = LambdaEclipsePrior.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(again(**x).predicted_image_embedding, trimmed)


def test_masked_padding_does_not_leak_and_no_nan():
    prior = LambdaEclipsePrior(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16).eval()
    randomize(prior)
    config = dict(RELEASED_CONFIG, embedding_dim=16, num_attention_heads=2, attention_head_dim=8, num_layers=2)
    x = inputs(config, [4, 6])
    y = dict(x, encoder_hidden_states=x["encoder_hidden_states"].clone())
    y["encoder_hidden_states"][:, 10:] = float("nan")  # garbage in padded positions must not matter
    with torch.no_grad():
        a = prior(**x, trim=False).predicted_image_embedding
        b = prior(**y).predicted_image_embedding
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)


def test_bad_inputs_raise_user_errors():
    prior = LambdaEclipsePrior(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16)
    x = inputs(dict(RELEASED_CONFIG, embedding_dim=16), [4])
    with pytest.raises(UserError, match="control_embedding"):
        prior(**dict(x, control_embedding=None))
    with pytest.raises(UserError, match="at most 77"):
        prior(**dict(x, encoder_hidden_states=torch.zeros(1, 78, 16), attention_mask=None))
    with pytest.raises(UserError, match="norm_in_type"):
        LambdaEclipsePrior(norm_in_type="layer")


def test_forward_output_has_one_name():
    """The network's output is LambdaEclipsePriorTransformerOutput; LambdaEclipsePriorOutput is the pipeline's."""
    prior = LambdaEclipsePrior(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16).eval()
    x = inputs(dict(RELEASED_CONFIG, embedding_dim=16), [4, 2])
    with torch.no_grad():
        out = prior(**x)
        as_tuple = prior(**x, return_dict=False)
    assert type(out) is LambdaEclipsePriorTransformerOutput and out.predicted_image_embedding.shape == (2, 16)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.predicted_image_embedding)
    assert not hasattr(prior_module, "LambdaEclipsePriorOutput")
