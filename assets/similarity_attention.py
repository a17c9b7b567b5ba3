"""A SelfAttention2d with hand-set weights (no training) that compares pixels, and its query map.

The cat figures of docs/maps.md come from here. A fixed stem turns the picture into a coarse grid of
features ``[colour c (3), |c|², position p (2), |p|²]``; the block's 1×1 query/key convolutions
are set so that each head's score is a Gaussian similarity kernel,
``q·k = -s/2 · |f_query - f_key|²`` plus a term that is the same for every key:

* head 0 compares colour (``f = c``),
* head 1 compares position (``f = p``),
* head 2 compares both.

So each head shows, exactly, which cells that head's arithmetic finds similar to the query cell.
Nothing here was learned; a trained model's heads choose their own features.

    python assets/similarity_attention.py --query 150,120 --out assets/chelsea_similarity_eye.png
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from visattn import SelfAttention2d, load_image
from visattn.explain.inputs import Preprocess
from visattn.explain.overlay import attention_panels
from visattn.explain.render import overlay_grid

#: (colour scale, position scale) of each head's kernel
HEADS = {"colour": (40.0, 0.0), "position": (0.0, 60.0), "colour + position": (40.0, 30.0)}


class PixelFeatures(nn.Module):
    """Pictures ``(B, 3, H, W)`` in ``[-1, 1]`` → ``(B, 7, H/s, W/s)``: ``[c, |c|², p, |p|²]``."""

    def __init__(self, stride: int = 5) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride)

    def forward(self, x: Tensor) -> Tensor:
        colour = self.pool(x)
        b, _, h, w = colour.shape
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, w / h, w), indexing="ij")
        position = torch.stack([ys, xs]).to(x)[None].expand(b, -1, -1, -1)
        square = lambda t: (t * t).sum(dim=1, keepdim=True)  # noqa: E731
        return torch.cat([colour, square(colour), position, square(position)], dim=1)


def similarity_block() -> SelfAttention2d:
    """Three heads of width 6 over the 7 features; queries ``s·[f, 1]``, keys ``[f, -|f|²/2]``."""
    block = SelfAttention2d(7, num_heads=3, qk_channels=18, v_channels=3, scale=1.0)
    q, k = torch.zeros(18, 7), torch.zeros(18, 7)
    q_bias, k_bias = torch.zeros(18), torch.zeros(18)
    colour, colour_sq, position, position_sq = [0, 1, 2], 3, [4, 5], 6
    for head, (s_colour, s_position) in enumerate(HEADS.values()):
        base = 6 * head  # rows: c (3), p (2), the constant/square-norm slot
        for i, channel in enumerate(colour):
            q[base + i, channel], k[base + i, channel] = s_colour, 1.0
        for i, channel in enumerate(position):
            q[base + 3 + i, channel], k[base + 3 + i, channel] = s_position, 1.0
        q_bias[base + 5] = 1.0
        k[base + 5, colour_sq], k[base + 5, position_sq] = -s_colour / 2, -s_position / 2
    with torch.no_grad():
        block.query.weight.copy_(q[:, :, None, None])
        block.query.bias.copy_(q_bias)
        block.key.weight.copy_(k[:, :, None, None])
        block.key.bias.copy_(k_bias)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="assets/chelsea.png")
    parser.add_argument("--query", required=True, help="X,Y pixel of the picture")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    image = load_image(args.image)
    query = tuple(float(v) for v in args.query.split(","))
    model = nn.Sequential(PixelFeatures(), similarity_block()).eval()
    preprocess = Preprocess(img_size=(150, 225), in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    panels = attention_panels(model, image, "query", preprocess=preprocess, query=query)
    overlay_grid(
        image,
        panels.panels[:3],
        titles=[f"head {i}: {name}" for i, name in enumerate(HEADS)],
        suptitle=f"hand-set SelfAttention2d (no training): where the cell at ({args.query}) attends",
        box=panels.box,
        extent=panels.extent,
        marker=panels.marker,
        panel_size=3.2,
        out=args.out,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
