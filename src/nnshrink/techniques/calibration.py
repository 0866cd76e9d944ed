"""What layer-wise reconstruction needs from calibration inputs, shared by the techniques that
reconstruct (GPTQ rounding in ``weights``, SparseGPT pruning in ``sparsity``, ThiNet's refit in
``channels``); not a technique.

:func:`input_columns` is the one place a layer's input becomes the rows of its GEMM (a Linear's
input features; a conv's unfolded ``in x kh x kw`` patches), and :func:`watch` the one place
forward hooks collect them. :func:`layer_hessians` sums, per layer, ``X^T X`` of those columns in
one pass: the Hessian of the layer's squared output error in its weights, up to a factor of 2.
:func:`inverse_hessian_factor` gives the upper Cholesky factor of its damped inverse, which both
solvers walk column by column. :func:`paired_grams` gives what a refit towards the original
model's outputs needs: the Grams of a layer's inputs in the model being compressed against the
same layer's inputs in the original.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nnshrink.errors import ConfigError


def calibration_inputs(calib, samples: int, what: str) -> list[torch.Tensor]:
    """Up to ``samples`` inputs from ``calib`` (batches, or ``(input, target)`` tuples)."""
    if calib is None:
        raise ConfigError(f"{what} needs calibration inputs (calib in Python, --calib or --data on the command line)")
    out, n = [], 0
    for batch in calib:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise ConfigError("calibration batches must be tensors or (tensor, label) pairs")
        out.append(x[: samples - n])
        n += len(out[-1])
        if n >= samples:
            break
    if not n:
        raise ConfigError("the calibration data is empty")
    return out


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(batch, positions, features)``: the rows the layer's GEMM multiplies by its weight
    matrix ``weight.reshape(out, -1)`` (for a grouped conv, every group's columns side by side).

    A Linear's positions are its input's leading dimensions after the batch (one for a vector, the
    sequence for a token sequence); a conv's are its output positions, each an unfolded patch in
    the ``(in, kh, kw)`` order of the weight.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    padding = module.padding
    if getattr(module, "padding_mode", "zeros") != "zeros":  # reflect/replicate/circular: padded as the conv pads
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * len(module.kernel_size)
    elif isinstance(padding, str):  # torch's "valid"/"same": unfold takes numbers, so spell them out
        reach = [di * (ki - 1) for di, ki in zip(module.dilation, module.kernel_size)]
        if padding == "same" and any(r % 2 for r in reach):
            raise ConfigError("a conv with padding='same' and an even kernel cannot be unfolded for reconstruction")
        padding = (0,) * len(reach) if padding == "valid" else tuple(r // 2 for r in reach)
    k, d, p, st = module.kernel_size, module.dilation, padding, module.stride
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, p, st = (1, *k), (1, *d), (0, *p), (1, *st)
    return F.unfold(x, k, dilation=d, padding=p, stride=st).transpose(1, 2)


@contextlib.contextmanager
def watch(model: nn.Module, layers: dict[str, nn.Module], fn: Callable[[str, nn.Module, torch.Tensor], None]
          ) -> Iterator[None]:
    """While open, every call of a watched layer passes ``(name, layer, its first input)`` to
    ``fn``; the model runs in eval mode without gradients and is restored after."""
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: fn(n, mod, args[0].detach()))
               for n, m in layers.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def layer_hessians(model: nn.Module, layers: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each layer's input columns, summed over ``batches`` in one pass."""
    hs: dict[str, torch.Tensor] = {}

    def add(name: str, module: nn.Module, x: torch.Tensor) -> None:
        cols = input_columns(module, x.double())
        cols = cols.reshape(-1, cols.shape[-1])
        h = cols.T @ cols
        hs[name] = hs[name] + h if name in hs else h

    with watch(model, layers, add):
        for b in batches:
            model(b)
    return hs


def execution_order(model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor) -> list[str]:
    """The names of ``layers`` in the order a forward pass on ``x`` first calls them (layers it
    never calls last, in the given order)."""
    seen: dict[str, None] = {}
    with watch(model, layers, lambda n, m, _: seen.setdefault(n, None)):
        model(x)
    return [*seen, *(n for n in layers if n not in seen)]


def paired_grams(original: nn.Module, reference: nn.Module, model: nn.Module, layer: nn.Module, batches,
                 rows: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, C, D)`` for one layer over ``batches`` (float64, one matrix per group of a grouped
    conv, so each is ``(groups, k + 1, k + 1)``): ``G = A^T A``, ``C = A^T B`` and ``D = B^T B``,
    where ``A`` is the group's input columns in ``model`` and ``B`` the columns of the same
    positions in ``original`` at its layer ``reference``, each with a column of ones appended (the
    bias).

    Every call of the layer counts; the inputs are unfolded a few samples at a time, about
    ``rows`` rows of columns at once (one sample at least), so a large feature map never becomes
    one matrix.
    """
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    groups = getattr(layer, "groups", 1)
    sums = None
    for b in batches:
        for which, (net, at) in enumerate(((model, layer), (original, reference))):
            got[which] = []
            with watch(net, {"x": at}, lambda n, m, x, w=which: got[w].append(x)):
                net(b)
        if len(got[0]) != len(got[1]):  # pragma: no cover - the two models are the same graph
            raise ConfigError("the compressed and the original model call a layer a different number of times")
        for xa, xb in zip(got[0], got[1]):
            per_sample = max(1, input_columns(layer, xa[:1]).shape[1])
            chunk = max(1, rows // per_sample)
            for i in range(0, len(xa), chunk):
                a, d = (_with_ones(input_columns(m, x[i:i + chunk].double()), groups)
                        for m, x in ((layer, xa), (reference, xb)))
                terms = tuple(torch.einsum("ngi,ngj->gij", u, v) for u, v in ((a, a), (a, d), (d, d)))
                sums = terms if sums is None else tuple(s + t for s, t in zip(sums, terms))
    if sums is None:
        raise ConfigError("the calibration inputs never reach the layer being reconstructed")
    return sums


def _with_ones(cols: torch.Tensor, groups: int) -> torch.Tensor:
    """``(rows, groups, k + 1)``: each group's columns, and a one."""
    cols = cols.reshape(-1, groups, cols.shape[-1] // groups)
    return torch.cat([cols, torch.ones(*cols.shape[:2], 1, dtype=cols.dtype)], 2)


class Refit:
    """Least-squares refits of one layer towards the original layer's outputs, from
    :func:`paired_grams`: the layer's outputs on its inputs here should be what the original
    layer (``weight``, ``bias``) gave on its inputs there.

    Row ``r`` (of group ``g``) solves ``min |A_K v - B [w b]^T|^2 + damp * sum_K diag(G)_k
    (v_k - w_k)^2`` with ``G`` and ``C`` of its group, over its kept columns ``K`` and the bias: a
    ridge towards the original weights, scaled to each input's own power, so the damping does not
    depend on the inputs' scale, an input that never fires keeps its weight, and the bias is free.
    Rows with the same number of kept weights are solved together.
    """

    def __init__(self, grams: tuple[torch.Tensor, torch.Tensor, torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor | None, damp: float = 0.01) -> None:
        G, C, D = grams
        W = weight.detach().reshape(weight.shape[0], -1).double()
        b = torch.zeros(W.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
        self.target = torch.cat([W, b[:, None]], 1)  # (out, k + 1)
        self.group = torch.arange(len(W)) // (len(W) // len(G))  # each output row's group
        self.G = G
        # R[r]: A^T of row r's group times row r's original outputs, (out, k + 1)
        self.R = torch.einsum("rij,rj->ri", C[self.group], self.target)
        self.power = float(torch.einsum("ri,rij,rj->", self.target, D[self.group], self.target))
        diag = torch.diagonal(G, dim1=1, dim2=2)
        self.pull = damp * diag.clone()
        self.pull[:, -1] = 0.0
        self.pull += 1e-9 * diag.mean()
        self.H = G + torch.diag_embed(self.pull)

    def hessian(self) -> torch.Tensor:
        """``X^T X`` of an ungrouped layer's inputs here (what SparseGPT or GPTQ walks)."""
        return self.G[0, :-1, :-1]

    def solve(self, keep: torch.Tensor | None = None, rows_at_once: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (out, k), bias)`` with only ``keep``'s weights nonzero (all when None)."""
        k = self.target.shape[1] - 1
        keep = torch.ones(len(self.target), k, dtype=torch.bool) if keep is None else keep.reshape(len(self.target), -1).bool()
        out = torch.zeros_like(self.target)
        counts = keep.sum(1)
        bias_col = torch.full((1, 1), k)
        for count in counts.unique().tolist():
            rows = (counts == count).nonzero().squeeze(1)
            for i in range(0, len(rows), rows_at_once):
                r = rows[i:i + rows_at_once]
                cols = torch.cat([keep[r].nonzero()[:, 1].reshape(len(r), count), bias_col.expand(len(r), 1)], 1)
                g = self.group[r][:, None, None]
                # H is symmetric positive definite: Cholesky (batched LU in MKL fails on some sizes)
                factor = torch.linalg.cholesky(self.H[g, cols[:, :, None], cols[:, None, :]])
                rhs = self.R[r[:, None], cols] + self.pull[g[:, :, 0], cols] * self.target[r[:, None], cols]
                v = torch.cholesky_solve(rhs[..., None], factor)[..., 0]
                out[r[:, None], cols] = v
        return out[:, :-1], out[:, -1]

    def error(self, weight: torch.Tensor, bias: torch.Tensor) -> float:
        """The layer's squared output error against the original's on the calibration inputs,
        relative to the original outputs' power."""
        v = torch.cat([weight.reshape(len(bias), -1).double(), bias.double()[:, None]], 1)
        sq = torch.einsum("ri,rij,rj->", v, self.G[self.group], v) - 2 * torch.einsum("ri,ri->", v, self.R) + self.power
        return max(0.0, float(sq)) / max(self.power, 1e-30)


def set_weight(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write a refit's ``(out, in)`` weight and its bias into ``layer`` (adding a bias if it had none)."""
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


def reconstruct(original: nn.Module, model: nn.Module, layers: dict[str, nn.Module], batches,
                choose: Callable[[str, nn.Module, torch.Tensor], None], dense: tuple[str, ...] = (),
                damp: float = 0.01) -> dict[str, float]:
    """Compress ``layers`` of ``model`` one at a time, in execution order, each refit towards what
    the same layer of ``original`` outputs; returns each layer's relative output error on the
    calibration inputs afterwards, in that order.

    For each layer, on its inputs in ``model`` as the layers before it left them
    (:func:`paired_grams`), ``choose(name, layer, H)`` (with ``H = X^T X`` of those inputs) zeroes
    the weights it removes, SparseGPT for one, starting once from the original weights and once
    from a dense refit of them to the original layer's outputs (which folds in the error the
    earlier layers left); the kept weights and bias of each are refit by least squares
    (:class:`Refit`) and the one with the smaller output error is kept. The layers named in
    ``dense`` (grouped convs among them) are not compressed but refit densely the same way, so
    they too take up the error before them.

    Measured on the realistic zoo (ts13 imports, 256 calibration inputs, held-out test metric
    relative to float), against SparseGPT fitted on the original model's inputs alone: at 2:4,
    MobileNetV3 -17.3% -> -1.4%, P-Net -2.6% -> -0.8%, the pitch net -3.1% -> -1.0%; at 50% in
    every layer, MobileNetV3 -49% -> -2.1%.
    """
    order = execution_order(model, layers, batches[0][:1])
    errors: dict[str, float] = {}
    for name in order:
        layer, ref = layers[name], original.get_submodule(name)
        refit = Refit(paired_grams(original, ref, model, layer, batches), ref.weight, ref.bias, damp)
        if name in dense:
            weight, bias = refit.solve()
            set_weight(layer, weight, bias)
            errors[name] = refit.error(weight, bias)
            continue
        best = None
        for weight, bias in ((ref.weight.detach().reshape(len(refit.target), -1), ref.bias), refit.solve()):
            set_weight(layer, weight, torch.zeros(len(weight)) if bias is None else bias)
            choose(name, layer, refit.hessian())
            weight, bias = refit.solve(layer.weight != 0)
            err = refit.error(weight, bias)
            if best is None or err < best[0]:
                best = (err, weight, bias)
        set_weight(layer, best[1], best[2])
        errors[name] = best[0]
    return errors


def inverse_hessian_factor(hessian: torch.Tensor, w2d: torch.Tensor, damp: float = 0.01):
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, after zeroing the
    columns of ``w2d`` (in place) whose inputs were always zero; None if ``H`` cannot be
    factored even damped."""
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    w2d[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        return None
