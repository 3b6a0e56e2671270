"""Time series towers: ``resnet1d`` (a 1-D ResNet) and ``patch_transformer`` (per-lead patches with lead and position
embeddings, missing leads left out of attention), both from scratch for any channel count, or from a local checkpoint
(``pretrained``: a safetensors file or a torch state dict, read with ``weights_only=True``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..modality_config import TimeseriesConfig
from .layers import norm_layer, sinusoidal_positions
from .registry import TowerSpec, register_tower
from .timeseries import channel_count


def load_tower_weights(tower: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``tower``: safetensors, or a torch state dict read with ``weights_only=True``.

    A wrapping ``state_dict``/``model`` entry is unwrapped, a key prefix (``module.``, or ``adapters.<name>.tower.``
    of a saved mmalign model) is found by matching the tower's own keys, and keys beyond them (a head) are ignored.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"pretrained checkpoint not found: {path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in several types; all mean "not a plain state dict"
            raise ConfigError(f"{path}: not a state dict loadable with weights_only=True ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict (parameter name -> tensor)")
    own = set(tower.state_dict())
    probe = min(own)
    prefixes = [k[: len(k) - len(probe)] for k in state if k.endswith(probe)]
    matches = [p for p in prefixes if {k[len(p):] for k in state if k.startswith(p)} >= own]
    if len(matches) > 1:
        raise ConfigError(f"{path}: several towers match ({', '.join(repr(p) for p in matches)}); save one alone")
    if not matches:
        missing = sorted(own - set(state))
        raise ConfigError(f"{path}: does not fit this {type(tower).__name__}: {len(missing)} missing key(s) "
                          f"(e.g. {', '.join(missing[:3])}); check tower and tower_kwargs")
    prefix = matches[0]
    try:
        tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k[len(prefix):] in own
                               and k.startswith(prefix)})
    except RuntimeError as e:
        raise ConfigError(f"{path}: shapes do not fit this tower ({str(e).splitlines()[-1].strip()})") from None


class ResBlock1d(nn.Module):
    """conv-norm-ReLU-conv-norm plus a (projected when needed) shortcut, then ReLU (He et al. 2016, in 1-D)."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, norm: str = "batch"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, bias=False), norm_layer(norm, c_out, dims=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(c_out, c_out, kernel, 1, kernel // 2, bias=False), norm_layer(norm, c_out, dims=1),
        )
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv1d(c_in, c_out, 1, stride, bias=False), norm_layer(norm, c_out, dims=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet1d(nn.Module):
    """A 1-D ResNet over leads as input channels: strided stem, stages halving time, global average pooling.
    ``norm``: ``batch`` or ``group`` (rows normalised alone: the same result on any number of processes, and with
    GradCache)."""

    def __init__(self, in_channels: int, widths: tuple = (32, 64, 128, 256), depths: tuple = (1, 1, 1, 1),
                 kernel: int = 7, stem_kernel: int = 15, norm: str = "batch"):
        super().__init__()
        if len(widths) != len(depths):
            raise ConfigError(f"resnet1d: widths {list(widths)} and depths {list(depths)} differ in length")
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, widths[0], stem_kernel, 2, stem_kernel // 2, bias=False),
            norm_layer(norm, widths[0], dims=1), nn.ReLU(inplace=True), nn.MaxPool1d(3, 2, 1),
        )
        blocks, c = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                blocks.append(ResBlock1d(c, w, 2 if i > 0 and j == 0 else 1, kernel, norm))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["signal"] * inputs["mask"].unsqueeze(-1).to(inputs["signal"].dtype)
        return self.blocks(self.stem(x)).mean(dim=-1)


class PatchTransformer(nn.Module):
    """Each lead is cut into patches of ``patch_size`` samples; a patch token = linear(patch) + lead embedding +
    position code. A CLS token attends over all leads' patches; missing leads are masked out of attention."""

    def __init__(self, in_channels: int, patch_size: int = 25, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"patch_transformer: dim {dim} must be divisible by heads {heads}")
        self.patch_size = patch_size
        self.patch = nn.Linear(patch_size, dim)
        self.lead_embed = nn.Parameter(torch.randn(in_channels, dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x, mask = inputs["signal"], inputs["mask"]
        B, C, T = x.shape
        n = T // self.patch_size
        if n == 0:
            raise DataError(f"patch_transformer: {T} samples are fewer than one patch ({self.patch_size})")
        tokens = self.patch(x[..., : n * self.patch_size].reshape(B, C, n, self.patch_size))
        positions = sinusoidal_positions(n, tokens.shape[-1], x.device)
        tokens = tokens + self.lead_embed[None, :, None] + positions[None, None]
        tokens = torch.cat([self.cls.expand(B, -1, -1), tokens.reshape(B, C * n, -1)], dim=1)
        pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=x.device),
                         (~mask.bool()).repeat_interleave(n, dim=1)], dim=1)
        for block in self.blocks:
            tokens = block(tokens, src_key_padding_mask=pad)
        return self.norm(tokens[:, 0])


def _build(cls: type[nn.Module], cfg: TimeseriesConfig) -> nn.Module:
    try:
        tower = cls(channel_count(cfg), **cfg.tower_kwargs)
    except TypeError as e:
        raise ConfigError(f"{cfg.tower} tower_kwargs: {e}") from None
    if cfg.pretrained and cfg.init == "pretrained":
        load_tower_weights(tower, cfg.pretrained)
    return tower


register_tower("timeseries", "resnet1d", TowerSpec(build=lambda cfg: _build(ResNet1d, cfg), tower_kwargs=ResNet1d))
register_tower("timeseries", "patch_transformer", TowerSpec(build=lambda cfg: _build(PatchTransformer, cfg),
                                                           tower_kwargs=PatchTransformer))
