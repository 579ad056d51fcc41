"""Base CAM methods under Finer-CAM, checked against closed forms and independent per-image oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAMPlusPlus, XGradCAM
from torch import Tensor, nn

from finercam import FinerCAM
from finercam.methods import METHODS, get_method
from finercam.objectives import References, finer_score

GRADIENT_METHODS = [name for name, method in METHODS.items() if method.uses_gradients]
LINEAR_METHODS = [name for name, method in METHODS.items() if method.linear_in_gradient]


def _oracle_gradients(
    model: nn.Module, images: Tensor, targets: Tensor, refs: Tensor, gamma: float, aggregation: str
) -> tuple[Tensor, Tensor]:
    """Activations and gradients of the Finer score, one image at a time, by splitting the model by hand."""
    activations, gradients = [], []
    for b in range(images.shape[0]):
        with torch.no_grad():
            a = model.features(images[b : b + 1])  # type: ignore[operator]
        a = a.clone().requires_grad_(True)
        logits = model.head(a)  # type: ignore[operator]
        s = finer_score(logits, targets[b : b + 1], References(refs[b : b + 1], "explicit"), gamma, aggregation)
        (g,) = torch.autograd.grad(s.sum(), a)
        activations.append(a.detach())
        gradients.append(g)
    return torch.cat(activations), torch.cat(gradients)


def _textbook(method: str, a: Tensor, g: Tensor) -> Tensor:
    """Each method's raw map written from its paper, using grad-cam's own weight code where it has one."""
    if method == "gradcam":
        return (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)
    if method == "hirescam":
        return (g * a).sum(1)
    if method == "layercam":
        return (F.relu(g) * a).sum(1)
    cls = {"xgradcam": XGradCAM, "gradcam++": GradCAMPlusPlus}[method]
    weights = cls.get_cam_weights(None, None, None, None, a.double().numpy(), g.double().numpy())  # type: ignore[arg-type]
    return (torch.from_numpy(weights).to(a.dtype)[:, :, None, None] * a).sum(1)


@pytest.mark.parametrize("aggregation", ["mean", "softmax"])
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_raw_maps_equal_an_independent_per_image_oracle(
    tiny_net: nn.Module, images: Tensor, method: str, aggregation: str
) -> None:
    model = tiny_net.double()
    x = images.double()
    gamma = 0.7
    with FinerCAM(model, "features", method) as cam:
        result = cam(x, references="nearest", num_references=3, gamma=gamma, aggregation=aggregation)
    a, g = _oracle_gradients(model, x, result.targets, result.references, gamma, aggregation)
    expected = _textbook(method, a, g)
    torch.testing.assert_close(result.raw_maps, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.6, 2.0])
def test_gradcam_has_the_closed_form_of_a_linear_head(linear_head_net: nn.Module, images: Tensor, gamma: float) -> None:
    # y = W mean_ij A + b, so g_k = W_ck / (hw) everywhere and the Finer weights are (W_c - gamma mean_t W_dt) / hw.
    model = linear_head_net.double()
    x = images.double()
    with FinerCAM(model, "features", "gradcam") as cam:
        result = cam(x, references="top", num_references=2, gamma=gamma)
    a = model.features(x).detach()
    weight = model.fc.weight.detach()
    finer_rows = weight[result.targets] - gamma * weight[result.references].mean(dim=1)
    expected = torch.einsum("bk,bkhw->bhw", finer_rows, a) / (a.shape[2] * a.shape[3])
    torch.testing.assert_close(result.raw_maps, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gamma_zero_is_the_base_cam(tiny_net: nn.Module, images: Tensor, method: str) -> None:
    with FinerCAM(tiny_net, "features", method) as cam:
        result = cam(images, gamma=0.0)
    if get_method(method).linear_in_gradient:
        assert torch.equal(result.raw_maps, result.baseline_raw_maps)
        assert torch.equal(result.maps, result.baseline_maps)
    else:
        torch.testing.assert_close(result.raw_maps, result.baseline_raw_maps, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_aggregation_happens_before_the_relu(tiny_net: nn.Module, images: Tensor, method: str) -> None:
    gamma = 1.0
    with FinerCAM(tiny_net, "features", method) as cam:
        result = cam(images, references="top", num_references=3, gamma=gamma)
        per_class = [cam(images, targets=result.references[:, t], gamma=0.0).raw_maps for t in range(3)]
        target_raw = cam(images, targets=result.targets, gamma=0.0).raw_maps
    pre_relu = target_raw - gamma * torch.stack(per_class).mean(0)
    torch.testing.assert_close(result.raw_maps, pre_relu, rtol=1e-5, atol=1e-6)
    # Subtracting finished (post-ReLU) maps is a different, wrong quantity.
    post_relu = F.relu(target_raw) - gamma * torch.stack([F.relu(r) for r in per_class]).mean(0)
    assert not torch.allclose(F.relu(result.raw_maps), F.relu(post_relu), atol=1e-4)


@pytest.mark.parametrize("aggregation", ["mean", "softmax"])
def test_scorecam_equals_an_explicit_loop(tiny_net: nn.Module, images: Tensor, aggregation: str) -> None:
    model = tiny_net.double()
    x = images[:2].double()
    gamma = 0.6
    with FinerCAM(model, "features", "scorecam", score_batch_size=5) as cam:
        result = cam(x, gamma=gamma, aggregation=aggregation)
    refs = References(result.references, "explicit")
    with torch.no_grad():
        a = model.features(x)
        expected = []
        for b in range(x.shape[0]):
            scores = []
            for k in range(a.shape[1]):
                up = F.interpolate(a[b : b + 1, k : k + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
                mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
                logits = model(x[b : b + 1] * mask)
                one = References(refs.indices[b : b + 1], "explicit")
                scores.append(finer_score(logits, result.targets[b : b + 1], one, gamma, aggregation)[0])
            weights = torch.softmax(torch.stack(scores), dim=0)
            expected.append((weights[:, None, None] * a[b]).sum(0))
    torch.testing.assert_close(result.raw_maps, torch.stack(expected), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["mean", "softmax"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_sweep_equals_separate_runs(tiny_net: nn.Module, images: Tensor, method: str, aggregation: str) -> None:
    gammas = [0.0, 0.3, 0.6, 1.0, 2.0]
    with FinerCAM(tiny_net, "features", method) as cam:
        sweep = cam.sweep(images, gammas=gammas, aggregation=aggregation)
        assert sweep.maps.shape == (5, *images.shape[:1], *images.shape[2:])
        for index, gamma in enumerate(gammas):
            single = cam(images, gamma=gamma, aggregation=aggregation)
            torch.testing.assert_close(sweep.maps[index], single.maps, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sweep.layer_raw_maps[0][index], single.raw_maps, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(sweep.at(index).maps, single.maps, rtol=1e-5, atol=1e-5)


def test_larger_gamma_moves_the_map_towards_what_separates_the_classes(linear_head_net: nn.Module) -> None:
    # Two channels: one shared by the target and its reference (equal weights), one used by the target alone.
    model = linear_head_net.double()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[0, :2] = torch.tensor([1.0, 1.0])
        model.fc.weight[1, :2] = torch.tensor([1.0, 0.0])
        model.fc.bias.zero_()
    a = torch.zeros(1, 6, 4, 4, dtype=torch.float64)
    a[0, 0, 0, 0] = 5.0  # shared evidence, strong
    a[0, 1, 3, 3] = 1.0  # the difference, weak
    model.features = nn.Identity()  # type: ignore[assignment]
    with FinerCAM(model, "features", "gradcam") as cam:
        sweep = cam.sweep(a, gammas=[0.0, 1.0], targets=0, references=[[1]])
    base, finer = sweep.layer_raw_maps[0][:, 0]
    assert base.argmax() == 0  # the base CAM points at the shared evidence
    assert finer.argmax() == 15  # Finer-CAM points at the difference
    assert finer[0, 0] == 0.0  # the shared evidence cancels exactly at gamma = 1


def test_figure_titles_are_wrapped_to_their_panel() -> None:
    from finercam.viz import wrap_title

    title = "Finer-CAM γ=0.6\nvs 13-warbler-white_eyering-plain_throat-white_tailtip (0.03), 02-finch-beak (0.01)"
    wrapped = wrap_title(title, 30)
    assert all(len(line) <= 30 for line in wrapped.split("\n"))
    assert wrapped.split("\n")[0] == "Finer-CAM γ=0.6"
    assert wrapped.replace("\n", "").replace(" ", "") == title.replace("\n", "").replace(" ", "")
    assert wrap_title("short\n\nlines", 30) == "short\n\nlines"


def test_a_map_constant_up_to_rounding_is_zero_not_stretched_noise() -> None:
    from finercam.postprocess import minmax, normalize_maps

    one_cell = torch.tensor([[[0.3719]]])
    assert torch.equal(normalize_maps(one_cell, (8, 8)), torch.zeros(1, 8, 8))  # upsampling rounds: still constant
    noisy = torch.full((1, 4, 4), 2.5) + torch.randn(1, 4, 4) * 1e-7  # a few ulps of 2.5
    assert torch.equal(minmax(noisy), torch.zeros(1, 4, 4))
    real = torch.tensor([[[0.0, 1e-3], [2e-3, 4e-3]]])  # small values but a real range
    assert torch.allclose(minmax(real), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]), atol=1e-4)
    assert torch.equal(minmax(torch.zeros(2, 3, 3)), torch.zeros(2, 3, 3))
