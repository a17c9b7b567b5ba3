"""Digits with and without an inserted SelfAttention2d: same initial weights, seed and budget.

Whether attention helps is a statistical question, so it is answered here over several seeds and
both learning rates for the new block (the same as the network's, and a tenth of it), not in the
test suite (tests/test_insert.py only checks that both learn and that the gate moves):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/insert_digits.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from visattn import insert_attention


class TinyResNet(nn.Module):
    """A small ResNet from torchvision's BasicBlock, for fast training on 16×16 digits."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        downsample = nn.Sequential(conv1x1(16, 32, 2), nn.BatchNorm2d(32))
        self.layer2 = BasicBlock(16, 32, stride=2, downsample=downsample)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


def train_digits(model: nn.Module, epochs: int = 4, lr: float = 1e-2, block_lr: float = 0.1) -> tuple[float, int]:
    """Train on scikit-learn's digits (8×8 → 16×16); the held-out accuracy and the test-set size.

    AdamW with one-cycle schedule; inserted blocks (``*_attn``) learn at ``block_lr × lr``.
    """
    digits = load_digits()
    images = F.interpolate(
        torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16, scale_factor=2, mode="bilinear"
    )
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1300], order[1300:]
    blocks = [p for n, p in model.named_parameters() if "_attn." in n]
    rest = [p for n, p in model.named_parameters() if "_attn." not in n]
    groups = [{"params": rest, "lr": lr}] + ([{"params": blocks, "lr": lr * block_lr}] if blocks else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = epochs * -(-len(train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.2)
    torch.manual_seed(1)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(64):
            i = train[batch]
            opt.zero_grad()
            F.cross_entropy(model(images[i]), labels[i]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return (model(images[test]).argmax(1) == labels[test]).float().mean().item(), len(test)


def main(seeds: int = 3, epochs: int = 4) -> None:
    print("| seed | without attention | with, block lr × 1 | with, block lr × 0.1 | γ (× 0.1) |")
    print("|---|---|---|---|---|")
    for seed in range(seeds):
        torch.manual_seed(seed)
        plain = TinyResNet()
        row = [train_digits(copy.deepcopy(plain), epochs=epochs)[0]]
        for block_lr in (1.0, 0.1):
            model = copy.deepcopy(plain)
            insert_attention(model, "layer2", num_heads=2, pos="sincos")
            row.append(train_digits(model, epochs=epochs, block_lr=block_lr)[0])
        gamma = model.layer2_attn.gamma.item()
        print(f"| {seed} | " + " | ".join(f"{a:.2%}" for a in row) + f" | {gamma:+.3f} |")


if __name__ == "__main__":
    main()
