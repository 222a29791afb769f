"""Train the demo digits CNN and export it, with calibration and held-out data, as ONNX.

Offline and deterministic: scikit-learn's bundled ``load_digits()`` (1,797 8x8 images),
a fixed seed, CPU only. Runs in a few seconds on two cores.

    python models/train_digits.py                      # writes models/digits/
    python models/train_digits.py --variant worse --version 2 --out /tmp/digits-v2

Outputs in ``--out``:

- ``model.onnx``: input ``input`` float32 [N,1,8,8] (pixels / 16, so in [0,1]),
  output ``logits`` float32 [N,10]; opset 17, dynamic batch axis, self-contained.
- ``calibration.npz``: key ``input``, 256 samples drawn from the train split.
- ``heldout.npz``: keys ``input`` (float32) and ``label`` (int64), the whole test split.
- ``README.md``: provenance and the measured float test accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: `--help` should not wait for it
    from torch import nn

SEED = 20240601
TEST_FRACTION = 0.3
CALIBRATION_SAMPLES = 256
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OUT = Path(__file__).resolve().parent / "digits"


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """How one variant is trained."""

    conv1_channels: int
    conv2_channels: int
    hidden: int
    epochs: int
    learning_rate: float
    batch_size: int


RECIPES = {
    "good": Recipe(
        conv1_channels=16,
        conv2_channels=32,
        hidden=64,
        epochs=30,
        learning_rate=2e-3,
        batch_size=64,
    ),
    # Deliberately weak, for rollback demos: narrow layers, three epochs. About 0.68 test
    # accuracy: clearly worse than `good` (about 0.98), yet still a model, not noise.
    "worse": Recipe(
        conv1_channels=4, conv2_channels=8, hidden=16, epochs=3, learning_rate=3e-3, batch_size=64
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Splits:
    """The data splits, already scaled and shaped as the model's input."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_calibration: np.ndarray


def load_splits(seed: int = SEED) -> Splits:
    """Load digits, scale to [0,1], split 70/30 (stratified) and draw the calibration set."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x_train), size=CALIBRATION_SAMPLES, replace=False)
    return Splits(
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        x_calibration=np.ascontiguousarray(x_train[np.sort(pick)], dtype=np.float32),
    )


def build_model(recipe: Recipe) -> nn.Module:
    """Conv-ReLU, Conv-ReLU, MaxPool2, Flatten, Linear-ReLU, Linear."""
    from torch import nn

    c1, c2 = recipe.conv1_channels, recipe.conv2_channels
    return nn.Sequential(
        nn.Conv2d(1, c1, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, recipe.hidden),
        nn.ReLU(),
        nn.Linear(recipe.hidden, 10),
    )


def train(recipe: Recipe, splits: Splits, seed: int = SEED) -> nn.Module:
    """Train on the train split with Adam; deterministic on CPU."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = build_model(recipe)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(splits.x_train)
    y = torch.from_numpy(splits.y_train)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Run the torch model on a batch and return logits as numpy."""
    import torch

    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(x)).numpy())


def export_onnx(model: nn.Module, path: Path, *, version: int, variant: str) -> None:
    """Export with opset 17 and a dynamic batch axis into one self-contained file."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros(2, 1, 8, 8, dtype=torch.float32)
    # The legacy exporter gives a small, plain graph with stable node names; the dynamo
    # exporter would also work but writes an (empty) external-data file beside the model.
    # Torch warns that the legacy exporter is deprecated: we chose it on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    # Whatever the exporter did, leave exactly one self-contained file.
    proto = onnx.load(str(path), load_external_data=True)
    sidecar = path.with_name(path.name + ".data")
    if sidecar.exists():
        sidecar.unlink()
    proto.producer_name = "edgefleet-train-digits"
    proto.model_version = version
    proto.doc_string = f"EdgeFleet demo digits CNN, variant {variant}, version {version}"
    del proto.metadata_props[:]
    for key, value in (("edgefleet.model", "digits"), ("edgefleet.variant", variant)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path), save_as_external_data=False)


def onnxruntime_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the exported model with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return np.asarray(logits)


def write_readme(out: Path, report: dict[str, object]) -> None:
    """Write the provenance README for one trained model directory."""
    text = f"""# Digits demo model (variant `{report["variant"]}`, version {report["version"]})

Written by `models/train_digits.py`; do not edit by hand, re-run the script instead.

- Data: scikit-learn `load_digits()` (1,797 8x8 images), pixels divided by 16 (range [0,1]).
  Stratified split with seed {report["seed"]}: {report["train_samples"]} train (70%),
  {report["test_samples"]} held-out test (30%).
- Model: `model.onnx`, opset {OPSET}, input `{INPUT_NAME}` float32 `[N,1,8,8]`, output
  `{OUTPUT_NAME}` float32 `[N,10]`, dynamic batch axis. sha256 `{report["model_sha256"]}`.
- Recipe: `{report["recipe"]}`.
- `calibration.npz`: key `input`, {CALIBRATION_SAMPLES} samples drawn from the train split.
- `heldout.npz`: keys `input` (float32) and `label` (int64), every test sample.

## Measured

- Float test accuracy (torch): **{report["torch_test_accuracy"]:.4f}**
- Float test accuracy (ONNX Runtime, CPU): **{report["onnxruntime_test_accuracy"]:.4f}**
- Predictions equal between torch and ONNX Runtime on the test split:
  {report["prediction_agreement"]:.4f}; max abs logit difference {report["max_abs_logit_diff"]:.2e}.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Entry point: train, export, verify against ONNX Runtime, write outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, default=1, help="model version recorded in ONNX")
    parser.add_argument("--variant", choices=sorted(RECIPES), default="good")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    recipe = RECIPES[args.variant]
    splits = load_splits(args.seed)
    model = train(recipe, splits, args.seed)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    export_onnx(model, model_path, version=args.version, variant=args.variant)

    expected = torch_logits(model, splits.x_test)
    actual = onnxruntime_logits(model_path, splits.x_test)
    torch_pred = expected.argmax(axis=1)
    ort_pred = actual.argmax(axis=1)
    agreement = float(np.mean(torch_pred == ort_pred))
    max_diff = float(np.max(np.abs(expected - actual)))
    torch_acc = float(np.mean(torch_pred == splits.y_test))
    ort_acc = float(np.mean(ort_pred == splits.y_test))

    np.savez(out / "calibration.npz", input=splits.x_calibration)
    np.savez(out / "heldout.npz", input=splits.x_test, label=splits.y_test)
    report: dict[str, object] = {
        "variant": args.variant,
        "version": args.version,
        "seed": args.seed,
        "train_samples": len(splits.x_train),
        "test_samples": len(splits.x_test),
        "recipe": recipe,
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "torch_test_accuracy": torch_acc,
        "onnxruntime_test_accuracy": ort_acc,
        "prediction_agreement": agreement,
        "max_abs_logit_diff": max_diff,
    }
    write_readme(out, report)

    summary = {k: v for k, v in report.items() if k != "recipe"}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(summary, indent=2))
    print(f"test accuracy: {torch_acc:.4f} (torch), {ort_acc:.4f} (onnxruntime)")
    # Torch and ONNX Runtime must agree; otherwise the export is broken and nothing ships.
    if agreement < 1.0 or max_diff > 1e-3:
        print("error: ONNX Runtime predictions differ from torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
