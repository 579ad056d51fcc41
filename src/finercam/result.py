"""Result objects returned by :class:`finercam.FinerCAM`."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from finercam.errors import InvalidArgumentError


@dataclass(frozen=True, kw_only=True)
class _Explanation:
    """Fields shared by a single explanation and a gamma sweep.

    Attributes:
        baseline_maps: ``(B, H, W)`` the base CAM of the target (explaining ``y_c`` alone), from the same pass.
        baseline_raw_maps: ``(B, h, w)`` its signed raw map (first target layer).
        logits: ``(B, C)`` class scores ``y`` of the clean images.
        targets: ``(B,)`` explained classes ``c``.
        references: ``(B, T)`` reference classes ``d_t``; ``-1`` pads rows with fewer references. ``T == 0`` when the
            model has a single class: then there is nothing to contrast and the base CAM is returned.
        method: registry name of the base CAM method.
        aggregation: ``"mean"`` or ``"softmax"``.
        reference_strategy: ``"nearest"``, ``"top"``, ``"weights"`` or ``"explicit"``.
        layers: dotted names of the target layers.
        layer_raw_maps: one signed raw map tensor per target layer, at that layer's resolution.
        layer_baseline_raw_maps: the baseline's raw maps per target layer.
    """

    baseline_maps: Tensor
    logits: Tensor
    targets: Tensor
    references: Tensor
    method: str
    aggregation: str
    reference_strategy: str
    layers: tuple[str, ...]
    layer_raw_maps: tuple[Tensor, ...]
    layer_baseline_raw_maps: tuple[Tensor, ...]

    @property
    def probabilities(self) -> Tensor:
        """``(B, C)`` softmax of the logits."""
        return torch.softmax(self.logits.float(), dim=1)

    @property
    def has_references(self) -> bool:
        """Whether any image was contrasted with a reference class (``False`` only for single-class models)."""
        return bool((self.references >= 0).any())

    @property
    def raw_maps(self) -> Tensor:
        """Signed maps before the ReLU at layer resolution (the only target layer)."""
        return self._single_layer(self.layer_raw_maps, "raw_maps")

    @property
    def baseline_raw_maps(self) -> Tensor:
        """Signed baseline maps before the ReLU at layer resolution (the only target layer)."""
        return self._single_layer(self.layer_baseline_raw_maps, "baseline_raw_maps")

    def _single_layer(self, per_layer: tuple[Tensor, ...], name: str, instead: str | None = None) -> Tensor:
        """The only layer's maps; ``instead`` names what to read for several (default ``layer_<name>[i]``)."""
        if len(per_layer) != 1:
            raise InvalidArgumentError(
                f"{name} is defined for a single target layer; this result has {len(per_layer)} layers "
                f"{list(self.layers)} at different resolutions: use {instead or f'layer_{name}'}[i]"
            )
        return per_layer[0]


@dataclass(frozen=True, kw_only=True)
class CAMResult(_Explanation):
    """One Finer-CAM explanation per image.

    Attributes:
        maps: ``(B, H, W)`` in ``[0, 1]`` at input size: ReLU, bilinear upsampling, per-image min-max.
        gamma: the comparison strength used.
    """

    maps: Tensor
    gamma: float


@dataclass(frozen=True, kw_only=True)
class SweepResult(_Explanation):
    """Finer-CAM explanations for several comparison strengths, all from one forward pass.

    Attributes:
        maps: ``(G, B, H, W)`` in ``[0, 1]``, one slice per gamma.
        gammas: the ``G`` comparison strengths, in the order of ``maps``.
    """

    maps: Tensor
    gammas: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.gammas)

    def at(self, index: int) -> CAMResult:
        """The explanation for ``gammas[index]`` as a :class:`CAMResult` (``index`` counts from 0, or from the end
        when negative; for a gamma's own explanation use ``at(sweep.gammas.index(gamma))``)."""
        count = len(self.gammas)
        given = index
        try:  # an int, or a NumPy or 0-d torch integer
            index = -count - 1 if isinstance(index, bool) else operator.index(index)
        except TypeError:
            index = -count - 1
        if not -count <= index < count:
            hint = (f"; for gamma {given:g} use at(sweep.gammas.index({given:g}))" if isinstance(given, float)
                    and given in self.gammas else "")
            raise InvalidArgumentError(
                f"at() takes the position of a gamma in {list(self.gammas)}: a whole number from {-count} to "
                f"{count - 1}; got {given!r}{hint}"
            )
        fields = {name: getattr(self, name) for name in _Explanation.__dataclass_fields__}
        fields["layer_raw_maps"] = tuple(raw[index] for raw in self.layer_raw_maps)
        return CAMResult(**fields, maps=self.maps[index], gamma=self.gammas[index])
