"""The ``nnshrink`` command line.

Every command takes MODEL as a zoo name (trained and cached on first use) or a model file
(``.onnx``; ``.nsz`` as written by ``compress``). Errors a user can cause print one line and
exit with status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from nnshrink.errors import ConfigError, InputShapeError, NnshrinkError
from nnshrink.progress import spinner

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make trained networks small and fast for edge accelerators, and prove it.")
out = Console(soft_wrap=True)
err = Console(stderr=True)

def _errors(fn):
    """Turn errors a user can cause into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (NnshrinkError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            err.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


DataOpt = Annotated[str, typer.Option("--data", help="Bundled dataset (mnist, digits, mnist10k), .npz or image folder.")]


def _resolve(spec: str, data: str, show_progress: bool = True):
    """A model from a zoo name or a file path."""
    from nnshrink import zoo
    from nnshrink.io import load_model

    if spec in zoo.NAMES:
        return zoo.pretrained(spec, data, show_progress=show_progress)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"MODEL {spec!r} is neither a zoo model ({', '.join(zoo.NAMES)}) nor an existing file")
    return load_model(path)


def _input_for(model, dataset_shape, input_shape: str | None) -> torch.Tensor:
    if input_shape:
        try:
            dims = tuple(int(d) for d in input_shape.split(","))
        except ValueError as exc:
            raise ConfigError(f"--input-shape must be comma-separated integers like 1,28,28, got {input_shape!r}") from exc
        return torch.zeros((1, *dims))
    shape = getattr(model, "input_shape", None)
    if shape and all(isinstance(d, int) for d in shape):
        return torch.zeros((1, *shape))
    return torch.zeros((1, *dataset_shape))


def _check_fits(model, dataset) -> None:
    shape = getattr(model, "input_shape", None)
    if shape and all(isinstance(d, int) for d in shape) and tuple(shape) != tuple(dataset.input_shape):
        raise InputShapeError(f"the model takes inputs of shape {tuple(shape)} but dataset {dataset.name!r} "
                              f"has images of shape {tuple(dataset.input_shape)}")


@app.command()
@_errors
def analyze(model: Annotated[str, typer.Argument(help="Zoo name or model file.")],
            json_out: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON (schema nnshrink.analysis/1).")] = False,
            groups: Annotated[bool, typer.Option("--groups", help="Also list channel dependency groups.")] = False,
            input_shape: Annotated[str | None, typer.Option(help="C,H,W of one input, for models with dynamic dims.")] = None,
            data: DataOpt = "mnist") -> None:
    """Per-layer parameters, MACs and bytes of MODEL."""
    from nnshrink.data import load_dataset
    from nnshrink.graph import analyze as run_analysis, build_dependency_graph

    m = _resolve(model, data, show_progress=not json_out)
    shape = load_dataset(data).input_shape if not input_shape and not _fixed(m) else None
    x = _input_for(m, shape, input_shape)
    result = run_analysis(m, x)
    deps = build_dependency_graph(m, x) if groups else None
    if json_out:
        doc = result.to_dict()
        if deps is not None:
            doc["dependencies"] = deps.to_dict()
        out.print_json(json.dumps(doc))
        return
    from nnshrink.report import print_analysis

    print_analysis(out, result, f"{model}: input {tuple(x.shape)}")
    if deps is not None:
        _print_groups(deps)


def _fixed(model) -> bool:
    shape = getattr(model, "input_shape", None)
    return bool(shape) and all(isinstance(d, int) for d in shape)


def _print_groups(deps) -> None:
    from rich.table import Table

    table = Table(title="channel dependency groups")
    for col in ("group", "channels", "producers", "consumers", "tied by", "prunable"):
        table.add_column(col)
    for g in deps.groups:
        table.add_row(str(g.id), str(g.channels), ", ".join(p for p, _ in g.producers) or "-",
                      ", ".join(c.layer for c in g.consumers) or "-", ", ".join(sorted(g.couplings)) or "-",
                      "yes" if g.prunable else f"no: {g.reason}")
    out.print(table)


@app.command()
@_errors
def train(name: Annotated[str, typer.Argument(help="Zoo model name.")], data: DataOpt = "mnist",
          seed: int = 0, retrain: Annotated[bool, typer.Option(help="Ignore a cached checkpoint.")] = False) -> None:
    """Train zoo model NAME with its recipe (cached as safetensors) and print held-out accuracy."""
    from nnshrink import zoo
    from nnshrink.data import load_dataset

    start = time.perf_counter()
    model = zoo.pretrained(name, data, seed=seed, retrain=retrain)
    acc = zoo.accuracy(model, load_dataset(data), "test")
    out.print(f"{name} on {data}: held-out accuracy {acc:.2%} "
              f"({time.perf_counter() - start:.1f} s; checkpoint {zoo.checkpoint_path(name, data, seed)})")


@app.command()
@_errors
def evaluate(model: Annotated[str, typer.Argument(help="Zoo name or model file.")], data: DataOpt = "mnist",
             split: Annotated[str, typer.Option(help="train, val or test.")] = "test") -> None:
    """Top-1 accuracy of MODEL on a split of the data (held-out test by default)."""
    from nnshrink import zoo
    from nnshrink.data import load_dataset

    dataset = load_dataset(data)
    m = _resolve(model, data)
    _check_fits(m, dataset)
    acc = zoo.accuracy(m, dataset, split)
    out.print(f"{model}: {split} accuracy {acc:.2%} on {len(dataset.arrays(split)[1])} images of {dataset.name}")


@app.command()
@_errors
def export(model: Annotated[str, typer.Argument(help="Zoo name or model file.")],
           out_path: Annotated[Path, typer.Option("--out", help="Output .onnx file.")], data: DataOpt = "mnist") -> None:
    """Write MODEL as an ONNX file (dynamic batch) that ONNX Runtime runs."""
    from nnshrink.data import load_dataset
    from nnshrink.io import export_onnx

    m = _resolve(model, data)
    _refuse_overwrite_input(model, out_path)
    example = _input_for(m, load_dataset(data).input_shape, None)
    with spinner(f"exporting {out_path.name}"):
        export_onnx(m, out_path, example.repeat(2, *([1] * (example.dim() - 1))))
    out.print(f"wrote {out_path} ({out_path.stat().st_size:,} bytes)")


def _refuse_overwrite_input(model: str, *paths: Path) -> None:
    src = Path(model)
    for p in paths:
        if src.exists() and p.exists() and src.resolve() == p.resolve():
            raise ConfigError(f"{p} is the input model; choose another output path")


@app.command()
@_errors
def compress(model: Annotated[str, typer.Argument(help="Zoo name or model file.")],
             plan: Annotated[Path, typer.Option("--plan", help="Plan YAML (see examples/plans/).")],
             out_path: Annotated[Path, typer.Option("--out", help="Compressed model to write.")],
             report: Annotated[Path, typer.Option("--report", help="Report JSON to write.")],
             data: DataOpt = "mnist", seed: int = 0) -> None:
    """Run PLAN on MODEL, write the result to OUT and a report measured from OUT to REPORT."""
    from nnshrink import zoo
    from nnshrink.data import load_dataset
    from nnshrink.graph import analyze as run_analysis
    from nnshrink.io import export_onnx, load_model
    from nnshrink.plan import Plan, compress as run_plan
    from nnshrink.report import compress_report, layer_rows, summary, write_json

    the_plan = Plan.from_yaml(plan)
    _refuse_overwrite_input(model, out_path, report)
    if out_path.suffix.lower() not in (".nsz", ".onnx"):
        raise ConfigError(f"--out must end in .nsz or .onnx, got {out_path.name}")
    dataset = load_dataset(data)
    m = _resolve(model, data)
    _check_fits(m, dataset)
    x = torch.zeros((1, *dataset.input_shape))
    before_info = run_analysis(m, x)
    before = summary(before_info, zoo.accuracy(m, dataset, "test"), before_info.total_bytes)
    result = run_plan(m, the_plan, x, evaluate=zoo.make_evaluator(dataset, "val"),
                      train=zoo.make_trainer(dataset, seed=seed),
                      calib=dataset.loader("train", batch_size=64, shuffle=True, seed=seed))
    # .nsz version 0 is a plain ONNX model until the container lands; the report is measured
    # from the file written, re-read from disk, never from the model in memory.
    with spinner(f"writing {out_path.name}"):
        export_onnx(result.model, out_path, x.repeat(2, *([1] * (x.dim() - 1))))
        written = load_model(out_path)
    after_info = run_analysis(written, x)
    after = summary(after_info, zoo.accuracy(written, dataset, "test"), out_path.stat().st_size)
    steps = [{"step": r.step, "details": r.details, "skipped": r.skipped} for r in result.steps]
    doc = compress_report(model, the_plan.to_dict(), dataset.name, before, after,
                          layer_rows(before_info, after_info), steps, str(out_path), "onnx")
    write_json(report, doc)
    out.print(f"{model}: accuracy {before['accuracy']:.2%} -> {after['accuracy']:.2%}, "
              f"MACs {before['macs']:,} -> {after['macs']:,}, bytes {before['bytes']:,} -> {after['bytes']:,}")
    out.print(f"wrote {out_path} and {report}")


@app.command()
@_errors
def demo(data: DataOpt = "mnist") -> None:
    """The main job on the bundled data: LeNet-5, its analysis and held-out accuracy."""
    from nnshrink import zoo
    from nnshrink.data import load_dataset
    from nnshrink.graph import analyze as run_analysis
    from nnshrink.report import print_analysis

    dataset = load_dataset(data)
    out.rule("nnshrink demo: LeNet-5 (Caffe) on bundled MNIST")
    out.print(f"data: {dataset.name}, {len(dataset.arrays('train')[1])} train / "
              f"{len(dataset.arrays('val')[1])} validation / {len(dataset.arrays('test')[1])} held-out test images")
    start = time.perf_counter()
    model = zoo.pretrained("lenet5", data)
    out.print(f"model ready in {time.perf_counter() - start:.1f} s (cached at {zoo.checkpoint_path('lenet5', data)})")
    info = run_analysis(model, torch.zeros((1, *dataset.input_shape)))
    print_analysis(out, info, "LeNet-5 layers")
    acc = zoo.accuracy(model, dataset, "test")
    out.print(f"held-out accuracy: [bold]{acc:.2%}[/bold] on {len(dataset.arrays('test')[1])} test images; "
              f"float32 size {info.total_bytes:,} bytes; {info.total_macs:,} MACs per image")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage error or an error of ours)."""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        app(args=argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
