"""LoRA updates merged into the weights: the Flash-SDXL fuse at setup, and users' LoRAs with an exact restore.

One implementation serves both. A plain LoRA is one fused multiply-add into the weight; LoHa, LoKr and DoRA are formed
in float32 and added; every weight is rounded once to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .formats import Targets, read_lora
from .header import LoraError
from .updates import LayerUpdate, merged_weight


@torch.no_grad()
def fuse(targets: Targets, updates: Iterable[LayerUpdate], strength: float, dtype: torch.dtype) -> None:
    """Merge for good (the Flash-SDXL LoRA at load): each weight becomes weight + update, rounded once to dtype."""
    for update in updates:
        weight = targets.modules[update.component, update.module].weight
        weight.data = merged_weight(weight, [(update, strength)]).to(dtype)


ChangeListener = Callable[[set[tuple[str, str]]], None]
"""Told which (component, module) weights changed, to refresh what was precomputed from them."""


class LoraMerger:
    """User LoRAs merged into the weights, and taken out again exactly.

    The weights as loaded (Flash-SDXL fused in) are the reference. A module's weight is copied before it is first
    changed and copied back on restore, so a prediction after a LoRA gives the same bytes as one before it: no drift
    from adding and subtracting in low precision. Only the modules a LoRA touches are copied. Several LoRAs are
    summed in float32 from the reference and rounded once.
    """

    def __init__(self, models: Mapping[str, nn.Module], on_change: ChangeListener | None = None):
        self.targets = Targets.of(models)
        self.on_change = on_change
        self.originals: dict[tuple[str, str], torch.Tensor] = {}
        self.applied: tuple = ()
        self.copies_device: torch.device | None = None
        """Where the copies go: None keeps them beside the weights; the CPU spares a small GPU's memory."""

    def copy_bytes(self, loras: Iterable[tuple[list[LayerUpdate], float]]) -> int:
        """Memory the copies of the weights these LoRAs change would take."""
        targets = {(update.component, update.module) for updates, _ in loras for update in updates}
        weights = [self.targets.modules[target].weight for target in targets]
        return sum(weight.numel() * weight.element_size() for weight in weights)

    def read(self, path: Path) -> list[LayerUpdate]:
        return read_lora(path, self.targets)

    def copied_bytes(self) -> int:
        """Memory held by the copies of the changed weights."""
        return sum(original.numel() * original.element_size() for original in self.originals.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Put every changed weight back to the reference, bit for bit."""
        changed = set(self.originals)
        for target, original in self.originals.items():
            self.targets.modules[target].weight.copy_(original)
        self.originals.clear()
        self.applied = ()
        if changed and self.on_change is not None:
            self.on_change(changed)

    @torch.no_grad()
    def apply(self, key: tuple, loras: Iterable[tuple[list[LayerUpdate], float]]) -> None:
        """Make the weights the reference plus these LoRAs at these strengths; `key` names the set for `applied`.

        A failure part way leaves the reference weights, never a half-merged model; a merged weight beyond the model
        dtype's range (an overflow to infinity in fp16, say) is such a failure.
        """
        self.restore()
        grouped: dict[tuple[str, str], list[tuple[LayerUpdate, float]]] = {}
        for updates, strength in loras:
            for update in updates:
                grouped.setdefault((update.component, update.module), []).append((update, strength))
        try:
            for target, pairs in grouped.items():
                weight = self.targets.modules[target].weight
                self.originals[target] = weight.detach().to(self.copies_device or weight.device, copy=True)
                merged = merged_weight(weight, pairs).to(weight.dtype)
                if not bool(torch.isfinite(merged).all()):
                    component, module = target
                    raise LoraError(
                        f"merged at these scales, {component} layer {module} leaves the {weight.dtype} range; lower the"
                        " scale"
                    )
                weight.copy_(merged)
        except BaseException:
            self.restore()
            raise
        self.applied = key
        if self.on_change is not None:
            self.on_change(set(grouped))
