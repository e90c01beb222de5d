"""The 2D U-Net of the DeepWML paper, built from a plain config dict stored in the model file.

Paper architecture (Zhang et al. 2021): per block two 3×3 convolutions with ReLU, 2×2 max-pool
down, 2×2 transposed convolution up, skip connections by concatenation, 64 channels at the top,
a 1×1 convolution to one output map (sigmoid applied at inference, the loss takes logits).
`base_channels` and `depth` make narrower or shallower variants; `batch_norm` adds BatchNorm after
each convolution.
"""

from __future__ import annotations

import torch
from torch import nn

PAPER_CONFIG = {"name": "unet2d", "in_channels": 1, "base_channels": 64, "depth": 4, "batch_norm": False}


def _double_conv(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    layers = []
    for i in range(2):
        layers.append(nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet2D(nn.Module):
    def __init__(self, in_channels: int = 1, base_channels: int = 64, depth: int = 4, batch_norm: bool = False):
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(_double_conv(previous, width, batch_norm))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.decoders.append(_double_conv(width * 2, width, batch_norm))
        self.head = nn.Conv2d(base_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def validate_config(config: dict) -> dict:
    """Fill defaults and check an architecture config; raises ValueError on nonsense."""
    merged = dict(PAPER_CONFIG)
    merged.update(config or {})
    if merged["name"] != "unet2d":
        raise ValueError(f"unknown architecture {merged['name']!r} (this version knows 'unet2d')")
    for key in ("in_channels", "base_channels", "depth"):
        if not isinstance(merged[key], int) or merged[key] < (0 if key == "depth" else 1):
            raise ValueError(f"architecture {key} must be a positive integer, got {merged[key]!r}")
    if merged["in_channels"] != 1:
        raise ValueError(f"architecture in_channels must be 1 (DeepWML networks read one FLAIR channel), "
                         f"got {merged['in_channels']}")
    merged["batch_norm"] = bool(merged["batch_norm"])
    return merged


def build_model(config: dict) -> UNet2D:
    c = validate_config(config)
    return UNet2D(c["in_channels"], c["base_channels"], c["depth"], c["batch_norm"])


def size_multiple(config: dict) -> int:
    """Input height and width must be multiples of this."""
    return 2 ** validate_config(config)["depth"]


def count_flops(model: nn.Module, size: tuple[int, int] = (256, 256)) -> int:
    """Floating point operations (2 × multiply-accumulates) of the convolutions for one slice."""
    macs = 0

    def conv_hook(module, inputs, output):
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, nn.ConvTranspose2d):
            macs += inputs[0].numel() // inputs[0].shape[0] * module.out_channels * kernel // module.groups
        else:
            macs += output.numel() // output.shape[0] * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        first = next(model.parameters())
        with torch.inference_mode():
            model(torch.zeros(1, model.encoders[0][0].in_channels, *size, dtype=first.dtype, device=first.device))
    finally:
        for h in handles:
            h.remove()
    return 2 * macs


def widen(narrow: UNet2D, noise: float = 0.0, seed: int = 0) -> UNet2D:
    """The same U-Net with twice the channels at every level, computing the same function
    (Net2WiderNet, Chen et al. 2016): a way to grow a trained network's width, then fine-tune it.

    Every channel becomes two copies with the same incoming weights; each consumer of a copied
    channel splits the original weight between the copies in a random proportion (a, 1 - a), a in
    [0.25, 0.75], which keeps the output exactly as it was. `noise` (relative to each layer's weight
    spread) perturbs the second copies' incoming weights so that training can tell the copies apart:
    with Adam, copies that start equal would stay equal. With noise > 0 the function changes slightly.
    """
    base, depth = narrow.head.in_channels, narrow.depth
    in_channels = narrow.encoders[0][0].in_channels
    batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in narrow.modules())
    wide = UNet2D(in_channels, 2 * base, depth, batch_norm)
    generator = torch.Generator().manual_seed(seed)

    def new_activation(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(wide channel -> narrow channel, consumer weight share) of a copied activation of n channels."""
        share = 0.25 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.arange(2 * n) % n, torch.cat([share, 1 - share])

    def copy_conv(source, target, inputs, outputs) -> None:
        (in_index, in_share), out_index = inputs, outputs
        with torch.no_grad():
            transposed = isinstance(source, nn.ConvTranspose2d)
            w = source.weight.double()
            if transposed:  # [in, out, k, k]
                weight = w[in_index][:, out_index] * in_share[:, None, None, None]
            else:  # [out, in, k, k]
                weight = w[out_index][:, in_index] * in_share[None, :, None, None]
                if noise > 0:
                    second = torch.arange(len(out_index)) >= source.out_channels
                    jitter = torch.randn(weight.shape, generator=generator, dtype=torch.float64) * noise * float(w.std())
                    weight[second] += jitter[second]
            target.weight.copy_(weight.to(target.weight.dtype))
            if source.bias is not None:
                target.bias.copy_(source.bias[out_index])

    def copy_block(source, target, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """A double convolution (conv, [BN], ReLU, conv, [BN], ReLU); returns its output activation."""
        convs = [m for m in source if isinstance(m, nn.Conv2d)]
        wide_convs = [m for m in target if isinstance(m, nn.Conv2d)]
        norms = [m for m in source if isinstance(m, nn.BatchNorm2d)]
        wide_norms = [m for m in target if isinstance(m, nn.BatchNorm2d)]
        activation = inputs
        for k, (conv, wide_conv) in enumerate(zip(convs, wide_convs)):
            out = new_activation(conv.out_channels)
            copy_conv(conv, wide_conv, activation, out[0])
            if norms:
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(wide_norms[k], name).copy_(getattr(norms[k], name)[out[0]])
                    wide_norms[k].num_batches_tracked.copy_(norms[k].num_batches_tracked)
            activation = out
        return activation

    activation = (torch.arange(in_channels), torch.ones(in_channels, dtype=torch.float64))
    skips = []
    for level, (source, target) in enumerate(zip(narrow.encoders, wide.encoders)):
        activation = copy_block(source, target, activation)
        if level < depth:
            skips.append(activation)
    for up, wide_up, decoder, wide_decoder, skip in zip(narrow.ups, wide.ups, narrow.decoders, wide.decoders,
                                                         reversed(skips)):
        upsampled = new_activation(up.out_channels)
        copy_conv(up, wide_up, activation, upsampled[0])
        joined = (torch.cat([upsampled[0], up.out_channels + skip[0]]), torch.cat([upsampled[1], skip[1]]))
        activation = copy_block(decoder, wide_decoder, joined)
    copy_conv(narrow.head, wide.head, activation, torch.zeros(1, dtype=torch.long))
    return wide
