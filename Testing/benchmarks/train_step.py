"""Seconds per training step of the shipped default's network (32 channels, depth 4, batch norm) on this CPU,
fp32 and bf16 autocast with channels-last (what `deepwml train --cpu-bf16` uses): 8 whole 256 x 256 slices,
BCE, Adam; the network alone (no data loading or augmentation), median of 5 steps after a first. Prints the
minutes an epoch of 3200 slices (v9's) would take at that rate. Usage: python Testing/benchmarks/train_step.py"""
from __future__ import annotations

import time

import torch

from DeepWMLLib.model import build_model

SLICES, SIZE, EPOCH = 8, 256, 3200


def main() -> None:
    torch.manual_seed(0)
    for mode in ("fp32", "bf16"):
        model = build_model({"base_channels": 32, "depth": 4, "batch_norm": True})
        x = torch.randn(SLICES, 1, SIZE, SIZE)
        y = (torch.rand(SLICES, 1, SIZE, SIZE) > 0.9).float()
        if mode == "bf16":
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), 1e-4)
        times = []
        for _ in range(6):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                out = model(x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        step = sorted(times[1:])[len(times[1:]) // 2]
        print(f"{mode}: {step:.2f} s per step of {SLICES} slices {SIZE}x{SIZE} -> "
              f"{step / SLICES * EPOCH / 60:.1f} min per {EPOCH}-slice epoch ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
