"""Rescore fine-tunes of ``benchmarks/adaptation.py`` with their trained change mixed back per layer.

    PYTHONPATH=$PWD .venv/bin/python scripts/adaptation_layer_mix.py RUN_DIR [RUN_DIR ...] \
        [--work /tmp/medcl-adaptation] [--perturbation mild] [--plans "0.75" "decoder 0.9, rest 0.25"]

Each RUN_DIR is a fine-tune's output folder (its ``checkpoint_last.pt`` keeps the trained weights as
``trained_model``). For each plan the bundled model's weights plus a share of the trained change
(``training.start_weights.mixed_state``; what ``init.weight_mix`` and ``init.weight_mix_layers`` give a run,
whose training does not depend on them) are scored on the benchmark's held-out block, perturbed and clean.
A plan is ``S`` (every tensor S) or ``decoder D, rest R``: the decoder side (``DECODER_SIDE``: the decoder
stages, their UAFR blocks, the upsampling, the output and deep-supervision heads) D, every other tensor R.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DECODER_SIDE = (
    "decoder",
    "upsample",
    "uafr.decoder1",
    "uafr.decoder2",
    "uafr.decoder3",
    "head",
    "deep_supervision_heads",
)


def parse_plan(text: str) -> tuple[float, dict[str, float]]:
    """(share of every other tensor, prefix -> share) of a plan written as in the module docstring."""
    text = text.strip()
    if re.fullmatch(r"[0-9.]+", text):
        return float(text), {}
    found = re.fullmatch(r"decoder ([0-9.]+), rest ([0-9.]+)", text)
    if not found:
        raise SystemExit(f"a plan is 'S' or 'decoder D, rest R', got {text!r}")
    decoder, rest = float(found.group(1)), float(found.group(2))
    return rest, dict.fromkeys(DECODER_SIDE, decoder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medcl-adaptation"))
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "mni152-tissue")
    parser.add_argument(
        "--perturbation", choices=["strong", "mild"], default="strong", help="the runs' new scanner"
    )
    parser.add_argument("--plans", nargs="+", default=["0.75", "decoder 0.9, rest 0.25"])
    args = parser.parse_args(argv)
    import adaptation

    from napari_medcl.onnx_session import load_model
    from training.init_weights import load_initial_weights
    from training.torch_session import load_checkpoint_session

    plans = {text: parse_plan(text) for text in args.plans}
    perturbed, held_out, _ = adaptation.perturbed_dataset(args.data, args.work, args.perturbation)
    start = dict(load_initial_weights(adaptation.MODEL).state_dict)  # as --mix-sweep reads them
    before = adaptation.held_out_scores(
        load_model(adaptation.MODEL, device="cpu", precision="fp32"), args.data, perturbed, held_out
    )
    loss = before["clean"] - before["perturbed"]
    print(f"before: perturbed {before['perturbed']:.4f}, clean {before['clean']:.4f}")
    print("| run | plan | mean Dice perturbed | recovered | mean Dice clean | Δ clean |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for run in args.runs:
            for text, (share, layers) in plans.items():
                path = adaptation.mixed_checkpoint(
                    run / "checkpoint_last.pt", start, share, Path(folder) / "mixed.pt", layers
                )
                session, _ = load_checkpoint_session(path, "cpu")
                got = adaptation.held_out_scores(session, args.data, perturbed, held_out)
                recovered = (got["perturbed"] - before["perturbed"]) / loss
                print(
                    f"| {run.name} | {text} | {got['perturbed']:.4f} | {recovered:.0%} | {got['clean']:.4f} | "
                    f"{got['clean'] - before['clean']:+.4f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
