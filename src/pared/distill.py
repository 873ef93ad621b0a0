"""Knowledge distillation from the task's fp32 model into the model being compressed.

``compress_(student, DistillConfig(hidden=1.0, attention=1.0, steps=2000), context=Context(task=t))``
trains ``student`` with the shared loop (``pared.train``) on ``t.train_batches`` against a teacher,
a fresh ``t.model()`` that runs in inference mode and is never trained. The loss adds, to the
task's own loss:

- **logit KD** (``distill`` weight, inherited from ``FinetuneConfig``): ``T^2 KL`` at temperature
  ``T`` mixed with the task loss (Hinton et al., 2015);
- **hidden-state KD** (``hidden``): relative MSE between the outputs of matched transformer layers
  (or of modules named in ``features``), through a learned linear projection when the student is
  narrower than the teacher (TinyBERT);
- **attention-map transfer** (``attention``): KL between the teacher's and the student's
  ``softmax(Q K^T / sqrt(d))`` maps of matched layers, split into the teacher's number of heads
  (MiniLM; the split makes maps comparable when the student has fewer or narrower heads).

Sentence encoders need no labels: ``MiniLMTask``'s own loss is embedding distillation
(``embedding_loss``) on unlabeled sentences. Teacher outputs are cached per sample
(``cache_teacher``), so from the second epoch on the teacher no longer runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, register
from pared.config import register_config
from pared.errors import UsageError
from pared.student import layer_stack
from pared.teacher_cache import TeacherCache
from pared.train import (
    FinetuneConfig,
    StepHook,
    TrainableTask,
    kd_loss,
    on_accelerator,
    train,
    trainable_task,
)

__all__ = [
    "DistillConfig",
    "attention_map_loss",
    "embedding_loss",
    "hidden_state_loss",
    "kd_loss",
    "uniform_layer_map",
]


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cosine`` between (B, D) student and teacher embeddings (pure function)."""
    if student.shape != teacher.shape:
        raise UsageError(
            f"distillation: student embeddings {tuple(student.shape)} do not match teacher {tuple(teacher.shape)}"
        )
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum((s - t)^2) / sum(t^2)`` over valid positions: MSE relative to the teacher's energy,
    so layers whose activations differ in scale weigh the same.

    Args:
        student: (B, T, H) or any shape equal to ``teacher``'s (already projected to its width).
        teacher: the teacher's features.
        mask: (B, T) with 1 for real tokens, or None to count every position.
    """
    if student.shape != teacher.shape:
        raise UsageError(
            f"distillation: student features {tuple(student.shape)} do not match teacher {tuple(teacher.shape)}"
        )
    diff, energy = (student.float() - teacher.float()) ** 2, teacher.float() ** 2
    if mask is not None:
        m = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - mask.dim())))
        diff, energy = diff * m, energy * m
    return diff.sum() / energy.sum().clamp(min=1e-12)


def attention_log_probs(
    q: torch.Tensor, k: torch.Tensor, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, heads, T, T) log ``softmax(Q K^T / sqrt(d))`` from (B, T, W) projections (pure).

    Padded keys (``mask`` 0) get probability 0.
    """
    b, t, w = q.shape
    if w % heads:
        raise UsageError(f"distillation: attention width {w} is not divisible into {heads} heads")
    d = w // heads
    qh = q.float().view(b, t, heads, d).transpose(1, 2)
    kh = k.float().view(b, t, heads, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / d**0.5
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def attention_map_loss(
    student_qk: tuple[torch.Tensor, torch.Tensor],
    teacher_qk: tuple[torch.Tensor, torch.Tensor],
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(teacher map || student map)`` per query row, averaged over heads and real query tokens."""
    s_log = attention_log_probs(*student_qk, heads, mask)
    t_log = attention_log_probs(*teacher_qk, heads, mask)
    if s_log.shape != t_log.shape:
        raise UsageError(
            f"distillation: student attention maps {tuple(s_log.shape)} do not match teacher {tuple(t_log.shape)}"
        )
    kl = (t_log.exp() * (t_log - s_log)).sum(dim=-1)  # (B, heads, T)
    if mask is None:
        return kl.mean()
    rows = mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * rows).sum() / rows.sum().clamp(min=1)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer matched to each student layer: ``(j + 1) * T // S - 1``, so last maps to last.

    Example:
        >>> uniform_layer_map(3, 6)
        [1, 3, 5]
    """
    return [(j + 1) * teacher_layers // student_layers - 1 for j in range(student_layers)]


@register_config("distill")
@dataclasses.dataclass
class DistillConfig(FinetuneConfig):
    """Fine-tune with distillation from the task's fp32 model (all ``finetune`` fields apply).

    Attributes:
        hidden: weight of hidden-state distillation (0 turns it off).
        attention: weight of attention-map transfer (transformer stacks only; 0 turns it off).
        layers: ``all`` matched layer pairs, or only the ``last`` student layer.
        layer_map: the teacher layer index matched to each student layer; empty maps uniformly
            (``uniform_layer_map``: a 3-layer student of a 6-layer teacher gets 1, 3, 5).
        features: names of modules, present in both models, whose outputs are matched instead
            of transformer layers (a CNN's blocks); channel widths may differ.
        cache_teacher: keep the teacher's outputs per training sample (inference mode), so
            later epochs skip the teacher.
    """

    hidden: float = 0.0
    attention: float = 0.0
    layers: Literal["all", "last"] = "all"
    layer_map: tuple[int, ...] = ()
    features: tuple[str, ...] = ()
    cache_teacher: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("hidden", "attention"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if self.attention > 0 and self.features:
            raise UsageError(
                "distill.attention needs transformer layers; it cannot be combined with distill.features"
            )
        if any(i < 0 for i in self.layer_map):
            raise UsageError(
                f"distill.layer_map holds teacher layer indices >= 0, got {list(self.layer_map)}"
            )


@dataclasses.dataclass
class _Pair:
    """One matched (student module, teacher module) whose outputs are compared."""

    name: str
    kind: Literal["hidden", "attention"]
    student: list[nn.Module]  # one module for hidden, (query, key) for attention
    teacher: list[nn.Module]
    heads: int = 0


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _query_key(layer: nn.Module, where: str) -> list[nn.Module]:
    for q_name, k_name in (
        ("attention.self.query", "attention.self.key"),
        ("self_attn.q_proj", "self_attn.k_proj"),
    ):
        try:
            return [layer.get_submodule(q_name), layer.get_submodule(k_name)]
        except AttributeError:
            continue
    raise UsageError(
        f"distill.attention: {where} has no query/key projections (HF BERT or q_proj/k_proj layouts)"
    )


def _head_count(layer: nn.Module) -> int:
    for name in ("attention.self", "self_attn"):
        try:
            attn = layer.get_submodule(name)
        except AttributeError:
            continue
        heads = getattr(attn, "num_attention_heads", None) or getattr(attn, "num_heads", None)
        if heads:
            return int(heads)
    raise UsageError("distill.attention: cannot read the teacher's head count")


def matched_pairs(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> list[_Pair]:
    """The (student, teacher) module pairs whose outputs ``cfg`` compares.

    Raises:
        UsageError: a named feature module or a mapped teacher layer does not exist.
    """
    pairs: list[_Pair] = []
    if cfg.features:
        for name in cfg.features:
            missing = [
                who
                for who, m in (("student", student), ("teacher", teacher))
                if not _has_module(m, name)
            ]
            if missing:
                raise UsageError(
                    f"distill.features: no module {name!r} in the {' and '.join(missing)}"
                )
            pairs.append(
                _Pair(name, "hidden", [student.get_submodule(name)], [teacher.get_submodule(name)])
            )
        return pairs
    if cfg.hidden == 0 and cfg.attention == 0:
        return pairs
    s_name, s_stack = layer_stack(student)
    t_name, t_stack = layer_stack(teacher)
    mapping = list(cfg.layer_map) or uniform_layer_map(len(s_stack), len(t_stack))
    if len(mapping) != len(s_stack):
        raise UsageError(
            f"distill.layer_map has {len(mapping)} entries; the student has {len(s_stack)} layers in {s_name}"
        )
    unknown = [i for i in mapping if i >= len(t_stack)]
    if unknown:
        raise UsageError(
            f"distill.layer_map names teacher layer(s) {unknown}; the teacher has {len(t_stack)} ({t_name}.0-{len(t_stack) - 1})"
        )
    chosen = list(enumerate(mapping))[-1:] if cfg.layers == "last" else list(enumerate(mapping))
    for j, i in chosen:
        s_layer, t_layer = s_stack[j], t_stack[i]
        if cfg.hidden > 0:
            pairs.append(_Pair(f"{s_name}.{j}", "hidden", [s_layer], [t_layer]))
        if cfg.attention > 0:
            pairs.append(
                _Pair(
                    f"{s_name}.{j}",
                    "attention",
                    _query_key(s_layer, f"student layer {j}"),
                    _query_key(t_layer, f"teacher layer {i}"),
                    heads=_head_count(t_layer),
                )
            )
    return pairs


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _token_mask(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The HF convention ``(input_ids, attention_mask, ...)``: the second input when it is an
    integer mask shaped like the first; None otherwise (every position counts)."""
    if (
        len(inputs) >= 2
        and inputs[1].shape == inputs[0].shape
        and not inputs[1].is_floating_point()
        and inputs[0].dim() == 2
    ):
        return inputs[1]
    return None


class _Capture:
    """Forward hooks that keep the latest output of each given module (first tensor of tuples)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.values: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        self.values[id(module)] = _first_tensor(output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Distiller(nn.Module):
    """What the training loop trains: the student plus the projections; the forward also runs
    (or looks up) the teacher, and leaves both sides' features for the loss."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, pairs: list[_Pair], cache: bool
    ) -> None:
        super().__init__()
        self.student = student
        self.projections = nn.ModuleDict()
        self._teacher = [teacher]  # a list, so the teacher is no submodule: never trained or saved
        self.pairs = pairs
        self._student_capture = _Capture([m for p in pairs for m in p.student])
        self._teacher_capture = _Capture([m for p in pairs for m in p.teacher])
        self.cache = TeacherCache() if cache else None
        self.mask: torch.Tensor | None = None
        self.teacher_output: torch.Tensor | None = None
        self.features: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def build_projections(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Run both models once; add a Linear where a hidden pair differs only in width."""
        with torch.no_grad():
            self.forward(*inputs)
        for k, (pair, (s, t)) in enumerate(zip(self.pairs, self.features, strict=True)):
            if pair.kind != "hidden":
                continue
            s_shape, t_shape = _width_last(s[0]).shape, _width_last(t[0]).shape
            if s_shape[:-1] != t_shape[:-1]:
                raise UsageError(
                    f"distillation: {pair.name} outputs {tuple(s[0].shape)} in the student and "
                    f"{tuple(t[0].shape)} in the teacher; only the width may differ"
                )
            if s_shape[-1] != t_shape[-1]:
                self.projections[str(k)] = nn.Linear(s_shape[-1], t_shape[-1]).to(s[0].device)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.mask = _token_mask(inputs)
        teacher_values = self._teacher_values(inputs)
        self.teacher_output = teacher_values[0]
        out = self.student(*inputs)
        self.features = []
        pos = 1
        for k, pair in enumerate(self.pairs):
            s = [self._student_capture.values[id(m)] for m in pair.student]
            t = teacher_values[pos : pos + len(pair.teacher)]
            pos += len(pair.teacher)
            if str(k) in self.projections:
                s = [_project(self.projections[str(k)], s[0])]
            self.features.append((s, t))
        return out

    def _teacher_values(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """[teacher output, then each pair's teacher features], from the cache when all hit."""
        lengths = self.mask.sum(dim=1).tolist() if self.mask is not None else None
        seq_len = inputs[0].shape[1] if self.mask is not None else None
        keys = self.cache.keys(inputs, lengths) if self.cache is not None else []
        if self.cache is not None:
            hit = self.cache.lookup(keys, seq_len, inputs[0].device)
            if hit is not None:
                return hit
        teacher = self._teacher[0]
        with torch.inference_mode():
            out = _first_tensor(teacher(*inputs))
            values = [out] + [
                self._teacher_capture.values[id(m)] for p in self.pairs for m in p.teacher
            ]
            values = [v.clone() for v in values]
        if self.cache is not None:
            self.cache.store(keys, values, lengths, seq_len)
        return [v.clone() for v in values]  # plain tensors usable in autograd

    def remove_hooks(self) -> None:
        self._student_capture.remove()
        self._teacher_capture.remove()

    def distill_loss(self, cfg: DistillConfig) -> torch.Tensor:
        """The weighted hidden-state and attention terms of the last forward."""
        hidden, attention = [], []
        for pair, (s, t) in zip(self.pairs, self.features, strict=True):
            if pair.kind == "hidden":
                hidden.append(hidden_state_loss(_width_last(s[0]), _width_last(t[0]), self.mask))
            else:
                attention.append(
                    attention_map_loss((s[0], s[1]), (t[0], t[1]), pair.heads, self.mask)
                )
        total = torch.zeros(
            (), device=self.teacher_output.device if self.teacher_output is not None else None
        )
        if hidden:
            total = total + cfg.hidden * torch.stack(hidden).mean()
        if attention:
            total = total + cfg.attention * torch.stack(attention).mean()
        return total


def _width_last(x: torch.Tensor) -> torch.Tensor:
    """Channels last for (B, C, H, W) conv features; other features already end in their width."""
    return x.movedim(1, -1) if x.dim() == 4 else x


def _project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(_width_last(x)).movedim(-1, 1) if x.dim() == 4 else linear(x)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    task: TrainableTask,
    cfg: DistillConfig,
    *,
    after_step: Sequence[StepHook] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``student`` in place against ``teacher`` on ``task`` (the ``distill`` step's work).

    ``after_step`` hooks are called as ``hook(step, student)``.

    Returns:
        Summary facts: steps, final loss, matched pairs, teacher cache size.
    """
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    pairs = matched_pairs(student, teacher, cfg)
    wrapper = _Distiller(student, teacher, pairs, cfg.cache_teacher)
    try:
        probe = next(iter(task.train_batches(2, seed=cfg.seed)), None)
        if probe is None:
            raise UsageError("distill: the task yields no training batches")
        device = next((p.device for p in student.parameters()), torch.device("cpu"))
        wrapper.build_projections(tuple(t[:2].to(device) for t in probe[0]))
        if wrapper.cache is not None:
            wrapper.cache.rows.clear()  # the probe's 2-sample batch is not a training sample set

        def loss(output: torch.Tensor, target: Any) -> torch.Tensor:
            total = task.loss(output, target)
            if cfg.distill > 0:
                soft = kd_loss(output, wrapper.teacher_output, cfg.temperature)
                total = (1 - cfg.distill) * total + cfg.distill * soft
            return total + wrapper.distill_loss(cfg)

        # The wrapper's forward already gives the teacher's logits; the loop must not add its own.
        hooks = [lambda step, _wrapper, hook=hook: hook(step, student) for hook in after_step]
        result = train(
            wrapper,
            task,
            dataclasses.replace(cfg, distill=0.0),
            loss_fn=loss,
            after_step=hooks,
            progress=progress,
        )
    finally:
        wrapper.remove_hooks()
        cached = len(wrapper.cache.rows) if wrapper.cache is not None else 0
        if wrapper.cache is not None:
            # Gigabytes for a large corpus; freed now rather than whenever the cyclic collector
            # reaches the closures that still point at the wrapper. Measured: 2.5 GB of small
            # tensors left alive made MiniLM eager inference 2x slower in the same process.
            wrapper.cache.rows.clear()
    return {
        "technique": "distill",
        "steps": result.steps,
        "final_loss": result.final_loss,
        "pairs": [f"{p.kind}:{p.name}" for p in pairs],
        "projections": len(wrapper.projections),
        "cached_samples": cached,
    }


@register(DistillConfig)
def _apply_distill(model: nn.Module, cfg: DistillConfig, ctx: Context) -> nn.Module:
    if ctx.skeleton:
        return model
    task = trainable_task(ctx, "distill")
    with on_accelerator(model) as device:
        ctx.summary.append(distill(model, task.model().to(device), task, cfg))
    return model
