"""Knowledge distillation: the loss terms, the distill step on a tiny BERT and the digits CNN,
the teacher cache, and refusals of models that cannot be matched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pared.recipe  # noqa: F401 - registers every technique
from pared.apply import Context, compress_
from pared.config import config_from_dict, config_to_dict
from pared.distill import (
    DistillConfig,
    attention_map_loss,
    distill,
    embedding_loss,
    hidden_state_loss,
    uniform_layer_map,
)
from pared.errors import UsageError
from pared.student import DropLayersConfig

pytest.importorskip("transformers")
from pared.testing.bert import TokenDistillTask, tiny_bert, token_batch  # noqa: E402

FAST = {"batch_size": 16, "optimizer": "adamw", "train_mode": False}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models are overhead-bound; a second thread only waits on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_embedding_and_hidden_losses() -> None:
    a = torch.randn(4, 8)
    assert embedding_loss(a, a) < 1e-6 and embedding_loss(a, 3 * a) < 1e-6  # scale-free
    assert abs(float(embedding_loss(a, -a)) - 2.0) < 1e-5
    t = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s = t.clone()
    s[0, 3:] += 100.0  # only padded positions differ
    assert hidden_state_loss(s, t, mask) < 1e-6 and hidden_state_loss(s, t) > 1.0
    assert (
        abs(float(hidden_state_loss(torch.zeros_like(t), t)) - 1.0) < 1e-6
    )  # relative to the teacher's energy
    with pytest.raises(UsageError, match="do not match"):
        embedding_loss(a, torch.randn(4, 9))


def test_attention_map_loss_is_a_masked_kl() -> None:
    q, k = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    assert attention_map_loss((q, k), (q, k), heads=2, mask=mask).abs() < 1e-6
    assert attention_map_loss((q, k), (q, 2 * k), heads=2, mask=mask) > 1e-3
    k2 = k.clone()
    k2[0, 4:] = 50.0  # padded keys of sample 0 and the rows of padded queries are ignored
    q2 = q.clone()
    q2[0, 4:] = -7.0
    assert attention_map_loss((q2, k2), (q, k), heads=2, mask=mask).abs() < 1e-5
    with pytest.raises(UsageError, match="not divisible into 3 heads"):
        attention_map_loss((q, k), (q, k), heads=3)


def test_uniform_layer_map() -> None:
    assert uniform_layer_map(3, 6) == [1, 3, 5]
    assert uniform_layer_map(2, 4) == [1, 3]
    assert uniform_layer_map(4, 4) == [0, 1, 2, 3]
    assert uniform_layer_map(1, 12) == [11]


def test_config_round_trip_and_refusals() -> None:
    cfg = DistillConfig(hidden=1.0, attention=0.5, layer_map=(1, 3), steps=5)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    for kwargs in (
        {"hidden": -1.0},
        {"layer_map": (-1,)},
        {"attention": 1.0, "features": ("a",)},
        {"lr": 0.0},
    ):
        with pytest.raises(UsageError, match="distill|finetune"):
            DistillConfig(**kwargs)


def _agreement(student: nn.Module, task: TokenDistillTask) -> float:
    """Mean cosine to the teacher's embeddings, both centred on the teacher's mean embedding
    (raw cosines of random-weight encoders share a large common direction)."""
    with torch.no_grad():
        centre = task.targets.mean(dim=0)
        out = student(task.ids, task.mask)
        return float(
            nn.functional.cosine_similarity(out - centre, task.targets - centre, dim=-1).mean()
        )


def test_distilling_a_half_depth_student_recovers_the_teacher() -> None:
    task = TokenDistillTask()
    ctx = Context(task=task)
    student = compress_(task.model(), DropLayersConfig(every=2), context=ctx)
    before = _agreement(student, task)
    compress_(
        student, DistillConfig(steps=40, lr=2e-3, hidden=1.0, attention=1.0, **FAST), context=ctx
    )
    summary = ctx.summary[-1]
    assert summary["pairs"] == [
        "hidden:bert.encoder.layer.0",
        "attention:bert.encoder.layer.0",
        "hidden:bert.encoder.layer.1",
        "attention:bert.encoder.layer.1",
    ]
    assert summary["projections"] == 0 and summary["cached_samples"] == 64
    after = _agreement(student, task)
    assert after > before + 0.02 and after > 0.95, (before, after)


def test_hidden_and_attention_terms_are_trained() -> None:
    """With only the hidden-state term, the matched layer moves toward the teacher's layer."""
    task = TokenDistillTask()
    teacher = task.model()
    student = compress_(task.model(), DropLayersConfig(keep=(0, 2)))
    ids, mask = token_batch(8, seed=3)

    def gap() -> float:
        grab = {}
        hooks = [
            m.register_forward_hook(lambda _m, _i, o, key=key: grab.__setitem__(key, o))
            for key, m in (
                ("s", student.bert.encoder.layer[1]),
                ("t", teacher.bert.encoder.layer[3]),
            )
        ]
        with torch.no_grad():
            student(ids, mask), teacher(ids, mask)
        for h in hooks:
            h.remove()
        return float(hidden_state_loss(grab["s"], grab["t"], mask))

    before = gap()
    cfg = DistillConfig(steps=30, lr=2e-3, hidden=1.0, layers="last", layer_map=(1, 3), **FAST)
    summary = distill(student, teacher, task, cfg, progress=False)
    assert summary["pairs"] == ["hidden:bert.encoder.layer.1"]
    assert gap() < 0.5 * before


def test_narrower_student_gets_learned_projections() -> None:
    """Half the heads and FFN neurons: FFN activations are matched through learned projections,
    attention maps of 2 remaining heads against 4 teacher heads through the head split."""
    from pared.prune.heads import TransformerPruneConfig

    task = TokenDistillTask()
    student = compress_(task.model(), TransformerPruneConfig(head_ratio=0.5, ffn_ratio=0.5))
    cfg = DistillConfig(
        steps=5,
        lr=1e-3,
        hidden=1.0,
        features=(
            "bert.encoder.layer.0.intermediate.dense",
            "bert.encoder.layer.3.intermediate.dense",
        ),
        **FAST,
    )
    summary = distill(student, task.model(), task, cfg, progress=False)
    assert summary["projections"] == 2
    assert not any("projections" in k for k in student.state_dict())  # projections are not kept
    summary = distill(
        student,
        task.model(),
        task,
        DistillConfig(steps=5, lr=1e-3, attention=1.0, **FAST),
        progress=False,
    )
    assert len(summary["pairs"]) == 4 and summary["projections"] == 0


def test_teacher_cache_skips_the_teacher_and_changes_nothing() -> None:
    task = TokenDistillTask(samples=32)
    results = {}
    for cache in (True, False):
        teacher, calls = task.model(), []
        teacher.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        student = tiny_bert(layers=2, seed=1)
        # SGD: Adam's per-weight normalisation would amplify float noise of the padding
        cfg = DistillConfig(
            epochs=3,
            lr=1e-2,
            hidden=1.0,
            attention=1.0,
            batch_size=8,
            optimizer="sgd",
            train_mode=False,
            cache_teacher=cache,
        )
        distill(student, teacher, task, cfg, progress=False)
        results[cache] = (student.state_dict(), len(calls))
    (cached, cached_calls), (plain, plain_calls) = results[True], results[False]
    assert (
        plain_calls == 1 + 3 * 4 and cached_calls == 1 + 4
    )  # the probe, then the first epoch only
    # each epoch pads samples differently; the cache pads stored rows back, so training is the same
    assert all(torch.allclose(cached[k], plain[k], atol=1e-6) for k in plain)
    assert not torch.equal(
        cached["bert.encoder.layer.0.output.dense.weight"],
        tiny_bert(layers=2, seed=1).state_dict()["bert.encoder.layer.0.output.dense.weight"],
    )


def test_digits_cnn_feature_and_logit_distillation(digits_fp32: nn.Module) -> None:
    """A half-width CNN student learns from the digits teacher through projected conv features."""
    from pared.tasks.digits import DigitsCNN, DigitsTask

    task = DigitsTask()
    torch.manual_seed(0)
    student = DigitsCNN(width=8)
    cfg = DistillConfig(
        steps=30,
        lr=3e-3,
        batch_size=64,
        distill=0.7,
        temperature=4.0,
        hidden=1.0,
        features=("features.2", "features.9"),
    )
    ctx = Context(task=task)
    compress_(student, cfg, context=ctx)
    assert ctx.summary[-1]["projections"] == 2
    assert task.evaluate(student)["accuracy"] > 80.0


def test_unmatched_models_are_refused() -> None:
    task = TokenDistillTask()
    with pytest.raises(UsageError, match=r"no module 'bert.pooler' in the student and teacher"):
        distill(
            tiny_bert(2),
            task.model(),
            task,
            DistillConfig(steps=1, hidden=1.0, features=("bert.pooler",)),
            progress=False,
        )
    with pytest.raises(UsageError, match=r"teacher layer\(s\) \[7\]; the teacher has 4"):
        distill(
            tiny_bert(2),
            task.model(),
            task,
            DistillConfig(steps=1, hidden=1.0, layer_map=(1, 7)),
            progress=False,
        )
    with pytest.raises(UsageError, match="layer_map has 3 entries; the student has 2"):
        distill(
            tiny_bert(2),
            task.model(),
            task,
            DistillConfig(steps=1, hidden=1.0, layer_map=(1, 2, 3)),
            progress=False,
        )


def test_features_that_differ_beyond_width_are_refused(digits_fp32: nn.Module) -> None:
    from pared.tasks.digits import DigitsTask

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10))
    student = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10)
    )  # 6x6 maps, not 8x8
    with pytest.raises(
        UsageError,
        match=r"0 outputs \(2, 2, 6, 6\) in the student and \(2, 4, 8, 8\) in the teacher",
    ):
        distill(
            student,
            teacher,
            DigitsTask(),
            DistillConfig(steps=1, hidden=1.0, features=("0",)),
            progress=False,
        )
    with pytest.raises(UsageError, match="does not match teacher"):
        distill(
            student,
            nn.Sequential(nn.Flatten(), nn.Linear(64, 7)),
            DigitsTask(),
            DistillConfig(steps=1, distill=0.5),
            progress=False,
        )


def test_distill_needs_a_trainable_task() -> None:
    with pytest.raises(UsageError, match="distill: .* provides no training data"):
        compress_(tiny_bert(2), DistillConfig(steps=1), context=Context(task=object()))


def test_distilled_student_reloads_from_its_recipe(tmp_path) -> None:
    """drop_layers + distill as a YAML recipe: the artefact rebuilds the 2-layer student."""
    from pared.artefact import load_artefact, save_artefact
    from pared.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(
        "name: student\nsteps:\n  - technique: drop_layers\n    keep: [1, 3]\n"
        "  - technique: distill\n    steps: 3\n    batch_size: 16\n    hidden: 1.0\n    freeze: ['*word_embeddings']\n"
    )
    recipe = load_recipe(str(tmp_path / "r.yaml"))
    task = TokenDistillTask(samples=32)
    ctx = Context(task=task)
    student = compress_(task.model(), recipe, context=ctx)
    assert [s["technique"] for s in ctx.summary] == ["drop_layers", "distill"]
    # the frozen token table is the teacher's
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, task.model().bert.embeddings.word_embeddings.weight)
    (tmp_path / "art").mkdir()
    save_artefact(student, tmp_path / "art", recipe=recipe, source=None, structure=ctx.structure)
    reloaded = load_artefact(tmp_path / "art", model=task.model())
    with torch.no_grad():
        assert torch.equal(reloaded(task.ids, task.mask), student(task.ids, task.mask))


def test_teacher_cache_is_released_when_distillation_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    import pared.distill as distill_module
    from pared.teacher_cache import TeacherCache

    made: list[TeacherCache] = []

    def recorded() -> TeacherCache:
        made.append(TeacherCache())
        return made[-1]

    monkeypatch.setattr(distill_module, "TeacherCache", recorded)
    task = TokenDistillTask()
    ctx = Context(task=task)
    student = compress_(task.model(), DropLayersConfig(every=2), context=ctx)
    compress_(student, DistillConfig(steps=8, lr=2e-3, hidden=1.0, **FAST), context=ctx)
    assert len(made) == 1 and ctx.summary[-1]["cached_samples"] > 0
    assert made[0].rows == {}  # the rows were dropped on the way out, not left to the collector
