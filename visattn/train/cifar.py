"""CIFAR-10 and CIFAR-100 from torchvision's Python-version batches, read without running code from them."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets as tv_datasets

__all__ = ["CIFAR_STATS", "cifar_images", "read_cifar_batch"]

#: per-channel mean and std of each CIFAR training set
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


#: the only globals a CIFAR batch may name: numpy arrays and dtypes (both numpy module layouts)
#: and the codec Python 2 pickles use for byte strings; everything else is refused unrun
_CIFAR_GLOBALS = frozenset(
    {
        *((module, "_reconstruct") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
        *((module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts, lists, strings and numbers and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: CIFAR batches hold only numpy arrays, lists, dicts and strings"
            )
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> dict[str, Any]:
    """One CIFAR batch or meta file (Python pickle) read without running code from it.

    Only numpy arrays/dtypes and builtin containers, strings and numbers are admitted, so a
    tampered file fails with a ``ValueError`` naming it instead of executing its payload.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR file {path} is missing; extract the archive again") from None
    except Exception as err:  # any unpickling failure means a bad or unsafe copy
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"CIFAR file {path} could not be read safely ({reason}); delete it and extract the archive again"
        ) from err
    if not isinstance(entry, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(entry).__name__}, not a dict; extract the archive again")
    return entry


def cifar_images(name: str, root: str, train: bool, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    """One CIFAR split as uint8 images ``(N, 3, 32, 32)``, labels ``(N,)`` and class names.

    torchvision's dataset class gives the layout (folder, file names, meta key); the batches are
    read with :func:`read_cifar_batch`, which never runs code stored in them.
    """
    base = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100}[name]
    folder = Path(root) / base.base_folder
    if download and not folder.is_dir():  # the archive's md5 is verified by torchvision
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(base.url, root, filename=base.filename, md5=base.tgz_md5)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name} not found: expected the Python-version batches in {folder} (extract "
            f"{base.filename} from https://www.cs.toronto.edu/~kriz/cifar.html into {root}), "
            "or set data.download=true when online"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    for file_name, _ in base.train_list if train else base.test_list:
        entry = read_cifar_batch(folder / file_name)
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in entry["labels" if "labels" in entry else "fine_labels"])
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(
                f"CIFAR file {folder / file_name} is not a CIFAR batch ({err!r}); extract it again"
            ) from None
    classes = read_cifar_batch(folder / base.meta["filename"]).get(base.meta["key"])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"CIFAR file {folder / base.meta['filename']} has no list of {base.meta['key']!r}")
    data = np.concatenate(images)
    if len(data) != len(labels):
        raise ValueError(f"{name} files in {folder} hold {len(data)} images but {len(labels)} labels")
    return torch.from_numpy(np.ascontiguousarray(data)), torch.tensor(labels, dtype=torch.long), classes
