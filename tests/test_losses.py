"""The losses: Eq. 1 against explicit loops and its cross-rank gather on 2 gloo processes; Eq. 2's targets and
Min-SNR weights against their formulas."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lambda_eclipse.losses import contrastive_loss, decoder_loss, diffusion_target, prior_loss


def _hand_loss(pred, target, text, lam: float, tau: float) -> tuple[float, float, float]:
    """Eq. 1 with Python loops: mean-squared projection error and image->text InfoNCE on cosine similarities."""
    b, d = len(pred), len(pred[0])
    mse = sum((pred[i][k] - target[i][k]) ** 2 for i in range(b) for k in range(d)) / (b * d)

    def cos(u, v):
        dot = sum(u[k] * v[k] for k in range(d))
        return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(x * x for x in v)))

    nce = 0.0
    for i in range(b):
        logits = [cos(pred[i], text[j]) / tau for j in range(b)]
        nce -= logits[i] - math.log(sum(math.exp(x) for x in logits))
    nce /= b
    return mse + lam * nce, mse, nce


@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
def test_prior_loss_matches_hand_computation(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    pred, target, text = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    out = prior_loss(pred, target, text, lambda_contrastive=0.2, temperature=tau)
    loss, mse, nce = _hand_loss(pred.tolist(), target.tolist(), text.tolist(), 0.2, tau)
    assert out["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out["contrastive"].item() == pytest.approx(nce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert set(out) == {"loss", "mse", "contrastive", "accuracy"}


def test_conventions() -> None:
    g = torch.Generator().manual_seed(1)
    pred, target, text = (torch.randn(6, 16, generator=g) for _ in range(3))
    base = prior_loss(pred, target, text)
    # Cosine similarity: rescaling the predictions or the texts leaves the contrastive term unchanged.
    assert prior_loss(3 * pred, target, 0.5 * text)["contrastive"].item() == pytest.approx(
        base["contrastive"].item(), rel=1e-5
    )
    # λ = 0 is the projection loss alone.
    only_mse = prior_loss(pred, target, text, lambda_contrastive=0.0)
    assert only_mse["loss"].item() == pytest.approx(base["mse"].item())
    # Rows are images, columns texts: predictions equal to their own texts retrieve perfectly.
    assert prior_loss(text.clone(), target, text)["accuracy"].item() == 1.0
    with pytest.raises(ValueError):
        prior_loss(pred, target[:, :8], text)


def test_gradients_flow_and_loss_can_reach_its_minimum() -> None:
    g = torch.Generator().manual_seed(2)
    target, text = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    pred = torch.randn(8, 16, generator=g, requires_grad=True)
    opt = torch.optim.Adam([pred], lr=0.05)
    first = None
    for _ in range(100):
        out = prior_loss(pred, target, text, temperature=0.07)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < 0.5 * first
    assert out["accuracy"].item() == 1.0


def test_bf16_inputs_give_fp32_losses() -> None:
    x = torch.randn(4, 8).bfloat16()
    out = prior_loss(x, x, x)
    assert all(v.dtype == torch.float32 for v in out.values())


# ---------------------------------------------------------------------------------------- distributed (gloo)
_SIZES = (3, 2)  # unequal local batches: the gather must pad and strip
_LAM, _TAU = 0.2, 0.1


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = sum(_SIZES)
    return torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked from a parent that may have used OpenMP threads
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred, target, text = _data()
        a = sum(_SIZES[:rank])
        sl = slice(a, a + _SIZES[rank])
        p = pred[sl].clone().requires_grad_(True)
        t = text[sl].clone().requires_grad_(True)
        out = prior_loss(p, target[sl], t, lambda_contrastive=_LAM, temperature=_TAU)
        out["loss"].backward()
        torch.save(
            {"loss": out["loss"].detach(), "grad_pred": p.grad, "grad_text": t.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_gathered_loss_on_two_gloo_processes(tmp_path) -> None:
    world = len(_SIZES)
    # fork, not spawn: the children inherit the imported package instead of re-importing diffusers (seconds).
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True, start_method="fork"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # Reference in one process: rank r's loss scores its rows against *all* texts; DDP trains on their mean.
    pred, target, text = _data()
    pred.requires_grad_(True)
    text.requires_grad_(True)
    losses = []
    for r in range(world):
        a = sum(_SIZES[:r])
        rows = slice(a, a + _SIZES[r])
        mse = torch.nn.functional.mse_loss(pred[rows], target[rows])
        logits = (
            torch.nn.functional.normalize(pred[rows], dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T / _TAU
        )
        nce = torch.nn.functional.cross_entropy(logits, torch.arange(_SIZES[r]) + a)
        losses.append(mse + _LAM * nce)
    torch.stack(losses).mean().backward()

    for r, res in enumerate(results):
        a = sum(_SIZES[:r])
        rows = slice(a, a + _SIZES[r])
        assert res["loss"].item() == pytest.approx(losses[r].item(), rel=1e-5)
        # DDP divides the summed gradient by the world size; the local gradients must match the global loss's.
        torch.testing.assert_close(res["grad_pred"] / world, pred.grad[rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["grad_text"] / world, text.grad[rows], rtol=1e-5, atol=1e-7)


def test_contrastive_without_process_group_scores_the_local_batch() -> None:
    g = torch.Generator().manual_seed(5)
    pred, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    loss, accuracy = contrastive_loss(pred, text, temperature=0.5, gather=True)  # no process group: nothing to gather
    logits = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T / 0.5
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert accuracy.item() == pytest.approx((logits.argmax(1) == torch.arange(4)).float().mean().item())


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def test_diffusion_targets_follow_the_prediction_type() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    a = _scheduler("epsilon").alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(diffusion_target(_scheduler("epsilon"), x0, eps, t), eps)
    v = diffusion_target(_scheduler("v_prediction"), x0, eps, t)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.equal(diffusion_target(_scheduler("sample"), x0, eps, t), x0)


def test_decoder_loss_is_the_mse_with_min_snr_weights() -> None:
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([5, 400, 990])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert decoder_loss(pred, target, t, _scheduler("epsilon"))["loss"].item() == pytest.approx(per_sample.mean().item())
    a = _scheduler("epsilon").alphas_cumprod[t]
    snr = a / (1 - a)
    for kind, weight in (("epsilon", snr.clamp(max=5) / snr), ("v_prediction", snr.clamp(max=5) / (snr + 1))):
        weighted = decoder_loss(pred, target, t, _scheduler(kind), snr_gamma=5.0)
        assert weighted["loss"].item() == pytest.approx((weight * per_sample).mean().item(), rel=1e-5)
        assert weighted["mse"].item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    # the noisiest step has SNR < 5, so its ε weight is 1 and the cleanest's is 5 / SNR ≈ 0.03
    assert (snr.clamp(max=5) / snr)[2] == 1.0 and (snr.clamp(max=5) / snr)[0] < 0.05
