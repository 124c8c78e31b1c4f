"""kdaudit: privacy-risk auditing for knowledge distillation of language models.

    import kdaudit
    result = kdaudit.run(kdaudit.load_config("smoke"))       # the whole pipeline
    print(result.audit.summary())                            # model × signal AUC
    audit = kdaudit.audit_models({"teacher": "runs/smoke/models/teacher"},
                                 members=..., nonmembers=...)  # any HF causal LMs
    audit.write_report("my_report")

Names are imported on first use, so `import kdaudit` stays light.
"""
from __future__ import annotations

import importlib

from kdaudit import threads as _threads

_threads.configure()   # before anything imports torch: OpenMP reads its policy once

__version__ = "0.1.0"

_EXPORTS = {
    "run": "kdaudit.pipeline", "RunResult": "kdaudit.pipeline",
    "audit_models": "kdaudit.api", "report_run": "kdaudit.api",
    "train_student": "kdaudit.distil", "train_teacher": "kdaudit.distil",
    "train_private_student": "kdaudit.distil",
    "load_config": "kdaudit.config", "RunConfig": "kdaudit.config",
    "load_records": "kdaudit.data.records", "Record": "kdaudit.data.records",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdaudit' has no attribute {name!r}")
