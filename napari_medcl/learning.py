"""Learning from corrections, without Qt and without torch: what the widget's learning panel does.

- :func:`add_to_training_set`: the image and its corrected labels into the corrections dataset
  (``napari_medcl.corrections.add_correction``), with one line saying what was written.
- :func:`plan_fine_tune` + :class:`FineTuneRun`: fine-tune the current model on the corrections folder in a
  subprocess (``python -m training.cli``, i.e. ``medcl-train``; napari never imports torch), then export it
  with ``medcl-export --verify`` and place it in ``<corrections>/finetuned/`` under a versioned name
  (``<model>-ft1``, ``-ft2``...). Progress comes from the run's ``train.log`` (one ``epoch i/N`` line per
  epoch); Cancel ends the subprocess, and no model appears: the exported file is written inside the run
  folder (atomically, by the exporter, after its verification) and moved into ``finetuned/`` by one rename
  only after the export succeeded. The subprocesses' output is kept in ``<run>/console.log``.
  When cases were held out and the new model carries the intensity consensus error map (carried from a bundled
  model, nothing fitted), ``medcl-calibrate`` then measures that map on the held-out cases before the model is
  placed, so that its figures are the new model's own.
- :func:`fine_tune_result`: the before/after line from the run's ``summary.json`` (held-out corrected cases,
  original validation cases; training.replay), and the error map's figures on the held-out cases.
- :func:`ranking_entries`: the *Which case next* list's lines.

Where things are: the corrections folder is chosen once and remembered in
``<config>/napari-medcl/learning.json`` (the folder ``server.json`` is in), read when the panel opens.
Inside it, besides the dataset (imagesTr, labelsTr, dataset.json, corrections/):
``finetuned/<name>.onnx`` (the models), ``finetuned/<name>.finetune.json`` (what each was fine-tuned from, so
that it can be fine-tuned again) and ``finetuned/runs/<name>/`` (the training run, its log and summary).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import MedclError

__all__ = [
    "FineTuneError",
    "FineTunePlan",
    "FineTuneRun",
    "Progress",
    "add_to_training_set",
    "fine_tune_result",
    "held_out_cases",
    "load_corrections_folder",
    "plan_fine_tune",
    "ranking_entries",
    "read_progress",
    "remember_corrections_folder",
    "versioned_name",
]

FINETUNED = "finetuned"
SIDECAR = ".finetune.json"
CONSOLE = "console.log"
# Below this many corrected cases none is held out: one case out of two would halve the training data.
MIN_CASES_TO_HOLD_OUT = 3
_VERSION = re.compile(r"^(?P<base>.+)-ft(?P<n>\d+)$")
_EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+): loss ")


class FineTuneError(MedclError, ValueError):
    """Fine-tuning cannot start or did not finish; one line saying why."""


# ------------------------------------------------------------------------------------------- settings


def settings_path() -> Path:
    """``<config>/napari-medcl/learning.json``, beside the widget's other remembered choices."""
    from napari_medcl.server_connection import settings_path as server_settings

    return server_settings().parent / "learning.json"


def load_corrections_folder(path: Path | None = None) -> Path | None:
    """The remembered corrections folder, or None (never chosen, or the file is unreadable)."""
    path = settings_path() if path is None else path
    try:
        folder = json.loads(path.read_text(encoding="utf-8"))["corrections_folder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(folder) if isinstance(folder, str) and folder else None


def remember_corrections_folder(folder: str | Path, path: Path | None = None) -> Path:
    from napari_medcl.atomic import write_text_atomic

    path = settings_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps({"corrections_folder": str(Path(folder).expanduser())}) + "\n")


# ------------------------------------------------------------------------------------ add to training set


def add_to_training_set(
    folder: str | Path,
    image: Any,
    labels: np.ndarray,
    *,
    model_labels: np.ndarray | None,
    provenance: Mapping[str, Any] | None,
) -> tuple[Any, str]:
    """Add ``image`` (a Volume) with its corrected ``labels`` to the corrections dataset at ``folder``;
    ``model_labels``: what the model last wrote into the labels layer (to tell the user's changes). Returns
    (AddedCase, the line the panel shows). CorrectionError (one line) for a user mistake."""
    from napari_medcl.corrections import CorrectionError, add_correction

    if model_labels is None:
        raise CorrectionError(
            "these labels were not made by a run of the model in this window, so what you changed is unknown: "
            "run the model on the image, correct its labels, then add them"
        )
    added = add_correction(
        folder, image, labels, model=dict(provenance or {}) or None, model_labels=model_labels
    )
    changed = added.record["changed"]
    unit, amount = (
        ("mL", changed.get("volume_ml")) if "volume_ml" in changed else ("cm2", changed.get("area_cm2"))
    )
    amount = f" ({amount:.3g} {unit})" if isinstance(amount, (int, float)) else ""
    count = len(_dataset_cases(Path(folder)))
    verb = "Replaced" if added.replaced else "Added"
    line = (
        f"{verb} {added.case_id} in {Path(folder)} ({count} corrected case(s)): "
        f"{int(changed['voxels']):,} voxel(s) changed{amount} from the model's labels."
    )
    return added, line


def _dataset_cases(folder: Path) -> list[str]:
    """Case ids that dataset.json lists, in the order they were (last) added (their records' time)."""
    from napari_medcl.corrections import FILE_ENDING, RECORDS_DIR

    try:
        meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    cases = []
    for entry in meta.get("training") or []:
        label = entry.get("label") if isinstance(entry, dict) else None
        if isinstance(label, str):
            cases.append(Path(label).name.removesuffix(FILE_ENDING))

    def added_at(case: str) -> str:
        try:
            return str(
                json.loads((folder / RECORDS_DIR / f"{case}.json").read_text(encoding="utf-8"))["added_at"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    return sorted(cases, key=lambda case: (added_at(case), case))


# -------------------------------------------------------------------------------------------- planning


def versioned_name(model_name: str, taken: Sequence[str]) -> str:
    """``<base>-ft<N>``: ``base`` is ``model_name`` without its own ``-ftN``; N one more than any taken."""
    match = _VERSION.match(model_name)
    base = match["base"] if match else model_name
    numbers = [int(m["n"]) for m in map(_VERSION.match, taken) if m and m["base"] == base]
    return f"{base}-ft{max(numbers, default=0) + 1}"


def held_out_cases(cases: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """(the corrected cases held out of training, a sentence about it): with 3 or more, the latest added
    fifth (at least one) is held out, so that the new model is scored on cases it never saw; with fewer,
    none, and the sentence says so."""
    n = len(cases)
    if n < MIN_CASES_TO_HOLD_OUT:
        return (), (
            f"Only {n} corrected case(s): too few to hold any out, so there is no before/after Dice on "
            f"corrected cases (add {MIN_CASES_TO_HOLD_OUT} or more)."
        )
    held = tuple(cases[-max(1, n // 5) :])
    return held, f"Holding out {', '.join(held)} (not trained on) to compare the models before and after."


@dataclass(frozen=True)
class FineTunePlan:
    """One fine-tuning: from ``source`` (the picker's choice) with ``init_from`` (a bundled name or a
    checkpoint) and the recipe ``config``, on ``corrections``, into ``run_dir``; the verified model ends as
    ``output`` named ``name``. ``val_cases``: the held-out corrected cases (``note`` says which, or why none).
    ``replay``: init.replay to pass (None: the recipe's, ``auto`` for bundled models)."""

    source: str
    name: str
    init_from: str
    config: Path
    corrections: Path
    run_dir: Path
    output: Path
    val_cases: tuple[str, ...]
    note: str
    replay: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sidecar(self) -> Path:
        return self.output.with_name(self.output.stem + SIDECAR)


def training_checkout() -> Path | None:
    """The folder that holds the ``training`` package (found without importing it), or None: not installed."""
    spec = importlib.util.find_spec("training")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def plan_fine_tune(
    model: str,
    corrections: str | Path,
    *,
    overrides: Sequence[str] = (),
    checkout: Path | None = None,
    models_dir: Path | None = None,
) -> FineTunePlan:
    """What fine-tuning ``model`` (a bundled name, or an .onnx fine-tuned here earlier) on ``corrections``
    will run. FineTuneError when it cannot: no cases, no training install, no weights for the model."""
    corrections = Path(corrections).expanduser().resolve()
    cases = _dataset_cases(corrections)
    if not cases:
        raise FineTuneError(f"{corrections} holds no corrected case yet: use 'Add to training set' first")
    checkout = training_checkout() if checkout is None else checkout
    if checkout is None or importlib.util.find_spec("torch") is None:
        raise FineTuneError(
            "fine-tuning needs the training tools: pip install 'napari-medcl[train,export]' in napari's environment"
        )
    init_from, config, replay, source_name = _model_source(model, checkout, models_dir)
    folder = corrections / FINETUNED
    taken = [p.name.removesuffix(".onnx") for p in folder.glob("*.onnx")]
    taken += [p.name for p in (folder / "runs").glob("*") if p.is_dir()]  # cancelled runs keep their name
    name = versioned_name(source_name, [*taken, source_name])  # always a newer version than the source
    val_cases, note = held_out_cases(cases)
    return FineTunePlan(
        source=model,
        name=name,
        init_from=init_from,
        config=config,
        corrections=corrections,
        run_dir=folder / "runs" / name,
        output=folder / f"{name}.onnx",
        val_cases=val_cases,
        note=note,
        replay=replay,
        overrides=tuple(overrides),
    )


def _model_source(model: str, checkout: Path, models_dir: Path | None) -> tuple[str, Path, str | None, str]:
    """(init_from, recipe config, init.replay or None, model name) for the picker's choice ``model``."""
    from napari_medcl.onnx_session import bundled_models

    bundled = {str(e.get("name")): e for e in bundled_models(models_dir)}
    if model in bundled:
        if not bundled[model].get("weights"):
            raise FineTuneError(f"the bundled model {model} ships no training weights to fine-tune")
        recipe = checkout / "training" / "configs" / f"finetune-{model}.yaml"
        if not recipe.is_file():
            raise FineTuneError(f"no fine-tuning recipe for {model} (training/configs/finetune-{model}.yaml)")
        return model, recipe, None, model
    path = Path(model)
    sidecar = path.with_name(path.stem + SIDECAR)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        checkpoint, config = Path(record["checkpoint"]), Path(record["config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FineTuneError(
            f"{path.name}: its training weights are unknown; only the bundled models and models fine-tuned "
            "here can be fine-tuned from napari (use medcl-train --init-from CHECKPOINT for others)"
        ) from None
    if not checkpoint.is_file() or not config.is_file():
        raise FineTuneError(f"{path.name}: its training run is gone ({checkpoint.parent})")
    replay = record.get("replay")
    return str(checkpoint), config, (str(replay) if replay else "null"), path.stem


def train_command(plan: FineTunePlan, python: str | None = None) -> list[str]:
    """The medcl-train command line of ``plan`` (run with the checkout as the working folder)."""
    sets = [
        f"data.root={plan.corrections}",
        f"output.dir={plan.run_dir}",
        f"data.val_cases={json.dumps(list(plan.val_cases))}",
        f"name={plan.name}",
    ]
    if plan.replay is not None:
        sets.append(f"init.replay={plan.replay}")
    command = [
        python or sys.executable,
        "-m",
        "training.cli",
        str(plan.config),
        "--init-from",
        plan.init_from,
    ]
    for item in (*sets, *plan.overrides):
        command += ["--set", item]
    return command


def export_command(plan: FineTunePlan, checkpoint: Path, python: str | None = None) -> list[str]:
    """medcl-export of the run's checkpoint into the run folder, verified before it is written."""
    return [
        python or sys.executable,
        "-m",
        "export.cli",
        str(checkpoint),
        "-o",
        str(plan.run_dir / f"{plan.name}.onnx"),
        "--verify",
        "--name",
        plan.name,
    ]


def measure_command(plan: FineTunePlan, model: Path, python: str | None = None) -> list[str] | None:
    """medcl-calibrate of the exported ``model`` that measures its carried intensity consensus on the held-out
    corrected cases (the model itself predicts them: it never trained on them), its profile kept; None when
    no case is held out or the model carries no consensus (nothing to measure)."""
    if not plan.val_cases:
        return None
    error_model = _error_map_of(model)
    if error_model is None or not error_model.is_consensus:
        return None
    command = [python or sys.executable, "-m", "export.calibrate", str(model), "-o", str(model)]
    command += ["--error-map", "consensus", "--intensity-weight", repr(error_model.intensity_weight)]
    for level, weight in error_model.verdict_weights.items():
        command += ["--verdict-weight", f"{level}={weight!r}"]
    for case in plan.val_cases:
        command += ["--error-case", str(model), str(plan.corrections), case]
    return command


# -------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    """Where a run is: ``epoch`` of ``epochs`` done (0 of None before the first), and its latest log line."""

    epoch: int
    epochs: int | None
    line: str

    @property
    def fraction(self) -> float:
        return 0.0 if not self.epochs else min(1.0, self.epoch / self.epochs)


def read_progress(run_dir: Path) -> Progress:
    """The progress of the run in ``run_dir`` from its train.log (partial last lines are ignored)."""
    try:
        text = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return Progress(0, None, "starting...")
    lines = text.splitlines()
    if not text.endswith("\n"):
        lines = lines[:-1]  # still being written
    lines = [line for line in lines if line.strip()]
    epoch, epochs = 0, None
    for line in lines:
        match = _EPOCH_LINE.search(line)
        if match:
            epoch, epochs = int(match[1]), int(match[2])
    last = lines[-1] if lines else "starting..."
    return Progress(epoch, epochs, _strip_stamp(last))


def _strip_stamp(line: str) -> str:
    parts = line.split(" ", 2)
    if len(parts) == 3 and re.fullmatch(r"\d{4}-\d\d-\d\d", parts[0]):
        return parts[2]
    return line


# ------------------------------------------------------------------------------------------------ run


class FineTuneRun:
    """Runs a :class:`FineTunePlan`: training, then export, then placement. Drive it with :meth:`poll`
    (from a timer on the GUI thread, or a loop in a script) until ``state`` is ``done``, ``failed`` or
    ``cancelled``; ``message`` says the outcome in one line."""

    def __init__(self, plan: FineTunePlan, *, cwd: Path | None = None, python: str | None = None):
        self.plan = plan
        self.cwd = cwd or training_checkout()
        self.python = python
        self.state = "new"
        self.message = ""
        self._process: subprocess.Popen | None = None
        self._console: Any = None

    @property
    def console_log(self) -> Path:
        return self.plan.run_dir / CONSOLE

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def start(self) -> None:
        self.plan.run_dir.mkdir(parents=True, exist_ok=True)
        self._console = open(self.console_log, "a", encoding="utf-8")  # noqa: SIM115 (closed when finished)
        self.state = "training"
        self._spawn(train_command(self.plan, self.python))

    def _spawn(self, command: list[str]) -> None:
        self._console.write("$ " + " ".join(command) + "\n")
        self._console.flush()
        self._process = subprocess.Popen(
            command,
            cwd=self.cwd,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # its own process group: Cancel ends it and whatever it started (DataLoader workers)
            start_new_session=os.name != "nt",
        )

    def progress(self) -> Progress:
        if self.state == "exporting":
            return Progress(1, 1, "exporting and verifying the model...")
        if self.state == "measuring":
            return Progress(1, 1, "measuring the error map on the held-out corrected case(s)...")
        if self.state == "done":
            return Progress(1, 1, self.message)
        return read_progress(self.plan.run_dir)

    def poll(self) -> str:
        """Advance when the current subprocess has ended; returns the state."""
        if self._process is None or self.finished:
            return self.state
        code = self._process.poll()
        if code is None:
            return self.state
        unmeasured = ""
        if code != 0 and self.state == "measuring":
            # the model trained and passed its verification: keep it, its map unmeasured, and say why
            unmeasured = " " + self._last_error(code)
        elif code != 0:
            return self._finish("failed", self._last_error(code))
        if self.state == "training":
            self.state = "exporting"
            self._spawn(export_command(self.plan, self._checkpoint(), self.python))
            return self.state
        if self.state == "exporting":
            try:
                measure = measure_command(self.plan, self._exported(), self.python)
            except (OSError, MedclError) as error:
                return self._finish("failed", f"the exported model cannot be read: {error}")
            if measure is not None:
                self.state = "measuring"
                self._spawn(measure)
                return self.state
        try:
            self._place()
        except OSError as error:
            return self._finish(
                "failed", f"the model could not be placed in {self.plan.output.parent}: {error}"
            )
        return self._finish("done", fine_tune_result(self.plan) + unmeasured)

    def wait(self, timeout_s: float = 600.0, interval_s: float = 0.2) -> str:
        import time

        deadline = time.monotonic() + timeout_s
        while not self.finished and time.monotonic() < deadline:
            self.poll()
            time.sleep(interval_s)
        return self.state

    def cancel(self) -> None:
        """End the running subprocess; the run's folder keeps its log, and no model is placed."""
        if self.finished:
            return
        process = self._process
        if process is not None and process.poll() is None:
            try:
                if os.name != "nt":
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.terminate()
                process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        self._finish("cancelled", "Fine-tuning cancelled; no model was added.")

    def _finish(self, state: str, message: str) -> str:
        self.state, self.message = state, message
        if self._console is not None:
            self._console.close()
            self._console = None
        return state

    def _exported(self) -> Path:
        return self.plan.run_dir / f"{self.plan.name}.onnx"

    def _checkpoint(self) -> Path:
        best = self.plan.run_dir / "checkpoint_best.pt"
        return best if best.is_file() else self.plan.run_dir / "checkpoint_last.pt"

    def _place(self) -> None:
        """The verified model into finetuned/, its record first: the .onnx appears by one rename, whole."""
        from napari_medcl.atomic import write_text_atomic

        exported = self._exported()
        summary = _summary(self.plan.run_dir)
        replay = (summary.get("start") or {}).get("replay") or summary.get("replay")
        record = {
            "name": self.plan.name,
            "fine_tuned_from": self.plan.source,
            "checkpoint": str(self._checkpoint()),
            "config": str(self.plan.run_dir / "config.yaml"),
            "corrections": str(self.plan.corrections),
            "held_out": list(self.plan.val_cases),
            "replay": replay["root"] if isinstance(replay, dict) else None,
            "summary": {k: v for k, v in summary.items() if k != "start"},
        }
        write_text_atomic(self.plan.sidecar, json.dumps(record, indent=2) + "\n")
        os.replace(exported, self.plan.output)

    def _last_error(self, code: int) -> str:
        if self.state == "measuring":
            return (
                f"The error map could not be measured on the held-out case(s): {self._last_line(code)} "
                f"(log: {self.console_log})"
            )
        what = "training" if self.state == "training" else "export"
        return f"Fine-tuning failed during {what}: {self._last_line(code)} (log: {self.console_log})"

    def _last_line(self, code: int) -> str:
        try:
            lines = self.console_log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or [f"exit status {code}"])[-1].strip()


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def fine_tune_result(plan: FineTunePlan) -> str:
    """The line the panel shows when a fine-tuning ends: the new model, and mean Dice before -> after on the
    held-out corrected cases and on the original validation cases."""
    summary = _summary(plan.run_dir)
    parts = [f"{plan.name} is in the model picker."]
    held = summary.get("held_out")
    if held and held.get("before") is not None and held.get("after") is not None:
        parts.append(
            f"Held-out corrected case(s) {', '.join(held.get('cases') or plan.val_cases)}: mean Dice "
            f"{held['before']:.3f} -> {held['after']:.3f} ({held['after'] - held['before']:+.3f})."
        )
    else:
        parts.append(plan.note)
    original = summary.get("original")
    if original and original.get("before") is not None and original.get("after") is not None:
        parts.append(
            f"Original validation case(s) ({len(original.get('cases') or [])}): mean Dice "
            f"{original['before']:.3f} -> {original['after']:.3f} ({original['after'] - original['before']:+.3f})."
        )
    else:
        parts.append("No original validation cases to check what the model may have lost (replay off).")
    parts.append(_error_map_line(plan.output))
    return " ".join(part for part in parts if part)


def _error_map_of(model: Path) -> Any:  # -> ErrorModel | None
    """The error map a model file's spec holds, read without starting a session (OSError, ModelError)."""
    from napari_medcl.onnx_session import check_model_bytes

    return check_model_bytes(model.read_bytes(), model).error_map_model


def _error_map_line(model: Path) -> str:
    """What the placed model's error map was measured at, in one sentence ('' without a map)."""
    try:
        error_model = _error_map_of(model)
    except (OSError, MedclError):
        return ""
    if error_model is None:
        return ""
    figures = error_model.figures
    if isinstance(figures.get("auroc"), (int, float)) and isinstance(figures.get("ece"), (int, float)):
        return (
            f"Error map on the held-out case(s): AUROC {figures['auroc']:.3f}, ECE {figures['ece']:.3f} "
            "(how well it finds the wrong voxels; 0.5 is chance)."
        )
    start = figures.get("start_model")
    if isinstance(start, Mapping):
        return f"Error map: carried from {start.get('name')}, not measured on this model."
    return "Error map: no figures recorded."


# ------------------------------------------------------------------------------------------- ranking


def ranking_entries(ranks: Sequence[Any]) -> list[str]:
    """One line per ranked case (napari_medcl.ranking.CaseRank), most informative first."""
    return [f"{r.rank}. {r.case}: {r.reason}" for r in ranks]
