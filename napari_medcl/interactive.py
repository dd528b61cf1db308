"""One case, segmented and corrected with prompts: the interactive session behind the widget and the API.

``open_session(volume, model)`` holds the image, the model and what the model said about the image (its
class probabilities and error likelihood, kept from the last prediction), the labels as they stand, and the
prompts so far. ``add_prompt`` re-segments a small box around the prompt with an engine and returns what
changed as one ``Update``: engine (a), any exported model, ``napari_medcl.refinement.LocalRefiner``; engine
(b), a model with prompt channels, ``napari_medcl.network_refiner.NetworkRefiner`` (the network is given
every point and scribble so far and the labels as they stand). ``engine`` "network" takes (b) (the model must
offer it); "auto" and "local" take (a), which gained more per click than the bundled prompt model on the
held-out block; box prompts always go to (a);
``undo`` takes the last step back; ``predict`` re-runs the model and replays the prompts onto its new output,
so a re-run never forgets a correction. ``next_region`` says where the model expects the most mistakes that no
prompt has touched yet. No Qt and no torch: the widget and the inference server drive the same object.

Coordinates are voxel indices of the image's grid; a 2D image is a depth-1 volume inside, and ``labels``
has the image's own spatial shape.

    >>> session = open_session(volume, "brain-tissue-3d")
    >>> session.predict()
    >>> update = session.add_prompt(point(12, 80, 64, label=3))
    >>> session.labels[update.box]; session.undo()
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import UsageError
from napari_medcl.prediction import Progress, predict_iter
from napari_medcl.prompts import Prompt, load_prompts, prompts_path, save_prompts
from napari_medcl.refinement import LocalProblem, LocalRefiner
from napari_medcl.review import RegionScore
from napari_medcl.session import InferenceSession
from napari_medcl.volume import Prediction, Volume

Box = tuple[slice, slice, slice]
# auto: the engine measured best, today the local refiner (engine (a)) for every model; network: engine (b)
ENGINES = ("auto", "local", "network")


@dataclass(frozen=True)
class Update:
    """What one step changed: ``box`` (Z, Y, X slices of the 3D grid; None when nothing changed) holds every
    changed voxel, ``labels`` the labels there now; ``changed`` voxels; ``seconds`` it took; ``prompt`` the
    prompt answered (None for an undo)."""

    box: Box | None
    labels: np.ndarray | None
    changed: int
    seconds: float
    prompt: Prompt | None = None
    engine: str | None = None  # which engine answered the prompt: "local" (a) or "network" (b)

    def image_box(self, spatial_dims: int) -> tuple[slice, ...] | None:
        """``box`` on the image's own grid (the depth axis dropped for a 2D image)."""
        if self.box is None:
            return None
        return self.box if spatial_dims == 3 else self.box[1:]


@dataclass
class _Step:
    box: Box
    before: np.ndarray
    prompts_before: int


class CaseSession:
    """See the module's text. Build it with ``open_session``."""

    def __init__(
        self,
        volume: Volume,
        model: InferenceSession | str | Path | None = None,
        *,
        refiner: LocalRefiner | None = None,
        engine: str = "auto",
        network_options: dict[str, Any] | None = None,
        **predict_options: Any,
    ):
        if not isinstance(volume, Volume):
            raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
        if engine not in ENGINES:
            raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.volume = volume
        self.model = model
        self.refiner = refiner or LocalRefiner()
        self.engine_choice = engine
        self.network_options = dict(network_options or {})  # NetworkRefiner's margin_mm and keep
        self._network: Any = None  # NetworkRefiner, made when the model is first needed (_resolve_engine)
        self._whole: np.ndarray | None = None  # the image as float32, for the network engine only
        self.predict_options = dict(predict_options)
        self.predict_options.pop("return_probabilities", None)
        spacing = tuple(float(s) for s in volume.spacing)
        self.spacing: tuple[float, float, float] = (1.0, *spacing) if volume.spatial_dims == 2 else spacing
        shape = tuple(int(n) for n in volume.spatial_shape)
        self.grid: tuple[int, int, int] = shape if len(shape) == 3 else (1, *shape)  # type: ignore[assignment]
        self.prediction: Prediction | None = None
        self._probabilities: np.ndarray | None = None
        self._error: np.ndarray | None = None
        self._labels = np.zeros(self.grid, dtype=np.uint8)
        self.prompts: list[Prompt] = []
        self._steps: list[_Step] = []
        self._last_changed = 0

    # ------------------------------------------------------------------ the model

    def predict_iter(
        self, *, cancel: Any = None, region: Any = None, **options: Any
    ) -> Iterator[Progress | Prediction]:
        """Run the model (whole image, or ``region`` as ``predict_iter`` takes it), yield its Progress and then
        its Prediction; the session keeps its probabilities and error likelihood, takes its labels (inside the
        region only) and replays every prompt onto them. The model's own labels stay in the Prediction.
        ``options``: ``predict_iter``'s, over those the session was opened with (this run only); the
        Prediction always carries the probabilities."""
        options = {**self.predict_options, **options}
        options.pop("return_probabilities", None)
        self._resolve_engine()
        result: Any = None
        for result in predict_iter(
            self.volume, self.model, return_probabilities=True, cancel=cancel, region=region, **options
        ):
            if isinstance(result, Progress):
                yield result
        self.take(result)
        yield result

    def take(self, prediction: Prediction) -> None:
        """Adopt a prediction of this image made with ``return_probabilities=True`` (the widget's run makes
        one): its probabilities and error likelihood, and its labels inside the region it covers (its
        provenance's ``roi``; all of the image when none), then replay every prompt onto them."""
        if prediction.probabilities is None:
            raise UsageError(
                "the prediction has no class probabilities: run it with return_probabilities=True"
            )
        probabilities = self._on_grid(prediction.probabilities.array, channels=True)
        error_map = prediction.error_map  # the calibrated error likelihood when the model has one
        error = prediction.entropy if error_map is None else error_map[1]
        labels = self._on_grid(prediction.labels.array)
        if probabilities.shape[1:] != self.grid:
            raise UsageError(
                f"a prediction of shape {probabilities.shape[1:]} does not fit the image {self.grid}"
            )
        inside = self._region_box(prediction)
        if self._probabilities is None:
            self._probabilities = np.zeros_like(probabilities)
            self._probabilities[0] = 1.0
            self._error = np.zeros(self.grid, dtype=np.float32)
            self._labels = np.zeros(self.grid, dtype=labels.dtype)
        self._probabilities[(slice(None), *inside)] = probabilities[(slice(None), *inside)]
        self._error[inside] = self._on_grid(error.array)[inside]
        self._labels[inside] = labels[inside]
        self.prediction = prediction
        for prompt in self.prompts:
            self._apply(prompt)
        self._steps.clear()  # a re-run starts a new history: its replayed prompts are not steps to undo

    @property
    def engine(self) -> str:
        """The engine that answers point and scribble prompts: "network" or "local" (box prompts: always
        "local", the networks are not trained with boxes)."""
        return "network" if self._resolve_engine() is not None else "local"

    def set_engine(self, engine: str) -> None:
        """Answer the next prompts with ``engine`` (auto, local or network)."""
        if engine not in ENGINES:
            raise UsageError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.engine_choice = engine
        self._network = None

    def _resolve_engine(self) -> Any:
        """The NetworkRefiner when the engine is the network, else None; loads the
        model once (a name or path) so that predictions and prompts share it."""
        if self.engine_choice in ("local", "auto"):
            # auto answers with engine (a) for now: on the held-out block the bundled prompt model gained less
            # per click than engine (a) (perturbed, 20 oracle clicks: +0.004 against +0.037 mean Dice;
            # docs/benchmarks.md, "Interactive correction"); the network is used when asked for
            return None
        if self._network is None:
            from napari_medcl.network_refiner import NetworkRefiner
            from napari_medcl.onnx_session import open_session as open_model

            if not isinstance(self.model, InferenceSession):
                options = {
                    k: self.predict_options[k]
                    for k in ("device", "backend", "precision")
                    if k in self.predict_options
                }
                self.model = open_model(self.model, **options)
            if self.model.spec.prompts is None:
                if self.engine_choice == "network":
                    raise UsageError(
                        f"engine 'network' needs a model with prompt channels; {self.model.spec.name!r} has "
                        "none (use engine 'local' or 'auto')"
                    )
                self._network = False
            else:
                options = {
                    k: v for k, v in self.predict_options.items() if k in ("overlap", "tta", "batch_size")
                }
                self._network = NetworkRefiner(self.model, **options, **self.network_options)
        return self._network or None

    def predict(self, **options: Any) -> Prediction:
        """``predict_iter`` run to its end; returns the Prediction."""
        result: Any = None
        for result in self.predict_iter(**options):  # noqa: B007  (the last item is the result)
            pass
        return result

    # ------------------------------------------------------------------ prompts

    @property
    def labels(self) -> np.ndarray:
        """The labels as they stand, on the image's spatial grid (a view: do not write; use ``set_labels``)."""
        return labels_view(self._labels, self.volume.spatial_dims)

    def set_labels(self, labels: np.ndarray) -> Update:
        """Take the user's own edits (a brush, an eraser): ``labels`` on the image's spatial grid. One step
        that ``undo`` takes back."""
        labels = self._on_grid(np.asarray(labels))
        if labels.shape != self.grid:
            raise UsageError(f"labels of shape {labels.shape} do not fit the image's grid {self.grid}")
        return self.edit_labels(tuple(slice(0, n) for n in self.grid), labels)  # type: ignore[arg-type]

    def edit_labels(self, box: Box, labels: np.ndarray) -> Update:
        """``set_labels`` for the part ``box`` (Z, Y, X slices of the 3D grid) only: ``labels`` of the box's
        shape. What a remote client sends for a brush stroke: the box it touched, not the whole map."""
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, self.grid))  # type: ignore[assignment]
        labels = np.asarray(labels)
        if labels.shape != tuple(s.stop - s.start for s in box):
            raise UsageError(f"labels of shape {labels.shape} do not fill the box {_describe(box)}")
        changed = labels != self._labels[box]
        inner = bounding_box(changed)
        if inner is None:
            return Update(None, None, 0, 0.0)
        tight = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner))
        self._steps.append(_Step(tight, self._labels[tight].copy(), len(self.prompts)))  # type: ignore[arg-type]
        self._labels[tight] = labels[inner].astype(self._labels.dtype)
        return Update(tight, self._labels[tight].copy(), int(changed.sum()), 0.0)  # type: ignore[arg-type]

    def add_prompt(self, prompt: Prompt) -> Update:
        """Answer one prompt (voxel indices of the image's grid: (z, y, x), z = 0 for a 2D image); one step."""
        self._need_prediction()
        prompt.check_inside(self.grid)
        num_classes = self._probabilities.shape[0]
        if prompt.label >= num_classes:
            raise UsageError(f"class {prompt.label} is not one of the model's classes (0..{num_classes - 1})")
        start = time.perf_counter()
        steps_before = len(self._steps)
        box, changed = self._apply(prompt)
        self.prompts.append(prompt)
        if len(self._steps) == steps_before:  # nothing changed: still a step, so undo removes the prompt
            self._steps.append(_Step(box, self._labels[box].copy(), len(self.prompts) - 1))
        seconds = time.perf_counter() - start
        engine = self._engine_for(prompt)
        if changed is None:
            return Update(None, None, 0, seconds, prompt, engine)
        return Update(changed, self._labels[changed].copy(), int(self._last_changed), seconds, prompt, engine)

    def undo(self) -> Update:
        """Take the last step back (a prompt or a ``set_labels``); an Update with ``changed`` 0 when there is
        nothing to undo."""
        if not self._steps:
            return Update(None, None, 0, 0.0)
        step = self._steps.pop()
        now = self._labels[step.box]
        changed = int(np.count_nonzero(now != step.before))
        self._labels[step.box] = step.before
        del self.prompts[step.prompts_before :]
        return Update(step.box, step.before.copy(), changed, 0.0)

    def next_region(self, *, window_mm: float | None = None) -> RegionScore | None:
        """Where the model expects the most mistakes that no prompt has touched: the window (a cube of
        ``window_mm`` per side; default the size of a prompt's box) holding the largest sum of the error
        likelihood, with the voxels of every prompt's box left out. Its ``box`` (the window, on the 3D grid),
        ``center`` (the voxel in it most likely wrong, with its neighbours) and ``score`` (the expected number of wrong voxels in it). None
        when nothing is left."""
        from scipy import ndimage

        self._need_prediction()
        error = self._error.astype(np.float64)
        for prompt in self.prompts:
            error[self._box_for(prompt)] = 0.0
        side = window_mm if window_mm is not None else 2.0 * self.refiner.margin_mm()
        size = [max(1, min(n, int(round(side / s)) | 1)) for s, n in zip(self.spacing, self.grid)]
        mean = ndimage.uniform_filter(error, size=size, mode="constant")
        best = np.unravel_index(int(mean.argmax()), mean.shape)
        score = float(mean[best]) * float(np.prod(size))
        if score <= 0.0:
            return None
        box = tuple(
            slice(max(0, c - k // 2), min(n, c + k // 2 + 1)) for c, k, n in zip(best, size, self.grid)
        )
        # the centre to show: the voxel of the window whose 3-voxel neighbourhood is the likeliest wrong
        local = ndimage.uniform_filter(error[box], size=[min(3, k) for k in size], mode="constant")
        peak = np.unravel_index(int(local.argmax()), local.shape)
        return RegionScore(
            box=box,
            center=tuple(float(b.start + p) for b, p in zip(box, peak)),
            score=score,
            expected_wrong_mm=score * float(np.prod(self.spacing)),
            voxels=int(np.prod([b.stop - b.start for b in box])),
            labelled_voxels=int(np.count_nonzero(self._labels[box])),
        )

    # ------------------------------------------------------------------ files

    def save_prompts(self, labels_path: str | Path) -> Path:
        """Write the prompts beside the labels file (``prompts_path``), atomically."""
        provenance = self.prediction.provenance if self.prediction is not None else None
        model = provenance.model.name if provenance is not None else None
        return save_prompts(prompts_path(labels_path), self.prompts, shape=self.grid, model=model)

    def load_prompts(self, path: str | Path) -> int:
        """Replay the prompts saved at ``path`` (a prompts file, or the labels file they sit beside) after those
        already here; returns how many."""
        prompts = load_prompts(path, shape=self.grid)
        for prompt in prompts:
            self.add_prompt(prompt)
        return len(prompts)

    # ------------------------------------------------------------------ inside

    def _need_prediction(self) -> None:
        if self._probabilities is None:
            raise UsageError(
                "run the model on this case first (session.predict()); prompts refine its result"
            )

    def _engine_for(self, prompt: Prompt) -> str:
        return "network" if prompt.kind != "box" and self._resolve_engine() is not None else "local"

    def _apply(self, prompt: Prompt) -> tuple[Box, Box | None]:
        """Solve ``prompt`` in its box and write the result: (the box solved, the box of changed voxels)."""
        box = self._box_for(prompt)
        if self._engine_for(prompt) == "network":
            # every earlier prompt too: the network is told all the user said, as in its training
            earlier = self.prompts[: self.prompts.index(prompt)] if prompt in self.prompts else self.prompts
            new = self._network.answer(
                self._whole_image(), self.spacing, self._labels, [*earlier, prompt], box,
                spatial_dims=self.volume.spatial_dims,
            )  # fmt: skip
        else:
            new = self._refine_locally(prompt, box)
        changed_mask = new != self._labels[box]
        self._last_changed = int(changed_mask.sum())
        inner = bounding_box(changed_mask)
        if inner is None:
            return box, None
        changed = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner))
        self._steps.append(_Step(changed, self._labels[changed].copy(), len(self.prompts)))
        self._labels[box] = new
        return box, changed  # type: ignore[return-value]

    def _refine_locally(self, prompt: Prompt, box: Box) -> np.ndarray:
        origin = np.array([s.start for s in box])
        local = Prompt(prompt.kind, prompt.label, prompt.voxels - origin, prompt.positive)
        problem = LocalProblem(
            image=self._image_in(box),
            probabilities=self._probabilities[(slice(None), *box)],
            labels=self._labels[box],
            spacing=self.spacing,
            prompts=[local],
        )
        return self.refiner.refine(problem).astype(self._labels.dtype)

    def _box_for(self, prompt: Prompt) -> Box:
        low, high = prompt.bounds()
        engine = self._network if self._engine_for(prompt) == "network" else self.refiner
        reach = [math.ceil(engine.margin_mm() / s) for s in self.spacing]
        return tuple(  # type: ignore[return-value]
            slice(max(0, int(lo) - r), min(n, int(hi) + r + 1))
            for lo, hi, r, n in zip(low, high, reach, self.grid)
        )

    def _whole_image(self) -> np.ndarray:
        """The whole image as float32 (C, Z, Y, X), made on the network engine's first prompt and kept: the
        network normalises it once per image (``NetworkRefiner`` caches by this array), not once per click."""
        if self._whole is None:
            self._whole = self._image_in(tuple(slice(0, n) for n in self.grid))  # type: ignore[arg-type]
        return self._whole

    def _image_in(self, box: Box) -> np.ndarray:
        """The image's channels inside ``box`` as float32 (C, Z, Y, X): converted box by box, so a session
        keeps no float copy of the whole scan."""
        array = self.volume.channels
        spatial = box if self.volume.spatial_dims == 3 else box[1:]
        part = np.asarray(array[(slice(None), *spatial)], dtype=np.float32)
        return part if self.volume.spatial_dims == 3 else part[:, None]

    def _on_grid(self, array: np.ndarray, *, channels: bool = False) -> np.ndarray:
        """An output on the image's grid as the 3D grid (a depth axis added for a 2D image)."""
        if self.volume.spatial_dims == 3:
            return array
        return array[:, None] if channels else array[None]

    def _region_box(self, prediction: Prediction) -> Box:
        roi = prediction.provenance.roi if prediction.provenance is not None else None
        if roi is None:
            return (slice(None),) * 3  # type: ignore[return-value]
        box = tuple(slice(int(a), int(b)) for a, b in roi)
        return box if self.volume.spatial_dims == 3 else (slice(0, 1), *box)  # type: ignore[return-value]


def open_session(
    volume: Volume, model: InferenceSession | str | Path | None = None, **options: Any
) -> CaseSession:
    """An interactive session on ``volume`` with ``model`` (an InferenceSession, bundled name, .onnx path or
    None for the default); ``options``: ``refiner`` and ``predict_iter``'s options (device, backend, overlap,
    tta, ...). Call ``predict()`` before the first prompt."""
    return CaseSession(volume, model, **options)


def _describe(box: Box) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in box) + "]"


def labels_view(labels: np.ndarray, spatial_dims: int) -> np.ndarray:
    """A read-only view of labels kept on the 3D grid (Z, Y, X), on the image's own grid (the depth axis
    dropped for a 2D image)."""
    view = (labels if spatial_dims == 3 else labels[0]).view()
    view.flags.writeable = False
    return view


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask``; None when there is none."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
