"""The ``medcam`` command. Heavy imports happen inside each command, so ``medcam --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monai_medcam.demo.classifier import RADIOLOGY_CHECKPOINT
    from monai_medcam.demo.run import run_demo, run_radiology_demo
    from monai_medcam.provenance import command_context

    problem = _device_problem(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    output = Path(args.output)
    settings = {"steps": args.steps} if args.steps is not None else {}
    print("1/2 known-evidence fundus images (fundus demo classifier), Med-CAM beside Grad-CAM")
    result = run_demo(output / "known_evidence", count=args.count, device=args.device, **settings)
    print(f"{'image':>5} {'label':>5} {'p(input)':>9} {'p(evidence)':>11} {'area':>7} {'verified':>8} {'settled':>7} {'steps':>5}")
    for i, row in enumerate(result.summary()):
        print(
            f"{i:>5} {row['label']:>5} {row['prob_input']:>9.3f} {row['prob_evidence']:>11.3f} "
            f"{row['area']:>7.2%} {str(row['verified']):>8} {str(row['settled']):>7} {row['steps']:>5}"
        )
    print("\n2/2 radiology path: DICOM MR series, DICOM radiograph, NIfTI volume, fundus PNG (grayscale demo classifier)")
    checkpoint = [RADIOLOGY_CHECKPOINT] if RADIOLOGY_CHECKPOINT.is_file() else []  # missing: the demo itself says how to train it
    provenance = command_context(args.argv, "python:monai_medcam.demo.classifier:radiology_classifier", checkpoint)
    report, overlaps = run_radiology_demo(output / "radiology", device=args.device, progress=True, provenance=provenance, **settings)
    print_report(report)
    for name, overlap in overlaps.items():
        print(f"  {name}: {overlap}")
    print(f"\nwrote {output}/known_evidence (panels.png, summary.csv, evidence_<i>.npy)")
    print(f"wrote {output}/radiology/evidence (DICOM SEG *_seg.dcm, NIfTI *.nii.gz, PNG panels, summary.csv, run.json)")
    print(f"      from the inputs in {output}/radiology/inputs")
    return 1 if report.failures else 0


def _int_list(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    if not all(p.strip() for p in parts):  # "64,,64" or "64,": a side left out, not two sides
        raise argparse.ArgumentTypeError(f"must be sides separated by ',' or 'x', each given, not {text!r}")
    values = tuple(int(p) for p in parts)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be sides of at least 1, not {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction from 0 to 1, not {value}")
    return value


def _device_problem(name: str) -> str | None:
    """Why ``--device`` cannot be used here (``None`` if it can): a name torch does not know, or
    CUDA asked of a machine without it."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        return f"--device {name!r} is not a torch device ({err})"
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"--device {name}: this machine has {found} CUDA device(s); use --device cpu"
    return None


def print_report(report, out=None) -> None:
    """One line per input: its images (or slices) and labels; over those whose decision needed
    evidence (all but vacuous decisions left empty, counted under "none"): the mean probability of
    each one's label on the input and on the evidence, the mean evidence area, and how many were
    verified and settled. Then the failures."""
    from monai_medcam.visualize import needed_evidence, summary_flag

    out = out or sys.stdout
    by_input: dict[str, list[dict]] = {}
    for row in report.rows:
        by_input.setdefault(str(row["input"]), []).append(row)
    print(f"{'input':<40} {'n':>3} {'label':>6} {'none':>4} {'p(label)':>9} {'p(evid.)':>9} {'area':>7} {'verified':>8} {'settled':>8}",
          file=out)
    for name, rows in by_input.items():
        labels = ",".join(str(v) for v in sorted({int(r["label"]) for r in rows}))
        needed = [r for r in rows if needed_evidence(r)]
        mean = lambda key, spec: format(sum(float(r[key]) for r in needed) / len(needed), spec) if needed else "-"  # noqa: E731
        verified = sum(summary_flag(r["verified"]) is True for r in needed)  # also as read back from a CSV ("False")
        settled = sum(summary_flag(r["settled"]) is True for r in needed)
        short = name if len(name) <= 40 else "..." + name[-37:]
        print(
            f"{short:<40} {len(rows):>3} {labels:>6} {len(rows) - len(needed):>4} {mean('prob_input', '.3f'):>9} {mean('prob_evidence', '.3f'):>9} "
            f"{mean('area', '.2%'):>7} {verified:>4}/{len(needed):<3} {settled:>4}/{len(needed):<3}",
            file=out,
        )
    for name, problem in report.failures.items():
        print(f"FAILED {name}: {problem}", file=out)


def _classifier(args: argparse.Namespace):
    """The ``--classifier`` (+ ``--weights``) as a LoadedClassifier, or ``None`` after saying why it
    (or ``--device``) was refused."""
    from monai_medcam.loading import load_classifier

    problem = _device_problem(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return None
    try:
        return load_classifier(args.classifier, args.weights)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def _target_layers(args: argparse.Namespace, loaded) -> str | list[str]:
    """``--target-layers`` as names (``''``: matching off), else what suits the classifier."""
    return loaded.target_layers if args.target_layers is None else [n for n in args.target_layers.split(",") if n]


def _settings(args: argparse.Namespace) -> dict[str, int | bool]:
    """The MedCAM settings given on the command line (``--steps``, ``--seed``, ``--skip-vacuous``)."""
    settings: dict[str, int | bool] = {"steps": args.steps} if args.steps is not None else {}
    if args.seed is not None:
        settings["seed"] = args.seed
    if getattr(args, "skip_vacuous", False):
        settings["skip_vacuous"] = True
    return settings


def _preprocessing(args: argparse.Namespace, loaded):
    """The bundle's own preprocessing where ``--preprocessing`` asks for it (``auto``: a bundle with
    transforms Med-CAM's own preprocessing does not do the same way, unless ``--size`` or
    ``--orientation``, options of Med-CAM's own, are given), else ``None`` and, for the warning, why
    not; ``False`` after an error message."""
    given = [flag for flag, value in (("--orientation", args.orientation), ("--size", args.size)) if value is not None]
    try:
        preprocessing, why_not = loaded.choose_preprocessing(
            args.preprocessing, given, "--preprocessing bundle applies the bundle's own and inverts it on the evidence")
    except ValueError as err:
        print(f"error: --preprocessing {args.preprocessing}: {err}", file=sys.stderr)
        return False, ""
    if preprocessing is None:
        return None, why_not
    print(f"note: inputs go through the bundle's own preprocessing ({', '.join(preprocessing.names)}), as in the classifier's "
          "training, and the evidence is inverted through it onto each source (--preprocessing medcam: Med-CAM's own).",
          file=sys.stderr)
    return preprocessing, ""


def _explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monai_medcam.io import InputError, NotAnImage, find_inputs
    from monai_medcam.pipeline import explain_inputs

    loaded = _classifier(args)
    if loaded is None:
        return 2
    inputs, failures, skipped, seen = [], [], [], set()
    for path in args.input:
        try:
            found, bad = find_inputs(path, exclude=args.output)
        except InputError as err:
            found, bad = [], [err]
        for item in found:  # an input given twice is explained once
            if item.label not in seen:
                seen.add(item.label)
                inputs.append(item)
        for err in bad:  # in a folder, a file with no image (a README, a structured report) is passed over
            (skipped if isinstance(err, NotAnImage) and Path(path).is_dir() else failures).append(err)
    for err in skipped:
        logging.getLogger("monai_medcam").debug("skipped %s", err)
    if not inputs and not failures:
        print(f"error: no image to explain in {', '.join(args.input)}" + (f" ({len(skipped)} file(s) without an image skipped)" if skipped else "") + ".",
              file=sys.stderr)
        return 2
    layers = _target_layers(args, loaded)
    if args.target_layers is None and layers == []:
        print("note: TorchScript classifier: activation matching is off (hooks do not run in TorchScript); "
              "for it, give the classifier as a bundle or python:module:factory.", file=sys.stderr)
    preprocessing, why_not = _preprocessing(args, loaded)
    if preprocessing is False:
        return 2
    orientation = None
    if preprocessing is not None:  # for the slices of volumes a 2D bundle's preprocessing does not take
        try:
            orientation = loaded.orientation
        except ValueError:  # a 2D bundle's "RA"
            pass
    else:
        try:  # a bundle's own codes, checked here (--orientation overrides them)
            orientation = args.orientation if args.orientation is not None else loaded.orientation
        except ValueError as err:
            print(f"error: {err} (--orientation overrides a bundle's codes: RAS, say, or none)", file=sys.stderr)
            return 2
        if args.orientation is None and orientation:
            print(f"note: volumes are reoriented to {orientation} for the classifier, as {loaded.orientation_source} says "
                  "(--orientation none: as read).", file=sys.stderr)
    if preprocessing is None and loaded.unapplied:
        print(f"warning: the bundle's preprocessing has {'; '.join(loaded.unapplied)}, which medcam explain's own does not do "
              "the same way: it stretches each input's intensities to [0, 1] and resizes it to the classifier's size (--size, "
              f"or the bundle's metadata){why_not}.", file=sys.stderr)
    from monai_medcam.provenance import command_context

    settings = _settings(args)
    try:
        report = explain_inputs(
            loaded.network,
            inputs,
            args.output,
            args.format,  # one string, "seg,nifti,png": output_formats reads it
            spatial_dims=args.spatial_dims or loaded.spatial_dims or 2,
            channels=args.channels or loaded.channels,
            size=args.size or loaded.size,
            class_idx=args.class_idx,
            target_layers=layers,
            batch_size=args.batch_size,
            device=args.device,
            fractional=args.fractional,
            gradcam_layer=args.gradcam_layer,
            progress=not args.no_progress,
            class_names=args.class_names if args.class_names is not None else loaded.class_names,
            orientation=orientation,
            preprocessing=preprocessing,
            failures={str(err.path): err.problem for err in failures},
            provenance=command_context(args.argv, loaded.source, loaded.files),
            **settings,
        )
    except (ValueError, OSError) as err:  # OSError: the output folder's summary or record could not be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report)
    done = len(report.written)
    if skipped:
        names = ", ".join(str(err.path) for err in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"skipped {len(skipped)} file(s) without an image: {names}")
    print(f"{done} input(s) explained, {len(report.failures)} failed; outputs in {args.output}"
          + (" (summary.csv)" if report.rows else ""))
    return 1 if report.failures or not done else 0


def _wsi(args: argparse.Namespace) -> int:
    from monai_medcam.io import InputError
    from monai_medcam.provenance import command_context
    from monai_medcam.wsi import explain_slide

    loaded = _classifier(args)
    if loaded is None:
        return 2
    size = args.size or (loaded.size[0] if loaded.size else None)
    settings, layers = _settings(args), _target_layers(args, loaded)
    try:
        report = explain_slide(
            loaded.network, args.slide, args.output, level=args.level, tile=args.tile, size=size,
            batch_size=args.batch_size, device=args.device, class_idx=args.class_idx, target_layers=layers,
            min_tissue=args.min_tissue, backend=args.backend, restart=args.restart, progress=not args.no_progress,
            class_names=args.class_names if args.class_names is not None else loaded.class_names,
            provenance=command_context(args.argv, loaded.source, loaded.files), **settings,
        )
    except (InputError, OSError) as err:  # OSError: a full disk or an output folder it may not write in
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # the classifier or the settings, found before any tile is explained
        print(f"error: {err}", file=sys.stderr)
        return 2
    height, width = report.level_size
    print(f"{report.slide}: level {report.level} ({width} x {height}), {report.tiles} tissue tiles "
          f"({report.explained} explained now, {report.resumed} resumed) in {report.seconds:.1f} s")
    for kind, path in report.outputs.items():
        print(f"  {kind:<9} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcam", description="Med-CAM minimal evidence masks for frozen classifiers.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log more detail")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run the whole path on embedded data: fundus panels, then DICOM/NIfTI/PNG in, SEG/NIfTI/PNG out"
    )
    demo.add_argument("--output", default="medcam_demo_output", help="folder for the pictures and tables")
    demo.add_argument("--count", type=int, default=4, help="number of known-evidence fundus images")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--steps", type=_positive_int, help="optimisation steps per attempt (default 300, early stop)")
    demo.set_defaults(run=_demo)

    explain = commands.add_parser(
        "explain",
        help="explain a classifier's decisions on DICOM, NIfTI or 2D image files",
        description="Explain each input (a file, or a folder searched recursively: each DICOM series folder is "
        "one input) and write the evidence as DICOM SEG, NIfTI and/or PNG, plus summary.csv.",
    )
    explain.add_argument("--classifier", required=True,
                         help="TorchScript file, MONAI bundle folder, or python:module:factory (with --weights)")
    explain.add_argument("--weights", help="state dict for a python:module:factory classifier (loaded weights_only)")
    explain.add_argument("--input", required=True, nargs="+", help="files or folders to explain")
    explain.add_argument("--output", required=True, help="folder for the evidence files and summary.csv")
    explain.add_argument("--format", default="seg,nifti,png", help="comma-separated: seg, nifti, png (default: all)")
    explain.add_argument("--class-idx", type=int, help="class to explain (default: the prediction)")
    explain.add_argument("--class-names", help="the classes' names in class order, comma-separated, e.g. 'no lesion,lesion', "
                                               "for the PNG panels and the SEG (default: a bundle's channel_def)")
    explain.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    explain.add_argument("--steps", type=_positive_int, help="optimisation steps per attempt (default 300, early stop)")
    explain.add_argument("--batch-size", type=_positive_int, default=8, help="images (or slices) optimised together")
    explain.add_argument("--size", type=_int_list, help="classifier input size, e.g. 96 or 96,96 (default: as read)")
    explain.add_argument("--spatial-dims", type=int, choices=(2, 3), help="classifier dims (default: from its weights)")
    explain.add_argument("--channels", type=int, help="classifier input channels (default: from its weights)")
    explain.add_argument("--orientation", help="axis codes volumes are reoriented to for the classifier, as in its training, "
                                               "e.g. RAS; the evidence keeps the source's geometry (default: a bundle's "
                                               "Orientationd, else as read; 'none': as read)")
    explain.add_argument("--preprocessing", choices=("auto", "bundle", "medcam"), default="auto",
                         help="how inputs are prepared for the classifier: 'bundle' runs a bundle's own preprocessing and "
                              "inverts it on the evidence; 'medcam' stretches intensities to [0, 1] and resizes to --size; "
                              "'auto' (default): the bundle's where it has transforms Med-CAM's own does not do the same way "
                              "(Spacingd, an intensity window, a crop)")
    explain.add_argument("--fractional", action="store_true", help="FRACTIONAL SEG of the soft mask instead of BINARY")
    explain.add_argument("--target-layers", help="comma-separated layer names for activation matching; '' turns it off (default: auto)")
    explain.add_argument("--gradcam-layer", help="add a Grad-CAM column of this layer to the PNG panels")
    explain.add_argument("--seed", type=int, help="random seed of the mask networks")
    explain.add_argument("--skip-vacuous", action="store_true",
                         help="leave the mask empty, without optimising, where the classifier gives the label with no "
                              "evidence at all (e.g. 'no lesion' slices of a volume); much faster when most are")
    explain.add_argument("--no-progress", action="store_true", help="no progress bar")
    explain.set_defaults(run=_explain)

    wsi = commands.add_parser(
        "wsi",
        help="explain a tile classifier over a whole-slide image (resumable)",
        description="Explain every tissue tile of a pyramidal slide at --level and write a pyramidal TIFF evidence "
        "map (255 = evidence), a per-tile CSV and a thumbnail. Killed runs resume where they stopped.",
    )
    wsi.add_argument("--classifier", required=True,
                     help="TorchScript file, MONAI bundle folder, or python:module:factory (with --weights)")
    wsi.add_argument("--weights", help="state dict for a python:module:factory classifier (loaded weights_only)")
    wsi.add_argument("--slide", required=True, help="the whole-slide image (openslide formats or pyramidal TIFF)")
    wsi.add_argument("--output", required=True, help="folder for <slide>_evidence.tif, _tiles.csv, _thumbnail.png")
    wsi.add_argument("--level", type=int, default=0, help="pyramid level the tiles are cut from (default 0)")
    wsi.add_argument("--tile", type=int, default=224, help="tile side in pixels of --level (default 224)")
    wsi.add_argument("--size", type=_positive_int, help="classifier input side if not --tile (default: from a bundle, else --tile)")
    wsi.add_argument("--batch-size", type=_positive_int, default=16, help="tiles optimised together")
    wsi.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    wsi.add_argument("--class-idx", type=int, help="class to explain (default: each tile's prediction)")
    wsi.add_argument("--class-names", help="the classes' names in class order, comma-separated, e.g. 'no lesion,lesion', "
                                           "for the thumbnail's caption (default: a bundle's channel_def)")
    wsi.add_argument("--steps", type=_positive_int, help="optimisation steps per attempt (default 300, early stop)")
    wsi.add_argument("--seed", type=int, help="random seed of the mask networks")
    wsi.add_argument("--target-layers", help="comma-separated layer names for activation matching; '' turns it off (default: auto)")
    wsi.add_argument("--min-tissue", type=_fraction, default=0.1, help="least tissue fraction of a tile (default 0.1)")
    wsi.add_argument("--backend", choices=("auto", "openslide", "tifffile"), default="auto", help="WSIReader backend")
    wsi.add_argument("--restart", action="store_true", help="discard the saved state of a different earlier run")
    wsi.add_argument("--no-progress", action="store_true", help="no progress bar")
    wsi.set_defaults(run=_wsi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the run's record
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:  # pydicom logs a traceback for each decoder that fails; the error names them all
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm(), _terminate_as_interrupt():  # log lines above the progress bar, not run into it
            return args.run(args)
    except KeyboardInterrupt as err:  # every file is written whole and then renamed: none is left half-written
        if args.run is _wsi:
            again = "the slide's finished batches are saved: the same command again resumes where it stopped"
        else:
            again = "summary.csv and run.json list the inputs explained and the files written"
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"\n{how}: every output written so far is whole (written, then renamed); {again}.", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a batch scheduler or a container runtime sends to stop a job), raised as an
    interrupt so the run stops as on Ctrl-C: its record says "interrupted", no temporary file is left."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (in the main thread only, where Python
    takes signals); the handler before is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
