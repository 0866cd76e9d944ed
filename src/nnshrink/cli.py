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

import typer
from rich.console import Console

from nnshrink.errors import ConfigError, InputShapeError, NnshrinkError
from nnshrink.progress import spinner

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make trained networks small and fast for edge accelerators, and prove it.")
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


def _import_torch():
    """Import torch with Ctrl-C held until it has loaded. Its C extension imports numpy and, if that
    import raises (a KeyboardInterrupt included), goes on without numpy, and a KeyboardInterrupt
    inside its autograd initialisation aborts the process (SIGABRT), so a Ctrl-C that lands there
    must wait: it is raised once the import is done, where the wrapper turns it into exit 130."""
    import signal
    import threading

    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored, or someone else's
        import torch
        return torch
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        import torch
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    return torch


def _errors(fn):
    """Turn errors a user can cause into one line on stderr and exit status 2 (Ctrl-C: 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            torch = _import_torch()  # here, not at the top: --help and --version answer without it
            torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
            return fn(*args, **kwargs)
        except (NnshrinkError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            err.print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None  # main() says so, for every Ctrl-C

    return wrapper


DataOpt = Annotated[str, typer.Option("--data", help="Bundled dataset (mnist, digits, mnist10k), .npz or image folder.")]


def _resolve(spec: str, data: str, show_progress: bool = True):
    """A model from a zoo name or a file path."""
    from nnshrink import zoo
    from nnshrink.io import load_model

    if spec in zoo.NAMES:  # trained on first use on bundled data; on the user's only by 'train'
        from nnshrink.data import BUNDLED

        return zoo.pretrained(spec, data, show_progress=show_progress, train_missing=data in BUNDLED)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"MODEL {spec!r} is neither a zoo model ({', '.join(zoo.NAMES)}) nor an existing file")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path)
    for w in caught:  # one line each, not Python's warning format
        if "kept as they are" in str(w.message):
            err.print(f"note: {w.message}", markup=False, highlight=False, soft_wrap=True)
    return model


def _input_for(model, dataset_shape, input_shape: str | None):
    import torch

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
    """The data fits the model: input shape, and a score for every label (before any work)."""
    import torch

    from nnshrink.graph.analysis import run_forward

    shape = getattr(model, "input_shape", None)
    if shape and all(isinstance(d, int) for d in shape) and tuple(shape) != tuple(dataset.input_shape):
        raise InputShapeError(f"the model takes inputs of shape {tuple(shape)} but dataset {dataset.name!r} "
                              f"has inputs of shape {tuple(dataset.input_shape)}")
    was_training = model.training
    y = run_forward(model.eval(), torch.from_numpy(dataset.arrays("val")[0][:2]))
    model.train(was_training)
    if isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[1] < dataset.num_classes:
        raise ConfigError(f"dataset {dataset.name!r} has labels up to {dataset.num_classes - 1} but the model "
                          f"scores {y.shape[1]} classes")


@app.command()
@_errors
def analyze(model: Annotated[str, typer.Argument(help="Zoo name or model file.")],
            json_out: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON (schema nnshrink.analysis/2).")] = False,
            groups: Annotated[bool, typer.Option("--groups", help="Also list channel dependency groups.")] = False,
            input_shape: Annotated[str | None, typer.Option(
                help="One sample's shape (like 3,48,320), for models whose input has symbolic sizes.")] = None,
            data: DataOpt = "mnist") -> None:
    """Per-layer parameters, MACs and bytes of MODEL."""
    from nnshrink.data import load_dataset
    from nnshrink.graph import analyze as run_analysis, build_dependency_graph

    m = _resolve(model, data, show_progress=not json_out)
    if input_shape or _fixed(m) or model in _zoo_names():
        shape = load_dataset(data).input_shape if not input_shape and not _fixed(m) else None
        x = _input_for(m, shape, input_shape)
    else:
        x = _example_for(m, None)
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


def _zoo_names() -> tuple[str, ...]:
    from nnshrink import zoo

    return zoo.NAMES


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
    dataset = load_dataset(data)
    acc = zoo.accuracy(model, dataset, "test")
    out.print(f"{name} on {data}: held-out accuracy {acc:.2%} "
              f"({time.perf_counter() - start:.1f} s; checkpoint {zoo.checkpoint_path(name, dataset, seed)})")


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
def export(model: Annotated[str, typer.Argument(help="Zoo name, model file or .nsz container.")],
           out_path: Annotated[Path | None, typer.Option("--out", help="Output .onnx file.")] = None,
           astc: Annotated[Path | None, typer.Option(
               "--astc", help="Folder for the .astc textures of an .nsz container's ASTC-stored weights.")] = None,
           tflite: Annotated[Path | None, typer.Option(
               "--tflite", help="A fully int8 TFLite file (NHWC, batch 1) of an .nsz container of a quantized "
                                "model, for TFLite Micro and Vela.")] = None,
           data: DataOpt = "mnist",
           input_shape: Annotated[str | None, typer.Option(
               help="One sample's shape (like 3,48,320), where the model's is symbolic.")] = None) -> None:
    """Write MODEL as an ONNX file (dynamic batch; a model imported from ONNX keeps its source's
    names, symbolic dims and metadata) that ONNX Runtime runs; and/or (--astc) the .astc
    textures and manifest.json of a container's ASTC-stored weights, as a GPU pipeline uploads
    them; and/or (--tflite) a quantized container as the int8 TFLite file Ethos-U's Vela takes."""
    from nnshrink.data import load_dataset
    from nnshrink.io import export_onnx

    if out_path is None and astc is None and tflite is None:
        raise ConfigError("export needs --out FILE.onnx, --astc FOLDER or --tflite FILE.tflite")
    _check_outputs([model], out=out_path, tflite=tflite)
    if tflite is not None:
        data_ = _tflite_of(model, _input_for(None, None, input_shape) if input_shape else None)
        from nnshrink.cache import atomic_write_bytes

        atomic_write_bytes(tflite, data_)
        out.print(f"wrote {tflite} ({len(data_):,} bytes): int8 TFLite from {model}")
        if out_path is None and astc is None:
            return
    if astc is not None:
        from nnshrink.io.astc import export_textures

        if not str(model).endswith(".nsz"):
            raise ConfigError(f"--astc reads an .nsz container, got {model}")
        if Path(model).resolve() == astc.resolve():
            raise ConfigError(f"--astc {astc} is the input; choose a folder")
        paths = export_textures(model, astc)
        out.print(f"wrote {len(paths) - 1} .astc textures and {paths[-1].name} to {astc} "
                  f"({sum(p.stat().st_size for p in paths):,} bytes)")
        if out_path is None:
            return
    m = _resolve(model, data)
    if model in _zoo_names():
        example = _input_for(m, load_dataset(data).input_shape, input_shape)
    else:
        example = _example_for(m, input_shape)
    with spinner(f"exporting {out_path.name}"):
        export_onnx(m, out_path, example.repeat(2, *([1] * (example.dim() - 1))))
    out.print(f"wrote {out_path} ({out_path.stat().st_size:,} bytes)")


def _tflite_of(model: str | Path, example=None) -> bytes:
    """The int8 TFLite flatbuffer of a quantized container (or QDQ ONNX file nnshrink wrote);
    ``example``: one input, where the model's shape is symbolic."""
    from nnshrink.io.qdq import graph_from_qdq
    from nnshrink.io.tflite import to_tflite

    suffix = Path(model).suffix.lower()
    if suffix not in (".nsz", ".onnx"):
        raise ConfigError(f"--tflite reads an .nsz container of a quantized model, got {model} "
                          f"(compress it first, e.g. with examples/plans/int8-npu.yaml)")
    if not Path(model).is_file():
        raise FileNotFoundError(f"no such file: {model}")
    if suffix == ".nsz":
        from nnshrink.io import read_onnx_from_container

        proto = read_onnx_from_container(model)
    else:
        from nnshrink.io.onnx_import import read_onnx

        proto = read_onnx(model)
    with spinner("writing int8 TFLite"):
        return to_tflite(graph_from_qdq(proto, example), example)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_outputs(inputs: list[str | Path], **outputs: Path | None) -> None:
    """Before any work: every output can be written, none is an input, no two are the same file.

    ``outputs`` maps option names (``out``, ``report``, ...) to paths (None: not asked for)."""
    given = {f"--{k.replace('_', '-')}": Path(v) for k, v in outputs.items() if v is not None}
    sources = {Path(i).resolve(): str(i) for i in inputs if i is not None and Path(i).exists()}
    seen: dict[Path, str] = {}
    for opt, path in given.items():
        full = path.resolve()
        if full in sources:
            raise ConfigError(f"{opt} {path} is an input ({sources[full]}); choose another output path")
        if full in seen:
            raise ConfigError(f"{seen[full]} and {opt} are the same file ({path}); choose two paths")
        seen[full] = opt
        if path.is_dir():
            raise ConfigError(f"{opt} {path} is a folder; give a file name")
        folder = full.parent
        if not folder.is_dir():
            raise ConfigError(f"{opt} {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"{opt} {path} cannot be written (no write permission or a read-only file system)")


def _declared(model) -> tuple[str | None, tuple | None]:
    """The name and per-sample shape (None where symbolic) of the model's input, as declared."""
    from nnshrink.graph import signature

    sig = signature.get(model)
    if sig is not None and sig.inputs:
        name, dims = sig.inputs[0]
        return name, (tuple(d if isinstance(d, int) else None for d in dims[1:]) if dims else None)
    shape = getattr(model, "input_shape", None)
    return None, tuple(shape) if shape else None


def _example_for(model, input_shape: str | None, batches=None, dataset=None):
    """One input for MODEL: --input-shape, else the shape the model declares, else the
    calibration data's or the dataset's; a model with symbolic dims and nothing else to go by
    is an error that names --input-shape."""
    import torch

    if input_shape:
        return _input_for(model, None, input_shape)
    _, dims = _declared(model)
    if dims and all(isinstance(d, int) for d in dims):
        return torch.zeros((1, *dims))
    if batches:
        return batches[0][:1].clone()
    if dataset is not None:
        return torch.zeros((1, *dataset.input_shape))
    shown = "[N, " + ", ".join(str(d) if d is not None else "?" for d in dims or ()) + "]"
    raise InputShapeError(f"the model declares its input as {shown}, with symbolic sizes; pass --input-shape "
                          f"with one sample's shape (like --input-shape {','.join(str(d or 64) for d in dims or (1,))})")


def _split_held_out(batches: list) -> tuple[list, list]:
    """Calibration batches and the held-out quarter (at least one) that fidelity is measured on."""
    if len(batches) == 1:
        x = batches[0]
        if len(x) < 2:
            return batches, batches
        k = max(1, len(x) // 4)
        return [x[:-k]], [x[-k:]]
    k = max(1, len(batches) // 4)
    return batches[:-k], batches[-k:]


@app.command()
@_errors
def compress(model: Annotated[str, typer.Argument(help="Zoo name or model file.")],
             out_path: Annotated[Path, typer.Option("--out", help="Container (.nsz) to write.")],
             report: Annotated[Path, typer.Option("--report", help="Report JSON to write.")],
             plan: Annotated[Path | None, typer.Option("--plan", help="Plan YAML (see examples/plans/).")] = None,
             target: Annotated[str | None, typer.Option(
                 "--target", help="size=25KB, ratio=100x, macs=0.5 or latency=0.6, or several together "
                                  "(ratio=20x,macs=0.5): the budget step's target (added to the plan, or "
                                  "the plan's budget step gets it).")] = None,
             max_drop: Annotated[float | None, typer.Option(
                 "--max-drop", help="Largest validation drop the budget step may take: percentage points of "
                                    "accuracy with --data, the metric's own units with --eval or --calib.")] = None,
             plot: Annotated[Path | None, typer.Option(
                 "--plot", help="With a budget step: its candidates' metric against size, as a PNG.")] = None,
             html_out: Annotated[Path | None, typer.Option(
                 "--html", help="The report as one self-contained HTML page (plots, per-layer table).")] = None,
             deploy_to: Annotated[str | None, typer.Option(
                 "--deploy", help="With a quantize step: compile the container's int8 TFLite for this Ethos-U "
                                  "(ethos-u55-128, ...) with Vela, write OUT_vela.tflite, and put Vela's figures "
                                  "under deploy in the report.")] = None,
             data: DataOpt = "mnist",
             calib: Annotated[Path | None, typer.Option(
                 "--calib", help="Unlabelled inputs instead of --data: an .npz (one key per model input) or a "
                                 "folder of .npy files; shapes may vary.")] = None,
             eval_spec: Annotated[str | None, typer.Option(
                 "--eval", help="Your metric, module:function or file.py:function, evaluate(model) -> float, "
                                "higher is better.")] = None,
             input_shape: Annotated[str | None, typer.Option(
                 help="One sample's shape (like 3,48,320), where the model's is symbolic.")] = None,
             seed: int = 0) -> None:
    """Run PLAN on MODEL, write the container OUT and a report measured from OUT to REPORT.

    With --data (labelled images) the metric is top-1 accuracy on its test split; with --eval it is
    yours; with --calib and no --eval it is fidelity to MODEL on held-out calibration inputs."""
    from nnshrink import zoo
    from nnshrink.data import load_dataset
    from nnshrink.data.calib import Fidelity, load_calib, load_evaluator
    from nnshrink.graph import analyze as run_analysis
    from nnshrink.io import describe, load, save
    from nnshrink.plan import Plan, compress as run_plan
    from nnshrink.report import write_json

    _check_outputs([model, plan, data if calib is None else calib, eval_spec.rpartition(":")[0] if eval_spec else None],
                   out=out_path, report=report, plot=plot, html=html_out)
    if plan is None and target is None and max_drop is None:
        raise ConfigError("compress needs --plan PLAN.yaml, or a budget: --target size=25KB|ratio=100x|macs=0.5|latency=0.6 and/or --max-drop")
    the_plan = Plan.from_yaml(plan) if plan is not None else Plan([])
    if out_path.suffix.lower() != ".nsz":
        raise ConfigError(f"--out must be an .nsz container, got {out_path.name} (use 'nnshrink export' for ONNX)")
    user_eval = load_evaluator(eval_spec) if eval_spec else None
    dataset = load_dataset(data) if calib is None else None
    m = _resolve(model, data)
    held = fit = None
    if dataset is not None:
        _check_fits(m, dataset)
        x = _example_for(m, input_shape, dataset=dataset)
        metric_name = f"top-1 accuracy (test split of {dataset.name})"
        evaluate = user_eval or zoo.make_evaluator(dataset, "val")
        train = zoo.make_trainer(dataset, seed=seed)
        calib_source = dataset.loader("train", batch_size=64, shuffle=True, seed=seed)

        def score(model_):
            return user_eval(model_) if user_eval else zoo.accuracy(model_, dataset, "test")
    else:
        name, dims = _declared(m)
        batches = load_calib(calib, name, None if dims is None else len(dims) + 1)
        x = _example_for(m, input_shape, batches)
        fit, held = _split_held_out(batches)
        metric_name = "output SQNR (dB) against MODEL on held-out --calib inputs"
        measure = Fidelity(m, held)  # MODEL's outputs on the held-out inputs, computed once
        measured: dict[int, dict] = {}
        evaluate = user_eval or measure.sqnr
        train, calib_source = None, fit

        def fidelity_of(model_) -> dict:
            if id(model_) not in measured:
                measured[id(model_)] = measure(model_)
            return measured[id(model_)]

        def score(model_):
            if user_eval:
                return user_eval(model_)
            return None if model_ is m else fidelity_of(model_)["output_sqnr_db"]
    if user_eval:
        metric_name = f"{eval_spec} (yours)"
    if target is not None or max_drop is not None:
        the_plan = _with_budget(the_plan, target, None if max_drop is None else
                                max_drop / 100 if dataset is not None and not user_eval else max_drop)
    vela_out = out_path.with_name(f"{out_path.stem}_vela.tflite") if deploy_to else None
    if deploy_to is not None:
        from nnshrink.deploy import ethos_u

        ethos_u._vela()
        if deploy_to not in ethos_u.TARGETS:
            raise ConfigError(f"unknown Ethos-U target {deploy_to!r}; choose one of {', '.join(ethos_u.TARGETS)}")
        if not any(st.kind == "quantize" for st in the_plan.steps):
            raise ConfigError("--deploy compiles an int8 model: the plan needs a quantize step (target: npu; "
                              "see examples/plans/int8-npu.yaml)")
        _check_outputs([model, plan], out=out_path, report=report, plot=plot, html=html_out, vela=vela_out)
    if plot is not None and not any(st.kind == "budget" for st in the_plan.steps):
        raise ConfigError("--plot draws a budget step's candidates; give --target or --max-drop, or a plan with a "
                          "budget step")
    import torch

    before_info = run_analysis(m, x)
    before_value = score(m)
    labelled = dataset is not None and not user_eval  # "accuracy" keeps its meaning in the report
    result = run_plan(m, the_plan, x, evaluate=evaluate, train=train, calib=calib_source)
    # the report is measured from the file written, read back from disk, never from memory
    with spinner(f"writing {out_path.name}"):
        save(result.model, out_path, x.repeat(2, *([1] * (x.dim() - 1))))
        digest = _sha256(out_path)
        written = load(out_path)
        streams = describe(out_path)
    after_value = score(written)
    doc = _report_doc(model, the_plan, dataset.name if dataset is not None else str(calib), metric_name, labelled,
                      (before_info, before_value), (run_analysis(written, x), after_value), result, out_path,
                      streams, seed)
    before, after = doc["before"], doc["after"]
    if held is not None:
        after["fidelity"] = fidelity_of(written)
    if _sha256(out_path) != digest:  # another run wrote the same --out meanwhile
        raise ConfigError(f"{out_path} changed while this run measured it (another run writing the same --out?); "
                          "the report was not written")
    doc["container_sha256"] = digest
    if deploy_to is not None:
        doc["deploy"] = _deploy_container(out_path, x, deploy_to, vela_out, dataset if labelled else None)
    write_json(report, doc)
    if html_out is not None:
        from nnshrink.report.html import write_html

        with spinner(f"writing {html_out.name}"):
            write_html(html_out, doc)
    if plot is not None:
        _budget_plot(result.steps, before_info.total_bytes, plot)
        out.print(f"plot: {plot}")
    sizes = doc["sizes"]

    def shown(v):
        return "n/a" if v is None else (f"{v:.2%}" if labelled else f"{v:.4g}")

    out.print(f"{model}: {metric_name} {shown(before['metric']['value'])} -> {shown(after_value)}, "
              f"MACs {before['macs']:,} -> {after['macs']:,}")
    if held is not None:
        f = after["fidelity"]
        agree = "n/a" if f["top1_agreement"] is None else f"{f['top1_agreement']:.2%}"
        out.print(f"fidelity on {sum(len(b) for b in held)} held-out inputs: top-1 agreement {agree}, "
                  f"max abs error {f['max_abs_error']:.3g}")
    ratio = sizes["float32"] / sizes["container"]
    than = f"{ratio:.1f}x smaller than float32" if ratio >= 1.05 else \
        f"{sizes['container'] / sizes['float32']:.3f}x the float32 bytes: not smaller"
    out.print(f"size: float32 {sizes['float32']:,} B, int8 {sizes['int8']:,} B, container {sizes['container']:,} B "
              f"({than})")
    if deploy_to is not None:
        from nnshrink.deploy import ethos_u

        d = doc["deploy"]
        out.print(ethos_u.summary_line(d))
        if d.get("tflite_accuracy") is not None:
            out.print(f"int8 TFLite in LiteRT (reference kernels): accuracy {d['tflite_accuracy']:.2%}")
        out.print(f"wrote {vela_out}")
    out.print(f"wrote {out_path} and {report}" + (f" and {html_out}" if html_out else ""))


def _report_doc(model: str, plan, data: str, metric_name: str, labelled: bool, before_side: tuple, after_side: tuple,
                result, path: Path, streams: list, seed: int) -> dict:
    """The compress report of ``result`` written to ``path``: ``before_side`` and ``after_side`` are
    (analysis, metric value), the after one measured from the file read back."""
    from nnshrink.report import compress_report, layer_rows, summary

    (before_info, before_value), (after_info, after_value) = before_side, after_side
    before = summary(before_info, before_value if labelled else None, before_info.total_bytes)
    before["metric"] = {"name": metric_name, "value": before_value}
    after = summary(after_info, after_value if labelled else None, path.stat().st_size)
    after["metric"] = {"name": metric_name, "value": after_value}
    steps = [{"step": r.step, "details": r.details, "skipped": r.skipped} for r in result.steps]
    return compress_report(model, plan.to_dict(), data, before, after, layer_rows(before_info, after_info, streams),
                           steps, str(path), "nsz", streams, run={"seed": seed})


@app.command("report")
@_errors
def report_cmd(report: Annotated[Path, typer.Argument(help="A report JSON of 'nnshrink compress' (schema /1 or /2).")],
               html_out: Annotated[Path | None, typer.Option(
                   "--html", help="Write it as one self-contained HTML page.")] = None) -> None:
    """Summarise a compress report, and write it as a self-contained HTML page with --html."""
    from nnshrink.report import metric_value, read_report

    _check_outputs([report], html=html_out)
    doc = read_report(report)
    before, after = doc["before"], doc["after"]
    metric = doc["run"].get("metric") or "metric"

    def value(side):
        v = metric_value(side)
        return "n/a" if v is None else f"{v:.2%}" if before.get("accuracy") is not None else f"{v:.4g}"
    ratio = before["bytes"] / after["bytes"] if after.get("bytes") else float("nan")
    out.print(f"{doc['run'].get('model')}: {metric} {value(before)} -> {value(after)}; bytes {before['bytes']:,} -> "
              f"{after['bytes']:,} ({ratio:.1f}x); MACs {before['macs']:,} -> {after['macs']:,}; "
              f"{len(doc['layers'])} layers, {len(doc['skipped'])} left alone by a step")
    if html_out is not None:
        from nnshrink.report.html import write_html

        write_html(html_out, doc)
        out.print(f"wrote {html_out} ({html_out.stat().st_size:,} bytes)")


def _deploy_container(path: Path, x, target: str, vela_out: Path, dataset) -> dict:
    """Vela's figures for the int8 TFLite of the container just written (read back from disk), and
    the TFLite file's accuracy in LiteRT's reference kernels where the data is labelled."""
    from nnshrink.deploy import ethos_u

    data_ = _tflite_of(path, x[:1])
    with spinner(f"compiling for {target} with Vela"):
        figures = ethos_u.compile_for(data_, target, vela_out, name=path.stem)
    figures["tflite_accuracy"] = None
    if dataset is not None:
        try:
            from nnshrink.io.tflite import litert_run

            xt, yt = dataset.tensors("test")
            with spinner("running the int8 TFLite in LiteRT"):
                pred = litert_run(data_, xt.numpy())[0].argmax(1)
            figures["tflite_accuracy"] = float((pred == yt.numpy()).mean())
        except ConfigError:  # LiteRT not installed: Vela's figures stand alone
            pass
    return figures


def _budget_plot(steps, float_bytes: int, path: Path,
                 title: str = "budget: every evaluated candidate (validation metric)") -> None:
    """The last budget step's evaluated candidates (validation metric against size) as a PNG."""
    from nnshrink.report.plots import frontier_plot
    from nnshrink.search import Point, pareto

    found = [r for r in steps if r.step == "budget"]
    if not found:
        raise ConfigError("--plot draws a budget step's candidates; this plan has no budget step")
    d = found[-1].details
    points = [Point(f"{float_bytes / p['bytes']:.0f}x", {}, p["bytes"], p["val_metric"], None)
              for p in d["frontier"] if p["val_metric"] is not None]
    if not points:
        raise ConfigError("--plot needs a metric: the budget step evaluated no candidate")
    chosen = min(points, key=lambda p: abs(p.bytes - d["bytes_file"]))
    frontier_plot(points, pareto(points), float_bytes, d["val_before"], path, title, chosen)


def _with_budget(plan, target: str | None, max_drop: float | None):
    """``plan`` with the command line's budget: its budget steps take it, or one is appended."""
    import dataclasses

    from nnshrink.plan import Plan
    from nnshrink.search.budget import Budget

    if max_drop is not None and max_drop < 0:
        raise ConfigError(f"--max-drop must be >= 0, got {max_drop}")
    change = {k: v for k, v in (("target", target), ("max_drop", max_drop)) if v is not None}
    steps = list(plan.steps)
    if any(isinstance(s, Budget) for s in steps):
        return Plan([dataclasses.replace(s, **change) if isinstance(s, Budget) else s for s in steps])
    return Plan(steps + [Budget(**change)])


@app.command("quant-sensitivity")
@_errors
def quant_sensitivity(model: Annotated[str, typer.Argument(help="Zoo name or model file.")],
                      data: DataOpt = "mnist",
                      weight_bits: Annotated[int, typer.Option(help="Weight bits (2-8).")] = 8,
                      act_bits: Annotated[int, typer.Option(help="Activation bits (8 or 16).")] = 8,
                      target: Annotated[str, typer.Option(
                          help="ort-x86 (7-bit weight grid), ort-x86-u8 or npu: the quantize step's target.")] = "ort-x86",
                      plot: Annotated[Path | None, typer.Option(help="Bar chart (PNG) to write.")] = None,
                      json_out: Annotated[Path | None, typer.Option("--json", help="Table as JSON.")] = None,
                      seed: int = 0) -> None:
    """Which layer is to blame for the accuracy lost to quantization (validation split)."""
    from rich.table import Table

    from nnshrink import zoo
    from nnshrink.data import load_dataset
    from nnshrink.plan import Context
    from nnshrink.report import write_json
    from nnshrink.report.plots import quant_sensitivity_plot
    from nnshrink.techniques import Quantize
    from nnshrink.techniques.quant.sensitivity import quant_sensitivity as measure

    _check_outputs([model, data], json=json_out, plot=plot)
    dataset = load_dataset(data)
    m = _resolve(model, data)
    _check_fits(m, dataset)
    import torch

    x = torch.zeros((2, *dataset.input_shape))
    evaluate = zoo.make_evaluator(dataset, "val")
    ctx = Context(x, None, None, dataset.loader("train", batch_size=64, shuffle=True, seed=seed))
    sim = Quantize(weight_bits=weight_bits, act_bits=act_bits, adaround=False, target=target).apply(m, ctx).model
    sens = measure(sim, evaluate, dataset.tensors("val", 256)[0])
    doc = sens.to_dict()
    table = Table(title=f"{model}: W{weight_bits}A{act_bits}, float {sens.float_accuracy:.2%}, "
                        f"all quantized {sens.quantized_accuracy:.2%} (validation)")
    for col in ("layer", "only this quantized", "its output SQNR", "all but this quantized"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in doc["layers"]:
        table.add_row(row["layer"], f"{row['only_this_quantized']:.2%}", f"{row['only_this_sqnr_db']:.1f} dB",
                      f"{row['all_but_this_quantized']:.2%}")
    out.print(table)
    worst = sens.worst()
    if worst:
        out.print(f"most sensitive: {', '.join(worst)} (the quantize step's layers: rules: skip keeps a layer "
                  "float, {bits: 8} gives it more bits)")
    if json_out:
        write_json(json_out, doc)
        out.print(f"wrote {json_out}")
    if plot:
        quant_sensitivity_plot(doc, plot, f"{model}: W{weight_bits}A{act_bits} sensitivity per layer")
        out.print(f"wrote {plot}")


@app.command()
@_errors
def decode(container: Annotated[Path, typer.Argument(help="An .nsz container.")],
           onnx_out: Annotated[Path, typer.Option("--onnx", help="ONNX file to write.")]) -> None:
    """Rebuild the model in CONTAINER (checksums verified) as an ONNX file ONNX Runtime runs."""
    from nnshrink.cache import atomic_write_bytes
    from nnshrink.io import read_onnx_from_container

    _check_outputs([container], onnx=onnx_out)
    proto = read_onnx_from_container(container)
    atomic_write_bytes(onnx_out, proto.SerializeToString())
    out.print(f"wrote {onnx_out} ({onnx_out.stat().st_size:,} bytes) from {container} "
              f"({container.stat().st_size:,} bytes)")


@app.command()
@_errors
def deploy(model: Annotated[str, typer.Argument(help="An .nsz container of a quantized model, or an int8 .tflite.")],
           target: Annotated[str, typer.Option("--target", help="Vela's accelerator: ethos-u55-128, ethos-u65-256, "
                                                                  "ethos-u85-256, ...")] = "ethos-u55-128",
           system_config: Annotated[str | None, typer.Option(
               "--system-config", help="A System_Config of Vela's Arm/vela.ini (default: one per accelerator).")] = None,
           memory_mode: Annotated[str | None, typer.Option(
               "--memory-mode", help="A Memory_Mode of Vela's Arm/vela.ini (default: one per accelerator).")] = None,
           out_path: Annotated[Path | None, typer.Option(
               "--out", help="The compiled model to write (default: MODEL's name with _vela.tflite, beside it).")] = None,
           tflite: Annotated[Path | None, typer.Option(
               "--tflite", help="Also keep the int8 TFLite file Vela compiled (from an .nsz).")] = None,
           report: Annotated[Path | None, typer.Option("--report", help="Vela's figures as JSON.")] = None,
           input_shape: Annotated[str | None, typer.Option(
               help="One sample's shape (like 3,48,320), where the model's is symbolic.")] = None) -> None:
    """Compile MODEL for an Arm Ethos-U NPU with Vela (in process, with an explicit configuration)
    and report Vela's own figures: operators on the NPU and the CPU, NPU cycles, inference time,
    SRAM, flash, weight bytes before and after Vela's encoding."""
    from nnshrink.deploy import ethos_u

    ethos_u._vela()  # not installed: one line, before any work
    if target not in ethos_u.TARGETS:
        raise ConfigError(f"unknown Ethos-U target {target!r}; choose one of {', '.join(ethos_u.TARGETS)}")
    src = Path(model)
    if out_path is None:
        out_path = src.with_name(f"{src.stem}_vela.tflite")
    _check_outputs([model], out=out_path, tflite=tflite, report=report)
    if src.suffix.lower() == ".tflite":
        if not src.is_file():
            raise FileNotFoundError(f"no such file: {model}")
        data_ = src.read_bytes()
    else:
        data_ = _tflite_of(model, _input_for(None, None, input_shape) if input_shape else None)
        if tflite is not None:
            from nnshrink.cache import atomic_write_bytes

            atomic_write_bytes(tflite, data_)
    with spinner(f"compiling for {target} with Vela"):
        figures = ethos_u.compile_for(data_, target, out_path, system_config, memory_mode, name=src.stem)
    if report is not None:
        from nnshrink.report import write_json

        write_json(report, {"schema": "nnshrink.deploy/1", "model": str(model), "deploy": figures})
    out.print(ethos_u.summary_line(figures))
    for op in figures["cpu_ops"]:
        out.print(f"  on the CPU: {op['op']} {op['name']!r}: {op['reason'] or 'no reason given'}")
    if figures["compiler"] != "default":
        out.print(f"  Vela: {figures['compiler']}")
    out.print(f"wrote {out_path}" + (f" and {report}" if report else ""))


@app.command()
@_errors
def demo(data: DataOpt = "mnist",
         plot: Annotated[Path, typer.Option(help="Where to write the accuracy-vs-size plot.")] = Path("nnshrink-frontier.png"),
         html_out: Annotated[Path, typer.Option(
             "--html", help="Where to write the budget search's report page.")] = Path("nnshrink-report.html"),
         quick: Annotated[bool, typer.Option(help="Skip MAC reduction and the budget search.")] = False) -> None:
    """The main job on the bundled data: LeNet-5 analysed, quantized, deep-compressed, measured."""
    import tempfile

    from nnshrink import zoo
    from nnshrink.data import load_dataset
    from nnshrink.graph import analyze as run_analysis
    from nnshrink.io import describe, load, save
    from nnshrink.plan import Plan, compress as run_plan
    from nnshrink.report import print_analysis, streams_table
    from nnshrink.techniques import QuantizeWeights

    import torch

    _check_outputs([data], plot=None if quick else plot, html=None if quick else html_out)
    dataset = load_dataset(data)
    out.rule("nnshrink demo: LeNet-5 (Caffe) on bundled MNIST")
    out.print(f"data: {dataset.name}, {len(dataset.arrays('train')[1])} train / "
              f"{len(dataset.arrays('val')[1])} validation / {len(dataset.arrays('test')[1])} held-out test images")
    start = time.perf_counter()
    model = zoo.pretrained("lenet5", data)
    out.print(f"model ready in {time.perf_counter() - start:.1f} s (cached at {zoo.checkpoint_path('lenet5', dataset)})")
    x = torch.zeros((1, *dataset.input_shape))
    info = run_analysis(model, x)
    print_analysis(out, info, "LeNet-5 layers")
    acc = zoo.accuracy(model, dataset, "test")
    out.print(f"held-out accuracy: [bold]{acc:.2%}[/bold] on {len(dataset.arrays('test')[1])} test images; "
              f"{info.total_macs:,} MACs per image")

    out.rule("int8 weights (per channel), entropy-coded into the .nsz container")
    small = run_plan(model, Plan([QuantizeWeights(bits=8)]), x).model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lenet5-int8.nsz"
        save(small, path, x.repeat(2, 1, 1, 1))
        size = path.stat().st_size
        back = load(path)
        streams = describe(path)
    acc_q = zoo.accuracy(back, dataset, "test")
    out.print(streams_table(streams))
    f32, int8 = info.total_params * 4, info.total_params
    out.print(f"container: [bold]{size:,} bytes[/bold], everything included: {f32 / size:.2f}x smaller than "
              f"float32 ({f32:,} B) and {int8 / size:.2f}x smaller than plain int8 ({int8:,} B)")
    out.print(f"held-out accuracy from the container: [bold]{acc_q:.2%}[/bold] (float: {acc:.2%}, "
              f"on the same {len(dataset.arrays('test')[1])} images)")
    _demo_int8_ptq(model, dataset, x, f32, acc)
    _demo_astc(model, dataset, x, f32, acc)
    if not quick:
        _demo_mac_reduction(model, dataset, x, info.total_macs, acc)
        _demo_budget(model, dataset, x, f32, acc, plot, html_out)


def _demo_int8_ptq(model, dataset, x, f32: int, acc: float) -> None:
    """W8A8 PTQ: the integer model an NPU runs, measured from its container, in ONNX Runtime and
    in the integer-only reference."""
    import tempfile

    from nnshrink import zoo
    from nnshrink.io import load, read_onnx_from_container, save
    from nnshrink.plan import Plan, compress as run_plan
    from nnshrink.techniques import Quantize
    from nnshrink.techniques.quant.reference import IntegerModel

    out.rule("W8A8 post-training quantization: int8 weights and activations, integer kernels")
    start = time.perf_counter()
    calib = dataset.loader("train", batch_size=64, shuffle=True, seed=0)
    result = run_plan(model, Plan([Quantize()]), x, evaluate=zoo.make_evaluator(dataset, "val"), calib=calib)
    secs = time.perf_counter() - start
    xt, yt = dataset.tensors("test")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lenet5-w8a8.nsz"
        save(result.model, path, x.repeat(2, 1, 1, 1))
        size = path.stat().st_size
        acc_q = zoo.accuracy(load(path), dataset, "test")
        proto = read_onnx_from_container(path)
    ref = IntegerModel(result.model, "fixed")
    acc_int = float((ref(xt.numpy()).argmax(1) == yt.numpy()).mean())
    out.print(f"PTQ in {secs:.1f} s (calibration on 256 training images; CLE and bias correction each kept if they bring the output closer to float's); container "
              f"[bold]{size:,} bytes[/bold] ({f32 / size:.2f}x smaller than float32 {f32:,} B)")
    out.print(f"held-out accuracy: float {acc:.2%} -> [bold]{acc_q:.2%}[/bold] from the container; "
              f"integer-only reference (fixed-point requantization, as TFLite/Ethos-U) {acc_int:.2%}")
    try:
        import onnxruntime as ort
    except ImportError:
        out.print("ONNX Runtime is not installed (pip install 'nnshrink[onnx]'): skipping its run")
        return
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"input": xt.numpy()})[0].argmax(1)
    out.print(f"ONNX Runtime, integer kernels (QLinearConv, QGemm), from the same file: "
              f"[bold]{float((pred == yt.numpy()).mean()):.2%}[/bold]")
    _demo_ethos_u(proto, x, xt, yt)


def _demo_ethos_u(proto, x, xt, yt) -> None:
    """The same container as the int8 TFLite file Ethos-U takes: LiteRT's accuracy, Vela's figures."""
    from nnshrink.io.qdq import graph_from_qdq
    from nnshrink.io.tflite import litert_run, to_tflite

    try:
        from nnshrink.deploy import ethos_u

        ethos_u._vela()
        data_ = to_tflite(graph_from_qdq(proto, x[:1]), x[:1])
        with spinner("int8 TFLite in LiteRT, then Vela for Ethos-U55-128"):
            pred = litert_run(data_, xt.numpy())[0].argmax(1)
            figures = ethos_u.compile_for(data_, "ethos-u55-128", name="lenet5")
    except ConfigError as exc:  # LiteRT or Vela not installed
        out.print(f"skipping the Ethos-U deployment: {exc}")
        return
    out.print(f"the container as int8 TFLite ({len(data_):,} B, bit-exact against the integer reference): "
              f"LiteRT accuracy [bold]{float((pred == yt.numpy()).mean()):.2%}[/bold]; Vela, "
              + ethos_u.summary_line(figures))


def _demo_mac_reduction(model, dataset, x, macs: int, acc: float) -> None:
    """Half the MACs: channel pruning with reconstruction for a target, then a short fine-tune."""
    from nnshrink import zoo
    from nnshrink.graph import analyze as run_analysis
    from nnshrink.plan import FineTune, Plan, compress as run_plan
    from nnshrink.techniques import ChannelPrune

    out.rule("Half the MACs: channel pruning with least-squares reconstruction, then fine-tuning")
    start = time.perf_counter()
    calib = dataset.loader("train", batch_size=64, shuffle=True, seed=0)
    result = run_plan(model, Plan([ChannelPrune(mac_ratio=0.5), FineTune(steps=300)]), x,
                      evaluate=zoo.make_evaluator(dataset, "val"),
                      train=zoo.make_trainer(dataset, show_progress=False), calib=calib)
    cp = result.steps[0]
    after = run_analysis(result.model, x)
    kept = ", ".join(f"{k} {v['kept']}/{v['channels']}" for k, v in cp.details["groups"].items())
    out.print(f"channels kept: {kept}; MACs {macs:,} -> [bold]{after.total_macs:,}[/bold] "
              f"(ratio {after.total_macs / macs:.3f}, target 0.50)")
    pruned_only = zoo.accuracy(cp.model, dataset, "test")
    out.print(f"held-out accuracy: float {acc:.2%}, pruned and reconstructed {pruned_only:.2%}, after 300 "
              f"fine-tuning steps [bold]{zoo.accuracy(result.model, dataset, 'test'):.2%}[/bold] "
              f"({time.perf_counter() - start:.0f} s)")


def _demo_budget(model, dataset, x, f32: int, acc: float, plot: Path, html_out: Path) -> None:
    """The smallest LeNet-5 within 0.2 point: the budget step's search over per-layer pruning and
    sharing, every retrained candidate shown and plotted."""
    import tempfile

    from nnshrink import zoo
    from nnshrink.graph import analyze as run_analysis
    from nnshrink.io import describe, load, save
    from nnshrink.plan import Plan, compress as run_plan
    from nnshrink.report.html import write_html
    from nnshrink.search.budget import Budget

    val_images = len(dataset.arrays("val")[1])
    out.rule("The smallest LeNet-5 within 0.2 point: per-layer pruning + sharing searched for the budget")
    start = time.perf_counter()
    calib = dataset.loader("train", batch_size=64, shuffle=True, seed=0)
    plan = Plan([Budget(max_drop=0.002, prune_steps=800, share_steps=300)])
    result = run_plan(model, plan, x, evaluate=zoo.make_evaluator(dataset, "val"),
                      train=zoo.make_trainer(dataset, show_progress=False), calib=calib)
    d = result.steps[0].details
    with tempfile.TemporaryDirectory() as tmp:  # the page is measured from the container, as compress's
        path = Path(tmp) / "lenet5-budget.nsz"
        save(result.model, path, x.repeat(2, 1, 1, 1))
        written = load(path)
        test = zoo.accuracy(written, dataset, "test")
        doc = _report_doc("lenet5", plan, dataset.name, f"top-1 accuracy (test split of {dataset.name})", True,
                          (run_analysis(model, x), acc), (run_analysis(written, x), test), result, path,
                          describe(path), 0)
    doc["output"]["path"] = "(the demo keeps no container)"
    write_html(html_out, doc)
    for p in d["frontier"]:
        label = ", ".join(f"{n} {v['sparsity']:.0%}/{v['bits'] or 32}b" for n, v in p["layers"].items())
        out.print(f"  candidate {p['bytes']:>8,} B  {f32 / p['bytes']:6.1f}x  validation {p['val_metric']:.2%}"
                  f"{'  <- chosen' if p['bytes'] == d['bytes_file'] else ''}   {label}")
    _budget_plot(result.steps, f32, plot, "LeNet-5: the budget step's candidates (validation accuracy)")
    out.print(f"smallest within 0.2 point of float on the validation split: container [bold]{d['bytes_file']:,} "
              f"bytes[/bold] = [bold]{f32 / d['bytes_file']:.1f}x[/bold] smaller than float32 (estimated "
              f"{d['bytes_estimated']:,} B before writing); held-out test {test:.2%} (float {acc:.2%}); "
              f"{d['evaluations']} retrained candidates, {val_images} validation images (one is "
              f"{100 / val_images:.1f} point)")
    out.print(f"plot: {plot}; the report page: {html_out} ({time.perf_counter() - start:.0f} s)")


def _demo_astc(model, dataset, x, f32: int, acc: float) -> None:
    import tempfile

    from nnshrink import zoo
    from nnshrink.io import describe, load, save
    from nnshrink.io.astc import export_textures
    from nnshrink.plan import Plan, compress as run_plan
    from nnshrink.techniques import Astc

    out.rule("ASTC: weights as GPU texture blocks, footprints per layer for 1.5 bits per weight")
    start = time.perf_counter()
    calib = [dataset.tensors("train", 256)[0]]
    result = run_plan(model, Plan([Astc(bits_per_weight=1.5)]), x, calib=calib)
    details = result.steps[0].details
    for name, entry in details["layers"].items():
        ch = " x2 channels" if entry["channels"] == 2 else ""
        out.print(f"  {name:6s} {entry['footprint']:>5s}{ch:13s} {entry['layout']:7s} texture "
                  f"{entry['texture'][0]}x{entry['texture'][1]:<5d} {entry['blocks']:>5,} blocks "
                  f"{entry['bits_per_weight']:.2f} bits/weight")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lenet5-astc.nsz"
        save(result.model, path, x.repeat(2, 1, 1, 1))
        size = path.stat().st_size
        back = load(path)
        textures = export_textures(path, Path(tmp) / "textures")[:-1]
        stored = sum(r.stored_bytes for r in describe(path) if r.kind == "astc")
    acc_a = zoo.accuracy(back, dataset, "test")
    out.print(f"container: [bold]{size:,} bytes[/bold] ({stored:,} of them ASTC blocks and scales, {len(textures)} "
              f".astc textures a GPU uploads as they are): [bold]{f32 / size:.1f}x[/bold] smaller than float32; "
              f"held-out accuracy from the container [bold]{acc_a:.2%}[/bold] (float {acc:.2%}), without "
              f"re-training ({time.perf_counter() - start:.0f} s; re-training, benchmarks/astc.py: 45x)")


def _version(value: bool) -> None:
    if value:
        from nnshrink import __version__

        out.print(f"nnshrink {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                     help="Print the version and exit.")] = False) -> None:
    """Make trained networks small and fast for edge accelerators, and prove it."""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage error or an error of ours, 130 when
    interrupted). torch is imported by the commands that need it, not for ``--help``."""
    try:
        app(args=argv)
        code = 0
    except SystemExit as exc:  # typer also turns a Ctrl-C outside our commands into exit 130
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    if code == 130:
        err.print("interrupted", style="red", highlight=False)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
