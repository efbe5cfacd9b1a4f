"""Data sets for ``larsopt train``: ``digits``, ``synthetic[:N]``, ``cifar10:DIR``, ``npz:FILE``,
``imagefolder:DIR``.

Every loader returns a :class:`Dataset` of float32 inputs, shaped ``(N, C, H, W)`` for images
or ``(N, D)`` for feature vectors, standardised with statistics of the training split only (so
the test split never leaks into training), and int64 class labels ``0 .. num_classes - 1``.
Every problem with the input raises :class:`UsageError` naming it.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from larsopt.cli.config import DATA_HELP
from larsopt.cli.errors import UsageError

# Split and generator seeds are fixed so that a data set is the same whatever --seed is:
# --seed changes the model's initialisation and the data order, never which samples are tested.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_SYNTHETIC_SEED = 0
_SYNTHETIC_DEFAULT_SIZE = 2000
_SYNTHETIC_MAX_SIZE = 1_000_000  # 256 MB of float32 inputs
_SYNTHETIC_CLASSES = 10
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IMAGEFOLDER_SPLITS = (("train",), ("test", "val"))
_IMAGEFOLDER_SPLIT_SEED = 0
_IMAGEFOLDER_TEST_FRACTION = 0.2


@dataclass
class Dataset:
    """A train/test split ready for training: standardised float32 inputs, int64 labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` or ``(D,)``."""
        return tuple(self.x_train.shape[1:])


def load(spec: str, image_size: int) -> Dataset:
    """Load the data set named by ``spec`` (see :data:`DATA_HELP`); ``image_size`` is the side
    imagefolder images are brought to."""
    kind, _, argument = spec.partition(":")
    try:
        if kind == "digits" and not argument:
            return _digits()
        if kind == "synthetic":
            return _synthetic(_synthetic_size(argument))
        if kind == "cifar10" and argument:
            return _cifar10(Path(argument).expanduser())
        if kind == "npz" and argument:
            return _npz(Path(argument).expanduser())
        if kind == "imagefolder" and argument:
            return _imagefolder(Path(argument).expanduser(), image_size)
    except MemoryError:
        raise UsageError(f"--data {spec}: not enough memory to load it") from None
    raise UsageError(f"--data {spec!r}: expected one of {DATA_HELP}")


def _synthetic_size(argument: str) -> int:
    if not argument:
        return _SYNTHETIC_DEFAULT_SIZE
    try:
        size = int(argument)
    except ValueError:
        raise UsageError(f"--data synthetic:{argument}: the sample count must be an integer") from None
    if not 2 * _SYNTHETIC_CLASSES <= size <= _SYNTHETIC_MAX_SIZE:
        raise UsageError(f"--data synthetic:{argument}: the sample count must be in "
                         f"{2 * _SYNTHETIC_CLASSES}..{_SYNTHETIC_MAX_SIZE:,}")
    return size


def _standardised(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray) -> Dataset:
    """Standardise per channel (images) or per feature (vectors) with training statistics.
    Inputs beyond float32's range (or too large to standardise in it), labels that are not class
    indices, and more classes than samples are refused."""
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        largest = max(abs(float(x.max())), abs(float(x.min())))
        if not largest <= _FLOAT32_MAX:
            raise UsageError(f"--data {name}: x_{split} holds values up to {largest:.3g}, beyond float32's range "
                             f"({_FLOAT32_MAX:.3g}); rescale the inputs")
        if y.size and y.min() < 0:
            raise UsageError(f"--data {name}: y_{split} holds the label {y.min()}; labels are class indices "
                             "0..K-1")
    samples = len(y_train) + len(y_test)
    largest_label = int(max(y_train.max(), y_test.max()))
    if largest_label >= samples:
        raise UsageError(f"--data {name}: the label {largest_label} would mean {largest_label + 1:,} classes "
                         f"for {samples} samples; labels are class indices 0..K-1")
    x_train_t = torch.as_tensor(np.asarray(x_train, dtype=np.float32))
    x_test_t = torch.as_tensor(np.asarray(x_test, dtype=np.float32))
    reduce_dims = (0, 2, 3) if x_train_t.ndim == 4 else (0,)
    mean = x_train_t.mean(dim=reduce_dims, keepdim=True)
    # Constant features (the blank border pixels of digits) get std 1 instead of a division by 0.
    std = x_train_t.std(dim=reduce_dims, keepdim=True)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x_train_t, x_test_t = (x_train_t - mean) / std, (x_test_t - mean) / std
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and torch.isfinite(x_train_t).all()
            and torch.isfinite(x_test_t).all()):
        raise UsageError(f"--data {name}: the inputs are too large to standardise in float32 (their sums "
                         "overflow); rescale them")
    y_train_t = torch.as_tensor(np.asarray(y_train), dtype=torch.int64)
    y_test_t = torch.as_tensor(np.asarray(y_test), dtype=torch.int64)
    return Dataset(
        name=name,
        x_train=x_train_t.contiguous(),
        y_train=y_train_t,
        x_test=x_test_t.contiguous(),
        y_test=y_test_t,
        num_classes=largest_label + 1,
    )


def _digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, shipped with the package, no download):
    a stratified 80/20 split with a fixed seed, 1437 train and 360 test images."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UsageError("--data digits needs scikit-learn: pip install 'larsopt[train]'") from None
    digits = load_digits()
    images = digits.images[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=_DIGITS_TEST_FRACTION, random_state=_DIGITS_SPLIT_SEED,
        stratify=digits.target)
    return _standardised("digits", x_train, y_train, x_test, y_test)


def _synthetic(size: int) -> Dataset:
    """``size`` 1x8x8 samples in 10 classes: a random prototype per class plus Gaussian noise,
    split 80/20. Learnable but not trivial; the same for every run."""
    generator = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    prototypes = torch.randn(_SYNTHETIC_CLASSES, 1, 8, 8, generator=generator)
    labels = torch.arange(size) % _SYNTHETIC_CLASSES
    labels = labels[torch.randperm(size, generator=generator)]
    inputs = prototypes[labels] + 1.5 * torch.randn(size, 1, 8, 8, generator=generator)
    n_test = max(_SYNTHETIC_CLASSES, size // 5)
    return _standardised(f"synthetic:{size}", inputs[n_test:].numpy(), labels[n_test:].numpy(),
                         inputs[:n_test].numpy(), labels[:n_test].numpy())


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as file:
            batch = pickle.load(file, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
            IndexError, ImportError) as error:
        raise UsageError(f"--data cifar10: {path} is not a CIFAR-10 python batch ({type(error).__name__})") \
            from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise UsageError(f"--data cifar10: {path} has data of shape {data.shape} and {labels.size} labels; "
                         "expected (N, 3072) uint8 and N labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UsageError(f"--data cifar10: {path} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10(folder: Path) -> Dataset:
    """CIFAR-10 in its python-pickle batch format: ``data_batch_1`` .. ``data_batch_5`` and
    ``test_batch`` in ``folder`` (or in ``folder/cifar-10-batches-py``, as the archive unpacks)."""
    if not folder.is_dir():
        raise UsageError(f"--data cifar10:{folder}: no such folder")
    if not (folder / _CIFAR_TEST_BATCH).exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    train_files = [folder / name for name in _CIFAR_TRAIN_BATCHES if (folder / name).is_file()]
    test_file = folder / _CIFAR_TEST_BATCH
    if not train_files and not test_file.is_file():
        raise UsageError(f"--data cifar10:{folder}: no CIFAR-10 batches there (expected data_batch_1..5 and "
                         "test_batch from cifar-10-python.tar.gz)")
    missing = [name for name in (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH) if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"--data cifar10:{folder}: {', '.join(missing)} missing (CIFAR-10 is data_batch_1..5 "
                         "and test_batch; unpack the whole cifar-10-python.tar.gz)")
    train = [_read_cifar_batch(path) for path in train_files]
    x_test, y_test = _read_cifar_batch(test_file)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    if len(x_train) == 0 or len(x_test) == 0:
        raise UsageError(f"--data cifar10:{folder}: the batches hold no images")
    return _standardised("cifar10", x_train, y_train, x_test, y_test)


def _npz(path: Path) -> Dataset:
    """An ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``. Inputs ``(N, D)`` are
    feature vectors, ``(N, H, W)`` one-channel images, ``(N, C, H, W)`` images (channels first);
    labels are integers ``0 .. K-1``."""
    if not path.is_file():
        raise UsageError(f"--data npz:{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            if missing:
                raise UsageError(f"--data npz:{path}: missing array(s) {', '.join(missing)} "
                                 f"(expected {', '.join(_NPZ_KEYS)})")
            arrays = {key: archive[key] for key in _NPZ_KEYS}
    except UsageError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise UsageError(f"--data npz:{path}: not a readable .npz file ({type(error).__name__})") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (2, 3, 4) or len(x) == 0:
            raise UsageError(f"--data npz:{path}: x_{split} has shape {x.shape}; expected (N, D), (N, H, W) "
                             "or (N, C, H, W) with N > 0")
        if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
            raise UsageError(f"--data npz:{path}: x_{split} has dtype {x.dtype}; expected real numbers")
        if not np.isfinite(x).all():
            raise UsageError(f"--data npz:{path}: x_{split} contains NaN or infinity")
        if y.shape != (len(x),):
            raise UsageError(f"--data npz:{path}: y_{split} has shape {y.shape}; expected ({len(x)},), one "
                             f"label per row of x_{split}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise UsageError(f"--data npz:{path}: y_{split} must hold integer class labels >= 0")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UsageError(f"--data npz:{path}: x_train samples have shape {arrays['x_train'].shape[1:]}, "
                         f"x_test samples {arrays['x_test'].shape[1:]}")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.ndim == 3:
        x_train, x_test = x_train[:, None], x_test[:, None]
    return _standardised(f"npz:{path.name}", x_train, arrays["y_train"], x_test, arrays["y_test"])


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in _IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files, for every sub-folder of ``folder`` that holds images."""
    classes = {path.name: _image_files(path) for path in sorted(folder.iterdir())
               if path.is_dir() and not path.name.startswith(".")}
    return {name: files for name, files in classes.items() if files}


def _decode(path: Path, size: int) -> np.ndarray:
    """One image as ``(3, size, size)`` uint8: RGB, shorter side resized to ``size``, centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UsageError(f"--data imagefolder: cannot decode {path} ({type(error).__name__})") from None
    width, height = image.size
    scale = size / min(width, height)
    width, height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _imagefolder(folder: Path, size: int) -> Dataset:
    """Images in class sub-folders, decoded with Pillow (the ``train`` extra).

    ``DIR/train/<class>/`` and ``DIR/test/<class>/`` (or ``val``) are used as given; otherwise
    ``DIR/<class>/`` is split 80/20 per class with a fixed seed. Classes are the sub-folder names
    in sorted order. Every image is converted to RGB, its shorter side resized to ``size`` and
    centre-cropped to ``size`` x ``size``; all of them are held in memory.
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UsageError("--data imagefolder needs Pillow: pip install 'larsopt[train]'") from None
    if not folder.is_dir():
        raise UsageError(f"--data imagefolder:{folder}: no such folder")
    test_folder = next((folder / name for name in _IMAGEFOLDER_SPLITS[1] if (folder / name).is_dir()), None)
    if (folder / _IMAGEFOLDER_SPLITS[0][0]).is_dir() and test_folder is not None:
        train_classes = _class_folders(folder / _IMAGEFOLDER_SPLITS[0][0])
        test_classes = _class_folders(test_folder)
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            raise UsageError(f"--data imagefolder:{folder}: {test_folder.name}/ has classes that train/ lacks: "
                             f"{', '.join(unknown[:5])}")
        names = sorted(train_classes)
        train = [(path, names.index(name)) for name, files in train_classes.items() for path in files]
        test = [(path, names.index(name)) for name, files in test_classes.items() for path in files]
    else:
        classes = _class_folders(folder)
        names = sorted(classes)
        generator = np.random.default_rng(_IMAGEFOLDER_SPLIT_SEED)
        train, test = [], []
        for label, name in enumerate(names):
            files = [classes[name][index] for index in generator.permutation(len(classes[name]))]
            held_out = round(len(files) * _IMAGEFOLDER_TEST_FRACTION) if len(files) > 1 else 0
            test += [(path, label) for path in files[:held_out]]
            train += [(path, label) for path in files[held_out:]]
    if len(names) < 2 or not train or not test:
        raise UsageError(f"--data imagefolder:{folder}: expected class sub-folders of images (at least two "
                         "classes, with train and test images), as DIR/<class>/ or DIR/train/<class>/ and "
                         "DIR/test/<class>/")

    def stacked(items: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([_decode(path, size) for path, _ in items])
        return images, np.asarray([label for _, label in items], dtype=np.int64)

    x_train, y_train = stacked(train)
    x_test, y_test = stacked(test)
    return _standardised(f"imagefolder:{folder.name}", x_train, y_train, x_test, y_test)
