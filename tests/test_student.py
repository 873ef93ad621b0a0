"""Student construction: layer dropping keeps the teacher's weights, reloads, refuses bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pared.recipe  # noqa: F401 - registers every technique
from pared.apply import Context, compress_
from pared.artefact import load_artefact, save_artefact
from pared.config import config_from_dict, config_to_dict
from pared.errors import UsageError
from pared.prune.heads import TransformerPruneConfig
from pared.student import DropLayersConfig, drop_layers, kept_layers, layer_stack
from pared.testing.bert import tiny_bert, token_batch
from pared.testing.models import tiny_mlp

pytest.importorskip("transformers")


class Block(nn.Module):
    """A residual MLP block: the unit of a ``Sequential`` stack."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def block_stack(depth: int = 6) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(*[Block() for _ in range(depth)])


def test_kept_layers_every_and_keep() -> None:
    assert kept_layers(6, DropLayersConfig(every=2)) == [1, 3, 5]
    assert kept_layers(6, DropLayersConfig(every=3)) == [2, 5]
    assert kept_layers(12, DropLayersConfig(every=4)) == [3, 7, 11]
    assert kept_layers(6, DropLayersConfig(keep=(0, 2, 5))) == [0, 2, 5]


def test_unknown_layer_index_is_named() -> None:
    with pytest.raises(UsageError, match=r"layer\(s\) \[6, 9\].*has 6"):
        kept_layers(6, DropLayersConfig(keep=(0, 6, 9)))
    with pytest.raises(UsageError, match="keeps no layer"):
        kept_layers(3, DropLayersConfig(every=4))
    with pytest.raises(UsageError, match=r"bert.encoder.layer has 4"):
        compress_(tiny_bert(), DropLayersConfig(keep=(1, 4)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"every": 2, "keep": (1,)},
        {"every": -1},
        {"keep": (3, 1)},
        {"keep": (1, 1)},
        {"keep": (-1,)},
    ],
)
def test_bad_configs_are_refused(kwargs: dict) -> None:
    with pytest.raises(UsageError, match="drop_layers"):
        DropLayersConfig(**kwargs)


def test_config_round_trips() -> None:
    cfg = DropLayersConfig(keep=(0, 3), stack="bert.encoder.layer")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_bert_student_keeps_the_teacher_layers() -> None:
    teacher = tiny_bert()
    ctx = Context()
    student = compress_(copy.deepcopy(teacher), DropLayersConfig(every=2), context=ctx)
    assert ctx.summary == [
        {
            "technique": "drop_layers",
            "stack": "bert.encoder.layer",
            "layers_before": 4,
            "kept": [1, 3],
        }
    ]
    assert len(student.bert.encoder.layer) == 2 and student.bert.config.num_hidden_layers == 2
    for j, i in enumerate([1, 3]):
        s, t = (
            student.bert.encoder.layer[j].state_dict(),
            teacher.bert.encoder.layer[i].state_dict(),
        )
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    # embeddings are the teacher's too; the student runs and is smaller
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight,
        teacher.bert.embeddings.word_embeddings.weight,
    )
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )
    with torch.no_grad():
        out = student(*token_batch(3, seed=5))
    assert out.shape == (3, 32) and torch.isfinite(out).all()


def test_keeping_every_layer_changes_nothing() -> None:
    teacher = tiny_bert()
    student = compress_(copy.deepcopy(teacher), DropLayersConfig(keep=(0, 1, 2, 3)))
    with torch.no_grad():
        assert torch.allclose(
            student(*token_batch(3, seed=5)), teacher(*token_batch(3, seed=5)), atol=1e-6
        )


def test_sequential_stack_and_root_stack() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    model.blocks = block_stack(6)
    name, stack = layer_stack(model)
    assert name == "blocks" and len(stack) == 6
    root = block_stack(6)
    x = torch.randn(2, 8)
    expected = root[4](root[1](x))
    smaller, summary = drop_layers(root, DropLayersConfig(keep=(1, 4)))
    assert isinstance(smaller, nn.Sequential) and len(smaller) == 2 and summary["stack"] == ""
    assert torch.allclose(smaller(x), expected)


def test_no_stack_or_ambiguous_stacks_are_refused() -> None:
    with pytest.raises(UsageError, match="no layer stack"):
        compress_(tiny_mlp(), DropLayersConfig(every=2))
    two = nn.Module()
    two.a, two.b = block_stack(3), block_stack(3)
    with pytest.raises(UsageError, match=r"several layer stacks of 3 layers \(a, b\)"):
        compress_(two, DropLayersConfig(every=2))
    student = compress_(two, DropLayersConfig(every=3, stack="b"))
    assert len(student.a) == 3 and len(student.b) == 1
    with pytest.raises(UsageError, match="no module named 'c'"):
        compress_(two, DropLayersConfig(every=2, stack="c"))


def test_narrower_student_chains_with_head_pruning(tmp_path) -> None:
    """Layer dropping then head/FFN pruning: a shallower and narrower student that reloads."""
    teacher = tiny_bert()
    recipe = [DropLayersConfig(every=2), TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.5)]
    ctx = Context(calib=[token_batch(3, seed=5)])
    student = compress_(copy.deepcopy(teacher), recipe, context=ctx)
    assert len(student.bert.encoder.layer) == 2
    assert student.bert.encoder.layer[0].attention.self.query.out_features == 16
    save_artefact(student, tmp_path, recipe=recipe, source=None, structure=ctx.structure)
    reloaded = load_artefact(tmp_path, model=tiny_bert())
    with torch.no_grad():
        assert torch.equal(reloaded(*token_batch(3, seed=5)), student(*token_batch(3, seed=5)))
