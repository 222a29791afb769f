"""The compile pipeline: profile -> checks -> artifact -> verification -> signed bundle.

`compile_model(CompileOptions(...))` is the public entry point (the CLI, the demo and the
benchmarks call it). Work happens in a temporary directory; the bundle is written atomically
at the very end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compiler.baseline import BASELINE_PATH, baseline_bytes, build_baseline
from compiler.calibration import CALIBRATION_PATH, CalibrationMap, fit_calibration
from compiler.data import Dataset, load_dataset
from compiler.errors import (
    CompileError,
    DatasetError,
    GateRefusedError,
    ProfileNotFoundError,
    SigningKeyError,
)
from compiler.golden import GOLDEN_COUNT, GOLDEN_MAX, GOLDEN_MIN, GOLDEN_PATH, pick_golden
from compiler.model import LoadedModel, OpIssue, check_ops, load_model
from compiler.onnx_target import onnx_runner
from compiler.package import BundleFile, bundle_name, make_manifest, write_signed_bundle
from compiler.quantize import CALIBRATION_METHODS, CalibrationMethod, QuantConfig, preprocess
from compiler.sensitivity import NodeSensitivity, SensitivityMode, measure_sensitivity
from compiler.target import (
    BuildRequest,
    BuiltArtifact,
    Precision,
    Target,
    resolve_precision,
    target_for,
)
from compiler.verify import Gate, GateResult, build_report, is_classifier_output, run_all
from protocol.manifest import GoldenSpec, ModelInfo, VerificationReport

__all__ = [
    "Attempt",
    "CompileOptions",
    "CompileResult",
    "NullProgress",
    "Progress",
    "compile_model",
    "resolve_created_at",
]

PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"
_SENSITIVITY_SAMPLES = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileOptions:
    """Everything one compile needs; built once at the entry point."""

    model_path: Path
    profile: str
    calibration_path: Path
    heldout_path: Path
    key_path: Path
    out_dir: Path
    key_passphrase: bytes | None = None
    model_name: str | None = None  # default: the model file's stem
    model_version: int = 1
    description: str = ""
    expires_days: int = 90
    #: None: now (the bundle is then not reproducible); see resolve_created_at
    created_at: datetime | None = None
    precision: str | None = None  # None: the profile's preferred precision
    calibration_method: CalibrationMethod = "minmax"
    per_channel: bool | None = None  # None: the profile's choice
    reduce_range: bool = False
    exclude_nodes: tuple[str, ...] = ()
    max_top1_drop_points: float | None = None  # None: the profile's gate
    min_snr_db: float | None = None
    auto: bool = False
    sensitivity: bool = False
    sensitivity_mode: SensitivityMode = "only"
    sensitivity_top: int = 10
    class_names: tuple[str, ...] = ()
    latency_runs: int = 50
    trt_max_batch: int = 8
    golden_count: int = GOLDEN_COUNT


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One artifact tried (one in a plain compile; several with --auto)."""

    label: str
    precision: Precision
    description: str
    size_bytes: int
    passed: bool
    top1_drop_points: float | None
    min_snr_db: float | None
    reasons: tuple[str, ...]
    chosen: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CompileResult:
    bundle_path: Path
    sha256: str
    size_bytes: int
    manifest: Any  # protocol.manifest.BundleManifest
    attempts: tuple[Attempt, ...]
    sensitivity: tuple[NodeSensitivity, ...]
    op_issues: tuple[OpIssue, ...]
    #: includes host latency even when it was kept out of the manifest (reproducible mode)
    host_figures: dict[str, Any] = field(default_factory=dict)
    reproducible: bool = False
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Machine-readable summary (the CLI's --json)."""
        m = self.manifest
        return {
            "bundle": str(self.bundle_path),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "model": {"name": m.model.name, "version": m.model.version},
            "profile": m.profile,
            "precision": m.artifact.precision,
            "runtime": m.artifact.runtime,
            "reproducible": self.reproducible,
            "verification": m.verification.model_dump(mode="json") if m.verification else None,
            "quantization": m.quantization,
            "host_figures": self.host_figures,
            "attempts": [_attempt_json(a) for a in self.attempts],
            "sensitivity": [_sens_json(s) for s in self.sensitivity],
            "op_issues": [
                {"node": i.node, "op_type": i.op_type, "reason": i.reason, "severity": i.severity}
                for i in self.op_issues
            ],
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "label": a.label,
        "precision": a.precision,
        "description": a.description,
        "size_bytes": a.size_bytes,
        "passed": a.passed,
        "top1_drop_points": a.top1_drop_points,
        "min_snr_db": a.min_snr_db,
        "reasons": list(a.reasons),
        "chosen": a.chosen,
    }


def _sens_json(s: NodeSensitivity) -> dict[str, Any]:
    return {
        "node": s.node,
        "op_type": s.op_type,
        "mode": s.mode,
        "min_snr_db": s.min_snr_db,
        "max_abs_error": s.max_abs_error,
        "top1_agreement": s.top1_agreement,
    }


class Progress(Protocol):
    """The seam the CLI's progress bars plug into."""

    def stage(self, text: str) -> None: ...

    def task(self, text: str, total: int) -> Callable[[int], None]: ...

    def done(self) -> None: ...


class NullProgress:
    def stage(self, text: str) -> None:
        return None

    def task(self, text: str, total: int) -> Callable[[int], None]:
        return lambda n: None

    def done(self) -> None:
        return None


def resolve_created_at(
    explicit: datetime | None, env: dict[str, str] | None = None
) -> tuple[datetime, bool]:
    """(created_at, reproducible?): --created-at, else SOURCE_DATE_EPOCH, else now."""
    env = dict(os.environ) if env is None else env
    if explicit is not None:
        ts = explicit if explicit.tzinfo else explicit.replace(tzinfo=UTC)
        return ts.astimezone(UTC).replace(microsecond=0), True
    raw = env.get("SOURCE_DATE_EPOCH", "").strip()
    if raw:
        try:
            return datetime.fromtimestamp(int(raw), UTC), True
        except (ValueError, OverflowError, OSError) as exc:
            raise CompileError(
                f"SOURCE_DATE_EPOCH={raw!r} is not a Unix timestamp in seconds"
            ) from exc
    return datetime.now(UTC).replace(microsecond=0), False


def _load_profile(name: str) -> Any:
    from hardware_profiles import ProfileError, UnknownProfileError, load_profile

    try:
        return load_profile(name)
    except UnknownProfileError as exc:
        raise ProfileNotFoundError(str(exc)) from exc
    except ProfileError as exc:
        raise CompileError(f"hardware profile {name!r} is invalid: {exc}") from exc


def _load_key(path: Path, passphrase: bytes | None) -> Any:
    from protocol.errors import KeyFileError
    from protocol.signing import load_signing_key

    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    try:
        return load_signing_key(Path(path), passphrase)
    except KeyFileError as exc:
        raise SigningKeyError(str(exc)) from exc


def _model_name(options: CompileOptions) -> str:
    name = options.model_name or Path(options.model_path).stem
    try:
        ModelInfo(name=name, version=max(1, options.model_version))
    except ValueError as exc:
        raise CompileError(
            f"model name {name!r} is not usable in a bundle (letters, digits, '.', '_', '-'; "
            f"at most 128); pass --model-name"
        ) from exc
    if options.model_version < 1:
        raise CompileError(f"--model-version must be >= 1 (got {options.model_version})")
    return name


@dataclass(slots=True)
class _Context:
    options: CompileOptions
    profile: Any
    target: Target
    model: LoadedModel
    calibration: Dataset
    heldout: Dataset
    preprocessed: Path
    workdir: Path
    gate: Gate
    threads: int
    float_held: list[np.ndarray]
    progress: Progress
    notes: list[str]
    counter: int = 0


@dataclass(frozen=True, slots=True)
class _Outcome:
    artifact: BuiltArtifact
    outputs: list[np.ndarray]
    report: VerificationReport
    gate: GateResult
    attempt: Attempt


def _try(ctx: _Context, precision: Precision, quant: QuantConfig | None, label: str) -> _Outcome:
    ctx.counter += 1
    work = ctx.workdir / f"attempt{ctx.counter}"
    work.mkdir()
    desc = quant.describe() if quant is not None else precision
    ctx.progress.stage(f"building {precision} artifact ({desc})")
    artifact = ctx.target.build(
        BuildRequest(
            model=ctx.model,
            profile=ctx.profile,
            precision=precision,
            quant=quant,
            calibration=ctx.calibration,
            preprocessed=ctx.preprocessed,
            workdir=work,
            trt_max_batch=ctx.options.trt_max_batch,
        )
    )
    runner = ctx.target.runner(artifact, threads=ctx.threads)
    advance = ctx.progress.task(f"verifying {label}", ctx.heldout.count)
    outs = run_all(runner, ctx.heldout.inputs, ctx.model.inputs, on_batch=advance)
    report, result = build_report(
        ctx.float_held,
        outs,
        ctx.model.outputs,
        labels=ctx.heldout.labels,
        gate=ctx.gate,
        runtime=(
            f"LiteRT interpreter (host), {ctx.threads} threads"
            if artifact.format == "tflite"
            else f"onnxruntime CPUExecutionProvider (host), {ctx.threads} threads"
        ),
        notes=[*ctx.notes, *artifact.notes],
    )
    snrs = [c.snr_db for c in report.outputs if c.snr_db is not None]
    attempt = Attempt(
        label=label,
        precision=precision,
        description=desc,
        size_bytes=artifact.size_bytes,
        passed=result.passed,
        top1_drop_points=report.top1_drop_points,
        min_snr_db=min(snrs) if snrs else None,
        reasons=result.reasons,
    )
    return _Outcome(artifact, outs, report, result, attempt)


def _advice(ctx: _Context, precision: Precision, quant: QuantConfig | None) -> list[str]:
    tips: list[str] = []
    if quant is not None:
        if not quant.per_channel:
            tips.append("per-channel weights (--per-channel)")
        others = [m for m in ("minmax", "entropy", "percentile") if m != quant.calibration_method]
        tips.append(f"another calibration method (--calibration-method {' or '.join(others)})")
        tips.append(
            "exclude the most sensitive nodes (find them with --sensitivity, "
            "then --exclude-node NAME)"
        )
    for p in ("fp16", "fp32"):
        if p != precision and ctx.profile.allows(p):
            tips.append(f"--precision {p}")
            break
    tips.append("or let --auto try these and keep the smallest artifact within budget")
    return tips


def _sensitivity(
    ctx: _Context, quant: QuantConfig, qdq: Path, mode: SensitivityMode
) -> list[NodeSensitivity]:
    n = min(ctx.heldout.count, _SENSITIVITY_SAMPLES)
    idx = np.arange(n)
    samples = ctx.heldout.take(idx)
    floats = [f[:n] for f in ctx.float_held]
    from compiler.sensitivity import quantized_nodes

    advance = ctx.progress.task("per-node sensitivity", len(quantized_nodes(qdq)))
    return measure_sensitivity(
        preprocessed=ctx.preprocessed,
        qdq_model=qdq,
        config=quant,
        calibration=ctx.calibration,
        samples=samples,
        float_outputs=floats,
        model_inputs=ctx.model.inputs,
        workdir=ctx.workdir / f"sensitivity-{mode}",
        threads=ctx.threads,
        mode=mode,
        on_node=lambda _name: advance(1),
    )


_Spec = tuple[str, Precision, "QuantConfig | None"]


def _float_tier(precision: Precision) -> list[_Spec]:
    return [(precision, precision, None)]


def _auto(
    ctx: _Context, first: _Outcome, precision: Precision, quant: QuantConfig | None
) -> tuple[_Outcome, list[Attempt], list[NodeSensitivity]]:
    """Try alternatives tier by tier (other calibration / per-channel, then excluding the
    most sensitive nodes, then fp16, then fp32); keep the smallest passing artifact of the
    first tier that has one."""
    attempts = [first.attempt]
    sens: list[NodeSensitivity] = []
    if first.gate.passed:
        return first, attempts, sens

    def calibration_tier() -> list[_Spec]:
        assert quant is not None
        specs: list[_Spec] = [
            (f"int8 {m}", "int8", quant.with_changes(calibration_method=m))
            for m in CALIBRATION_METHODS
            if m != quant.calibration_method
        ]
        if not quant.per_channel:
            specs.append(("int8 per-channel", "int8", quant.with_changes(per_channel=True)))
        return specs

    def exclusion_tier() -> list[_Spec]:
        assert quant is not None
        sens.extend(_sensitivity(ctx, quant, first.artifact.local_path, "only"))
        worst = [s.node for s in sens]
        return [
            (
                f"int8 excluding {k} node(s)",
                "int8",
                quant.with_changes(exclude_nodes=(*quant.exclude_nodes, *worst[:k])),
            )
            for k in range(1, min(3, len(worst)) + 1)
        ]

    tiers: list[Callable[[], list[_Spec]]] = []
    if quant is not None:
        tiers += [calibration_tier, exclusion_tier]
    fallbacks: tuple[Precision, ...] = ("fp16", "fp32")
    for fallback in fallbacks:
        if fallback != precision and ctx.profile.allows(fallback):
            tiers.append(functools.partial(_float_tier, fallback))
    for make_tier in tiers:
        outcomes = [_try(ctx, prec, q, label) for label, prec, q in make_tier()]
        attempts.extend(o.attempt for o in outcomes)
        passing = [o for o in outcomes if o.gate.passed]
        if passing:
            return min(passing, key=lambda o: o.attempt.size_bytes), attempts, sens
    return first, attempts, sens


def _paired_latency_ms(
    float_run: Callable[..., Any], artifact_run: Callable[..., Any], feed: Any, runs: int
) -> tuple[float, float, float]:
    """(float median ms, artifact median ms, median of per-pair ratios), runs interleaved.

    Alternating the two models puts load from other processes on both sides of each pair,
    so the ratio holds on a busy build machine where back-to-back medians would not.
    """
    for _ in range(3):
        float_run(feed)
        artifact_run(feed)
    f_times: list[float] = []
    a_times: list[float] = []
    ratios: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        float_run(feed)
        t1 = time.perf_counter()
        artifact_run(feed)
        t2 = time.perf_counter()
        f_times.append((t1 - t0) * 1000.0)
        a_times.append((t2 - t1) * 1000.0)
        ratios.append((t2 - t1) / (t1 - t0) if t1 > t0 else 1.0)
    return (
        round(statistics.median(f_times), 4),
        round(statistics.median(a_times), 4),
        round(statistics.median(ratios), 4),
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("edgefleet", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def compile_model(options: CompileOptions, *, progress: Progress | None = None) -> CompileResult:
    """Compile, verify, sign and write one bundle; raises a `CompileError` on any failure."""
    started = time.perf_counter()
    progress = progress or NullProgress()
    created_at, reproducible = resolve_created_at(options.created_at)
    if options.expires_days < 1:
        raise CompileError(f"--expires-days must be >= 1 (got {options.expires_days})")
    if not GOLDEN_MIN <= options.golden_count <= GOLDEN_MAX:
        raise CompileError(
            f"golden_count must be {GOLDEN_MIN}..{GOLDEN_MAX} (got {options.golden_count})"
        )
    name = _model_name(options)

    progress.stage("checking profile, key, model and data")
    profile = _load_profile(options.profile)
    target = target_for(profile)
    target.check(profile)
    precision = resolve_precision(profile, options.precision)
    key = _load_key(options.key_path, options.key_passphrase)
    model = load_model(Path(options.model_path))
    issues = check_ops(model, profile)
    calibration = load_dataset(Path(options.calibration_path), model.inputs, role="calibration")
    heldout = load_dataset(Path(options.heldout_path), model.inputs, role="held-out")
    if heldout.count < options.golden_count:
        raise DatasetError(
            f"held-out data {options.heldout_path} has {heldout.count} sample(s); verification "
            f"and the {options.golden_count} golden pairs need at least {options.golden_count} "
            f"(a few hundred give a meaningful accuracy figure)"
        )
    if calibration.sha256 == heldout.sha256:
        raise CompileError(
            "the held-out data is the calibration data; verify on samples the quantizer "
            "never saw (a separate --heldout set)"
        )
    gate = Gate(
        max_top1_drop_points=profile.accuracy.max_top1_drop_points
        if options.max_top1_drop_points is None
        else options.max_top1_drop_points,
        min_snr_db=profile.accuracy.min_snr_db
        if options.min_snr_db is None
        else options.min_snr_db,
    )
    quant = (
        QuantConfig.for_profile(
            profile,
            calibration_method=options.calibration_method,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            exclude_nodes=options.exclude_nodes,
        )
        if precision == "int8"
        else None
    )
    threads = profile.runtime.threads
    notes = [f"{i.severity}: {i.node} ({i.op_type}): {i.reason}" for i in issues]

    with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as tmp:
        workdir = Path(tmp)
        progress.stage("optimizing the float graph")
        pre_path = workdir / "preprocessed.onnx"
        pre_opts = preprocess(model.serialized(), pre_path)
        float_runner = onnx_runner(model.serialized(), threads=threads)
        adv = progress.task("running the float model", heldout.count + calibration.count)
        float_held = run_all(float_runner, heldout.inputs, model.inputs, on_batch=adv)
        float_cal = run_all(float_runner, calibration.inputs, model.inputs, on_batch=adv)
        ctx = _Context(
            options=options,
            profile=profile,
            target=target,
            model=model,
            calibration=calibration,
            heldout=heldout,
            preprocessed=pre_path,
            workdir=workdir,
            gate=gate,
            threads=threads,
            float_held=float_held,
            progress=progress,
            notes=notes,
        )
        first = _try(
            ctx,
            precision,
            quant,
            f"{precision} (profile default)" if options.precision is None else precision,
        )
        sens: list[NodeSensitivity] = []
        attempts = [first.attempt]
        chosen = first
        if options.auto:
            chosen, attempts, sens = _auto(ctx, first, precision, quant)
        if options.sensitivity and not sens and quant is not None:
            qdq = first.artifact.local_path if first.artifact.precision == "int8" else None
            if qdq is not None:
                sens = _sensitivity(ctx, quant, qdq, options.sensitivity_mode)
        attempts = [
            Attempt(**{**_attempt_fields(a), "chosen": a is chosen.attempt}) for a in attempts
        ]
        if not chosen.gate.passed:
            progress.done()
            why = "; ".join(chosen.gate.reasons)
            tips = _advice(ctx, precision, quant) if not options.auto else []
            tried = (
                " --auto tried: "
                + "; ".join(f"{a.label}: {'pass' if a.passed else 'fail'}" for a in attempts)
                if options.auto
                else ""
            )
            raise GateRefusedError(
                f"the {chosen.artifact.precision} artifact for {profile.name} is outside the "
                f"accuracy budget: {why}. No bundle was written."
                + (f" Try: {'; '.join(tips)}." if tips else "")
                + tried,
                report=chosen.report,
            )

        artifact = chosen.artifact
        progress.stage("golden pairs, baseline sketches, host figures")
        # Noise between two implementations of the same artifact (optimized int8 kernels vs
        # the graph as written) sets the golden tolerance's floor.
        n_noise = min(heldout.count, 256)
        alt = ctx.target.runner(artifact, threads=1, optimized=False)
        alt_outs = run_all(alt, heldout.take(np.arange(n_noise)), model.inputs)
        noise = max(
            float(np.abs(a.astype(np.float64) - o[:n_noise]).max())
            for a, o in zip(alt_outs, chosen.outputs, strict=True)
        )
        golden = pick_golden(
            heldout.inputs,
            chosen.outputs,
            model.inputs,
            model.outputs,
            noise_abs=noise,
            count=options.golden_count,
        )
        baseline = build_baseline([calibration.inputs, heldout.inputs], [float_cal, float_held])
        host = _host_figures(ctx, artifact, options.latency_runs)
        manifest_host = dict(host)
        if reproducible:
            # Timings differ run to run (and the thread count host to host); a pinned
            # creation time asks for identical bytes.
            for k in (
                "float_latency_ms_median",
                "artifact_latency_ms_median",
                "latency_ratio",
                "latency_threads",
            ):
                manifest_host.pop(k, None)
            manifest_host["latency_note"] = (
                "host latency left out: reproducible build (created_at pinned)"
            )

        files = [
            BundleFile(path=artifact.bundle_path, data=artifact.local_path, role="artifact"),
            *(BundleFile(path=e.path, data=e.data, role=e.role) for e in artifact.extra_files),
            BundleFile(path=BASELINE_PATH, data=baseline_bytes(baseline), role="baseline"),
            BundleFile(path=GOLDEN_PATH, data=golden.data, role="golden"),
        ]
        task = "classification" if any(is_classifier_output(f) for f in float_held) else "other"
        calibration_map = _calibration_map(task, model.outputs, chosen.outputs, heldout.labels)
        if calibration_map is not None:
            files.append(
                BundleFile(
                    path=CALIBRATION_PATH, data=calibration_map.to_bytes(), role="calibration_map"
                )
            )
        lineage = {
            "source_model_file": Path(options.model_path).name,
            "source_model_sha256": model.sha256,
            "calibration_sha256": calibration.sha256,
            "calibration_samples": calibration.count,
            "heldout_sha256": heldout.sha256,
            "heldout_samples": heldout.count,
            "compiler": "edgefleet",
            "compiler_version": _versions()["edgefleet"],
            "versions": _versions(),
            "preprocess": pre_opts,
            "golden_indices": list(golden.indices),
            "golden_noise_abs": float(f"{noise:.4g}"),
            "options": {
                "profile": profile.name,
                "precision": precision if options.precision is None else options.precision,
                "calibration_method": options.calibration_method,
                "per_channel": options.per_channel,
                "reduce_range": options.reduce_range,
                "exclude_nodes": list(options.exclude_nodes),
                "auto": options.auto,
                "gate": gate.as_dict(),
                "expires_days": options.expires_days,
                "trt_max_batch": options.trt_max_batch,
                "golden_count": options.golden_count,
            },
            "attempts": [_attempt_json(a) for a in attempts] if options.auto else [],
        }
        manifest = make_manifest(
            name=name,
            version=options.model_version,
            description=options.description,
            profile=profile.name,
            created_at=created_at,
            expires_at=created_at + timedelta(days=options.expires_days),
            files=files,
            artifact=artifact,
            inputs=model.inputs,
            outputs=model.outputs,
            task=task,
            class_names=options.class_names,
            verification=chosen.report,
            baseline_path=BASELINE_PATH,
            golden=GoldenSpec(
                path=GOLDEN_PATH,
                count=len(golden.indices),
                atol=golden.atol,
                rtol=golden.rtol,
                min_top1_match=golden.min_top1_match,
            ),
            lineage=lineage,
            host_figures=manifest_host,
            key_ids=(key.keyid,),
        )
        progress.stage("signing and writing the bundle")
        out = Path(options.out_dir) / bundle_name(name, options.model_version, profile.name)
        sha = write_signed_bundle(out, manifest, [key], files)
    progress.done()
    return CompileResult(
        bundle_path=out,
        sha256=sha,
        size_bytes=out.stat().st_size,
        manifest=manifest,
        attempts=tuple(attempts),
        sensitivity=tuple(sens[: options.sensitivity_top]),
        op_issues=tuple(issues),
        host_figures=host,
        reproducible=reproducible,
        elapsed_s=time.perf_counter() - started,
    )


def _calibration_map(
    task: str, outputs: Any, artifact_outputs: list[np.ndarray], labels: np.ndarray | None
) -> CalibrationMap | None:
    """Temperature scaling of the artifact's first 2-D output on the labelled held-out set."""
    if task != "classification" or labels is None:
        return None
    for info, out in zip(outputs, artifact_outputs, strict=True):
        if out.ndim == 2 and out.shape[1] > 1 and len(out) == len(labels):
            return fit_calibration(info.name, out, labels)
    return None


def _attempt_fields(a: Attempt) -> dict[str, Any]:
    return {f: getattr(a, f) for f in Attempt.__dataclass_fields__}


def _host_figures(ctx: _Context, artifact: BuiltArtifact, runs: int) -> dict[str, Any]:
    float_bytes = ctx.model.size_bytes
    art_bytes = artifact.size_bytes
    figures: dict[str, Any] = {
        "float_bytes": float_bytes,
        "artifact_bytes": art_bytes,
        "size_ratio": round(art_bytes / float_bytes, 4) if float_bytes else None,
        "parameter_count": ctx.model.parameter_count,
        "threads": ctx.threads,
    }
    if runs > 0:
        # More threads than this host has cores (a 4-thread Jetson profile on a 2-core build
        # box) would measure oversubscription, not the model.
        threads = max(1, min(ctx.threads, _host_cores()))
        feed = ctx.heldout.take(np.arange(1))
        f_ms, a_ms, ratio = _paired_latency_ms(
            onnx_runner(ctx.model.serialized(), threads=threads),
            ctx.target.runner(artifact, threads=threads),
            feed,
            runs,
        )
        figures.update(
            {
                "latency_threads": threads,
                "latency_runs": runs,
                "latency_batch": 1,
                "float_latency_ms_median": f_ms,
                "artifact_latency_ms_median": a_ms,
                # median of per-pair ratios (runs interleaved), not a ratio of medians
                "latency_ratio": ratio,
                "latency_method": "interleaved float/artifact pairs",
            }
        )
    return figures


def _host_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
