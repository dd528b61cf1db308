"""``medcl-data build NAME -o DIR``: build a ready dataset from real labelled data available offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_medcl.errors import MedclError


def main(argv: list[str] | None = None) -> int:
    from training.data.builders import BUILDERS, build_dataset

    parser = argparse.ArgumentParser(prog="medcl-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the datasets that can be built")
    build = commands.add_parser("build", help="build a dataset in the MSD layout")
    build.add_argument("name", choices=sorted(BUILDERS))
    build.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    build.add_argument("--blocks", type=int, default=5, help="mni152-tissue: number of axial blocks (cases)")
    build.add_argument("--gap-mm", type=float, default=6.0, help="mni152-tissue: left-out gap between blocks")
    build.add_argument(
        "--downsample", type=int, default=1, help="mni152-tissue: keep every n-th voxel per axis"
    )
    build.add_argument("--modality", default="MRI", help="pyradiomics-lesions: MRI or CT cases")
    build.add_argument("--sdist", type=Path, help="pyradiomics-lesions: a local pyradiomics-3.0.1.tar.gz")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, (_, description) in BUILDERS.items():
            print(f"{name}: {description}")
        return 0
    options = {"overwrite": args.overwrite}
    if args.name == "mni152-tissue":
        options.update(n_blocks=args.blocks, gap_mm=args.gap_mm, downsample=args.downsample)
    else:
        options.update(modality=args.modality, sdist=args.sdist)
    try:
        path = build_dataset(args.name, args.output, **options)
    except (MedclError, OSError) as error:  # OSError: the output folder is not empty or not writable
        print(f"medcl-data: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from napari_medcl.crash_log import internal_error_message

        print(f"medcl-data: {internal_error_message('medcl-data', error)}", file=sys.stderr)
        return 1
    print(f"wrote {path} (see {path / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
