"""Layer selection rules shared by every technique."""

from __future__ import annotations

import pytest
from torch import nn

from pared.errors import UsageError
from pared.select import rule_matches, select_modules


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)
        self.conv = nn.Conv2d(1, 1, 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block(), Block()])
        self.head = nn.Linear(4, 2)


def _is_layer(name: str, m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d))


def _names(**kw) -> list[str]:
    return [n for n, _ in select_modules(Net(), candidate=_is_layer, **kw)]


ALL = [f"layers.{i}.{k}" for i in range(3) for k in ("query", "value", "conv")] + ["head"]


def test_no_rules_selects_every_candidate_in_model_order() -> None:
    assert _names() == ALL


def test_type_rule() -> None:
    assert _names(include=["type:Conv2d"]) == [f"layers.{i}.conv" for i in range(3)]
    linears = [n for n in ALL if not n.endswith("conv")]
    assert _names(include=["type:torch.nn.modules.linear.Linear"]) == linears
    assert rule_matches("type:Linear", "x", nn.Linear(1, 1))
    assert not rule_matches("type:Linear", "x", nn.Bilinear(1, 1, 1))
    assert not rule_matches("type:Lin", "x", nn.Linear(1, 1))


def test_glob_rule() -> None:
    assert _names(include=["layers.*.query"]) == ["layers.0.query", "layers.1.query", "layers.2.query"]
    assert _names(include=["layers.1.*"]) == ["layers.1.query", "layers.1.value", "layers.1.conv"]
    assert _names(include=["head"]) == ["head"]
    # globs are case-sensitive and anchored
    assert not rule_matches("Head", "head", nn.Linear(1, 1))
    assert not rule_matches("layers.1", "layers.1.query", nn.Linear(1, 1))


def test_regex_rule_is_fullmatch() -> None:
    assert _names(include=[r"re:layers\.[02]\.(query|value)"]) == [
        "layers.0.query", "layers.0.value", "layers.2.query", "layers.2.value"
    ]
    assert not rule_matches("re:query", "layers.0.query", nn.Linear(1, 1))  # fullmatch, not search
    assert rule_matches("re:.*query", "layers.0.query", nn.Linear(1, 1))


def test_exclude_wins_over_include() -> None:
    got = _names(include=["layers.*"], exclude=["re:.*value", "type:Conv2d"])
    assert got == ["layers.0.query", "layers.1.query", "layers.2.query"]
    assert _names(include=["head"], exclude=["head"]) == []


def test_exclude_alone() -> None:
    assert _names(exclude=["layers.*"]) == ["head"]


def test_unmatched_rules_are_listed() -> None:
    with pytest.raises(UsageError) as info:
        _names(include=["layers.*.query", "layer.*.key", "type:LSTM"])
    msg = str(info.value)
    assert "include" in msg and "'layer.*.key'" in msg and "'type:LSTM'" in msg
    assert "layers.*.query" not in msg
    with pytest.raises(UsageError, match=r"exclude.*'nothing'"):
        _names(exclude=["nothing"])


def test_rule_must_match_an_eligible_layer_not_any_module() -> None:
    # "layers.0" names a module, but not a candidate layer: a typo-guard must still fire.
    with pytest.raises(UsageError, match="layers.0"):
        _names(include=["layers.0"])


@pytest.mark.parametrize("bad", ["re:(", "re:[a-", "re:*x"])
def test_bad_regex_is_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="bad regular expression") as info:
        _names(include=[bad])
    assert bad in str(info.value) and info.value.exit_code == 2
