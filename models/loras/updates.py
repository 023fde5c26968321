"""One parameter's update from a LoRA file, whatever its layout, and the arithmetic that adds it to the parameter."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .header import LoraError


def finite(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the file, refused when it holds NaN or infinity (one would spread through every picture)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise LoraError(f"{key} holds NaN or infinite values, so the file is damaged")
    return tensor


@dataclass(frozen=True)
class LayerUpdate:
    """One parameter's update from one file: a low-rank (LoRA), Hadamard (LoHa) or Kronecker (LoKr) product, or a
    full difference (ComfyUI's LoraSave writes them for norm weights and biases).

    `delta()` is the file's full-strength difference, alpha / rank included; `magnitude` makes it a DoRA update (the
    merged weight's norm is set to it, along the axis its shape names).
    """

    component: str
    module: str
    kind: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    rank_stabilised: bool = False
    parameter: str = "weight"
    """The module's parameter it changes: "weight", or "bias" (full differences only)."""

    @property
    def rank(self) -> int:
        """The update's rank; 0 for a full difference or a LoKr with neither factor decomposed."""
        if self.kind == "diff":
            return 0
        if self.kind == "lora":
            return self.tensors["down"].shape[0]
        if self.kind == "loha":
            return self.tensors["w1_b"].shape[0]
        decomposed = self.tensors.get("w2_b", self.tensors.get("w1_b"))
        return 0 if decomposed is None else decomposed.shape[0]

    @property
    def scaling(self) -> float:
        """alpha / rank (alpha / sqrt(rank) for rsLoRA); no alpha means 1, as every trainer assumes.

        A LoKr with neither factor decomposed and a full difference have no rank, and their alpha is ignored, as
        LyCORIS and ComfyUI do.
        """
        if self.alpha is None or self.rank == 0:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rank_stabilised else self.rank)

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The weight difference at strength 1, in float32, shaped like the weight."""
        t = {name: tensor.to(device, torch.float32) for name, tensor in self.tensors.items()}
        if self.kind == "diff":
            return t["diff"].reshape(shape)
        if self.kind == "lora":
            product = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.kind == "loha":  # OneTrainer keeps a conv's factors 4-D, LyCORIS flattens them
            product = (t["w1_a"].flatten(1) @ t["w1_b"].flatten(1)) * (t["w2_a"].flatten(1) @ t["w2_b"].flatten(1))
        else:
            first = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
            second = t["w2"] if "w2" in t else t["w2_a"] @ t["w2_b"].flatten(1)
            product = torch.kron(first, second.flatten(1))
        return product.reshape(shape) * self.scaling

    def fits(self, shape: torch.Size) -> bool:
        """Whether the update has the parameter's shape: a full difference exactly, a product as (out features,
        in features x kernel taps), a DoRA magnitude one value per output or per input channel."""
        if self.kind == "diff":
            return tuple(self.tensors["diff"].shape) == tuple(shape)
        if len(shape) < 2 or self._product_shape() != (shape[0], math.prod(shape[1:])):
            return False
        return self.magnitude is None or self.magnitude_axis(shape) is not None

    def magnitude_axis(self, shape: torch.Size) -> int | None:
        """The axis DoRA's magnitude is per: 0 for output channels ([out] in peft, [out, 1] in LyCORIS since April
        2025), 1 for input channels ([1, in]: older LyCORIS, OneTrainer); None when it is neither. Told apart by
        shape, not size, so that a square layer is read as its writer meant."""
        magnitude = self.magnitude
        if magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.numel() == shape[1]:
            return 1
        return 0 if magnitude.numel() == shape[0] else None

    def describe_misfit(self, shape: torch.Size) -> str:
        """How the update and the parameter differ, in words, for a refusal."""
        if self.kind == "diff":
            return f"changes a {self.parameter} of shape {tuple(self.tensors['diff'].shape)}, SDXL's is {tuple(shape)}"
        rows, columns = self._product_shape()
        if (rows, columns) == (shape[0], math.prod(shape[1:])):
            return f"has a DoRA magnitude of shape {tuple(self.magnitude.shape)} for a weight of shape {tuple(shape)}"
        return f"maps {columns} to {rows} features, SDXL's maps {math.prod(shape[1:])} to {shape[0]}"

    def _product_shape(self) -> tuple[int, int]:
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], t["down"].flatten(1).shape[1]
        if self.kind == "loha":
            return t["w1_a"].shape[0], t["w1_b"].flatten(1).shape[1]
        first = t["w1"].shape if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1])
        second = t["w2"].flatten(1).shape if "w2" in t else (t["w2_a"].shape[0], t["w2_b"].flatten(1).shape[1])
        return first[0] * second[0], first[1] * second[1]


def add_update(merged: torch.Tensor, update: LayerUpdate, strength: float) -> None:
    """Add one file's update at `strength` to a float32 weight, in place (DoRA as in ComfyUI: strength blends between
    the weight and the decomposed result, so 0 is exactly no change and 1 is the file's DoRA).

    A plain LoRA is one fused multiply-add into the weight (addmm), cheaper than forming the product and adding it
    (docs/BENCHMARKS.md, "Figures behind the code's choices").
    """
    scale = strength * update.scaling
    if update.kind == "lora" and update.magnitude is None:
        up, down = (update.tensors[name].to(merged.device, torch.float32).flatten(1) for name in ("up", "down"))
        merged.view(merged.shape[0], -1).addmm_(up, down, alpha=scale)
        return
    delta = update.delta(merged.shape, merged.device)
    if update.magnitude is None:
        merged.add_(delta, alpha=strength)
        return
    decomposed = merged + delta
    magnitude = update.magnitude.to(merged.device, torch.float32)
    if update.magnitude_axis(merged.shape) == 0:
        norm = decomposed.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = decomposed.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.dim() - 2))
    decomposed *= magnitude.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
    merged.lerp_(decomposed, strength)


def merged_weight(weight: torch.Tensor, updates: Iterable[tuple[LayerUpdate, float]]) -> torch.Tensor:
    """A weight with updates at their strengths added in float32, in order (DoRA sees what came before it)."""
    merged = weight.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    for update, strength in updates:
        add_update(merged, update, strength)
    return merged
