"""Calibration and held-out data sets: loading, validation against the model's inputs."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compiler.errors import DatasetError
from compiler.model import TensorInfo

__all__ = ["LABEL_KEY", "Dataset", "iter_batches", "load_dataset", "validate_arrays"]

#: Optional key holding integer class labels of held-out samples.
LABEL_KEY = "label"


@dataclass(frozen=True, slots=True, kw_only=True)
class Dataset:
    """Samples keyed by model input name, all with the same leading sample count."""

    role: str  # "calibration" or "held-out": used in messages
    source: str
    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None
    sha256: str

    @property
    def count(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def batches(self, batch_size: int, *, pad: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive feeds of at most `batch_size` samples.

        pad: fill the last batch up to `batch_size` by repeating its last sample (models
        with a fixed batch axis accept nothing else).
        """
        yield from iter_batches(self.inputs, batch_size, pad=pad)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v[indices]) for k, v in self.inputs.items()}


def iter_batches(
    inputs: Mapping[str, np.ndarray], batch_size: int, *, pad: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Slice every input into consecutive batches (optionally padding the last one)."""
    count = int(next(iter(inputs.values())).shape[0])
    for start in range(0, count, batch_size):
        feed = {k: v[start : start + batch_size] for k, v in inputs.items()}
        short = batch_size - (min(count, start + batch_size) - start)
        if pad and short:
            feed = {
                k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in feed.items()
            }
        yield feed


def _content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    # Hash the content, not the container: an .npz's zip timestamps must not change lineage.
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_arrays(path: Path, role: str) -> dict[str, np.ndarray]:
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DatasetError(
                f"{role} directory {path} holds no <input>.npy files; write one .npy per "
                f"model input (and optionally {LABEL_KEY}.npy)"
            )
        out: dict[str, np.ndarray] = {}
        for f in files:
            try:
                out[f.stem] = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{role} file {f} is not a readable .npy: {exc}") from exc
        return out
    if not path.is_file():
        raise DatasetError(f"{role} data {path} does not exist (an .npz or a directory of .npy)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DatasetError(
                    f"{role} data {path} is a single array; use an .npz keyed by input name"
                )
            return {k: npz[k] for k in npz.files}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{role} data {path} is not a readable .npz: {exc}") from exc


def validate_arrays(
    arrays: Mapping[str, np.ndarray],
    inputs: Sequence[TensorInfo],
    *,
    role: str,
    source: str,
) -> Dataset:
    """Check names, shapes, dtypes, counts and finiteness; return a `Dataset`."""
    missing = [t for t in inputs if t.name not in arrays]
    if missing:
        wanted = ", ".join(f"{t.name!r} {t.describe()}" for t in missing)
        raise DatasetError(
            f"{role} data {source} lacks model input(s) {wanted}; it has keys "
            f"{sorted(arrays)}. Key each array by the model's input name."
        )
    picked: dict[str, np.ndarray] = {}
    count: int | None = None
    for t in inputs:
        arr = np.asarray(arrays[t.name])
        expected = np.dtype(t.dtype)
        if arr.dtype != expected:
            raise DatasetError(
                f"{role} input {t.name!r} has dtype {arr.dtype}; the model expects "
                f"{t.describe()} (convert with .astype(np.{expected.name}))"
            )
        if arr.ndim != len(t.shape):
            raise DatasetError(
                f"{role} input {t.name!r} has shape {list(arr.shape)}; the model expects "
                f"{t.describe()} (samples stacked on the first axis)"
            )
        for axis, (got, want) in enumerate(zip(arr.shape[1:], t.shape[1:], strict=True), 1):
            if isinstance(want, int) and got != want:
                raise DatasetError(
                    f"{role} input {t.name!r} has shape {list(arr.shape)}; the model expects "
                    f"{t.describe()} (axis {axis} must be {want})"
                )
        if arr.shape[0] == 0:
            raise DatasetError(f"{role} data {source} is empty (input {t.name!r} has 0 samples)")
        if count is not None and arr.shape[0] != count:
            raise DatasetError(
                f"{role} inputs have different sample counts ({count} and {arr.shape[0]} for "
                f"{t.name!r}); every input needs one row per sample"
            )
        count = int(arr.shape[0])
        if arr.dtype.kind in "fc":
            bad = ~np.isfinite(arr)
            if bad.any():
                first = int(np.argwhere(bad.reshape(arr.shape[0], -1).any(axis=1))[0, 0])
                raise DatasetError(
                    f"{role} input {t.name!r} holds {int(bad.sum())} NaN/Inf value(s) "
                    f"(first in sample {first}); clean the data before compiling"
                )
        picked[t.name] = np.ascontiguousarray(arr)
    labels = None
    if LABEL_KEY in arrays and LABEL_KEY not in picked:
        labels = np.asarray(arrays[LABEL_KEY])
        if labels.dtype.kind not in "iu" or labels.shape != (count,):
            raise DatasetError(
                f"{role} key {LABEL_KEY!r} must be integer class labels of shape [{count}]; "
                f"got {labels.dtype}{list(labels.shape)}"
            )
    hashed = dict(picked)
    if labels is not None:
        hashed[LABEL_KEY] = labels
    return Dataset(
        role=role, source=source, inputs=picked, labels=labels, sha256=_content_sha256(hashed)
    )


def load_dataset(path: Path, inputs: Sequence[TensorInfo], *, role: str) -> Dataset:
    """Load an .npz keyed by input name (or a directory of <input>.npy) and validate it."""
    path = Path(path)
    return validate_arrays(_read_arrays(path, role), inputs, role=role, source=str(path))
