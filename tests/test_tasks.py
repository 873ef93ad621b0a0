"""Built-in tasks (corpus, digits, minilm), UserTask and get_task."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pared.calib import CalibData
from pared.errors import UsageError
from pared.tasks import BUILTIN_TASKS, MiniLMTask, Task, UserTask, corpus, digits, get_task
from pared.tasks.minilm import embedding_agreement


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Never touch the user's ~/.cache/pared; tests that need a fresh dir override this.
    path = tmp_path_factory.mktemp("pared-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARED_CACHE_DIR", str(path))
        yield path


# ---------------------------------------------------------------- corpus


def _sentences_in(cache: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("PARED_CACHE_DIR", str(cache))
    return corpus.sentences()


def test_corpus_is_deterministic_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _sentences_in(tmp_path / "a", monkeypatch)
    second = _sentences_in(tmp_path / "b", monkeypatch)
    assert first == second
    assert len(first) >= corpus.N_EVAL + corpus.N_CALIB
    assert len(set(first)) == len(first)
    files = list((tmp_path / "a").glob("corpus_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text(encoding="utf-8")) == first


def test_corpus_rebuilds_a_corrupt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _sentences_in(tmp_path, monkeypatch)
    cache_file = next(tmp_path.glob("corpus_*.json"))
    cache_file.write_text("[truncated", encoding="utf-8")
    corpus._cached_sentences.cache_clear()
    assert corpus.sentences() == good


def test_corpus_splits_are_disjoint_and_prose() -> None:
    ev, cal = corpus.eval_sentences(), corpus.calib_sentences()
    assert len(ev) == 512 and len(cal) == 128
    assert not set(ev) & set(cal)
    for s in ev + cal:
        assert 6 <= len(s.split()) <= 40
        assert not any(tok in s for tok in (">>>", "{", "}", "=", "()", "_", "\n"))
        assert s[0].isupper() and s[-1] in ".!?"


def test_training_sources_are_parsed_never_imported(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    source = [
        '"""Module prose that belongs in the corpus."""',
        f"open({str(marker)!r}, 'w').write('imported')",
        "class Thing:",
        '    """Class prose kept as well."""',
        "    async def run(self):",
        '        """Coroutine prose too."""',
    ]
    (tmp_path / "pkg" / "mod.py").write_text("\n".join(source) + "\n", encoding="utf-8")
    (tmp_path / "pkg" / "tests" / "test_mod.py").write_text('"""Test prose is skipped."""\n', encoding="utf-8")
    (tmp_path / "pkg" / "broken.py").write_text('"""Never parsed."""\ndef (:\n', encoding="utf-8")
    docs = corpus._source_docstrings(tmp_path)
    assert docs == ["Module prose that belongs in the corpus.", "Class prose kept as well.", "Coroutine prose too."]
    assert not marker.exists()


def test_training_split_is_large_and_disjoint_from_held_out_sentences() -> None:
    train = corpus.train_sentences()
    held_out = set(corpus.eval_sentences()) | set(corpus.calib_sentences())
    assert len(train) >= 10_000 and len(set(train)) == len(train)
    assert not held_out & set(train)
    assert all(corpus.is_prose(s) for s in train[:2000])


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("Return the harmonic mean of the data points given.", True),
        (">>> print(json.dumps(obj)) is how you use it.", False),
        ("Set x = 3 before calling the function here.", False),
        ("Call os.path.join with the two parts you need.", False),
        ("Too short to count.", False),
    ],
)
def test_is_prose(text: str, ok: bool) -> None:
    assert corpus.is_prose(text) is ok


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits-cache")


def test_digits_trains_then_loads_from_cache(
    digits_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARED_CACHE_DIR", str(digits_cache))
    task = get_task("digits")
    first = task.evaluate(task.model())
    assert first["accuracy"] >= 97.0
    assert (digits_cache / "digits_cnn_w16.safetensors").is_file()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("model() retrained although weights were cached")

    monkeypatch.setattr(digits, "train_digits_cnn", no_training)
    assert task.evaluate(task.model()) == first


def test_digits_corrupt_cache_is_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARED_CACHE_DIR", str(tmp_path))
    (tmp_path / "digits_cnn_w2.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    model = digits.DigitsTask(width=2).model()  # tiny width keeps the retraining fast
    assert isinstance(model, digits.DigitsCNN)
    assert digits.DigitsTask(width=2).evaluate(model)["accuracy"] > 50.0


def test_digits_shapes_and_numpy_runner(
    digits_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARED_CACHE_DIR", str(digits_cache))
    task = get_task("digits")
    (x,) = task.example_inputs(5)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert task.input_names() == ["x"] and task.dynamic_axes() == {"x": {0: "batch"}}

    model = task.model()
    seen: list[tuple[int, ...]] = []

    def numpy_runner(x: torch.Tensor) -> np.ndarray:
        seen.append(tuple(x.shape))
        return model(x).numpy()

    assert task.evaluate(numpy_runner) == task.evaluate(model)
    assert all(s[1:] == (1, 8, 8) and s[0] <= 64 for s in seen)
    assert task.evaluate(lambda x: np.zeros((len(x), 10), np.float32))["accuracy"] < 15.0

    batches = list(task.calibration())
    assert len(batches) == 8 and all(b[0].shape == (16, 1, 8, 8) for b in batches)


def test_digits_split_and_half_width() -> None:
    x_tr, y_tr, x_te, y_te = digits.digits_data()
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == 450
    assert torch.bincount(y_te, minlength=10).min() >= 43  # stratified: ~25% of every class
    full = sum(p.numel() for p in digits.DigitsCNN().parameters())
    half = sum(p.numel() for p in digits.DigitsCNN(width=8).parameters())
    assert full < 100_000 and half < full / 3
    assert digits.DigitsCNN(width=8)(x_te[:3]).shape == (3, 10)


# ---------------------------------------------------------------- minilm


@pytest.fixture(scope="module")
def minilm() -> MiniLMTask:
    # 64 of the 512 eval sentences: a full pass at length 128 takes ~20 s on 2 cores.
    return MiniLMTask(n_eval=64)


@pytest.fixture(scope="module")
def minilm_model(minilm: MiniLMTask) -> torch.nn.Module:
    return minilm.model()


def test_minilm_outputs_unit_norm(minilm: MiniLMTask, minilm_model: torch.nn.Module) -> None:
    ids, mask = minilm.example_inputs(3)
    assert ids.shape == mask.shape == (3, 128) and ids.dtype == mask.dtype == torch.int64
    assert bool(mask.all())  # example sequences are filled to the full 128 tokens
    assert torch.equal(ids, minilm.example_inputs(3)[0])
    with torch.inference_mode():
        out = minilm_model(ids, mask)
    assert out.shape == (3, 384)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    assert minilm_model.get_submodule("bert.encoder.layer.0.attention.self.query") is not None


def test_minilm_evaluate_identity_and_noise(
    minilm: MiniLMTask, minilm_model: torch.nn.Module
) -> None:
    same = minilm.evaluate(minilm_model)
    assert same["mean_cosine"] > 0.9999 and same["top10_overlap"] == 1.0

    gen = torch.Generator().manual_seed(0)
    shapes: list[tuple[int, ...]] = []

    def noisy(ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        shapes.append(tuple(ids.shape))
        out = minilm_model(ids, mask)
        return (out + 0.03 * torch.randn(out.shape, generator=gen)).numpy()

    worse = minilm.evaluate(noisy)
    assert worse["mean_cosine"] < same["mean_cosine"] - 0.01
    assert worse["min_cosine"] < same["min_cosine"]
    assert worse["top10_overlap"] < 1.0
    assert shapes == [(32, 128), (32, 128)]


def test_minilm_calibration_and_defaults(minilm: MiniLMTask) -> None:
    batches = list(minilm.calibration())
    assert len(batches) == 16
    assert all(b[0].shape == b[1].shape == (8, 128) for b in batches)
    full = get_task("minilm")
    assert isinstance(full, MiniLMTask) and full.n_eval == 512
    assert full.primary_metric == "mean_cosine"
    assert full.dynamic_axes() == {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}}


def test_minilm_onnx_export_matches_torch(
    minilm: MiniLMTask, minilm_model: torch.nn.Module, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "minilm.onnx"
    torch.onnx.export(
        minilm_model,
        minilm.example_inputs(2),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=minilm.input_names(),
        output_names=["embedding"],
        dynamic_axes=minilm.dynamic_axes(),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Batch 3 checks the dynamic axis; the padded calibration batch checks the mask was kept.
    padded = next(iter(minilm.calibration()))
    for inputs in (minilm.example_inputs(2), minilm.example_inputs(3), padded):
        feeds = {n: t.numpy() for n, t in zip(minilm.input_names(), inputs, strict=True)}
        got = torch.as_tensor(session.run(None, feeds)[0])
        with torch.inference_mode():
            want = minilm_model(*inputs)
        assert (got - want).abs().max().item() < 1e-4


def test_embedding_agreement_scores_nan_as_worst() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    bad = ref.clone()
    bad[3] = float("nan")
    m = embedding_agreement(ref, bad, k=10)
    assert m["min_cosine"] == -1.0 and m["top10_overlap"] < 1.0
    assert embedding_agreement(ref, ref, k=10)["top10_overlap"] == 1.0


# ---------------------------------------------------------------- registry and UserTask


def test_get_task_unknown_names_known_tasks() -> None:
    with pytest.raises(UsageError) as err:
        get_task("nope")
    assert "minilm" in str(err.value) and "digits" in str(err.value) and "nope" in str(err.value)
    assert {"minilm", "digits"} <= set(BUILTIN_TASKS)


def _user_task(**kwargs: object) -> UserTask:
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def evaluate(run: object) -> dict[str, float]:
        logits = torch.as_tensor(run(x)).float()  # type: ignore[operator]
        return {"accuracy": 100.0 * float((logits.argmax(1) == y).float().mean())}

    return UserTask(
        "mine",
        model_fn=lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)).train(),
        example_inputs_fn=lambda b: (x[:b],),
        evaluate_fn=evaluate,
        **kwargs,  # type: ignore[arg-type]
    )


def test_user_task_implements_the_protocol() -> None:
    task = _user_task(calibration_data=[(torch.randn(8, 4),) for _ in range(3)])
    assert isinstance(task, Task)
    assert not task.model().training
    assert task.example_inputs(5)[0].shape == (5, 4)
    assert 0.0 <= task.evaluate(task.model())["accuracy"] <= 100.0
    assert isinstance(task.calibration(), CalibData) and len(list(task.calibration())) == 3
    assert task.input_names() == ["input0"] and task.dynamic_axes() == {"input0": {0: "batch"}}


def test_user_task_errors_name_the_fix() -> None:
    with pytest.raises(UsageError, match="calibration_data"):
        _user_task().calibration()
    with pytest.raises(UsageError, match="primary metric 'f1'"):
        _user_task(primary_metric="f1").evaluate(lambda x: torch.zeros(len(x), 3))


def test_minilm_teacher_targets_follow_the_sentence_order(
    minilm: MiniLMTask, minilm_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Targets are computed in length order for speed and must land back on their own sentences.
    sentences = sorted(corpus.train_sentences()[:70], key=lambda s: -len(s))[::3] + corpus.train_sentences()[70:80]
    task = MiniLMTask(n_eval=8)
    monkeypatch.setattr(task, "model", lambda: minilm_model)
    targets = task._teacher_embeddings(sentences)
    with torch.inference_mode():
        one_by_one = torch.cat([minilm_model(*task._tokenize_longest([s])) for s in sentences])
    torch.testing.assert_close(targets, one_by_one, atol=1e-5, rtol=1e-4)
