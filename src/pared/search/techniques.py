"""Search spaces of the techniques pared had before the search existed.

New techniques register their space next to their own config (see ``pared.search.space``); these
live here only because their modules predate the search. Ranges are the useful ones measured in
docs/quantization.md, docs/pruning-*.md and docs/clustering.md, not each config's full domain.

Slots and recipe order: ``prune`` (10) -> ``recover`` (30) -> ``quantize`` (40).
"""

from __future__ import annotations

from pared.cluster import ClusterConfig
from pared.prune import ChannelPruneConfig, MagnitudePruneConfig, TransformerPruneConfig
from pared.quant import Int8Config, SmoothQuantConfig, WeightOnlyConfig
from pared.search.space import NONE, ModelInfo, TrialLike, register_space
from pared.train import FinetuneConfig

PER_GROUP = 2  # per-group knobs only for the most sensitive groups: few params, most of the gain


@register_space("int8", slot="quantize", order=40)
def int8_space(trial: TrialLike, info: ModelInfo) -> list | None:
    """Static (optionally SmoothQuant first, optionally with int8 attention matmuls) or dynamic
    int8; sensitive groups may stay float."""
    if not info.layers_of("Linear", "Conv2d"):
        return None
    mode = trial.suggest_categorical("int8.mode", ["static", "dynamic"])
    exclude = tuple(info.group_rule(g) for g in info.most_sensitive("int8", PER_GROUP)
                    if trial.suggest_categorical(f"int8.float.{g}", [False, True]))
    if mode == "dynamic":
        if not info.layers_of("Linear"):
            return None  # dynamic int8 covers Linear layers only
        return [Int8Config(mode="dynamic", exclude=exclude)]
    steps: list = []
    if info.layers_of("Linear") and trial.suggest_categorical("int8.smoothquant", [True, False]):
        steps.append(SmoothQuantConfig(alpha=trial.suggest_float("int8.alpha", 0.5, 0.95, step=0.05)))
    calibration = trial.suggest_categorical("int8.calibration", ["minmax", "percentile"])
    # Int8 attention matmuls: faster in OpenVINO, a little less accurate (docs/quantization.md).
    attention = info.hf_attention and trial.suggest_categorical("int8.attention", [False, True])
    # Keeping the most sensitive attention block float buys back most of attention's error.
    kept = trial.suggest_categorical("int8.attention_float", [0, 1]) if attention else 0
    return [*steps, Int8Config(mode="static", calibration=calibration, exclude=exclude, attention=attention,
                               attention_float=kept)]


@register_space("weight_only", slot="quantize", order=40)
def weight_only_space(trial: TrialLike, info: ModelInfo) -> WeightOnlyConfig | None:
    """Grouped int4/int8 weight-only quantization with a group size every Linear accepts."""
    sizes = [g for g in (32, 64, 128) if info.in_features and all(w % g == 0 for w in info.in_features.values())]
    if not sizes:
        return None
    return WeightOnlyConfig(
        bits=trial.suggest_categorical("weight_only.bits", [4, 8]),
        group_size=trial.suggest_categorical("weight_only.group_size", sizes),
        method=trial.suggest_categorical("weight_only.method", ["rtn", "gptq"]),
        embeddings=bool(info.layers_of("Embedding")),
    )


@register_space("cluster", slot="quantize", order=40)
def cluster_space(trial: TrialLike, info: ModelInfo) -> ClusterConfig | None:
    """k-means weight sharing with 2**bits clusters per layer (a storage gain, not a speed one)."""
    if not info.layers_of("Linear", "Conv2d") or info.attention:
        return None  # k-means over every transformer weight is minutes per trial
    smallest = min((info.weights.get(n, 1 << 30) for n in info.layers_of("Linear", "Conv2d")), default=1)
    most = min(8, smallest.bit_length() - 1)  # 2**bits clusters must not exceed any layer's weights
    if most < 3:
        return None
    return ClusterConfig(bits=trial.suggest_int("cluster.bits", 3, most))


@register_space("magnitude_prune", slot="prune", order=10)
def magnitude_prune_space(trial: TrialLike, info: ModelInfo) -> MagnitudePruneConfig | None:
    """Unstructured sparsity, with its own ratio for each of the most prune-sensitive groups."""
    if not info.layers_of("Linear", "Conv2d"):
        return None
    sparsity = trial.suggest_float("magnitude_prune.sparsity", 0.2, 0.95, step=0.05)
    per_layer = {info.group_rule(g): trial.suggest_float(f"magnitude_prune.sparsity.{g}", 0.0, 0.9, step=0.1)
                 for g in info.most_sensitive("prune50", PER_GROUP)}
    return MagnitudePruneConfig(sparsity=sparsity, per_layer=per_layer)


@register_space("prune_channels", slot="prune", order=10)
def channel_prune_space(trial: TrialLike, info: ModelInfo) -> ChannelPruneConfig | None:
    """Remove conv/linear channels (CNNs; transformers use ``prune_transformer``)."""
    if not info.layers_of("Conv2d") or info.attention:
        return None
    return ChannelPruneConfig(
        ratio=trial.suggest_float("prune_channels.ratio", 0.1, 0.7, step=0.05),
        scope=trial.suggest_categorical("prune_channels.scope", ["layer", "global"]),
    )


@register_space("prune_transformer", slot="prune", order=10)
def transformer_prune_space(trial: TrialLike, info: ModelInfo) -> TransformerPruneConfig | None:
    """Remove attention heads and FFN neurons (fluctuation scores with bias compensation)."""
    if not info.attention:
        return None
    return TransformerPruneConfig(
        head_ratio=trial.suggest_int("prune_transformer.heads_of_12", 0, 6) / 12,  # whole heads of 12
        ffn_ratio=trial.suggest_float("prune_transformer.ffn_ratio", 0.0, 0.7, step=0.05),
        importance="fluctuation",
    )


@register_space("finetune", slot="recover", order=30)
def finetune_space(trial: TrialLike, info: ModelInfo) -> FinetuneConfig | None:
    """A short recovery fine-tune on the task's training data, after pruning (the prune slot is
    drawn first: with nothing pruned there is nothing to recover). A transformer step costs about
    as much as a CNN epoch here, hence its shorter range."""
    if not info.trainable or getattr(trial, "params", {}).get("prune") == NONE:
        return None
    most = 100 if info.attention else 400
    return FinetuneConfig(steps=trial.suggest_int("finetune.steps", 10, most, log=True),
                          lr=trial.suggest_float("finetune.lr", 1e-5, 1e-3, log=True))
