"""ONNX -> per-profile artifact -> verified, signed bundle.

Public API (import from the submodules; this root stays cheap to import):
``compiler.pipeline.compile_model(CompileOptions(...)) -> CompileResult``,
``compiler.report.verification_table(report)``, ``compiler.target.register_target``.
"""

__all__: list[str] = []
