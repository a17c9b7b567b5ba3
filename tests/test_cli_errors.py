"""Every mistake at the command line is one line: a table of bad inputs run through the CLI.

Each row is a ``visattn`` command line with something wrong in it; it must end with exit status
2, exactly one line on stderr that names the key, flag or file at fault, no traceback, and no
run folder left behind. The rows run in one child process (``visattn.cli.main(argv)`` per row,
as the console script calls it, each with its own empty working folder and captured stderr),
so that Python and torch are imported once; a few rows also run as separate processes
(``train.py``, ``python -m visattn.cli``) to check the real exit status.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from visattn import create_model, save_pretrained
from visattn.explain.recording import NotRecordedError
from visattn.train.config import config_to_dict, load_config
from visattn.train.engine import NonFiniteLossError
from visattn.train.lock import RunFolderBusy
from visattn.weights.checkpoint import save_checkpoint
from visattn.weights.hf import MissingExtraError

from .test_data import Payload, write_cifar10
from .test_imagefolder import cut_jpeg, make_folder

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
OVERLAY = ["overlay", "--model", "vit_digits_patch4_16", "--method", "cls"]
PICTURE = ["--image", "{tmp}/ok.png", "--out", "o.png"]
EXPLORE = ["explore", "--model", "vit_digits_patch4_16"]
PAGE = ["--image", "{tmp}/ok.png", "--out", "o.html"]
TIMM_FILE = ["--pretrained-file", "{tmp}/test_vit2.safetensors"]  # timm's test_vit2: another depth and layer scale
MAPS = ["evaluate-maps", "--checkpoint", "{tmp}/good.pt"]


def drawn(source: str, *flags: str, method: str = "cls") -> list[str]:
    """``visattn overlay`` of the test picture: ``source`` a checkpoint file or ``model:NAME``."""
    where = ["--model", source[6:]] if source.startswith("model:") else ["--checkpoint", source]
    return ["overlay", *where, "--method", method, *flags, *PICTURE]


def folder_run(root: str, *overrides: str) -> list[str]:
    """``visattn train`` of a tiny model for one epoch on the image folder ``{tmp}/root``."""
    data = ["data.name=imagefolder", f"data.root={{tmp}}/{root}", "data.img_size=16"]
    return ["train", *MODEL, "train.epochs=1", "train.amp=none", *data, *overrides]


#: (id, argv with {placeholders} for the files made below, what the one line must name)
ROWS: list[tuple[str, list[str], str]] = [
    # config keys: fail before anything is built
    ("unknown key", ["train", "train.epoch=3"], "train.epoch"),
    ("wrong type", ["train", "train.epochs=abc"], "train.epochs"),
    ("lr zero", ["train", "train.lr=0"], "train.lr"),
    ("lr negative", ["train", "train.lr=-1e-3"], "train.lr"),
    ("clip_grad negative", ["train", "train.clip_grad=-1"], "train.clip_grad"),
    ("label smoothing 1", ["train", "train.label_smoothing=1.0"], "train.label_smoothing"),
    ("warmup negative", ["train", "train.warmup_epochs=-1"], "train.warmup_epochs"),
    ("img_size zero", ["train", "data.img_size=0"], "data.img_size"),
    ("one fake class", ["train", "data.name=fake", "data.fake_classes=1"], "data.fake_classes"),
    ("workers negative", ["train", "data.workers=-1"], "data.workers"),
    ("optimizer typo", ["train", "train.opt=adamx"], "train.opt"),
    ("schedule typo", ["train", "train.sched=cosin"], "train.sched"),
    ("dataset typo", ["train", "data.name=cifar11"], "data.name"),
    ("amp choice", ["train", "train.amp=fp8"], "train.amp"),
    ("device choice", ["train", "train.device=tpu"], "train.device"),
    ("progress choice", ["train", "run.progress=bars"], "run.progress"),
    ("ema decay 1", ["train", "train.ema_decay=1"], "train.ema_decay"),
    ("val fraction", ["train", "data.val_fraction=1.5"], "data.val_fraction"),
    ("batch size zero", ["train", "train.batch_size=0"], "train.batch_size"),
    ("num_classes in model", ["train", "model.num_classes=3"], "model.num_classes"),
    ("override without =", ["train", "train.epochs"], "train.epochs"),
    ("override bad yaml", ["train", "train.epochs=[1,"], "train.epochs"),
    ("missing config file", ["train", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    ("yaml syntax", ["train", "--config", "{tmp}/syntax.yaml"], "syntax.yaml"),
    ("yaml top-level list", ["train", "--config", "{tmp}/list.yaml"], "list.yaml"),
    ("yaml unknown key", ["train", "--config", "{tmp}/unknown.yaml"], "train.epoch"),
    ("yaml wrong type", ["train", "--config", "{tmp}/badtype.yaml"], "train.epochs"),
    ("yaml not utf-8", ["train", "--config", "{tmp}/latin1.yaml"], "latin1.yaml"),
    ("unknown flag", ["train", "--bogus"], "--bogus"),
    # resume: refused before anything is written
    ("resume with --config", ["train", "--resume", "{tmp}/saved", "--config", "{tmp}/list.yaml"], "--config"),
    ("resume a missing folder", ["train", "--resume", "{tmp}/nowhere"], "nowhere"),
    ("resume without state", ["train", "--resume", "{tmp}/nostate"], "nostate"),
    ("resume other optimizer", ["train", "--resume", "{tmp}/saved", "train.opt=sgd"], "train.opt"),
    ("resume other model", ["train", "--resume", "{tmp}/saved", "model.depth=3"], "model.depth"),
    ("resume fewer epochs", ["train", "--resume", "{tmp}/saved", "train.epochs=1"], "train.epochs"),
    # data and model: fail while the run is set up
    ("unknown model", ["train", "model.name=nope"], "nope"),
    ("model argument typo", ["train", "model.dept=2"], "dept"),
    ("batch larger than data", ["train", *MODEL, "train.batch_size=5000"], "train.batch_size"),
    ("cifar files missing", ["train", "data.name=cifar10", "data.root={tmp}/empty"], "cifar-10-batches-py"),
    ("cifar with a payload", ["train", "data.name=cifar10", "data.root={tmp}/evil"], "data_batch_1"),
    ("image folder missing", ["train", "data.name=imagefolder", "data.root={tmp}/nowhere"], "data.root"),
    ("one-class image folder", ["train", "data.name=imagefolder", "data.root={tmp}/one_class"], "one_class"),
    ("class with one image", ["train", "data.name=imagefolder", "data.root={tmp}/lonely"], "'b'"),
    ("canvas img_size", ["train", "data.name=digits_canvas", "data.img_size=32"], "data.canvas_size"),
    ("out_dir is a file", ["train", *MODEL, "run.out_dir={tmp}/afile"], "afile"),
    # eval
    ("eval missing checkpoint", ["eval", "--checkpoint", "{tmp}/missing.pt"], "missing.pt"),
    ("eval truncated", ["eval", "--checkpoint", "{tmp}/truncated.pt"], "truncated.pt"),
    ("eval foreign file", ["eval", "--checkpoint", "{tmp}/foreign.pt"], "foreign.pt"),
    ("eval pickled code", ["eval", "--checkpoint", "{tmp}/evil.pt"], "evil.pt"),
    ("eval without config", ["eval", "--checkpoint", "{tmp}/no_config.pt"], "no_config.pt"),
    ("eval without model_config", ["eval", "--checkpoint", "{tmp}/no_model_config.pt"], "model_config"),
    ("eval weights mismatch", ["eval", "--checkpoint", "{tmp}/mismatch.pt"], "mismatch.pt"),
    ("eval folder without best", ["eval", "--checkpoint", "{tmp}/nostate"], "nostate"),
    ("eval other classes",
     ["eval", "--checkpoint", "{tmp}/good.pt", "--data", "fake", "--set", "data.fake_classes=3"], "fake"),
    ("eval bad --set", ["eval", "--checkpoint", "{tmp}/good.pt", "--set", "data.nam=x"], "data.nam"),
    # overlay
    ("overlay missing image", [*OVERLAY, "--image", "{tmp}/nothere.png", "--out", "o.png"], "nothere.png"),
    ("overlay not an image", [*OVERLAY, "--image", "{tmp}/not_image.png", "--out", "o.png"], "not_image.png"),
    ("overlay bomb", [*OVERLAY, "--image", "{tmp}/bomb.png", "--out", "o.png"], "bomb.png"),
    ("overlay out folder", [*OVERLAY, "--image", "{tmp}/ok.png", "--out", "{tmp}/no/o.png"], "--out"),
    ("overlay truncated", drawn("{tmp}/truncated.pt"), "truncated.pt"),
    ("overlay no model_config", drawn("{tmp}/no_model_config.pt"), "model_config"),
    ("overlay mismatch", drawn("{tmp}/mismatch.pt"), "mismatch.pt"),
    ("overlay query missing", drawn("model:vit_digits_patch4_16", method="query"), "--query"),
    ("overlay img-size with checkpoint", drawn("{tmp}/good.pt", "--img-size", "8,8"), "--img-size"),
    ("overlay query outside", drawn("model:vit_digits_patch4_16", "--query", "999,9", method="query"), "999"),
    ("overlay bad query", drawn("model:vit_digits_patch4_16", "--query", "x"), "--query"),
    ("overlay layer out of range", drawn("model:vit_digits_patch4_16", "--layer", "99"), "99"),
    ("overlay unknown layer", drawn("model:vit_digits_patch4_16", "--layer", "blocks.nope"), "blocks.nope"),
    ("overlay layer with rollout", drawn("model:vit_digits_patch4_16", "--layer", "0", method="rollout"), "--layer"),
    ("overlay layer with grad_rollout",
     drawn("model:vit_digits_patch4_16", "--layer", "-1", method="grad_rollout"), "cls, query, received"),
    ("overlay no image flag", [*OVERLAY, "--out", "o.png"], "--image"),
    ("overlay head with rollout", drawn("model:vit_digits_patch4_16", "--head", "0", method="rollout"), "--head"),
    ("overlay head out of range", drawn("model:vit_digits_patch4_16", "--head", "9", method="received"), "head number"),
    ("overlay head not a number", drawn("model:vit_digits_patch4_16", "--head", "max"), "--head"),
    # pretrained weights: a file of another architecture is one line naming the file and the mismatch
    ("overlay pretrained-file mismatch", ["overlay", "--model", "test_vit", *TIMM_FILE, "--method", "cls", *PICTURE],
     "does not fit the architecture 'test_vit'"),
    ("explore pretrained-file mismatch", ["explore", "--model", "test_vit", *TIMM_FILE, *PAGE],
     "test_vit2.safetensors"),
    ("explore pretrained-file CNN mismatch", ["explore", "--model", "timm:test_resnet", *TIMM_FILE, *PAGE],
     "does not fit the architecture 'timm:test_resnet'"),
    ("explore pretrained-file missing",
     ["explore", "--model", "test_vit", "--pretrained-file", "{tmp}/nothere.pth", *PAGE], "nothere.pth"),
    ("overlay pretrained-file edited folder", [*OVERLAY, "--pretrained-file", "{tmp}/edited", *PICTURE],
     "edited/config.json: the weights do not fit the model of its model_config, refused before building it"),
    ("explore pretrained-file folder of another model",
     ["explore", "--model", "vit_tiny_patch4_32", "--pretrained-file", "{tmp}/folder", *PAGE],
     "describes a model 'vit_digits_patch4_16', not 'vit_tiny_patch4_32'"),
    ("overlay pretrained with checkpoint", drawn("{tmp}/good.pt", "--pretrained"), "--pretrained"),
    ("overlay pretrained own model", [*OVERLAY, "--pretrained", *PICTURE], "no published weights"),
    ("overlay pretrained offline", ["overlay", "--model", "test_vit", "--pretrained", "--method", "cls", *PICTURE],
     "pretrained_file"),
    ("explore pretrained and file", ["explore", "--model", "test_vit", "--pretrained", *TIMM_FILE, *PAGE],
     "--pretrained-file"),
    # explore
    ("explore max-mb zero", [*EXPLORE, *PAGE, "--max-mb", "0"], "--max-mb"),
    ("explore max-mb too small", [*EXPLORE, *PAGE, "--max-mb", "0.001"], "max_mb"),
    ("explore out folder", [*EXPLORE, "--image", "{tmp}/ok.png", "--out", "{tmp}/no/o.html"], "--out"),
    ("explore no attention", ["explore", "--model", "timm:test_resnet", *PAGE], "no visattn attention modules"),
    ("explore not an image", [*EXPLORE, "--image", "{tmp}/not_image.png", "--out", "o.html"], "not_image.png"),
    ("explore unknown colormap", [*EXPLORE, *PAGE, "--cmap", "rainbow"], "rainbow"),
    ("explore no image", [*EXPLORE, "--out", "o.html"], "--image"),
    # evaluate-maps
    ("maps missing checkpoint", ["evaluate-maps", "--checkpoint", "{tmp}/missing.pt"], "missing.pt"),
    ("maps cls without class token", [*MAPS, "--methods", "cls", "--metrics", "deletion"], "'cls'"),
    ("maps pointing without boxes", [*MAPS, "--methods", "rollout", "--metrics", "pointing"], "pointing"),
    ("maps unknown method", [*MAPS, "--methods", "rollout,gradcam"], "gradcam"),
    ("maps unknown metric", [*MAPS, "--metrics", "deletion,faithfulness"], "faithfulness"),
    ("maps zero limit", [*MAPS, "--limit", "0"], "--limit"),
    ("maps zero steps", [*MAPS, "--steps", "0"], "--steps"),
    ("maps out folder", [*MAPS, "--metrics", "deletion", "--out", "{tmp}/no/where"], "--out"),
    ("maps layer out of range", [*MAPS, "--methods", "received", "--layer", "7", "--metrics", "deletion"], "7"),
    # demo and sites
    ("demo unknown model", ["demo", "--model", "nope"], "nope"),
    ("demo bad batch", ["demo", "--batch", "abc"], "--batch"),
    ("demo zero batch", ["demo", "--batch", "0"], "--batch"),
    ("demo negative batch", ["demo", "--batch", "-3"], "--batch"),
    ("eval zero batch", ["eval", "--checkpoint", "{tmp}/good.pt", "--batch", "0"], "--batch"),
    ("sites unknown model", ["sites", "nope"], "nope"),
    ("sites empty input", ["sites", "resnet18_small", "--input-size", "3", "0", "0"], "input_size"),
    ("sites zero heads", ["sites", "resnet18_small", "--heads", "0"], "--heads"),
    ("sites zero kv-pool", ["sites", "resnet18_small", "--kv-pool", "0"], "--kv-pool"),
    ("sites unknown block", ["sites", "resnet18_small", "--block", "windw"], "unknown attention block 'windw'"),
    ("sites block-arg without =", ["sites", "resnet18_small", "--block-arg", "window_size"], "KEY=VALUE"),
    ("sites unknown block option", ["sites", "resnet18_small", "--block-arg", "kv_pol=3"], "did you mean 'kv_pool'"),
    ("overlay empty img-size", drawn("model:vit_digits_patch4_16", "--img-size", "0,16"), "--img-size"),
    # non-finite scores and maps: no page, no picture
    ("explore NaN weights", ["explore", "--checkpoint", "{tmp}/nan.pt", *PAGE],
     "the model's output for ok.png: 10 of 10 values are NaN or infinite"),
    ("explore max-mb infinite", [*EXPLORE, *PAGE, "--max-mb", "inf"], "max_mb must be a positive number"),
    ("overlay NaN weights", drawn("{tmp}/nan.pt", method="received"),
     "the heatmap to draw: 16 of 16 values are NaN or infinite"),
    ("overlay panels NaN weights", drawn("{tmp}/nan.pt", "--panels", method="rollout"),
     "the heatmap to draw: 16 of 16 values are NaN or infinite"),
    # data folders and pictures: what is not a regular file, a picture in two classes, pictures gone mid-run
    ("overlay fifo", [*OVERLAY, "--image", "{tmp}/pipe.png", "--out", "o.png"], "pipe.png is a named pipe"),
    ("overlay device", [*OVERLAY, "--image", "/dev/zero", "--out", "o.png"], "/dev/zero is a character device"),
    ("explore fifo", [*EXPLORE, "--image", "{tmp}/pipe.png", "--out", "o.html"], "pipe.png is a named pipe"),
    ("picture in two classes", folder_run("two_classes"), "dog/stolen.png"),
    ("strict folder with a fifo", folder_run("fifo_folder", "data.strict=true"), "cat/pipe.png"),
    ("held-out pictures gone", folder_run("dogs_gone", "train.batch_size=4"), "val/dog/0.jpg"),
    # a checkpoint's stored config is data, not instructions (files made by make_hostile_checkpoints)
    ("ckpt eval loads a file", ["eval", "--checkpoint", "{tmp}/loads_file.pt"], "'checkpoint_path'"),
    ("ckpt overlay pretrained_cfg_overlay", drawn("{tmp}/overlay_file.pt"), "'pretrained_cfg_overlay'"),
    ("ckpt explore hf name", ["explore", "--checkpoint", "{tmp}/hf_name.pt", *PAGE], "hf:facebook/dinov2-small"),
    ("ckpt maps unknown key", ["evaluate-maps", "--checkpoint", "{tmp}/unknown_key.pt"], "'open_file'"),
    ("ckpt eval far larger model", ["eval", "--checkpoint", "{tmp}/huge.pt"], "huge.pt"),
    ("ckpt overlay far larger model", drawn("{tmp}/huge.pt"), "huge.pt"),
    ("ckpt eval no heads", ["eval", "--checkpoint", "{tmp}/no_heads.pt"], "no_heads.pt"),
    ("ckpt eval class_names an int", ["eval", "--checkpoint", "{tmp}/names_int.pt"], "class_names"),
    ("ckpt overlay class_names numbers", drawn("{tmp}/names_numbers.pt"), "class_names"),
    ("ckpt explore class_names too few", ["explore", "--checkpoint", "{tmp}/names_short.pt", *PAGE], "class_names"),
    ("ckpt resume far larger model", ["train", "--resume", "{tmp}/huge_run"], "last.pt"),
    ("ckpt eval stored download", ["eval", "--checkpoint", "{tmp}/downloads.pt"], "--data-root"),
    ("ckpt eval stored download, root given",
     ["eval", "--checkpoint", "{tmp}/downloads.pt", "--data-root", "{tmp}/empty"], "cifar10 not found"),
    ("ckpt eval asks to download",
     ["eval", "--checkpoint", "{tmp}/downloads.pt", "--data-root", "{tmp}/empty", "--set", "data.download=true"],
     "data.download"),
    ("ckpt eval stored image folder", ["eval", "--checkpoint", "{tmp}/folder.pt"], "--data-root"),
    ("ckpt maps stored image folder", ["evaluate-maps", "--checkpoint", "{tmp}/folder.pt"], "--data-root"),
    ("ckpt error escapes a name", ["eval", "--checkpoint", "{tmp}/esc\x1b[2J\u202e.pt"], "esc\\x1b[2J\\u202e.pt"),
    # outputs never destroy inputs (--force never makes them), other kinds need --force; run names are one folder
    ("explore out is the image", [*EXPLORE, "--image", "{tmp}/ok.png", "--out", "{tmp}/ok.png"], "is the input"),
    ("explore out links to the image", [*EXPLORE, *PAGE[:2], "--out", "{tmp}/ok_link.html"], "ok_link.html is the"),
    ("explore out is a hard link", [*EXPLORE, *PAGE[:2], "--out", "{tmp}/ok_hard.html", "--force"], "is the input"),
    ("explore out is the weights file",
     ["explore", "--model", "test_vit", *TIMM_FILE, *PAGE[:2], "--out", "{tmp}/test_vit2.safetensors", "--force"],
     "test_vit2.safetensors is the input"),
    ("explore out over a text file", [*EXPLORE, *PAGE[:2], "--out", "{tmp}/important.txt"], "holds text"),
    ("explore out over a picture", [*EXPLORE, *PAGE[:2], "--out", "{tmp}/picture.html"], "--force"),
    ("explore out is a folder", [*EXPLORE, *PAGE[:2], "--out", "{tmp}/empty"], "is a folder"),
    ("overlay out is the image", [*OVERLAY, "--image", "{tmp}/ok.png", "--out", "{tmp}/ok.png"], "is the input"),
    ("overlay out links to the checkpoint", drawn("{tmp}/good.pt")[:-1] + ["{tmp}/good_link.png"], "is the input"),
    ("overlay out over a page", drawn("model:vit_digits_patch4_16")[:-1] + ["{tmp}/page.png"], "holds an HTML page"),
    ("overlay out not a picture name", drawn("model:vit_digits_patch4_16")[:-1] + ["{tmp}/important.txt"], "'.txt'"),
    ("maps out links to the checkpoint", [*MAPS, "--metrics", "deletion", "--out", "{tmp}/good_link"], "is the input"),
    ("run name with a parent", ["train", "run.name=../x"], "run.name='../x'"),
    ("run name absolute", ["train", "run.name=/tmp/x"], "run.name='/tmp/x'"),
    ("run name dot", ["train", "run.name=."], "run.name='.'"),
    ("run name dot dot", ["train", "run.name=.."], "run.name='..'"),
    ("run name with a slash", ["train", "run.name=a/b"], "run.name='a/b'"),
    ("run name with a backslash", ["train", "run.name=a\\b"], "run.name='a\\\\b'"),
    ("run name with a NUL", ["train", "run.name=a\x00b"], "run.name='a\\x00b'"),
    ("run name with a line break", ["train", "run.name=a\nb"], "run.name='a\\nb'"),
    ("run name empty", ["train", "run.name="], "run.name=''"),
    ("run name empty in a file", ["train", "--config", "{tmp}/empty_name.yaml"], "run.name=''"),
    # model arguments and sizes: checked on the meta device before anything is built or loaded
    ("model num_heads zero", ["train", "model.num_heads=0"], "model.num_heads=0"),
    ("model num_heads negative", ["train", "model.num_heads=-2"], "model.num_heads=-2"),
    ("model num_heads not dividing", ["train", "model.num_heads=3"], "model.num_heads"),
    ("model patch_size zero", ["train", "model.patch_size=0"], "model.patch_size=0"),
    ("model depth negative", ["train", "model.depth=-1"], "model.depth=-1"),
    ("model embed_dim float", ["train", "model.embed_dim=1e6"], "model.embed_dim"),
    ("model mlp_ratio zero", ["train", "model.mlp_ratio=0"], "model.mlp_ratio"),
    ("attention num_heads zero",
     ["train", "model.name=resnet18_small", "model.attention.at=layer3", "model.attention.num_heads=0"],
     "model.attention.num_heads=0"),
    ("img_size 1e9 float", ["train", "data.img_size=1e9"], "data.img_size"),
    ("batch_size 1e9 float", ["train", "train.batch_size=1e9"], "train.batch_size"),
    ("huge img_size", ["train", "data.img_size=1000000000"], "data.img_size=1000000000 is too large"),
    ("huge batch_size", ["train", "train.batch_size=1000000000"], "train.batch_size=1000000000 is too large"),
    ("huge embed_dim", ["train", "model.embed_dim=1000000"], "model.embed_dim=1000000 is too large"),
    ("huge depth", ["train", "model.depth=10000"], "model.depth=10000 is too large"),
    ("huge canvas", ["train", "data.name=digits_canvas", "data.canvas_size=1000000"], "data.canvas_size"),
]  # fmt: skip

DRIVER = r"""
import contextlib, io, json, os, sys, traceback
from visattn.cli import main

for row in json.loads(sys.stdin.read()):
    os.chdir(row["cwd"])
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(row["argv"])
            except SystemExit as stop:  # argparse, as the console script would see it
                code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        code = "uncaught"
        err.write(traceback.format_exc())
    print(json.dumps({"code": code, "stderr": err.getvalue()}), flush=True)
"""


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A few hundred bytes that declare a 400-megapixel picture (over PIL's bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def make_checkpoints(tmp: Path) -> None:
    cfg = load_config(overrides=MODEL)
    model = create_model("vit_digits_patch4_16", embed_dim=32, depth=1, num_heads=2, num_classes=10, in_chans=1)
    model_config = {
        "name": "vit_digits_patch4_16",
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "num_classes": 10,
        "in_chans": 1,
    }
    data_config = {
        "name": "digits",
        "img_size": [16, 16],
        "in_chans": 1,
        "mean": [0.3],
        "std": [0.4],
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
    }
    save_checkpoint(tmp / "good.pt", model, model_config, config=config_to_dict(cfg), data_config=data_config)
    save_pretrained(model, tmp / "folder", data_config=data_config)
    save_pretrained(model, tmp / "edited", data_config=data_config)  # then made to ask for a far larger model
    edited = json.loads((tmp / "edited" / "config.json").read_text())
    edited["model_config"].update(embed_dim=4096, depth=24, num_heads=16)
    (tmp / "edited" / "config.json").write_text(json.dumps(edited))
    save_checkpoint(tmp / "no_config.pt", model, model_config, data_config=data_config)
    save_checkpoint(
        tmp / "mismatch.pt", model, {**model_config, "depth": 2}, config=config_to_dict(cfg), data_config=data_config
    )
    torch.save(
        {"format": "visattn-checkpoint", "version": 1, "model": model.state_dict(), "config": config_to_dict(cfg)},
        tmp / "no_model_config.pt",
    )
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    save_file(timm.create_model("test_vit2").state_dict(), tmp / "test_vit2.safetensors")
    torch.save({"format": "visattn-checkpoint", "payload": Payload(tmp / "pwned")}, tmp / "evil.pt")
    (tmp / "truncated.pt").write_bytes((tmp / "good.pt").read_bytes()[:700])
    (tmp / "saved").mkdir()
    torch.save(
        {"format": "visattn-checkpoint", "version": 1, "epoch": 2, "config": config_to_dict(cfg)},
        tmp / "saved" / "last.pt",
    )
    (tmp / "nostate").mkdir()
    (tmp / "nostate" / "config.yaml").write_text("train:\n  epochs: 3\n")
    with torch.no_grad():  # the weights of a diverged run: every score and map is NaN
        for weight in model.parameters():
            weight.fill_(float("nan"))
    save_checkpoint(tmp / "nan.pt", model, model_config, config=config_to_dict(cfg), data_config=data_config)
    (tmp / "pwned").unlink(missing_ok=True)  # torch.save pickles without unpickling: nothing ran yet


def make_hostile_checkpoints(tmp: Path) -> None:
    """Checkpoints whose stored fields would read files, reach the network, exhaust memory or
    crash the CLI if they were obeyed (the rows under "a checkpoint's stored config is data")."""
    model = create_model("vit_digits_patch4_16", embed_dim=32, depth=1, num_heads=2)
    small = {"name": "vit_digits_patch4_16", "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}
    training = config_to_dict(load_config(overrides=MODEL))
    data = {"name": "digits", "img_size": [16, 16], "in_chans": 1, "mean": [0.3], "std": [0.4], "num_classes": 10}
    names = [str(d) for d in range(10)]
    stored_configs = {
        "loads_file": {**small, "name": "test_vit", "checkpoint_path": str(tmp / "good.pt")},
        "overlay_file": {**small, "name": "test_vit", "pretrained_cfg_overlay": {"file": str(tmp / "good.pt")}},
        "hf_name": {**small, "name": "hf:facebook/dinov2-small"},
        "unknown_key": {**small, "open_file": "passwd"},
        "huge": {**small, "embed_dim": 8192, "depth": 64, "num_heads": 8},
        "no_heads": {**small, "num_heads": 0},
    }
    for name, stored in stored_configs.items():
        save_checkpoint(tmp / f"{name}.pt", model, stored, config=training, data_config={**data, "class_names": names})
    for name, class_names in (("names_int", 10), ("names_numbers", list(range(10))), ("names_short", names[:9])):
        save_checkpoint(
            tmp / f"{name}.pt", model, small, config=training, data_config={**data, "class_names": class_names}
        )
    for name, overrides in (
        ("downloads", ["data.name=cifar10", "data.download=true", f"data.root={tmp / 'empty'}"]),
        ("folder", ["data.name=imagefolder", f"data.root={tmp / 'lonely'}"]),
    ):
        save_checkpoint(
            tmp / f"{name}.pt", model, small, config=config_to_dict(load_config(overrides=[*MODEL, *overrides]))
        )
    huge_training = config_to_dict(
        load_config(overrides=["model.embed_dim=8192", "model.depth=64", "model.num_heads=8"])
    )
    (tmp / "huge_run").mkdir()
    torch.save(
        {
            "format": "visattn-checkpoint",
            "version": 1,
            "epoch": 1,
            "config": huge_training,
            "model": model.state_dict(),
        },
        tmp / "huge_run" / "last.pt",
    )


def make_inputs(tmp: Path) -> None:
    (tmp / "syntax.yaml").write_text("train: {epochs: 3\n")
    (tmp / "list.yaml").write_text("- train\n- data\n")
    (tmp / "unknown.yaml").write_text("train:\n  epoch: 3\n")
    (tmp / "badtype.yaml").write_text("train:\n  epochs: many\n")
    (tmp / "latin1.yaml").write_bytes(b"train:\n  name: \xff\xfe\n")
    (tmp / "afile").write_text("not a folder")
    (tmp / "not_image.png").write_text("plain text")
    bomb_png(tmp / "bomb.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp / "ok.png")
    (tmp / "empty").mkdir()
    write_cifar10(tmp / "evil")
    with open(tmp / "evil" / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        pickle.dump({"data": Payload(tmp / "pwned"), "labels": [0]}, handle)
    for name, counts in (("one_class", {"only": 4}), ("lonely", {"a": 6, "b": 1})):
        for label, count in counts.items():
            (tmp / name / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp / name / label / f"{i}.png")
    make_checkpoints(tmp)
    make_picture_inputs(tmp)
    make_hostile_checkpoints(tmp)
    make_outputs(tmp)


def make_picture_inputs(tmp: Path) -> None:
    """A FIFO, a folder whose dog class holds a cat picture, a strict folder holding a FIFO, and a
    folder whose held-out dogs pass the check when built but cannot be read (JPEGs cut short)."""
    os.mkfifo(tmp / "pipe.png")
    make_folder(tmp / "two_classes", 3)
    os.symlink(tmp / "two_classes" / "cat" / "0.png", tmp / "two_classes" / "dog" / "stolen.png")
    make_folder(tmp / "fifo_folder", 3)
    os.mkfifo(tmp / "fifo_folder" / "cat" / "pipe.png")
    make_folder(tmp / "dogs_gone" / "train", 4)
    make_folder(tmp / "dogs_gone" / "val", 2)
    for path in (tmp / "dogs_gone" / "val" / "dog").iterdir():
        path.unlink()
        cut_jpeg(path.with_suffix(".jpg"))


def make_outputs(tmp: Path) -> None:
    """Files in the way of an output: links to inputs, a text file, a page named .png, a PNG named .html."""
    (tmp / "ok_link.html").symlink_to(tmp / "ok.png")
    os.link(tmp / "ok.png", tmp / "ok_hard.html")
    for link in ("good_link.png", "good_link.json"):
        (tmp / link).symlink_to(tmp / "good.pt")
    (tmp / "important.txt").write_text("do not lose this")
    (tmp / "page.png").write_text("<!DOCTYPE html><title>a page</title>")
    Image.new("RGB", (4, 4)).save(tmp / "picture.html", format="PNG")
    (tmp / "empty_name.yaml").write_text('run:\n  name: ""\n')


def env() -> dict[str, str]:
    # HF_HUB_OFFLINE: --pretrained must fail at once (nothing is downloaded in the tests)
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "VISATTN_TRACEBACK": "",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``{row id: (exit status, stderr, working folder)}`` for every row of :data:`ROWS`."""
    tmp = tmp_path_factory.mktemp("inputs")
    make_inputs(tmp)
    rows = []
    for number, (_, argv, _) in enumerate(ROWS):
        cwd = tmp_path_factory.mktemp(f"row{number}")
        rows.append({"argv": [a.format(tmp=tmp) for a in argv], "cwd": str(cwd)})
    done = subprocess.run(
        [sys.executable, "-c", DRIVER], input=json.dumps(rows), env=env(), capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.splitlines()
    assert len(lines) == len(ROWS), done.stdout[-2000:] + done.stderr[-2000:]
    out = {}
    for (name, _, _), row, line in zip(ROWS, rows, lines, strict=True):
        result = json.loads(line)
        out[name] = (result["code"], result["stderr"], Path(row["cwd"]))
    return out, tmp


def test_every_row_has_its_own_name():
    """The results are looked up by row name: a repeated name would check one row's outcome twice
    and the other's never."""
    assert len({name for name, _, _ in ROWS}) == len(ROWS)


@pytest.mark.slow  # the table's child process: seconds for imports and the rows together
@pytest.mark.parametrize(("name", "argv", "names"), ROWS, ids=[row[0] for row in ROWS])
def test_a_bad_input_ends_in_one_line(results, name, argv, names):
    table, tmp = results
    code, err, cwd = table[name]
    command = argv[0]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"visattn {command}: error: ") or err.startswith("visattn: error: "), err
    assert names in err, err
    assert not list(cwd.iterdir()), f"left behind: {list(cwd.iterdir())}"  # no runs/ folder, no output
    assert not (tmp / "pwned").exists(), "a payload ran"


def run_process(args: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env={**env(), **extra_env}, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_real_processes_exit_2_with_one_line_and_traceback_on_request(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env={**env(), **extra},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, extra in (
            ([str(ROOT / "train.py"), "train.clip_grad=-1"], {}),
            (["-m", "visattn.cli", "demo", "--model", "nope"], {}),
            (["-m", "visattn.cli", "sites", "nope", "--traceback"], {}),
            (["-m", "visattn.cli", "demo", "--model", "nope"], {"VISATTN_TRACEBACK": "1"}),
        )
    ]
    (train, demo, traced, env_traced) = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    assert train == (2, "visattn train: error: train.clip_grad must be null (no clipping) or positive, got -1.0\n")
    assert demo[0] == 2 and demo[1].startswith("visattn demo: error: unknown model 'nope'") and demo[1].count("\n") == 1
    for code, err in (traced, env_traced):
        assert code == 1 and "Traceback (most recent call last)" in err and "unknown model 'nope'" in err
    assert not list(tmp_path.iterdir())


#: a sub-command that fails with each of these ends in exit status 2 and "error: " (what visattn
#: raises on purpose about the input), or in exit status 1 and "internal error: " (a bug)
RAISED = [
    (ValueError("bad value"), 2),
    (FileNotFoundError("no such file"), 2),
    (RunFolderBusy("runs/x is in use by process 12"), 2),
    (NonFiniteLossError("training loss is nan at step 3"), 2),
    (NotRecordedError("no attention recorded for 'blocks.9'"), 2),
    (MissingExtraError("Hugging Face models need the transformers package"), 2),
    (RuntimeError("shape '[2, 3]' is invalid for input of size 7"), 1),
    (KeyError("qkv.weight"), 1),
    (IndexError("list index out of range"), 1),
    (TypeError("unsupported operand"), 1),
    (AttributeError("'NoneType' object has no attribute 'shape'"), 1),
]


@pytest.mark.parametrize(("raised", "code"), RAISED, ids=[type(e).__name__ for e, _ in RAISED])
def test_only_what_visattn_raises_on_purpose_is_the_users_error(monkeypatch, capsys, raised, code):
    from visattn import cli

    def broken(name: str):
        raise raised

    monkeypatch.setattr(cli, "create_model", broken)
    assert cli.main(["demo"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if code == 2:
        assert err.startswith("visattn demo: error: "), err
    else:
        assert err.startswith(f"visattn demo: internal error: {type(raised).__name__}: "), err
        assert err.endswith("(rerun with --traceback and report it)\n"), err


BUG = """
import sys
from visattn import cli

def broken(name):
    return {}["blocks.0.attn.qkv.weight"]  # a bug: a KeyError of visattn's own code

cli.create_model = broken
cli.run(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_bug_exits_1_with_one_line_asking_for_the_traceback(tmp_path):
    """A real process whose code has a bug (a ``KeyError``, which the command line once took for
    the user's mistake) exits with status 1 and one line; with ``--traceback`` the traceback."""
    plain, traced = (
        subprocess.run(
            [sys.executable, "-c", BUG, "demo", *flags], env=env(), cwd=tmp_path, capture_output=True, text=True
        )
        for flags in ([], ["--traceback"])
    )
    assert (plain.returncode, plain.stderr) == (
        1,
        "visattn demo: internal error: KeyError: blocks.0.attn.qkv.weight (rerun with --traceback and report it)\n",
    )
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr
    assert traced.stderr.rstrip().endswith("KeyError: 'blocks.0.attn.qkv.weight'"), traced.stderr


def test_the_entry_point_exits_with_mains_code_after_freezing_the_collector(monkeypatch):
    """``visattn`` and ``train.py`` go through ``run``: main's exit code, and ``gc.freeze()`` first
    (what spares the interpreter's teardown from collecting every torch object)."""
    from visattn import cli

    calls: list = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 3)
    monkeypatch.setattr(cli.gc, "freeze", lambda: calls.append("freeze"))
    with pytest.raises(SystemExit) as stopped:
        cli.run(["models"])
    assert stopped.value.code == 3 and calls == [["models"], "freeze"]


@pytest.mark.slow
def test_error_lines_escape_what_a_terminal_would_act_on(results):
    """Names from checkpoints, folders and the command line cannot send escape sequences or
    bidirectional overrides through an error line: every line of the table is printable text."""
    table, _ = results
    for name, (_, err, _) in table.items():
        assert err.endswith("\n") and err[:-1].isprintable(), (name, err)


def imagefolder_checkpoint(tmp: Path, class_names: list[str]) -> Path:
    """An image folder with ``class_names`` as class folders (10 pictures each) and a checkpoint of
    a model trained on it somewhere else (its stored ``data.root`` names no folder here)."""
    for label, name in enumerate(class_names):
        (tmp / "pictures" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (25 * i, 100 * label, 0)).save(tmp / "pictures" / name / f"{i}.png")
    overrides = [*MODEL, "data.name=imagefolder", "data.img_size=16", "data.root=/elsewhere/pictures"]
    model = create_model("vit_digits_patch4_16", embed_dim=32, depth=1, num_heads=2, in_chans=3, num_classes=2)
    stored = {"name": "vit_digits_patch4_16", "embed_dim": 32, "depth": 1, "num_heads": 2, "in_chans": 3}
    save_checkpoint(
        tmp / "run.pt", model, {**stored, "num_classes": 2}, config=config_to_dict(load_config(overrides=overrides))
    )
    return tmp / "run.pt"


@pytest.mark.slow
def test_python_m_visattn_is_the_visattn_command_and_eval_prints_folder_names_escaped(tmp_path):
    """``python -m visattn`` runs the console script's entry point: its help, an error row (exit 2,
    one line) and ``eval`` of a checkpoint on the folder given with ``--data-root``, whose class
    folder names (a terminal escape, a forged line) are printed escaped, one table row each."""
    hostile = "red\x1b[31m\nforged: top-1 100.00%"
    checkpoint = imagefolder_checkpoint(tmp_path, ["plain", hostile])
    make_hostile_checkpoints(tmp_path)
    runs = [
        ["--help"],
        ["eval", "--checkpoint", str(tmp_path / "loads_file.pt")],
        ["eval", "--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "pictures"), "--batch", "4"],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "visattn", *args],
            env=env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in runs
    ]
    (help_code, (usage, _)), (code, (_, err)), (eval_code, (table, eval_err)) = [
        (p.wait(timeout=300), p.communicate()) for p in procs
    ]
    assert help_code == 0 and usage.startswith("usage: visattn ") and "evaluate-maps" in usage
    assert code == 2 and err.startswith("visattn eval: error: ") and err.count("\n") == 1 and "'checkpoint_path'" in err
    assert eval_code == 0, eval_err
    lines = table.splitlines()
    assert len(lines) == 3 + 2 and "\x1b" not in table, table  # header, totals, column titles, one row per class
    assert lines[-2].startswith("plain ") and lines[-1].startswith("red\\x1b[31m\\nforged: top-1 100.00%"), lines
