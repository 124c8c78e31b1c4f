"""A run's context and its stages.

A `Stage` is a record: a name, the inputs that go into its hash, the files it writes and the
function that writes them. `execute` runs it unless the manifest holds a finished record with
the same input hash and every output exists, so a second identical command does nothing and
an interrupted one resumes (training stages also resume from their last checkpoint).
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from kdaudit import distributed
from kdaudit.config import RunConfig
from kdaudit.data import records as rec
from kdaudit.models import load_tokenizer
from kdaudit.store import Manifest, RunDir, stable_hash

Log = Callable[[str], None]


def versions() -> dict[str, str]:
    """The interpreter's and the main packages' versions, recorded with every run."""
    out = {"python": platform.python_version()}
    for pkg in ("kdaudit", "torch", "transformers", "accelerate", "opacus", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class RunContext:
    """One run: its config, run directory, manifest and the hashes of the stages run so far
    (a stage hashes its upstream stages' hashes, so a recomputed stage reruns its dependants)."""

    cfg: RunConfig
    log: Log = print
    hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not distributed.is_main():      # one process speaks for a launched run
            self.log = lambda _: None
        self.dir = RunDir(self.cfg.run_dir)
        self.dir.root.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.dir.manifest)
        self._tokenizer = None

    def record_config(self) -> None:
        if not distributed.is_main():
            return
        self.manifest.data.update(config=self.cfg.to_dict(), versions=versions(),
                                  seed=self.cfg.seed)
        self.manifest.save()

    @property
    def tokenizer(self):
        """The run's tokenizer (models/tokenizer), loaded once the tokenizer stage wrote it."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.dir.tokenizer)
        return self._tokenizer

    def forget_tokenizer(self) -> None:
        self._tokenizer = None

    def split(self, name: str) -> list[rec.Record]:
        return rec.read_jsonl(self.dir.data(name))


@dataclass
class Stage:
    name: str
    inputs: dict[str, Any]                       # hashed: a change reruns the stage
    outputs: list                                # paths; a missing one reruns the stage
    fn: Callable[[], dict[str, Any] | None]      # writes the outputs; returns manifest info
    every_process: bool = False                  # training, audits: every process runs fn


def execute(run: RunContext, stage: Stage) -> None:
    """Run `stage` unless it is done with the same inputs; record it in the manifest.

    Under a launcher, the main process alone writes the manifest and runs the stage (every
    process does, for a training or audit stage); the others wait, then read what it
    recorded, so every process holds the same stage hashes. Alone, every `distributed` call is a no-op."""
    name, h = stage.name, stable_hash(stage.inputs)
    main = distributed.is_main()
    if distributed.launched():
        distributed.barrier()
        run.manifest = Manifest(run.dir.manifest)      # as the main process left it
    if run.manifest.is_done(name, h) and all(p.exists() for p in stage.outputs):
        # downstream stages see this stage's inputs and when it ran, so a stage that is
        # recomputed (e.g. its outputs were deleted) makes everything after it rerun
        run.hashes[name] = stable_hash([h, run.manifest.stage(name).get("started")])
        run.log(f"[skip] {name}: done, inputs unchanged")
        return
    run.log(f"[run ] {name}")
    started = distributed.from_main(time.time())
    run.hashes[name] = stable_hash([h, started])
    if main:
        run.manifest.mark(name, status="running", input_hash=h, started=started)
    info: dict[str, Any] = {}
    try:
        if main or stage.every_process:
            info = stage.fn() or {}
    except BaseException as e:
        if main:
            run.manifest.mark(name, status="failed", input_hash=h, started=started,
                              error=f"{type(e).__name__}: {e}")
        raise
    distributed.barrier()
    if main:
        run.manifest.mark(name, status="done", input_hash=h, started=started,
                          seconds=round(time.time() - started, 2), **info)
    distributed.barrier()
