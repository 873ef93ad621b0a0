"""Transformer pruning: attention heads and FFN neurons, physically removed.

``compress_(model, TransformerPruneConfig(head_ratio=0.25, ffn_ratio=0.3))`` works on:

- Hugging Face BERT-style attention (a module with ``.self.query/.key/.value`` Linears and
  ``.attention_head_size``, and ``.output.dense``): the q/k/v rows and the output projection's
  columns of the dropped heads are removed, and ``num_attention_heads`` / ``all_head_size`` of
  the self-attention module are updated. transformers 5.x reshapes q/k/v with ``view(..., -1,
  head_size)`` and never reads the head count from the config in the forward, so the shared
  ``config.num_attention_heads`` stays as it is (layers may keep different head counts);
- ``nn.MultiheadAttention``: it ties the inner width (heads x head_dim) to ``embed_dim``, so it
  cannot hold fewer heads; it is replaced by ``PrunedMultiheadAttention``, the same computation
  with fewer heads, the same call signature and the same state_dict names. Variants it does not
  cover (``add_bias_kv``, ``add_zero_attn``, separate k/v dims) are refused, naming the layer;
- FFN blocks with ``.intermediate.dense`` and ``.output.dense`` (BERT's layer): intermediate
  neurons are rows of the first and columns of the second Linear.

Importance: per head, the mean-normalised L1 magnitude (or Taylor score) of its q/k/v rows and
output-projection columns; per FFN neuron, of its row and column. ``fluctuation`` (FLAP, An et
al. 2024) uses calibration data instead: a head's or neuron's score is the variance of its
contribution to the block output, ``Var(a_i) * ||W_out[:, i]||^2``, and the mean contribution of
what is removed is added to the output projection's bias (bias compensation), so a removed unit
that was nearly constant costs almost nothing. With ``reconstruct=True`` the output projection is
refit by least squares instead. By default every layer loses the same share (``head_ratio``,
``ffn_ratio``); ``scope="global"`` ranks heads (and neurons) of all layers together, so layers
that matter less lose more. At least one head and one neuron stay in every layer.
Kept heads and neurons are recorded in ``ctx.structure`` for the skeleton rebuild.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pared.apply import Context, register
from pared.config import BaseConfig, register_config
from pared.errors import InputRefused, UsageError
from pared.prune.importance import Importance, get_importance
from pared.prune.structured import (
    _check_ratio,
    accumulate_grads,
    global_keep_counts,
    example_inputs,
    kept_count,
    realized_vs_theoretical,
    reduce_to_channels,
    slice_module,
    top_channels,
)
from pared.select import select_modules

TECHNIQUE = "prune_transformer"


@register_config(TECHNIQUE)
@dataclasses.dataclass
class TransformerPruneConfig(BaseConfig):
    """Remove attention heads and FFN neurons of transformer blocks.

    Attributes:
        head_ratio: fraction of each attention layer's heads removed, in [0, 1).
        ffn_ratio: fraction of each FFN's intermediate neurons removed, in [0, 1).
        importance: ``magnitude``, ``taylor`` (needs a trainable task) or ``fluctuation``
            (needs calibration data; BERT-style blocks only; adds bias compensation). Statistics
            are taken over tokens whose attention mask is 1 when the BERT model is called with one.
        reconstruct: with ``fluctuation``, refit each pruned output projection (weights and bias)
            by least squares so it best reproduces the unpruned block output on the calibration
            tokens (Kwon et al. 2022's layer-wise reconstruction) instead of only compensating
            the bias.
        calibration_batches: calibration batches used by ``fluctuation``.
        scope: ``layer``: every layer loses the same share; ``global``: ``head_ratio`` of all
            heads (and ``ffn_ratio`` of all neurons) go where scores are lowest across layers
            (fluctuation scores compared as they are, weight scores normalised per layer).
        include: layer rules on attention modules (``...attention``, or the
            ``nn.MultiheadAttention``) and FFN blocks (BERT's ``...layer.N``).
        exclude: layer rules for modules left whole.
        round_to: kept FFN neurons are rounded up to a multiple of this.
        taylor_batches: training batches whose gradients ``taylor`` sums.
    """

    head_ratio: float = 0.25
    ffn_ratio: float = 0.3
    importance: Literal["magnitude", "taylor", "fluctuation"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    taylor_batches: int = 4
    calibration_batches: int = 16
    reconstruct: bool = False

    def validate(self) -> None:
        _check_ratio(f"{TECHNIQUE}.head_ratio", self.head_ratio)
        _check_ratio(f"{TECHNIQUE}.ffn_ratio", self.ffn_ratio)
        if self.round_to < 1:
            raise UsageError(f"{TECHNIQUE}.round_to must be >= 1, got {self.round_to}")
        if self.taylor_batches < 1:
            raise UsageError(f"{TECHNIQUE}.taylor_batches must be >= 1, got {self.taylor_batches}")
        if self.reconstruct and self.importance != "fluctuation":
            raise UsageError(f"{TECHNIQUE}.reconstruct needs importance='fluctuation' (it uses its calibration statistics)")
        if self.calibration_batches < 1:
            raise UsageError(f"{TECHNIQUE}.calibration_batches must be >= 1, got {self.calibration_batches}")


# ----------------------------------------------------------------------------- recognising layers


def is_bert_attention(m: nn.Module) -> bool:
    """A BERT-style attention block: ``.self`` with query/key/value Linears, ``.output.dense``."""
    s = getattr(m, "self", None)
    out = getattr(getattr(m, "output", None), "dense", None)
    return (isinstance(s, nn.Module) and isinstance(out, nn.Linear) and hasattr(s, "attention_head_size")
            and all(isinstance(getattr(s, k, None), nn.Linear) for k in ("query", "key", "value")))


def is_bert_ffn(m: nn.Module) -> bool:
    """A block with ``.intermediate.dense`` feeding ``.output.dense`` (BERT's layer)."""
    up = getattr(getattr(m, "intermediate", None), "dense", None)
    down = getattr(getattr(m, "output", None), "dense", None)
    return isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and down.in_features == up.out_features


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        return "mha"
    if is_bert_attention(m):
        return "bert_attention"
    if is_bert_ffn(m):
        return "ffn"
    return None


# -------------------------------------------------------------------- nn.MultiheadAttention stand-in


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with fewer heads: inner width ``num_heads * head_dim`` may be
    smaller than ``embed_dim``.

    Same call (``query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal``), same return ``(output, weights or None)`` and the same
    state_dict names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``). ``attn_mask`` may be
    2-D (L, S) or 3-D (N * num_heads, L, S) with this module's head count. Averaged attention
    weights average over the kept heads only.
    """

    pared_fx_leaf = True  # its branches on mask/batch layout are not fx-traceable

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **factory)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one unbatched sequence
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, tq, _ = query.shape
        inner = self.num_heads * self.head_dim
        w, bias = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (bias[:inner], bias[inner:2 * inner], bias[2 * inner:]) if bias is not None else (None, None, None)
        q = F.linear(query, w[:inner], bq).view(b, tq, self.num_heads, self.head_dim).transpose(1, 2)
        k = F.linear(key, w[inner:2 * inner], bk).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = F.linear(value, w[2 * inner:], bv).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, b, self.num_heads, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, h, Lq, Lk)
            if is_causal and mask is None:
                causal = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), p)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal and mask is None)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, inner))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


def _merge_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, b: int, h: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """One additive float mask broadcastable to (B, h, Lq, Lk) from nn.MHA's two mask kinds."""
    out: torch.Tensor | None = None
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        if m.dim() == 3:  # (B * h, Lq, Lk)
            m = m.view(b, h, m.shape[-2], m.shape[-1])
        out = m
    if key_padding_mask is not None:
        kp = _additive(key_padding_mask, dtype)[:, None, None, :]  # (B, 1, 1, Lk)
        out = kp if out is None else out + kp
    return out


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:  # True = not allowed to attend (nn.MHA's convention)
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


# -------------------------------------------------------------------------------- surgery (pure-ish)


def _head_rows(heads: list[int], head_dim: int, total_inner: int, blocks: int) -> list[int]:
    """Row indices of the kept heads in ``blocks`` stacked projections of ``total_inner`` rows."""
    return [blk * total_inner + h * head_dim + i for blk in range(blocks) for h in heads for i in range(head_dim)]


def prune_bert_attention(att: nn.Module, heads: list[int]) -> None:
    """Keep only ``heads`` (indices) of a BERT-style attention block, in place."""
    s = att.self
    d = s.attention_head_size
    rows = _head_rows(heads, d, s.query.out_features, 1)
    for name in ("query", "key", "value"):
        setattr(s, name, slice_module(getattr(s, name), rows, None))
    att.output.dense = slice_module(att.output.dense, None, rows)
    s.num_attention_heads = len(heads)
    s.all_head_size = len(heads) * d


def prune_mha(mha: nn.Module, heads: list[int]) -> PrunedMultiheadAttention:
    """A ``PrunedMultiheadAttention`` holding only ``heads`` of ``mha`` (an nn.MHA or an already
    pruned one)."""
    _check_mha(mha)
    d = mha.head_dim
    inner = mha.num_heads * d
    rows = torch.as_tensor(_head_rows(heads, d, inner, 3), dtype=torch.long)
    ref = mha.in_proj_weight
    new = PrunedMultiheadAttention(mha.embed_dim, len(heads), d, bias=mha.in_proj_bias is not None,
                                   batch_first=mha.batch_first, dropout=float(mha.dropout),
                                   device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        new.in_proj_weight.copy_(mha.in_proj_weight[rows])
        if mha.in_proj_bias is not None:
            new.in_proj_bias.copy_(mha.in_proj_bias[rows])
    new.out_proj = slice_module(mha.out_proj, None, _head_rows(heads, d, inner, 1))
    return new.train(mha.training)


def _check_mha(mha: nn.Module) -> None:
    if isinstance(mha, PrunedMultiheadAttention):
        return
    name = "nn.MultiheadAttention"
    if not mha._qkv_same_embed_dim:
        raise UsageError(f"{TECHNIQUE}: {name} with kdim/vdim different from embed_dim is not supported")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UsageError(f"{TECHNIQUE}: {name} with add_bias_kv or add_zero_attn is not supported")


def prune_ffn(block: nn.Module, neurons: list[int]) -> None:
    """Keep only ``neurons`` of a block's ``intermediate.dense`` -> ``output.dense``, in place."""
    block.intermediate.dense = slice_module(block.intermediate.dense, neurons, None)
    block.output.dense = slice_module(block.output.dense, None, neurons)


# ------------------------------------------------------------------------------------- scores


def head_scores(m: nn.Module, importance: Importance, grads: dict[str, torch.Tensor] | None, prefix: str) -> torch.Tensor:
    """One score per head: q/k/v rows and output columns, each mean-normalised, averaged."""
    def sc(name: str, w: torch.Tensor) -> torch.Tensor:
        return importance(w, grads.get(f"{prefix}{name}") if grads is not None else None)

    if _kind(m) == "mha":
        h, d = m.num_heads, m.head_dim
        w = sc("in_proj_weight", m.in_proj_weight).reshape(3, h, d, -1)
        parts = [w[i].reshape(h, -1).double().mean(dim=1) for i in range(3)]
        out = sc("out_proj.weight", m.out_proj.weight)
    else:
        s = m.self
        h, d = s.num_attention_heads, s.attention_head_size
        parts = [sc(f"self.{k}.weight", getattr(s, k).weight).reshape(h, -1).double().mean(dim=1)
                 for k in ("query", "key", "value")]
        out = sc("output.dense.weight", m.output.dense.weight)
    parts.append(out.reshape(out.shape[0], h, d).transpose(0, 1).reshape(h, -1).double().mean(dim=1))
    return torch.stack([p / p.mean().clamp_min(1e-12) for p in parts]).mean(dim=0)


def neuron_scores(block: nn.Module, importance: Importance, grads: dict[str, torch.Tensor] | None, prefix: str) -> torch.Tensor:
    """One score per FFN neuron: its ``intermediate.dense`` row and ``output.dense`` column."""
    up, down = block.intermediate.dense.weight, block.output.dense.weight
    g = (lambda n: grads.get(f"{prefix}{n}")) if grads is not None else (lambda n: None)
    rows = reduce_to_channels(importance(up, g("intermediate.dense.weight")), 0)
    cols = reduce_to_channels(importance(down, g("output.dense.weight")), 1)
    return torch.stack([p / p.mean().clamp_min(1e-12) for p in (rows, cols)]).mean(dim=0)


# ------------------------------------------------------------------------------------- handler


@register(TransformerPruneConfig)
def _apply_transformer(model: nn.Module, cfg: TransformerPruneConfig, ctx: Context) -> nn.Module:
    key = ctx.structure_key(TECHNIQUE)
    if ctx.skeleton:
        _rebuild(model, ctx.structure.get(key), key)
        return model
    chosen = select_modules(model, candidate=lambda n, m: _kind(m) is not None, include=cfg.include, exclude=cfg.exclude)
    if not chosen:
        raise UsageError(f"{TECHNIQUE}: no BERT-style attention, nn.MultiheadAttention or BERT-style FFN block found")
    for name, m in chosen:
        if _kind(m) == "mha":
            try:
                _check_mha(m)
            except UsageError as exc:
                raise UsageError(f"{exc} (layer '{name}'); exclude it") from None
    inputs = _inputs_or_none(ctx)
    before = _facts(model, inputs)
    stats: dict[str, UnitStats] = {}
    if cfg.importance == "fluctuation":
        stats = _calibrate(model, chosen, ctx, cfg)
    importance = get_importance(cfg.importance) if cfg.importance != "fluctuation" else None
    grads = accumulate_grads(model, ctx, cfg.taylor_batches, TECHNIQUE) if cfg.importance == "taylor" else None
    head_scores_of: dict[str, torch.Tensor] = {}
    ffn_scores_of: dict[str, torch.Tensor] = {}
    for name, m in chosen:
        prefix = f"{name}." if name else ""
        kind = _kind(m)
        if kind in ("mha", "bert_attention") and cfg.head_ratio > 0:
            head_scores_of[name] = stats[name].fluctuation() if stats else head_scores(m, importance, grads, prefix)
        elif kind == "ffn" and cfg.ffn_ratio > 0:
            ffn_scores_of[name] = stats[name].fluctuation() if stats else neuron_scores(m, importance, grads, prefix)
    layers: dict[str, dict[str, Any]] = {}
    for scores_of, ratio, round_to, field in ((head_scores_of, cfg.head_ratio, 1, "heads"),
                                              (ffn_scores_of, cfg.ffn_ratio, cfg.round_to, "neurons")):
        counts = {n: kept_count(len(s), ratio, round_to) for n, s in scores_of.items()}
        if cfg.scope == "global":  # fluctuation is output variance: comparable across layers
            counts = global_keep_counts(scores_of, ratio, round_to, normalize=not stats)
        for name, scores in scores_of.items():
            keep = top_channels(scores, counts[name])
            if len(keep) < len(scores):
                layers[name] = {"kind": _kind(model.get_submodule(name)), field: keep, "of": len(scores)}
    for name, entry in layers.items():
        if name in stats:  # before slicing: the removed units' columns are still there
            fix = _refit if cfg.reconstruct else _compensate_bias
            fix(model.get_submodule(name), stats[name], entry)
    _apply_layers(model, layers)
    ctx.structure[key] = {"layers": layers}
    after = _facts(model, inputs)
    ctx.summary.append({
        "technique": TECHNIQUE,
        "importance": cfg.importance,
        "layers": [{"layer": n, "kind": e["kind"], "before": e["of"],
                    "after": len(e.get("heads") or e.get("neurons") or [])} for n, e in layers.items()],
        **realized_vs_theoretical(before, after, ideal_ratio=_ideal_ratio(before["params"], layers, model)),
    })
    return model


# ------------------------------------------------------------- fluctuation (calibration statistics)


@dataclasses.dataclass
class UnitStats:
    """Running sums of each unit's contribution to its block's output projection.

    A unit is an FFN neuron (contribution ``a_i * W[:, i]``) or an attention head (contribution
    ``ctx_h @ W[:, h]^T``). ``total`` sums the contribution vectors, ``sq`` their squared norms,
    over ``count`` tokens.
    """

    total: torch.Tensor  # (units, out_features)
    sq: torch.Tensor  # (units,)
    count: float = 0.0
    gram: torch.Tensor | None = None  # (in + 1, in + 1): X^T X of [inputs, 1], for ``reconstruct``

    def fluctuation(self) -> torch.Tensor:
        """Per unit, E||c||^2 - ||E c||^2: the output error of replacing it by its mean."""
        if self.count == 0:
            raise UsageError(f"{TECHNIQUE}: calibration never reached a selected layer")
        mean = self.total / self.count
        return (self.sq / self.count - (mean * mean).sum(dim=1)).clamp_min(0)

    def mean_contribution(self) -> torch.Tensor:
        return self.total / max(self.count, 1.0)


def _accumulate(st: UnitStats, x: torch.Tensor, weight: torch.Tensor, units: int) -> None:
    """Add (N, in) inputs of an output projection ``weight`` (out, in) to the running sums."""
    n, width = x.shape
    per = width // units
    if per == 1:  # FFN neurons: contribution a_i * W[:, i]; no (N, units, out) tensor needed
        st.total += x.sum(dim=0)[:, None] * weight.T
        st.sq += (x * x).sum(dim=0) * (weight * weight).sum(dim=0)
    else:  # heads: contribution ctx_h @ W[:, h]^T, (N, heads, out) is small
        c = torch.einsum("nud,oud->nuo", x.reshape(n, units, per), weight.reshape(weight.shape[0], units, per))
        st.total += c.sum(dim=0)
        st.sq += (c * c).sum(dim=(0, 2))
    st.count += float(n)
    if st.gram is not None:
        xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1).float()
        st.gram += (xa.T @ xa).double()  # float32 product per batch, float64 running sum


def _calibrate(model: nn.Module, chosen: list[tuple[str, nn.Module]], ctx: Context, cfg: TransformerPruneConfig) -> dict[str, UnitStats]:
    from pared.calib import checked_batches

    if ctx.calib is None:
        raise UsageError(f"{TECHNIQUE}: importance='fluctuation' needs calibration data (calib=...)")
    stats: dict[str, UnitStats] = {}
    token_mask: list[torch.Tensor | None] = [None]
    hooks = []

    def grab_mask(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        token_mask[0] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    for mod in model.modules():
        if hasattr(mod, "embeddings") and hasattr(mod, "encoder"):  # the HF BertModel itself
            hooks.append(mod.register_forward_pre_hook(grab_mask, with_kwargs=True))
    for name, m in chosen:
        kind = _kind(m)
        if kind == "mha":
            raise UsageError(f"{TECHNIQUE}: importance='fluctuation' supports BERT-style blocks, not "
                             f"nn.MultiheadAttention ('{name}'); use 'magnitude' or exclude it")
        proj = m.output.dense
        units = m.self.num_attention_heads if kind == "bert_attention" else proj.in_features

        def observe(mod: nn.Module, args: tuple, name: str = name, units: int = units) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).double()
            mask = token_mask[0]
            if mask is not None and mask.shape == x.shape[:-1]:
                flat = flat[mask.reshape(-1).bool()]
            w = mod.weight.detach().double()
            gram = torch.zeros(w.shape[1] + 1, w.shape[1] + 1, dtype=torch.float64) if cfg.reconstruct else None
            st = stats.setdefault(name, UnitStats(torch.zeros(units, w.shape[0], dtype=torch.float64),
                                                  torch.zeros(units, dtype=torch.float64), gram=gram))
            _accumulate(st, flat, w, units)

        hooks.append(proj.register_forward_pre_hook(observe))
    try:
        with torch.inference_mode():
            for batch in checked_batches(ctx.calib, limit=cfg.calibration_batches):
                model(*batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n, m in chosen if n not in stats and _kind(m) is not None]
    if missing:
        raise UsageError(f"{TECHNIQUE}: calibration data never reached {missing}")
    return stats


def _compensate_bias(m: nn.Module, st: UnitStats, entry: dict[str, Any]) -> None:
    """Add the removed units' mean contribution to the output projection's bias (FLAP)."""
    proj = m.output.dense
    if proj.bias is None:
        return
    kept = set(entry.get("heads") or entry.get("neurons") or [])
    removed = [u for u in range(entry["of"]) if u not in kept]
    with torch.no_grad():
        proj.bias += st.mean_contribution()[removed].sum(dim=0).to(proj.bias.dtype)


def _refit(m: nn.Module, st: UnitStats, entry: dict[str, Any]) -> None:
    """Least-squares refit of the output projection on the kept inputs (plus bias), in place.

    With X = [inputs, 1] over the calibration tokens, G = X^T X and W_aug = [W, b], the kept
    columns K solve min ||X_K V^T - X W_aug^T||: V^T = (G_KK + lambda I)^-1 G_K: W_aug^T.
    The removed columns are left as they are (the slicing that follows drops them).
    """
    proj = m.output.dense
    if st.gram is None or proj.bias is None:
        return
    width = proj.in_features
    per = width // entry["of"]
    kept_units = entry.get("heads") or entry.get("neurons") or []
    cols = [u * per + i for u in kept_units for i in range(per)] + [width]  # + the bias column
    g = st.gram
    w_aug = torch.cat([proj.weight.detach().double(), proj.bias.detach().double()[:, None]], dim=1)
    g_kk = g[cols][:, cols]
    ridge = 1e-4 * g_kk.diagonal().mean() * torch.eye(len(cols), dtype=g.dtype)
    v_t = torch.linalg.solve(g_kk + ridge, g[cols] @ w_aug.T)  # (K + 1, out)
    with torch.no_grad():
        idx = torch.as_tensor(cols[:-1], dtype=torch.long)
        proj.weight[:, idx] = v_t[:-1].T.to(proj.weight.dtype)
        proj.bias.copy_(v_t[-1].to(proj.bias.dtype))


def _apply_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    for name, entry in layers.items():
        m = model.get_submodule(name) if name else model
        if entry["kind"] == "mha":
            new = prune_mha(m, entry["heads"])
            if name:
                model.set_submodule(name, new)
            else:
                raise UsageError(f"{TECHNIQUE}: cannot replace the root module; wrap the attention in a model")
        elif entry["kind"] == "bert_attention":
            prune_bert_attention(m, entry["heads"])
        else:
            prune_ffn(m, entry["neurons"])


def _rebuild(model: nn.Module, entry: Any, key: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("layers"), dict):
        raise InputRefused(f"artefact structure has no valid '{key}' entry: cannot rebuild the pruned heads")
    for name, spec in entry["layers"].items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise InputRefused(f"artefact structure names layer '{name}', which the model does not have") from None
        kind = spec.get("kind") if isinstance(spec, dict) else None
        field = "neurons" if kind == "ffn" else "heads"
        idx = spec.get(field) if isinstance(spec, dict) else None
        if kind not in ("mha", "bert_attention", "ffn") or kind != _kind(m):
            raise InputRefused(f"artefact structure entry of '{name}' does not match the model's layer")
        limit = _count(m, kind)
        if (not isinstance(idx, list) or not idx or not all(isinstance(i, int) and 0 <= i < limit for i in idx)):
            raise InputRefused(f"artefact structure: {field} of '{name}' must be integers in [0, {limit})")
    _apply_layers(model, entry["layers"])


def _count(m: nn.Module, kind: str) -> int:
    if kind == "mha":
        return m.num_heads
    if kind == "bert_attention":
        return m.self.num_attention_heads
    return m.intermediate.dense.out_features


def _inputs_or_none(ctx: Context) -> tuple[torch.Tensor, ...] | None:
    try:
        return example_inputs(ctx, TECHNIQUE)
    except UsageError:
        return None  # MACs are then left out of the summary; head pruning needs no trace


def _facts(model: nn.Module, inputs: tuple[torch.Tensor, ...] | None) -> dict[str, int]:
    from pared.measure import count_macs, count_params

    out = {"params": count_params(model),
           "bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}
    if inputs is not None:
        out["macs"] = count_macs(model, inputs)
    return out


def _ideal_ratio(params_before: int, layers: dict[str, dict[str, Any]], model: nn.Module) -> float:
    """Theoretical params ratio: the pruned Linears' weights shrink by exactly the removed share
    of their heads or neurons (biases and norms ignored), everything else stays."""
    removed = 0
    for name, e in layers.items():
        m = model.get_submodule(name) if name else model
        gone = e["of"] - len(e.get("heads") or e.get("neurons") or [])
        if e["kind"] == "ffn":
            removed += 2 * gone * m.output.dense.out_features
        else:
            embed = m.embed_dim if e["kind"] == "mha" else m.output.dense.out_features
            d = m.head_dim if e["kind"] == "mha" else m.self.attention_head_size
            removed += 4 * gone * d * embed
    return 1.0 - removed / params_before if params_before else 1.0
