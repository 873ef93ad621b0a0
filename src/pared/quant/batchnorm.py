"""Fold BatchNorm into the preceding convolution before quantizing it.

Integer kernels run Conv+BN as one convolution; quantizing the conv weights before folding
would quantize the wrong weights. Found with torch.fx; a model that does not trace is left as
it is (and nothing is folded), which only costs speed, never correctness.
"""

from __future__ import annotations

import torch
from torch import fx, nn


def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every ``Conv2d -> BatchNorm2d`` pair (conv output used only by the BN), in place.

    The BatchNorm module is replaced by ``nn.Identity``. Returns the names of folded BN layers.
    """
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models simply keep their BatchNorms
        return []
    modules = dict(model.named_modules())
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = modules.get(src.target)
        if isinstance(conv, nn.Conv2d):
            fold_conv_bn_(conv, modules[node.target])
            model.set_submodule(node.target, nn.Identity())
            folded.append(node.target)
    return folded


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv``'s weight and bias so that ``conv(x) == bn(conv_old(x))`` in eval mode."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    conv.bias = nn.Parameter(new_bias)
