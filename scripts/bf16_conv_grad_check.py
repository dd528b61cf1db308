"""How often torch's CPU bf16 autocast returns a broken 3D convolution weight gradient, by layer shape.

Each trial: a fresh random input, a 3x3x3 convolution (no bias, padding 1) under ``torch.autocast("cpu",
bfloat16)``, then the backward of the mean squared output in float32; a weight gradient with a NaN, an inf or a
value above 1e6 (the true ones stay below 0.1 here) counts as broken. ``--fp32`` runs the same trials without
autocast, as the control. The numbers are in docs/performance.md ("Training on CPU: bf16"); the training loop
skips a step whose gradient norm is not finite (training/loop.py).

    .venv/bin/python scripts/bf16_conv_grad_check.py            # the default shapes, one torch thread
    .venv/bin/python scripts/bf16_conv_grad_check.py --fp32
"""

from __future__ import annotations

import argparse

import torch

# (channels, spatial size, trials): the deepest level of the tests' tiny 3D U-Net first; 3x10x10 is the bundled
# 3D recipe's deepest (24x80x80 patches, 16-128 features)
SHAPES = [
    (32, (2, 4, 4), 1000),
    (32, (4, 8, 8), 500),
    (8, (1, 16, 16), 1000),
    (64, (6, 10, 10), 200),
    (128, (3, 5, 5), 300),
    (128, (3, 10, 10), 100),
    (16, (16, 64, 64), 30),
]


def is_broken(grad: torch.Tensor) -> bool:
    """A NaN, an inf, or a value above 1e6 (the true gradients here stay below 0.1)."""
    return not bool(torch.isfinite(grad).all()) or float(grad.abs().max()) > 1e6


def broken_count(channels: int, size: tuple[int, ...], trials: int, bf16: bool, seed: int) -> int:
    """How many of ``trials`` backward passes gave a broken weight gradient."""
    generator = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    broken = 0
    for _ in range(trials):
        x = torch.randn(2, channels, *size, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        y.float().square().mean().backward()
        broken += int(is_broken(conv.weight.grad))
        conv.weight.grad = None
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", action="store_true", help="no autocast: the control")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the convolutions' initial weights
    precision = "fp32" if args.fp32 else "bf16 autocast"
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {precision}")
    for channels, size, trials in SHAPES:
        broken = broken_count(channels, size, trials, not args.fp32, args.seed)
        print(
            f"conv3d {channels}->{channels}, batch 2 x {'x'.join(map(str, size))}: {broken} of {trials} broken"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
