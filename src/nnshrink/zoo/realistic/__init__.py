"""The realistic zoo: six models shaped like real third-party ones, trained here on generated data.

Where the MNIST zoo has four image classifiers, these carry what real exports carry (LSTMs, CTC
outputs, FPN upsampling, transposed convs, squeeze-excite, PReLU, two-headed outputs, 1-D audio
convs, attention) and each is scored with its own task metric (higher is better):

=============  ===============================================  ==========================
name           task and data                                    metric
=============  ===============================================  ==========================
``crnn``       read rendered digit strings (CTC)                character accuracy
``dbnet``      segment rendered words on a page                 mask IoU at 0.5
``mbv3``       classify pasted shapes                           top-1 accuracy
``pnet``       face / not face on 12x12 patches, plus its box   (accuracy + mean box IoU) / 2
``pitchnet``   pitch of synthesized harmonic tones              raw pitch accuracy (50 cents)
``transformer``MNIST digits read row by row as a sequence       top-1 accuracy
=============  ===============================================  ==========================

:func:`pretrained` trains (about a minute each on two cores) and caches a checkpoint keyed by
the code and the recipe; :func:`task` gives a model's data, loss and metric, and
:func:`exports` writes it as ONNX the ways real models arrive.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnshrink.errors import ConfigError
from nnshrink.zoo.realistic import data as gen
from nnshrink.zoo.realistic import models as arch

Batch = tuple[torch.Tensor, ...]


@dataclass
class Task:
    """One realistic-zoo model: how to build, feed, train and score it.

    Attributes:
        name: Zoo name.
        metric_name: What :meth:`evaluate` returns (higher is better).
        build: Makes the untrained model.
        splits: ``split -> (inputs, *targets)`` tensors (``train``, ``val``, ``test``).
        loss: ``loss(outputs, *targets)`` for training.
        score: ``score(outputs, *targets) -> float`` over a whole split.
        steps, batch_size, lr: The training recipe.
        dynamic: Input axes that vary in use, besides the batch (``{2: "height", 3: "width"}``).
        example_shapes: Other input shapes the model must accept (drop-in tests).
    """

    name: str
    metric_name: str
    build: Callable[[], nn.Module]
    splits: dict[str, Batch]
    loss: Callable[..., torch.Tensor]
    score: Callable[..., float]
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    dynamic: dict[int, str] = field(default_factory=dict)
    example_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def inputs(self) -> torch.Tensor:
        return self.splits["test"][0]

    def calibration(self, n: int = 64) -> torch.Tensor:
        """Unlabelled inputs from the training split."""
        return self.splits["train"][0][:n]

    def evaluate(self, model: nn.Module, split: str = "test") -> float:
        """The task metric of ``model`` on ``split`` (eval mode, no gradients)."""
        x, *targets = self.splits[split]
        return self.score(run_batched(model, x), *targets)


def run_batched(model: nn.Module, x: torch.Tensor, batch: int = 256):
    """``model(x)`` in eval mode, in batches (tuples of outputs concatenated per output)."""
    was = model.training
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(x[i:i + batch]))
    model.train(was)
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))
    return torch.cat(outs)


# -- metrics ----------------------------------------------------------------------------------
def ctc_greedy(log_probs: torch.Tensor) -> list[list[int]]:
    """Best-path CTC decoding of ``(N, T, C)`` scores: collapse repeats, drop blanks (0)."""
    best = log_probs.argmax(-1).tolist()
    out = []
    for seq in best:
        chars, prev = [], 0
        for c in seq:
            if c != prev and c != 0:
                chars.append(c)
            prev = c
        out.append(chars)
    return out


def _edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def char_accuracy(log_probs, labels, lengths) -> float:
    """1 - (character edit distance / characters), over all lines."""
    decoded = ctc_greedy(log_probs)
    errors = sum(_edit_distance(d, lab[:n].tolist()) for d, lab, n in zip(decoded, labels, lengths))
    return max(0.0, 1.0 - errors / max(1, int(lengths.sum())))


def mask_iou(prob, mask) -> float:
    pred, gt = prob > 0.5, mask > 0.5
    return float((pred & gt).sum()) / max(1, int((pred | gt).sum()))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(N, 4)`` ``(x1, y1, x2, y2)`` box arrays."""
    lo, hi = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(1)
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1) + (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area - inter).clamp(min=1e-9)


def face_score(outputs, labels, boxes) -> float:
    prob, box = (o.flatten(1) for o in outputs)
    acc = float((prob.argmax(1) == labels).float().mean())
    pos = labels == 1
    iou = float(box_iou(box[pos], boxes[pos]).mean()) if pos.any() else 0.0
    return (acc + iou) / 2


def top1(logits, labels) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def pitch_accuracy(salience, pitch) -> float:
    return float(((salience.argmax(-1).float() - pitch).abs() <= 0.5).float().mean())


# -- losses -----------------------------------------------------------------------------------
def _ctc_loss(log_probs, labels, lengths):
    n, t, _ = log_probs.shape
    return F.ctc_loss(log_probs.transpose(0, 1), labels, torch.full((n,), t, dtype=torch.long), lengths,
                      zero_infinity=True)


def _dice_bce(prob, mask):
    inter = (prob * mask).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + mask.sum() + 1)
    return F.binary_cross_entropy(prob, mask) + dice


def _face_loss(outputs, labels, boxes):
    prob, box = (o.flatten(1) for o in outputs)
    cls = F.nll_loss(torch.log(prob.clamp(min=1e-7)), labels)
    pos = labels == 1
    reg = F.mse_loss(box[pos], boxes[pos]) if pos.any() else prob.sum() * 0
    return cls + 10 * reg


def _pitch_loss(salience, pitch):
    return F.binary_cross_entropy(salience, torch.from_numpy(gen.pitch_targets(pitch.numpy())))


# -- tasks --------------------------------------------------------------------------------------
SIZES = {"train": 1.0, "val": 0.125, "test": 0.25}


def _split_seeds(seed: int) -> dict[str, int]:
    return {"train": 1000 + seed, "val": 2000 + seed, "test": 3000 + seed}


def _generated(fn, n: int, seed: int = 0) -> dict[str, Batch]:
    out = {}
    for split, s in _split_seeds(seed).items():
        arrays = fn(max(8, int(n * SIZES[split])), s)
        out[split] = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return out


def _mnist_rows() -> dict[str, Batch]:
    from nnshrink.data import load_dataset

    ds = load_dataset("mnist")
    return {s: (torch.from_numpy(x[:, 0].copy()), torch.from_numpy(y.astype(np.int64)))
            for s, (x, y) in ds.splits.items()}


def _tasks(scale: float) -> dict[str, Callable[[], Task]]:
    def n(v: int) -> int:
        return max(16, int(v * scale))

    return {
        "crnn": lambda: Task("crnn", "character accuracy", lambda: arch.CRNN(len(gen.ALPHABET)),
                             _generated(gen.text_lines, n(4000)), _ctc_loss, char_accuracy, steps=1500,
                             lr=2e-3, dynamic={3: "width"}, example_shapes=((1, 1, 32, 64), (3, 1, 32, 200))),
        "dbnet": lambda: Task("dbnet", "mask IoU", arch.DBNet, _generated(gen.text_pages, n(1500)), _dice_bce,
                              mask_iou, steps=800, batch_size=16, dynamic={2: "height", 3: "width"},
                              example_shapes=((1, 1, 48, 80), (2, 1, 96, 64))),
        "mbv3": lambda: Task("mbv3", "top-1 accuracy", arch.MobileNetV3, _generated(gen.shapes, n(6000)),
                             F.cross_entropy, top1, steps=1500, batch_size=64),
        "pnet": lambda: Task("pnet", "(accuracy + box IoU) / 2", arch.PNet, _generated(gen.faces, n(8000)),
                             _face_loss, face_score, steps=1500, batch_size=64,
                             dynamic={2: "height", 3: "width"}, example_shapes=((1, 3, 24, 30),)),
        "pitchnet": lambda: Task("pitchnet", "raw pitch accuracy", arch.PitchNet, _generated(gen.tones, n(6000)),
                                 _pitch_loss, pitch_accuracy, steps=1200, batch_size=64),
        "transformer": lambda: Task("transformer", "top-1 accuracy", arch.TinyTransformer, _mnist_rows(),
                                    F.cross_entropy, top1, steps=1500, batch_size=64, lr=2e-3,
                                    dynamic={1: "sequence"}, example_shapes=((2, 20, 28), (1, 40, 28))),
    }


NAMES = tuple(_tasks(1.0))


def task(name: str, scale: float = 1.0) -> Task:
    """The task of realistic-zoo model ``name``; ``scale`` shrinks the generated data (tests)."""
    tasks = _tasks(scale)
    if name not in tasks:
        raise ConfigError(f"unknown realistic-zoo model {name!r}; choose one of {', '.join(NAMES)}")
    return tasks[name]()


def fit(model: nn.Module, t: Task, steps: int | None = None, seed: int = 0, show_progress: bool = True,
        lr: float | None = None) -> nn.Module:
    """Train ``model`` in place on ``t``'s training split (AdamW, one-cycle schedule)."""
    from nnshrink.progress import progress_bar

    torch.manual_seed(seed)
    gen_ = torch.Generator().manual_seed(seed)
    train = t.splits["train"]
    total = steps if steps is not None else t.steps
    lr = lr or t.lr
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    model.train()
    with progress_bar(f"training {t.name}", total, enabled=show_progress) as advance:
        for _ in range(total):
            idx = torch.randint(0, len(train[0]), (t.batch_size,), generator=gen_)
            x, *targets = (a[idx] for a in train)
            loss = t.loss(model(x), *targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            advance(1)
    return model.eval()


def checkpoint_path(name: str, seed: int = 0):
    from nnshrink.cache import cache_dir, code_fingerprint
    from nnshrink.zoo import realistic
    from nnshrink.zoo.realistic import data, models

    key = hashlib.sha256(json.dumps([name, seed, code_fingerprint(realistic, data, models)]).encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"realistic-{name}-{key}-s{seed}.safetensors"


def pretrained(name: str, seed: int = 0, show_progress: bool = True) -> tuple[nn.Module, Task]:
    """Realistic-zoo model ``name`` trained by its recipe (cached), and its task."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from nnshrink.cache import atomic_path

    t = task(name)
    torch.manual_seed(seed)
    model = t.build()
    path = checkpoint_path(name, seed)
    if path.exists():
        try:
            model.load_state_dict(load_file(path))
            return model.eval(), t
        except (SafetensorError, RuntimeError, OSError):
            path.unlink(missing_ok=True)
    fit(model, t, seed=seed, show_progress=show_progress)
    meta = {"name": name, "seed": str(seed), "metric": t.metric_name, "test": f"{t.evaluate(model):.4f}"}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    return model.eval(), t
