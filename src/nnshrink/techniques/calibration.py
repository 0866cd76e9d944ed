"""What layer-wise reconstruction needs from calibration inputs, shared by the techniques that
reconstruct (GPTQ rounding in ``weights``, SparseGPT pruning in ``sparsity``); not a technique.

:func:`layer_hessians` runs the float model once over unlabelled batches and sums, per layer,
``X^T X`` of the layer's input columns (a Linear's input features; a conv's unfolded
``in x kh x kw`` patches): the Hessian of the layer's squared output error in its weights, up to
a factor of 2. :func:`inverse_hessian_factor` gives the upper Cholesky factor of its damped
inverse, which both solvers walk column by column.
"""

from __future__ import annotations

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


def layer_hessians(model: nn.Module, layers: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each layer's input columns, summed over ``batches`` in one pass."""
    hs: dict[str, torch.Tensor] = {}

    def hook(name, module):
        def fn(_, args):
            x = args[0].detach().double()
            if isinstance(module, nn.Linear):
                cols = x.reshape(-1, x.shape[-1])
            else:
                if isinstance(module, nn.Conv1d):
                    x = x.unsqueeze(2)
                    k, d, p, st = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
                else:
                    k, d, p, st = module.kernel_size, module.dilation, module.padding, module.stride
                cols = F.unfold(x, k, dilation=d, padding=p, stride=st).transpose(1, 2).reshape(-1, module.weight[0].numel())
            h = cols.T @ cols
            hs[name] = hs[name] + h if name in hs else h
        return fn

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                model(b)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return hs


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
