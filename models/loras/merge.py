"""LoRA updates merged into the weights: the Flash-SDXL fuse at setup, and users' LoRAs with an exact restore.

One implementation serves both. A plain LoRA is one fused multiply-add into the weight; LoHa, LoKr, DoRA and full
differences are formed in float32 and added; every parameter is rounded once to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .formats import LoraContents, Target, read_lora
from .header import LoraError
from .names import Targets
from .updates import LayerUpdate, merged_weight

COMPACT_DTYPES = (torch.bfloat16, torch.float16)
"""Narrower dtypes a copy is kept in when the parameter round-trips through one exactly: the float32 weights of a CPU
pipeline were loaded from fp16 files, so a LoRA's copies of every layer Flash-SDXL did not change take half the
memory, and the restore is still bit for bit (tests/loras/test_merge.py)."""


@torch.no_grad()
def fuse(targets: Targets, updates: Iterable[LayerUpdate], strength: float, dtype: torch.dtype) -> None:
    """Merge for good (the Flash-SDXL LoRA at load): each parameter becomes itself + update, rounded once to dtype."""
    for update in updates:
        parameter = targets.parameter(update.component, update.module, update.parameter)
        parameter.data = merged_weight(parameter, [(update, strength)]).to(dtype)


ChangeListener = Callable[[set[tuple[str, str]]], None]
"""Told which (component, module) layers changed, to refresh what was precomputed from their weights."""


def exactly_held(parameter: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(parameter.detach().to(dtype).to(parameter.dtype), parameter.detach()))


class LoraMerger:
    """User LoRAs merged into the weights, and taken out again exactly.

    The weights as loaded (Flash-SDXL fused in) are the reference. A parameter is copied before it is first changed
    and copied back on restore, so a prediction after a LoRA gives the same bytes as one before it: no drift from
    adding and subtracting in low precision. Only the parameters a LoRA touches are copied, each in the narrowest
    dtype that holds it exactly. Several LoRAs are summed in float32 from the reference and rounded once.
    """

    def __init__(self, models: Mapping[str, nn.Module], on_change: ChangeListener | None = None):
        self.targets = Targets.of(models)
        self.on_change = on_change
        self.originals: dict[Target, torch.Tensor] = {}
        self.applied: tuple = ()
        self.copies_device: torch.device | None = None
        """Where the copies go: None keeps them beside the weights; the CPU spares a small GPU's memory."""
        self.copy_dtypes: dict[Target, torch.dtype] = {}
        """Each reference parameter's narrowest exact dtype, found once: the reference never changes."""

    def read(self, path: Path) -> LoraContents:
        return read_lora(path, self.targets)

    def copy_bytes(self, loras: Iterable[tuple[list[LayerUpdate], float]]) -> int:
        """Memory the copies of the parameters these LoRAs change would take (what `apply` will hold)."""
        targets = {(update.component, update.module, update.parameter) for updates, _ in loras for update in updates}
        return sum(self._parameter(target).numel() * self._copy_dtype(target).itemsize for target in targets)

    def copied_bytes(self) -> int:
        """Memory held by the copies of the changed parameters."""
        return sum(original.numel() * original.element_size() for original in self.originals.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Put every changed parameter back to the reference, bit for bit."""
        changed = {(component, module) for component, module, _ in self.originals}
        for target, original in self.originals.items():
            self._parameter(target).copy_(original)
        self.originals.clear()
        self.applied = ()
        if changed and self.on_change is not None:
            self.on_change(changed)

    @torch.no_grad()
    def apply(self, key: tuple, loras: Iterable[tuple[list[LayerUpdate], float]]) -> None:
        """Make the weights the reference plus these LoRAs at these strengths; `key` names the set for `applied`.

        A failure part way leaves the reference weights, never a half-merged model; a merged parameter beyond the
        model dtype's range (an overflow to infinity in fp16, say) is such a failure.
        """
        self.restore()
        grouped: dict[Target, list[tuple[LayerUpdate, float]]] = {}
        for updates, strength in loras:
            for update in updates:
                grouped.setdefault((update.component, update.module, update.parameter), []).append((update, strength))
        try:
            for target, pairs in grouped.items():
                parameter = self._parameter(target)
                merged = merged_weight(parameter, pairs).to(parameter.dtype)
                if not bool(torch.isfinite(merged).all()):
                    component, module, name = target
                    raise LoraError(
                        f"merged at these scales, {component} layer {module}'s {name} leaves the {parameter.dtype}"
                        " range; lower the scale"
                    )
                device = self.copies_device or parameter.device
                self.originals[target] = parameter.detach().to(device, self._copy_dtype(target), copy=True)
                parameter.copy_(merged)
        except BaseException:
            self.restore()
            raise
        self.applied = key
        if self.on_change is not None:
            self.on_change({(component, module) for component, module, _ in grouped})

    def _parameter(self, target: Target) -> torch.Tensor:
        return self.targets.parameter(*target)

    def _copy_dtype(self, target: Target) -> torch.dtype:
        if target not in self.copy_dtypes:
            parameter = self._parameter(target)
            narrower = [dtype for dtype in COMPACT_DTYPES if dtype.itemsize < parameter.element_size()]
            self.copy_dtypes[target] = next(
                (dtype for dtype in narrower if exactly_held(parameter, dtype)), parameter.dtype
            )
        return self.copy_dtypes[target]
