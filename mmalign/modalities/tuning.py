"""What of a tower trains: LiT-style locking (Zhai et al. 2022) with the last blocks or the norms left trainable, and
LoRA adapters (Hu et al. 2021, via peft) that ``merge_lora`` folds back into the weights."""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..modality_config import LoraConfig

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def tower_blocks(tower: nn.Module) -> nn.Module | None:
    """The tower's stack of blocks (transformer layers, CNN stages).

    A tower may name it ``blocks``; otherwise it is the ``ModuleList``/``Sequential`` of two or more children of one
    type (so an MLP's Linear-GELU-Linear never qualifies) holding the most parameters.
    """
    if isinstance(getattr(tower, "blocks", None), (nn.ModuleList, nn.Sequential)):
        return tower.blocks
    best, best_size = None, 0
    for module in tower.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            if len({type(child) for child in module}) == 1:
                size = sum(p.numel() for p in module.parameters())
                if size > best_size:
                    best, best_size = module, size
    return best


def lock_tower(tower: nn.Module, unlocked_layers: int = 0, unlock_norms: bool = False) -> None:
    """LiT locking: freeze every parameter, then unfreeze the last ``unlocked_layers`` blocks and/or all norms."""
    for p in tower.parameters():
        p.requires_grad_(False)
    unlock(tower, unlocked_layers, unlock_norms)


def unlock(tower: nn.Module, unlocked_layers: int = 0, unlock_norms: bool = False) -> None:
    """Make the last ``unlocked_layers`` blocks and/or all normalisation layers trainable."""
    if unlocked_layers > 0:
        blocks = tower_blocks(tower)
        if blocks is None:
            raise ConfigError(f"cannot unlock {unlocked_layers} layers: {type(tower).__name__} has no block list")
        for block in list(blocks)[-unlocked_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)
    if unlock_norms:
        for module in tower.modules():
            if isinstance(module, NORM_TYPES):
                for p in module.parameters():
                    p.requires_grad_(True)


def default_lora_targets(tower: nn.Module) -> list[str]:
    """Attention and MLP of every block: the block stack's ``nn.Linear`` layers and ``nn.MultiheadAttention``
    modules (peft adapts an MHA's in- and out-projections itself; its ``out_proj`` is never called directly)."""
    blocks = tower_blocks(tower)
    if blocks is None:
        raise ConfigError(f"LoRA: {type(tower).__name__} has no block list; name lora.target_modules")
    prefix = next(name for name, module in tower.named_modules() if module is blocks)
    inside_mha = {f"{name}.out_proj" for name, m in blocks.named_modules() if isinstance(m, nn.MultiheadAttention)}
    targets = [
        f"{prefix}.{name}" for name, m in blocks.named_modules()
        if isinstance(m, nn.MultiheadAttention) or (isinstance(m, nn.Linear) and name not in inside_mha)
    ]
    if not targets:
        raise ConfigError(f"LoRA: no linear or attention layers in the blocks of {type(tower).__name__}; "
                          f"name lora.target_modules")
    return targets


def add_lora(tower: nn.Module, spec: LoraConfig) -> nn.Module:
    """Wrap ``tower`` in a peft ``LoraModel``: its own weights frozen, only the low-rank adapters trainable.

    ``merge_lora`` folds the adapters back into the weights (exactly the same function, plain modules again).
    """
    import peft

    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=spec.target_modules or default_lora_targets(tower))
    try:
        return peft.LoraModel(tower, config, "default")
    except ValueError as e:
        raise ConfigError(f"LoRA on {type(tower).__name__}: {str(e).splitlines()[0]}") from None


def merge_lora(tower: nn.Module) -> nn.Module:
    """The tower with its LoRA adapters merged into the weights (peft ``merge_and_unload``); others unchanged."""
    import peft

    return tower.merge_and_unload() if isinstance(tower, peft.LoraModel) else tower
