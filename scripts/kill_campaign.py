"""SIGKILL campaigns: kill ``medcl-predict`` and ``medcl-train`` at random moments, then check what they left.

``python scripts/kill_campaign.py predict --trials 50`` and ``python scripts/kill_campaign.py train --trials 10``;
``predict --jobs 2`` kills the parent of two worker processes instead.

Predict: three NIfTI volumes and a tiny-patch pointwise ONNX model (so one run lasts a second or two). One
uninterrupted run is timed first; each trial then starts ``medcl-predict`` into a fresh folder, SIGKILLs it
after a delay drawn uniformly over that duration (seeded), and checks the folder: every file under a final
name (no leading dot) must read back completely (``read_image``, or ``json.load`` for sidecars), and every case
with a sidecar must have all the outputs it lists. Temporary files (leading dot) are allowed, since nothing can
remove them after SIGKILL, and are counted. A re-run into the same folder must then finish and complete every
case.

Train: a tiny 3D MSD dataset and a CPU config of a few epochs. Each trial SIGKILLs ``medcl-train`` at a random
moment, checks that the checkpoints under final names load, then ``--resume`` must finish with every epoch in
``metrics.jsonl``. When the kill came before the first checkpoint, ``--resume`` must refuse with "nothing to
resume" and a plain re-run must finish instead.

The functions are importable (``tests/scripts/test_kill_faults.py`` runs small campaigns); the exit status is 1 when
any check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the tests' helpers (tests/onnx_models.py, tests/dataset_factory.py)
    sys.path.insert(0, str(REPO))

OUTPUT_KINDS = ("labels", "uncertainty", "entropy", "top_class_error")
# Most of a short run is Python and torch starting; 12 epochs put most kills after the first checkpoint.
TRAIN_EPOCHS = 12


def _tool(name: str) -> str:
    """The console script beside this interpreter (the venv's), so children run the same installation."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: console script not found; install the project into this venv")
    return str(path)


def _run_killed(cmd: list[str], delay: float, log: Path, after: Path | None = None) -> tuple[bool, int]:
    """Start ``cmd``; SIGKILL it after ``delay`` s unless it ended first (with ``after``: ``delay`` s after that
    file first exists, so a kill meant for a later stage lands there however slowly the run starts). Returns
    (killed, exit code)."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        while after is not None and not after.exists() and proc.poll() is None:
            time.sleep(0.05)
        try:
            proc.wait(timeout=delay)
            return False, proc.returncode
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, proc.returncode


def _kill_during(
    cmd: list[str], delay: float, log: Path, clear: Sequence[Path], after: Path | None = None
) -> tuple[bool, int, float, int]:
    """Like _run_killed, but a run that finished before ``delay`` is undone (``clear`` removed) and run again
    with a delay 0.8 times shorter, up to 8 times, so that (nearly) every trial is a kill: one timed run is
    only an estimate of the next one's length. Returns (killed, exit code, final delay, runs that ended first).
    """
    ended_first = 0
    for _ in range(8):
        killed, code = _run_killed(cmd, delay, log, after)
        if killed or code != 0:
            break
        ended_first += 1
        for path in clear:
            shutil.rmtree(path, ignore_errors=True)
        delay *= 0.8
    return killed, code, delay, ended_first


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)


# ---- predict --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictSetup:
    inputs: tuple[Path, ...]
    model: Path
    jobs: int = 1  # --jobs: worker processes of the killed parent

    def command(self, out: Path) -> list[str]:
        jobs = ["--jobs", str(self.jobs)] if self.jobs > 1 else []
        return [
            _tool("medcl-predict"),
            *map(str, self.inputs),
            "-o",
            str(out),
            "--model",
            str(self.model),
            "--device",
            "cpu",
            "--quiet",
            *jobs,
        ]


@dataclass(frozen=True)
class FolderCheck:
    """What a folder holds after a run. ``truncated``: final-name files that do not read back (must be empty);
    ``incomplete``: cases whose sidecar lists an output that is missing or unreadable (must be empty);
    ``orphans``: final-name images of cases without a sidecar (a case killed mid-write; allowed)."""

    final_files: int
    truncated: tuple[str, ...]
    incomplete: tuple[str, ...]
    temp_files: int
    complete_cases: tuple[str, ...]
    orphans: int


def make_predict_setup(
    root: Path,
    *,
    n_cases: int = 3,
    shape: tuple[int, int, int] = (48, 64, 64),
    patch: int = 8,
    seed: int = 0,
    jobs: int = 1,
) -> PredictSetup:
    """``n_cases`` NIfTI volumes of ``shape`` (z, y, x) and a pointwise model with a ``patch``^3 window;
    ``jobs`` > 1 runs ``medcl-predict --jobs jobs``."""
    import numpy as np

    from napari_medcl.io import write_image
    from napari_medcl.volume import Volume
    from tests.onnx_models import pointwise_model, save

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(n_cases):
        array = rng.random(shape, dtype=np.float32)
        volume = Volume(array, spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
        inputs.append(write_image(volume, root / f"case{i}.nii.gz"))
    model = save(pointwise_model(spatial_dims=3, patch=(patch,) * 3), root / "model.onnx")
    return PredictSetup(tuple(inputs), model, jobs)


def _case_locks_freed(out: Path, timeout: float) -> bool:
    """Wait until no process holds a case lock in ``out`` (a killed parent's workers have stopped)."""
    from napari_medcl.cohort import busy_cases

    deadline = time.monotonic() + timeout
    while busy_cases(out):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def check_predict_folder(out: Path) -> FolderCheck:
    """Read back every file under a final name in ``out``; see FolderCheck."""
    from napari_medcl.atomic import is_temp_name
    from napari_medcl.io import read_image

    truncated, incomplete, complete = [], [], []
    final = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    temps = sum(1 for p in out.iterdir() if is_temp_name(p.name))
    readable: set[str] = set()
    sidecars: dict[str, dict] = {}
    for path in final:
        try:
            if path.suffix == ".json":
                sidecars[path.stem] = json.loads(path.read_text(encoding="utf-8"))
            else:
                read_image(path)
            readable.add(path.name)
        except Exception as error:  # any failure to read back means a damaged file under a final name
            truncated.append(f"{path.name}: {type(error).__name__}: {error}")
    for case, sidecar in sidecars.items():
        outputs = sidecar.get("outputs", {})
        names = [outputs.get(kind) for kind in OUTPUT_KINDS]
        if None in names or not all(name in readable for name in names):
            incomplete.append(f"{case}: sidecar lists {outputs}, readable: {sorted(readable)}")
        else:
            complete.append(case)
    owned = {name for case in complete for name in (f"{case}.json", *sidecars[case]["outputs"].values())}
    orphans = sum(1 for p in final if p.name not in owned and p.suffix != ".json")
    return FolderCheck(
        len(final), tuple(truncated), tuple(incomplete), temps, tuple(sorted(complete)), orphans
    )


@dataclass
class PredictSummary:
    trials: int = 0
    kills: int = 0
    truncated: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    temp_files: int = 0
    orphans: int = 0
    complete_at_kill: int = 0
    reruns_ok: int = 0
    failures: list[str] = field(default_factory=list)
    run_seconds: float = 0.0
    ended_first: int = 0  # runs that finished before their kill and were redone

    @property
    def ok(self) -> bool:
        return not (self.truncated or self.incomplete or self.failures) and self.reruns_ok == self.trials

    def line(self) -> str:
        return (
            f"predict: {self.trials} trials, {self.kills} kills (run {self.run_seconds:.2f} s; "
            f"{self.ended_first} runs ended before the kill and were redone earlier), "
            f"truncated files {len(self.truncated)}, incomplete cases {len(self.incomplete)}, "
            f"temp files left {self.temp_files}, orphan outputs {self.orphans}, "
            f"cases complete at kill {self.complete_at_kill}, re-runs finished {self.reruns_ok}/{self.trials}"
        )


def run_predict_campaign(
    work: Path,
    trials: int,
    *,
    seed: int = 0,
    fractions: Sequence[float] | None = None,
    verbose: bool = False,
    jobs: int = 1,
) -> PredictSummary:
    """``trials`` killed ``medcl-predict`` runs under ``work``, each checked and then re-run to completion.

    Kill delays: uniform over the timed run (seeded), or ``fractions`` of it when given (one per trial).
    ``jobs`` > 1: the parent of ``--jobs`` workers is killed; its workers must then stop by themselves (their
    case locks must be free within 60 s) before the folder is checked."""
    setup = make_predict_setup(work / "inputs", jobs=jobs)
    summary = PredictSummary()
    n_cases = len(setup.inputs)
    start = time.perf_counter()
    reference = _run(setup.command(work / "reference"))
    summary.run_seconds = time.perf_counter() - start
    if reference.returncode != 0:
        raise RuntimeError(f"the uninterrupted medcl-predict run failed:\n{reference.stderr}")
    if fractions is not None and len(fractions) != trials:
        raise ValueError(f"{len(fractions)} kill fractions for {trials} trials")
    rng = random.Random(seed)
    for trial in range(trials):
        out = work / f"trial{trial:03d}"
        delay = summary.run_seconds * (fractions[trial] if fractions else rng.random())
        killed, code, delay, ended_first = _kill_during(
            setup.command(out), delay, work / f"trial{trial:03d}.log", [out]
        )
        summary.ended_first += ended_first
        summary.trials += 1
        summary.kills += killed
        if not killed and code != 0:
            summary.failures.append(f"trial {trial}: exited {code} without a kill")
        if not _case_locks_freed(out, timeout=60.0):
            summary.failures.append(f"trial {trial}: a case lock was still held 60 s after the kill")
        check = check_predict_folder(out) if out.is_dir() else FolderCheck(0, (), (), 0, (), 0)
        summary.truncated += [f"trial {trial} ({delay:.2f} s): {t}" for t in check.truncated]
        summary.incomplete += [f"trial {trial} ({delay:.2f} s): {t}" for t in check.incomplete]
        summary.temp_files += check.temp_files
        summary.orphans += check.orphans
        summary.complete_at_kill += len(check.complete_cases)
        rerun = _run(setup.command(out))
        after = check_predict_folder(out)
        summary.truncated += [f"trial {trial} re-run: {t}" for t in after.truncated]
        if rerun.returncode == 0 and len(after.complete_cases) == n_cases and not after.truncated:
            summary.reruns_ok += 1
        else:
            summary.failures.append(
                f"trial {trial}: re-run exited {rerun.returncode} with {len(after.complete_cases)} of {n_cases} "
                f"cases complete: {rerun.stderr.strip()[-300:]}"
            )
        if verbose:
            print(
                f"  trial {trial}: kill at {delay:.2f} s ({'killed' if killed else 'had ended'}), "
                f"{check.final_files} final files, {len(check.complete_cases)} cases complete, "
                f"{check.temp_files} temp, {check.orphans} orphans",
                flush=True,
            )
    return summary


# ---- train ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSetup:
    config: Path
    overrides: tuple[str, ...]
    epochs: int

    def command(self, out: Path, cache: Path, *, resume: bool = False) -> list[str]:
        cmd = [_tool("medcl-train"), str(self.config)]
        for item in (*self.overrides, f"output.dir={out}", f"data.cache_dir={cache}"):
            cmd += ["--set", item]
        return [*cmd, "--resume"] if resume else cmd


def make_train_setup(root: Path, *, epochs: int = TRAIN_EPOCHS) -> TrainSetup:
    """A 4-case 3D MSD dataset and a small CPU config (3D U-Net + UAFR + PDCR, 2 iterations per epoch)."""
    from tests.dataset_factory import make_msd_dataset

    data = make_msd_dataset(root / "Task99_Tiny", n_cases=4, shape=(12, 20, 18))
    config = root / "run.yaml"
    config.write_text(
        f"data: {{root: {data}, val_fraction: 0.25, crop_nonzero: false}}\n"
        "model:\n  features: [8, 16, 32]\n  uafr: {enabled: true}\n"
        "loss:\n  pdcr: {enabled: true, mode: rf, layers: {encoder2: 16, encoder3: 8},"
        " cross_pairs: [[encoder2, encoder3]], cross_samples: 8}\n"
        "train: {patch_size: [8, 16, 16]}\n",
        encoding="utf-8",
    )
    overrides = (
        "data.num_workers=0",
        "data.augmentation.enabled=false",
        "train.device=cpu",
        f"train.epochs={epochs}",
        "train.iterations_per_epoch=2",
        "train.batch_size=2",
    )
    return TrainSetup(config, overrides, epochs)


def check_train_folder(out: Path) -> tuple[list[str], int]:
    """Load every checkpoint and config under a final name; returns (damaged files, temp files)."""
    import yaml

    from training.checkpoint import load_checkpoint

    damaged = []
    if not out.is_dir():
        return damaged, 0
    for path in sorted(out.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            if path.suffix == ".pt":
                load_checkpoint(path)
            elif path.suffix == ".yaml" and not isinstance(
                yaml.safe_load(path.read_text(encoding="utf-8")), dict
            ):
                raise ValueError("not a mapping")
        except Exception as error:  # a checkpoint or config that does not load is damaged
            damaged.append(f"{path.name}: {type(error).__name__}: {error}")
    from napari_medcl.atomic import is_temp_name

    return damaged, sum(1 for p in out.iterdir() if is_temp_name(p.name))


@dataclass
class TrainSummary:
    trials: int = 0
    kills: int = 0
    damaged: list[str] = field(default_factory=list)
    temp_files: int = 0
    before_first_checkpoint: int = 0
    resumes_ok: int = 0
    reruns_ok: int = 0
    failures: list[str] = field(default_factory=list)
    run_seconds: float = 0.0
    ended_first: int = 0  # runs that finished before their kill and were redone

    @property
    def ok(self) -> bool:
        done = self.resumes_ok + self.reruns_ok
        return not (self.damaged or self.failures) and done == self.trials

    def line(self) -> str:
        return (
            f"train: {self.trials} trials, {self.kills} kills (run {self.run_seconds:.2f} s; "
            f"{self.ended_first} runs ended before the kill and were redone earlier), "
            f"truncated files {len(self.damaged)}, temp files left {self.temp_files}, "
            f"killed before the first checkpoint {self.before_first_checkpoint} (re-runs finished "
            f"{self.reruns_ok}), resumes finished {self.resumes_ok}/{self.trials - self.before_first_checkpoint}"
        )


def _finished_run(out: Path, epochs: int) -> str | None:
    """None when ``out`` holds a finished run of ``epochs`` epochs, else what is wrong."""
    from training.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(out / "checkpoint_last.pt")
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        logged = [json.loads(line)["epoch"] for line in lines]
    except Exception as error:  # the finished run's files must all load
        return f"{type(error).__name__}: {error}"
    if state["epoch"] != epochs or logged != list(range(1, epochs + 1)):
        return f"checkpoint epoch {state['epoch']}, metrics epochs {logged}, expected {epochs}"
    return None


def run_train_campaign(
    work: Path,
    trials: int,
    *,
    seed: int = 0,
    fractions: Sequence[float] | None = None,
    after_checkpoint: Sequence[bool] | None = None,
    epochs: int = TRAIN_EPOCHS,
    verbose: bool = False,
) -> TrainSummary:
    """``trials`` killed ``medcl-train`` runs under ``work``, each resumed (or re-run) to completion.

    Kill delays: uniform over the timed run (seeded), or ``fractions`` of it when given (one per trial);
    counted from the start, or for a trial whose ``after_checkpoint`` entry is true from the moment its first
    ``checkpoint_last.pt`` appears (a kill meant to hit a resumable run, whatever the machine's load)."""
    setup = make_train_setup(work / "setup", epochs=epochs)
    summary = TrainSummary()
    start = time.perf_counter()
    reference = _run(setup.command(work / "reference", work / "reference-cache"))
    summary.run_seconds = time.perf_counter() - start
    if reference.returncode != 0:
        raise RuntimeError(f"the uninterrupted medcl-train run failed:\n{reference.stdout}{reference.stderr}")
    if fractions is not None and len(fractions) != trials:
        raise ValueError(f"{len(fractions)} kill fractions for {trials} trials")
    if after_checkpoint is not None and len(after_checkpoint) != trials:
        raise ValueError(f"{len(after_checkpoint)} after_checkpoint entries for {trials} trials")
    rng = random.Random(seed)
    for trial in range(trials):
        out, cache = work / f"trial{trial:03d}", work / f"cache{trial:03d}"
        delay = summary.run_seconds * (fractions[trial] if fractions else rng.random())
        after = out / "checkpoint_last.pt" if after_checkpoint and after_checkpoint[trial] else None
        killed, code, delay, ended_first = _kill_during(
            setup.command(out, cache), delay, work / f"trial{trial:03d}.log", [out, cache], after
        )
        summary.ended_first += ended_first
        summary.trials += 1
        summary.kills += killed
        damaged, temps = check_train_folder(out)
        summary.damaged += [f"trial {trial} ({delay:.2f} s): {d}" for d in damaged]
        summary.temp_files += temps
        note = ""
        if not killed:
            note = "had ended"
            problem = _finished_run(out, setup.epochs) if code == 0 else f"exited {code} without a kill"
            if problem:
                summary.failures.append(f"trial {trial}: {problem}")
            else:
                summary.resumes_ok += 1  # nothing to resume: the run itself finished
        elif not (out / "checkpoint_last.pt").is_file():
            note = "before the first checkpoint"
            summary.before_first_checkpoint += 1
            resume = _run(setup.command(out, cache, resume=True))
            if resume.returncode == 0 or "nothing to resume" not in resume.stderr:
                summary.failures.append(
                    f"trial {trial}: resume without a checkpoint exited {resume.returncode}: "
                    f"{resume.stderr.strip()[-300:]}"
                )
            rerun = _run(setup.command(out, cache))
            problem = (
                _finished_run(out, setup.epochs) if rerun.returncode == 0 else rerun.stderr.strip()[-300:]
            )
            if problem:
                summary.failures.append(f"trial {trial}: plain re-run: {problem}")
            else:
                summary.reruns_ok += 1
        else:
            from training.checkpoint import load_checkpoint

            epoch = load_checkpoint(out / "checkpoint_last.pt")["epoch"]
            note = f"after epoch {epoch}"
            resume = _run(setup.command(out, cache, resume=True))
            if epoch >= setup.epochs:
                # killed after the last checkpoint: resume must say the run is finished, and it is
                if resume.returncode == 0 or "already finished" not in resume.stderr:
                    problem = f"resume of a finished run exited {resume.returncode}: {resume.stderr[-300:]}"
                else:
                    problem = _finished_run_checkpoint_only(out, setup.epochs)
            else:
                problem = (
                    _finished_run(out, setup.epochs)
                    if resume.returncode == 0
                    else f"resume exited {resume.returncode}: {resume.stderr.strip()[-300:]}"
                )
            if problem:
                summary.failures.append(f"trial {trial}: {problem}")
            else:
                summary.resumes_ok += 1
        damaged, _ = check_train_folder(out)
        summary.damaged += [f"trial {trial} after resume: {d}" for d in damaged]
        if verbose:
            print(f"  trial {trial}: kill at {delay:.2f} s ({note}), {temps} temp files", flush=True)
    return summary


def _finished_run_checkpoint_only(out: Path, epochs: int) -> str | None:
    """A kill after the last checkpoint may precede metrics.jsonl's last write; the checkpoint must be final."""
    from training.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoint_last.pt")
    return None if state["epoch"] == epochs else f"last checkpoint at epoch {state['epoch']}, not {epochs}"


# ---- command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaign", choices=("predict", "train"))
    parser.add_argument("--trials", type=int, default=None, help="default: 50 (predict), 10 (train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the runs (default: a temp folder)"
    )
    parser.add_argument("--verbose", action="store_true", help="one line per trial")
    parser.add_argument(
        "--jobs", type=int, default=1, help="predict: kill the parent of medcl-predict --jobs JOBS workers"
    )
    args = parser.parse_args(argv)
    trials = args.trials or (50 if args.campaign == "predict" else 10)
    with tempfile.TemporaryDirectory(prefix=f"medcl-kill-{args.campaign}-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if args.campaign == "predict":
            summary = run_predict_campaign(work, trials, seed=args.seed, verbose=args.verbose, jobs=args.jobs)
            problems = summary.truncated + summary.incomplete + summary.failures
        else:
            summary = run_train_campaign(work, trials, seed=args.seed, verbose=args.verbose)
            problems = summary.damaged + summary.failures
        for problem in problems:
            print(f"FAIL {problem}")
        print(f"{summary.line()}; {time.perf_counter() - start:.0f} s in all")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
