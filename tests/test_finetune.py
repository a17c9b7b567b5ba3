"""Fine-tuning a converted pretrained ViT with the training loop, end to end on the digits."""

from __future__ import annotations

import pytest
import timm
import torch

from visattn.train.config import load_config
from visattn.train.engine import fit
from visattn.weights.checkpoint import model_from_checkpoint


@pytest.mark.slow
def test_finetune_timm_weights_from_a_local_file(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        peer = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=1000)
        weights = tmp_path / "vit_tiny_depth1.pth"
        torch.save(peer.state_dict(), weights)
        cfg = load_config(
            overrides=[
                "model.name=vit_tiny_patch16_224",
                f"model.pretrained_file={weights}",
                "model.depth=1",
                "model.img_size=16",
                "model.patch_size=4",
                "train.epochs=3",
                "train.warmup_epochs=1",
                "train.lr=1e-3",
                "train.amp=none",
                f"run.out_dir={tmp_path / 'runs'}",
                "run.name=ft",
            ]
        )
        result = fit(cfg)
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "runs" / "ft"
    weights.unlink()  # the run's checkpoints must not need the starting file any more
    model = model_from_checkpoint(run / "best.pt")
    assert model.head.out_features == 10 and model.patch_embed.proj.in_channels == 1
    assert model.patch_embed.proj.kernel_size == (4, 4)
    # the encoder blocks started from the file's weights, and training moved them
    block = peer.blocks[0].attn.qkv.weight
    trained = model.blocks[0].attn.qkv.weight
    assert not torch.equal(trained, block)
    assert torch.nn.functional.cosine_similarity(trained.flatten(), block.flatten(), dim=0) > 0.9
    assert result["test_acc1"] > 0.3  # three short epochs: well above the 10 % of chance
