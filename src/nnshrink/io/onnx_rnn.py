"""ONNX ``LSTM``/``GRU`` nodes as torch modules, and back to the same nodes on export.

An imported recurrent node becomes :class:`OnnxRNN`: a torch ``nn.LSTM``/``nn.GRU`` (so training,
fine-tuning and every technique see an ordinary torch layer) with ONNX's input and output layout.

Why a custom op on export: torch's ONNX exporter traces ``nn.LSTM`` with a fixed sequence length
(its meta function gives the output a static length, measured with torch 2.13), so anything that
reads the output's shape, as the ``Reshape`` of a bidirectional output does, would be written
into the file as a constant and the model would only run at the example's length. Under
``torch.onnx.export`` the module calls ``nnshrink::onnx_rnn`` instead, whose fake kernel keeps
the length symbolic and whose translation (:data:`TRANSLATIONS`, passed to the exporter) writes
one ONNX ``LSTM``/``GRU`` node, as the source had.
"""

from __future__ import annotations

import torch
from torch import nn

# gate blocks: ONNX LSTM i, o, f, c and GRU z, r, h; torch's LSTM i, f, g(=c), o and GRU r, z, n
_TO_TORCH = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2]}
_TO_ONNX = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2]}


def reorder(m, kind: str, to: str):
    """Reorder the gate blocks of a weight or bias (first axis) from one framework's order to
    the other's (``to``: ``torch`` or ``onnx``); numpy arrays or torch tensors."""
    order = (_TO_TORCH if to == "torch" else _TO_ONNX)[kind]
    n = len(order)
    if isinstance(m, torch.Tensor):
        blocks = torch.chunk(m, n, dim=0)
        return torch.cat([blocks[i] for i in order], dim=0)
    import numpy as np

    blocks = np.split(m, n, axis=0)
    return np.concatenate([blocks[i] for i in order], axis=0)


@torch.library.custom_op("nnshrink::onnx_rnn", mutates_args=())
def onnx_rnn(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
             c0: torch.Tensor | None, kind: str, hidden: int, layout: int) -> list[torch.Tensor]:
    """ONNX ``LSTM``/``GRU`` (default activations, no peepholes): ``[Y, Y_h(, Y_c)]``."""
    dirs = w.shape[0]
    cls = nn.LSTM if kind == "LSTM" else nn.GRU
    rnn = cls(w.shape[2], hidden, bidirectional=dirs == 2, batch_first=True).to(x.dtype)
    gates = 4 if kind == "LSTM" else 3
    with torch.no_grad():
        for d in range(dirs):
            sfx = "_reverse" if d else ""
            getattr(rnn, f"weight_ih_l0{sfx}").copy_(reorder(w[d], kind, "torch"))
            getattr(rnn, f"weight_hh_l0{sfx}").copy_(reorder(r[d], kind, "torch"))
            getattr(rnn, f"bias_ih_l0{sfx}").copy_(reorder(b[d, :gates * hidden], kind, "torch"))
            getattr(rnn, f"bias_hh_l0{sfx}").copy_(reorder(b[d, gates * hidden:], kind, "torch"))
        return [t.clone() for t in OnnxRNN(rnn, layout)(x, h0, c0)]


@onnx_rnn.register_fake
def _(x, w, r, b, h0, c0, kind, hidden, layout):
    dirs = w.shape[0]
    seq, batch = (x.shape[1], x.shape[0]) if layout else (x.shape[0], x.shape[1])
    y = x.new_empty((batch, seq, dirs, hidden) if layout else (seq, dirs, batch, hidden))
    h = x.new_empty((batch, dirs, hidden) if layout else (dirs, batch, hidden))
    return [y, h, torch.empty_like(h)] if kind == "LSTM" else [y, h]


def _translate(x, w, r, b, h0, c0, kind: str, hidden: int, layout: int):
    from onnxscript import opset18 as op

    direction = "bidirectional" if w.shape[0] == 2 else "forward"
    if kind == "LSTM":
        return list(op.LSTM(x, w, r, b, None, h0, c0, hidden_size=hidden, direction=direction, layout=layout))
    return list(op.GRU(x, w, r, b, None, h0, hidden_size=hidden, direction=direction, layout=layout,
                       linear_before_reset=1))


TRANSLATIONS = {torch.ops.nnshrink.onnx_rnn.default: _translate}


class OnnxRNN(nn.Module):
    """A torch ``nn.LSTM``/``nn.GRU`` (one layer, batch first) with ONNX's layout: takes ``X``
    (``(seq, batch, input)``, or batch first for ``layout=1``) and optional initial states;
    returns ``Y`` (``(seq, directions, batch, hidden)`` or batch first), ``Y_h`` and, for an
    LSTM, ``Y_c``."""

    def __init__(self, rnn: nn.LSTM | nn.GRU, layout: int = 0) -> None:
        super().__init__()
        self.rnn = rnn
        self.layout = layout

    @property
    def kind(self) -> str:
        return "LSTM" if isinstance(self.rnn, nn.LSTM) else "GRU"

    def onnx_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``W``, ``R`` and ``B`` in ONNX's layout and gate order."""
        dirs = 2 if self.rnn.bidirectional else 1
        ws, rs, bs = [], [], []
        for d in range(dirs):
            sfx = "_reverse" if d else ""
            ws.append(reorder(getattr(self.rnn, f"weight_ih_l0{sfx}"), self.kind, "onnx"))
            rs.append(reorder(getattr(self.rnn, f"weight_hh_l0{sfx}"), self.kind, "onnx"))
            bs.append(torch.cat([reorder(getattr(self.rnn, f"bias_ih_l0{sfx}"), self.kind, "onnx"),
                                 reorder(getattr(self.rnn, f"bias_hh_l0{sfx}"), self.kind, "onnx")]))
        return torch.stack(ws), torch.stack(rs), torch.stack(bs)

    def forward(self, x, h0=None, c0=None):
        if torch.compiler.is_exporting():
            w, r, b = self.onnx_weights()
            return tuple(torch.ops.nnshrink.onnx_rnn(x, w, r, b, h0, c0, self.kind, self.rnn.hidden_size,
                                                     self.layout))
        dirs = 2 if self.rnn.bidirectional else 1
        if not self.layout:
            x = x.transpose(0, 1)
        elif h0 is not None:
            h0 = h0.transpose(0, 1)
            c0 = c0.transpose(0, 1) if c0 is not None else None
        if isinstance(self.rnn, nn.LSTM):
            state = None if h0 is None else (h0, c0 if c0 is not None else torch.zeros_like(h0))
            y, (h, c) = self.rnn(x, state)
        else:
            y, h = self.rnn(x, h0)
            c = None
        y = y.unflatten(-1, (dirs, self.rnn.hidden_size))  # (batch, seq, dirs, hidden)
        if not self.layout:
            y = y.permute(1, 2, 0, 3)  # (seq, dirs, batch, hidden)
        else:
            h = h.transpose(0, 1)
            c = c.transpose(0, 1) if c is not None else None
        return (y, h, c) if c is not None else (y, h)
