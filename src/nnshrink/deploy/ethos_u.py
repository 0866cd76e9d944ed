"""Compile an int8 TFLite model for Arm Ethos-U with Vela, in process, and read Vela's own figures.

Vela (PyPI ``ethos-u-vela``, the optional extra ``nnshrink[ethos-u]``) takes a fully int8 TFLite
model (:mod:`nnshrink.io.tflite`) and writes the ``*_vela.tflite`` that ships: the NPU's command
stream and its encoded weights in one custom operator, with the operators it could not place on
the NPU left for the CPU. It is always given an explicit configuration (its bundled
``Arm/vela.ini``, a system configuration and a memory mode for the accelerator), so it never
falls back to its defaults with a warning.

What is reported comes from Vela: its summary CSV (NPU cycles and all cycles, inference time,
SRAM, flash and DRAM used, weight bytes before and after its encoding, MACs) and its console
(operators on the NPU and on the CPU, each CPU operator with the reason Vela gave).

Vela 5's default compiler core stops on some graphs that its previous core compiles (measured:
a stride-4 1-D conv, "Non-passthrough operation (Conv2D) could not run on NPU"); there the
previous core is used, and the report says so.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
import tempfile
from pathlib import Path

from nnshrink.cache import atomic_write_bytes
from nnshrink.errors import ConfigError, UnsupportedModelError

# accelerator -> (system configuration, memory mode) of Vela's bundled vela.ini
DEFAULTS = {
    "ethos-u55": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u65": ("Ethos_U65_High_End", "Dedicated_Sram"),
    "ethos-u85": ("Ethos_U85_SYS_DRAM_High", "Dedicated_Sram"),
}
TARGETS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512",
           "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048")
CONFIG = "Arm/vela.ini"


def _vela():
    try:
        from ethosu.vela import vela
    except ImportError as exc:
        raise ConfigError("Ethos-U deployment needs Vela: pip install 'nnshrink[ethos-u]'") from exc
    return vela


def config_sections() -> dict[str, list[str]]:
    """The System_Config and Memory_Mode sections of Vela's bundled ``Arm/vela.ini``."""
    import configparser
    from importlib.util import find_spec

    spec = find_spec("ethosu")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "config_files" / CONFIG
    parser = configparser.ConfigParser()
    parser.read(path)
    out: dict[str, list[str]] = {"System_Config": [], "Memory_Mode": []}
    for section in parser.sections():
        kind, _, name = section.partition(".")
        if kind in out:
            out[kind].append(name)
    return out


def vela_version() -> str:
    try:
        from importlib.metadata import version

        return version("ethos-u-vela")
    except Exception:  # not installed, or no metadata
        return "unknown"


def _run(vela, args: list[str]) -> tuple[int, str]:
    """Vela's exit status and console output (its compiler core writes to the file descriptors
    directly, so those are redirected too)."""
    import os
    import sys

    buf = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as raw:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(raw.fileno(), 1)
        os.dup2(raw.fileno(), 2)
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                try:
                    status = vela.main(args)
                except SystemExit as exc:  # argparse errors
                    status = exc.code if isinstance(exc.code, int) else 2
                except RuntimeError as exc:  # the compiler core's own failures
                    print(f"RuntimeError: {exc}")
                    status = 1
                except Exception as exc:  # Vela's own errors (options, unsupported graphs)
                    print(f"VelaError: {type(exc).__name__}: {exc}")
                    status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        raw.seek(0)
        text = raw.read().decode("utf-8", "replace")
    return int(status or 0), buf.getvalue() + text


def compile_for(tflite: bytes | str | Path, target: str = "ethos-u55-128", out: str | Path | None = None,
                system_config: str | None = None, memory_mode: str | None = None, name: str = "model") -> dict:
    """Compile an int8 TFLite model with Vela for ``target`` and return Vela's figures.

    Args:
        tflite: The model (bytes, or a path).
        target: Vela's accelerator configuration (:data:`TARGETS`).
        out: Where to write the compiled ``*_vela.tflite`` (atomically); None: not kept.
        system_config, memory_mode: Sections of Vela's ``Arm/vela.ini``; default: :data:`DEFAULTS`.
        name: The network's name in Vela's output.

    Returns:
        The ``deploy`` section of a report (see docs/cli.md).

    Raises:
        ConfigError: Vela is not installed, or an unknown target or configuration.
        UnsupportedModelError: Vela could not compile the model (its message).
    """
    vela = _vela()
    if target not in TARGETS:
        raise ConfigError(f"unknown Ethos-U target {target!r}; choose one of {', '.join(TARGETS)}")
    family = target.rsplit("-", 1)[0]
    system_config = system_config or DEFAULTS[family][0]
    memory_mode = memory_mode or DEFAULTS[family][1]
    sections = config_sections()
    for what, value in (("System_Config", system_config), ("Memory_Mode", memory_mode)):
        if sections and value not in sections[what]:
            raise ConfigError(f"Vela's {CONFIG} has no {what} {value!r}; choose one of {', '.join(sections[what])}")
    data = tflite if isinstance(tflite, bytes) else Path(tflite).read_bytes()
    safe = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "model"
    with tempfile.TemporaryDirectory(prefix="nnshrink-vela-") as tmp:
        src = Path(tmp) / f"{safe}.tflite"
        src.write_bytes(data)
        outdir = Path(tmp) / "out"
        args = [str(src), "--accelerator-config", target, "--config", CONFIG, "--system-config", system_config,
                "--memory-mode", memory_mode, "--output-dir", str(outdir), "--show-cpu-operations"]
        status, log = _run(vela, args)
        compiler = "default"
        if status != 0 and "RuntimeError" in log:
            first = next((ln for ln in log.splitlines() if ln.startswith("RuntimeError")), "").strip()
            status, log = _run(vela, args + ["--debug-force-legacy-core"])
            compiler = f"previous core (the default one stopped: {first.removeprefix('RuntimeError: ')})"
        if status != 0:
            shown = next((ln for ln in reversed(log.strip().splitlines()) if ln.strip()), "no message")
            if "OptionError" in log:  # Vela's CliOptionError, ConfigOptionError: a configuration it refuses
                raise ConfigError(f"Vela: {shown.split('OptionError: ', 1)[-1]}")
            raise UnsupportedModelError(f"Vela could not compile the model for {target}: {shown}")
        summaries = list(outdir.glob(f"{safe}_summary_*.csv"))
        compiled = outdir / f"{safe}_vela.tflite"
        if not summaries or not compiled.exists():
            raise UnsupportedModelError(f"Vela wrote no compiled model for {target}")
        with summaries[0].open() as f:
            row = next(csv.DictReader(f))
        if out is not None:
            atomic_write_bytes(Path(out), compiled.read_bytes())
        compiled_bytes = compiled.stat().st_size
        shutil.rmtree(outdir, ignore_errors=True)
    return _figures(row, log, target, system_config, memory_mode, compiler, len(data), compiled_bytes, out)


def _figures(row: dict, log: str, target: str, system_config: str, memory_mode: str, compiler: str,
             tflite_bytes: int, compiled_bytes: int, out) -> dict:
    def num(k: str) -> float:
        try:
            return float(row.get(k, "nan"))
        except ValueError:
            return float("nan")

    npu = re.search(r"NPU operators = (\d+)", log)
    cpu = re.search(r"CPU operators = (\d+)", log)
    n_npu, n_cpu = int(npu.group(1)) if npu else 0, int(cpu.group(1)) if cpu else 0
    cpu_ops = [{"op": m.group(1), "name": m.group(2).strip()}
               for m in re.finditer(r"^\s*CPU: (\S+) = (.*?) \((?:inputs|outputs)", log, re.M)]
    reasons = _cpu_reasons(log)
    for op in cpu_ops:
        op["reason"] = reasons.get(op["name"], "")
    warnings = sorted({ln.strip() for ln in log.splitlines() if ln.strip().startswith("Warning")
                       and "Placing on CPU" not in ln and "debug-force-legacy-core" not in ln})
    kib = 1024
    return {
        "target": target, "system_config": system_config, "memory_mode": memory_mode, "vela": vela_version(),
        "compiler": compiler, "npu_operators": n_npu, "cpu_operators": n_cpu,
        "npu_fraction": n_npu / max(1, n_npu + n_cpu), "cpu_ops": cpu_ops,
        "cycles_npu": int(num("cycles_npu")), "cycles_total": int(num("cycles_total")),
        "clock_hz": num("core_clock"), "inference_ms": num("inference_time") * 1000,
        "inferences_per_second": num("inferences_per_second"),
        "sram_bytes": int(num("sram_memory_used") * kib), "dram_bytes": int(num("dram_memory_used") * kib),
        "flash_bytes": int((num("off_chip_flash_memory_used") + num("on_chip_flash_memory_used")) * kib),
        "weight_bytes_original": int(num("total_original_weights")),
        "weight_bytes_encoded": int(num("total_npu_encoded_weights")),
        "macs": int(num("nn_macs")), "tflite_bytes": tflite_bytes, "vela_tflite_bytes": compiled_bytes,
        "vela_tflite": str(out) if out is not None else None, "warnings": warnings,
    }


def _cpu_reasons(log: str) -> dict[str, str]:
    """Operator name -> why Vela left it on the CPU (its warning and the constraint lines after it)."""
    reasons: dict[str, str] = {}
    lines = log.splitlines()
    for i, ln in enumerate(lines):
        m = re.search(r"Warning: (\S+) '(.*?)' is not supported on the NPU", ln)
        if not m:
            continue
        why = []
        for nxt in lines[i + 1:]:
            if not nxt.startswith(" "):
                break
            why.append(nxt.strip().lstrip("- "))
        reasons[m.group(2)] = "; ".join(w for w in why if w) or ln.split("NPU.", 1)[-1].strip()
    return reasons


def summary_line(d: dict) -> str:
    cpu = f", {d['cpu_operators']} on the CPU ({', '.join(o['op'] for o in d['cpu_ops'])})" if d["cpu_operators"] else ""
    return (f"{d['target']}: {d['npu_operators']} operators on the NPU{cpu}; {d['cycles_npu']:,} NPU cycles, "
            f"{d['inference_ms']:.3f} ms ({d['inferences_per_second']:,.0f}/s at {d['clock_hz'] / 1e6:.0f} MHz); "
            f"SRAM {d['sram_bytes']:,} B, flash {d['flash_bytes']:,} B; weights {d['weight_bytes_original']:,} B "
            f"-> {d['weight_bytes_encoded']:,} B encoded")
