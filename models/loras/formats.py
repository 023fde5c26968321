"""LoRA files of every common layout, read into one `LayerUpdate` per SDXL parameter, and the tokens they bring.

One implementation serves the Flash-SDXL fuse at setup and the users' LoRAs at request time.

Why by hand: diffusers reads kohya, diffusers and peft files, but refuses LoHa, LoKr and full differences, drops DoRA
with only a warning, loads none of the EriDiffusion trainers' layouts, and applies LoRAs through peft wrappers (~1,400
extra matmuls a step). Here the file's names are mapped to SDXL's layers (`names.py`: every prefix and block naming),
and each tensor's ending says its role:

- LoRA: `.lora_A.weight`/`.lora_B.weight` (peft, diffusers, ComfyUI), `.lora_down.weight`/`.lora_up.weight` (kohya,
  LyCORIS, OneTrainer, ai-toolkit, EriDiffusion), `.lora.down.weight` (older diffusers), `.lora_linear_layer.down`
  (diffusers' text encoders), `_lora.down.weight` (attention processors: Replicate's trainings, diffusers 0.19).
- LoHa `.hada_w1_a` ..., LoKr `.lokr_w1` ... (LyCORIS, SimpleTuner, OneTrainer), DoRA `.dora_scale` (per output
  [out,1] or per input [1,in]) or peft's `.lora_magnitude_vector`, `.alpha`.
- Full differences (ComfyUI's LoraSave, LyCORIS "full"): `.diff` for a weight, `.diff_b` for a bias, added as they are.
- Embeddings of new tokens: OneTrainer's `bundle_emb.<name>.clip_l` / `.clip_g` in the file itself, or a Replicate
  training's embeddings.pti beside it (kept in the cache as a `.tokens` file, see `tokens.py`).
- Not part of the LoRA, left out: EriDiffusion's optimizer state (`__opt__/`).

A file is applied whole or refused whole, with one line that names what did not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..limits import MAX_LORA_TENSORS
from .header import LoraError, Metadata, finite_number
from .names import Targets, describe_foreign
from .tokens import BUNDLE_PREFIX, TokenSet, bundled_token_sets
from .updates import LayerUpdate, finite

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("__opt__/",)
"""Tensors that are not part of the LoRA: EriDiffusion's full-state checkpoints carry the optimizer's moments."""

ROLES = {
    ".lora_A.weight": ("lora", "down"),
    ".lora_B.weight": ("lora", "up"),
    ".lora_down.weight": ("lora", "down"),
    ".lora_up.weight": ("lora", "up"),
    ".lora_mid.weight": ("lora", "mid"),
    ".lora.down.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"),
    ".lora_linear_layer.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"),
    "_lora.down.weight": ("lora", "down"),  # attention processors: <attention>.processor.to_q_lora.down.weight
    "_lora.up.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", "w1_a"),
    ".hada_w1_b": ("loha", "w1_b"),
    ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"),
    ".hada_t1": ("loha", "t1"),
    ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"),
    ".lokr_w1_a": ("lokr", "w1_a"),
    ".lokr_w1_b": ("lokr", "w1_b"),
    ".lokr_w2": ("lokr", "w2"),
    ".lokr_w2_a": ("lokr", "w2_a"),
    ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t2": ("lokr", "t2"),
    ".diff": ("diff", "diff"),
    ".diff_b": ("diff", "diff"),
    ".alpha": (None, "alpha"),
    ".dora_scale": (None, "magnitude"),
    ".lora_magnitude_vector": (None, "magnitude"),
    ".lora_magnitude_vector.weight": (None, "magnitude"),
}
"""Key endings and what each tensor is: (kind of update, role in it)."""

BIAS_ENDINGS = (".diff_b",)
"""Endings that change a layer's bias; every other ending changes its weight."""

UNSUPPORTED_ROLES = {
    ".lora_A.bias": "LoRA biases",
    ".lora_B.bias": "LoRA biases",
    ".lora_up.bias": "LoRA biases",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".bias_indices": "LyCORIS sparse biases",
}

DECOMPOSITIONS = {
    "mid": "LoCon with Tucker decomposition (lora_mid)",
    "t1": "LoHa with Tucker decomposition (hada_t1)",
    "t2": "LoHa or LoKr with Tucker decomposition (hada_t2, lokr_t2)",
}

REQUIRED_ROLES: dict[str, tuple[tuple[frozenset[str], ...], ...]] = {
    "lora": ((frozenset({"down"}),), (frozenset({"up"}),)),
    "loha": ((frozenset({"w1_a", "w1_b"}),), (frozenset({"w2_a", "w2_b"}),)),
    "lokr": ((frozenset({"w1"}), frozenset({"w1_a", "w1_b"})), (frozenset({"w2"}), frozenset({"w2_a", "w2_b"}))),
    "diff": ((frozenset({"diff"}),),),
}
"""The tensors each kind of update needs: every group must be present, in one of its forms."""


@dataclass(frozen=True)
class LoraContents:
    """What a LoRA file brings: one update per SDXL parameter it changes, and the new tokens it was trained with."""

    updates: list[LayerUpdate]
    token_sets: list[TokenSet] = field(default_factory=list)


Target = tuple[str, str, str]
"""(component, module, parameter): "weight", or "bias" for a full difference of a bias."""

Plan = dict[Target, dict[str, str]]
"""Each target -> {role: the file's key of that tensor}."""


def split_key(key: str) -> tuple[str, str, str | None]:
    """(module part, role, kind) of a tensor's key; the longest matching ending wins."""
    for ending in sorted(UNSUPPORTED_ROLES, key=len, reverse=True):
        if key.endswith(ending):
            raise LoraError(f"{UNSUPPORTED_ROLES[ending]} ({key}) are not supported; use a LoRA, LoHa, LoKr or DoRA")
    for ending in sorted(ROLES, key=len, reverse=True):
        if key.endswith(ending):
            kind, role = ROLES[ending]
            return key[: -len(ending)], role, kind
    raise LoraError(f"{key} is not a LoRA tensor (no lora_A/lora_B, lora_down/lora_up, hada_, lokr_ or diff key)")


def plan_keys(keys: Iterable[str], targets: Targets) -> tuple[Plan, dict[Target, set[str]]]:
    """Each key's layer, parameter, role and kind of update, from the names alone, so that a file that does not fit
    SDXL is refused before any of its tensors is read. Also returns the kinds of update found for each target.
    Embeddings of new tokens (`bundle_emb.`) are read apart, by `bundled_token_sets`."""
    plan: Plan = {}
    kinds: dict[Target, set[str]] = {}
    unknown: list[str] = []
    for key in keys:
        if key.startswith(IGNORED_PREFIXES) or key.startswith(BUNDLE_PREFIX):
            continue
        module_part, role, kind = split_key(key)
        layer = targets.resolve(module_part)
        if layer is None:
            unknown.append(key)
            continue
        target = (*layer, "bias" if key.endswith(BIAS_ENDINGS) else "weight")
        plan.setdefault(target, {})[role] = key
        if kind:
            kinds.setdefault(target, set()).add(kind)
    if unknown:
        what = describe_foreign(unknown)
        total = len(unknown) + sum(map(len, plan.values()))
        share = "none of its tensors fit an" if not plan else f"{len(unknown)} of its {total} tensors fit no"
        raise LoraError(f"{what}: {share} SDXL layer (such as {sorted(unknown)[0]})")
    return plan, kinds


def parse_lora(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, str] | None, targets: Targets
) -> list[LayerUpdate]:
    """Turn a file's tensors into one update per SDXL parameter, or refuse the whole file in one line.

    Never a partial load: a key whose layer SDXL lacks, a half pair, a value that is not finite, or a shape that does
    not fit stops it all.
    """
    plan, kinds = plan_keys(tensors, targets)
    if not plan:
        raise LoraError("the file holds no LoRA tensors")
    return build_updates(plan, kinds, tensors, Metadata(header), targets)


def build_updates(
    plan: Plan,
    kinds: dict[Target, set[str]],
    tensors: Mapping[str, torch.Tensor],
    metadata: Metadata,
    targets: Targets,
) -> list[LayerUpdate]:
    updates = []
    for target, roles in plan.items():
        checked = {role: finite(key, tensors[key]) for role, key in roles.items()}
        updates.append(_layer_update(target, checked, kinds.get(target, set()), metadata))
    for update in updates:
        parameter = targets.parameter(update.component, update.module, update.parameter)
        if parameter is None:
            raise LoraError(f"{update.component} layer {update.module} has no {update.parameter} to change")
        if not update.fits(parameter.shape):
            raise LoraError(
                f"{describe_foreign(tensors).replace('not an SDXL LoRA', 'made for another base model')}: its"
                f" {update.component} layer {update.module} {update.describe_misfit(parameter.shape)}"
            )
    return sorted(updates, key=lambda update: (update.component, update.module, update.parameter))


def _layer_update(target: Target, roles: dict[str, torch.Tensor], kinds: set[str], metadata: Metadata) -> LayerUpdate:
    component, module, parameter = target
    if len(kinds) != 1:
        found = ", ".join(sorted(kinds)) or "only an alpha or scale"
        raise LoraError(f"{component} layer {module} has {found}: not one complete LoRA, LoHa, LoKr or difference")
    [kind] = kinds
    for role, description in DECOMPOSITIONS.items():
        if role in roles:
            raise LoraError(f"{description} ({component} layer {module}) is not supported")
    missing = [
        " or ".join("+".join(sorted(option)) for option in options)
        for options in REQUIRED_ROLES[kind]
        if not any(option <= roles.keys() for option in options)
    ]
    if missing:
        raise LoraError(f"{component} layer {module} lacks {', '.join(missing)}: the file is incomplete")
    alpha_tensor = roles.pop("alpha", None)
    magnitude = roles.pop("magnitude", None)
    if alpha_tensor is not None and alpha_tensor.numel() == 0:
        raise LoraError(f"the alpha of {component} layer {module} is an empty tensor")
    alpha = metadata.alpha(component, module)
    if alpha_tensor is not None:
        alpha = finite_number(f"the alpha of {component} layer {module}", alpha_tensor.flatten()[0].item())
    return LayerUpdate(
        component=component,
        module=module,
        kind=kind,
        tensors=roles,
        alpha=alpha,
        magnitude=magnitude,
        rank_stabilised=metadata.rank_stabilised(component),
        parameter=parameter,
    )


def read_lora(path: Path, targets: Targets) -> LoraContents:
    """Read a LoRA file for the given SDXL layers, reading only what it needs: the header's names are resolved and
    its fields checked before any tensor is made, and only the tensors of the plan are read (safetensors only:
    nothing here can run code). Also returns the embeddings of new tokens it bundles."""
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
            if len(keys) > MAX_LORA_TENSORS:
                raise LoraError(f"the file lists {len(keys):,} tensors; an SDXL LoRA has at most {MAX_LORA_TENSORS:,}")
            metadata = Metadata(file.metadata() or {})
            plan, kinds = plan_keys(keys, targets)
            tensors = {key: file.get_tensor(key) for roles in plan.values() for key in roles.values()}
            token_sets = bundled_token_sets(file, keys)
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, LoraError):
            raise
        raise LoraError(f"not a readable safetensors file ({str(error).splitlines()[0][:120]})") from None
    if not plan and not token_sets:
        raise LoraError("the file holds no LoRA tensors")
    return LoraContents(build_updates(plan, kinds, tensors, metadata, targets), token_sets)
