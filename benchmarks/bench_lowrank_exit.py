"""Low-rank factorization, activation swap and early exit against the fp32 original, in one run.

Prints one JSON object per line on stdout (progress goes to stderr):

- ``part: "minilm"``: all-MiniLM-L6-v2 with its 12 FFN Linears factored by data-aware SVD to 50%
  of their parameters (``LowRankConfig(ratio=0.5)``, Gram matrices from training sentences),
  scored one-shot and after recovery by the ``distill`` step (embedding loss plus hidden-state
  distillation of every layer from the fp32 encoder) on ``corpus.train_sentences()``, which are
  disjoint from the 512 evaluation sentences. Activation swap on the same model: GELU replaced by
  ``gelu_tanh``, ``quick_gelu`` and ``relu`` one-shot, and ``relu`` recovered by the same
  distillation. Latency in torch eager at batch 8 x 128, interleaved with the fp32 model.
- ``part: "digits-svd"``: the digits CNN's convs and first Linear at 50% of their parameters
  (channel and spatial decompositions), recovered by ``finetune`` with logit distillation.
- ``part: "digits-exit"``: exit heads after ``features.2`` and ``features.6`` of the digits CNN,
  trained by distillation from its own output; per threshold: accuracy, average MACs per
  sample (counted on the real run over the 450 test images: samples that exit skip the rest),
  the share of samples at each exit, and eager latency per sample at batch 1 and 64. The curve
  is also written to ``<out>/early_exit_curve.json`` (and ``.png`` when matplotlib is present).
- one ``summary`` line with the machine, versions and elapsed time.

Timing reuses ``bench_int8.timed_rounds`` (interleaved, settled, disturbed rounds set aside).

Usage:
    python benchmarks/bench_lowrank_exit.py > lowrank_exit.jsonl
    python benchmarks/bench_lowrank_exit.py --part digits-exit --out /tmp/exit
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import Method, machine, timed_rounds  # noqa: E402 - shared timing harness
from bench_prune import facts, rounded  # noqa: E402

import pared  # noqa: E402
from pared.activation_swap import ActivationSwapConfig  # noqa: E402
from pared.apply import Context  # noqa: E402
from pared.distill import DistillConfig  # noqa: E402
from pared.early_exit import EarlyExitConfig, EarlyExitModel  # noqa: E402
from pared.lowrank import LowRankConfig  # noqa: E402
from pared.measure import count_macs, latency_from_samples  # noqa: E402
from pared.runtime import make_runner  # noqa: E402
from pared.train import FinetuneConfig  # noqa: E402

THREADS = 2
BASELINE = "torch-fp32-eager"
FFN = (
    r"re:bert\.encoder\.layer\.\d+\.intermediate\.dense",
    r"re:bert\.encoder\.layer\.\d+\.output\.dense",
)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)


def log(msg: str) -> None:
    print(f"[bench_lowrank_exit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps({"bench": "lowrank_exit", **obj}), flush=True)


def latency_ratios(
    part: str,
    models: dict[str, nn.Module],
    inputs: tuple[torch.Tensor, ...],
    *,
    batch: int,
    rounds: int,
    per_call: int = 1,
    threads: int = THREADS,
) -> dict[str, dict[str, float]]:
    """Interleaved eager latency of ``models``; p50 per call (divided by ``per_call``) and the
    ratio to the baseline."""
    methods = [
        Method(
            n,
            make_runner("torch", model=m, threads=threads),
            runtime="torch",
            size_bytes=0,
            size_what="",
        )
        for n, m in models.items()
    ]
    samples, stats = timed_rounds(methods, inputs, rounds=rounds, settle=True, seed=batch)
    lat = {
        n: latency_from_samples(samples[n], runtime="torch", batch=batch, threads=threads, warmup=3)
        for n in models
    }
    base = lat[BASELINE].p50_ms
    emit({"part": part, "batch": batch, "threads": threads, "timing": True, **stats})
    return {
        n: {"p50_ms": round(v.p50_ms / per_call, 4), "ratio_vs_fp32": round(v.p50_ms / base, 4)}
        for n, v in lat.items()
    }


# ----------------------------------------------------------------------------------- MiniLM


def run_minilm(
    rounds: int,
    scratch: Path,
    *,
    steps: int,
    swap_steps: int,
    lr: float,
    n_eval: int,
    hidden_layers: Literal["all", "last"] = "all",
) -> None:
    from pared.tasks.minilm import MiniLMTask

    part = "minilm"
    torch.set_num_threads(THREADS)
    task = MiniLMTask(n_eval=n_eval)
    fp32 = task.model()
    # Gram matrices from training sentences (padded to their batch's longest, so padding does not
    # dominate them); disjoint from the evaluation sentences like the recovery data.
    calib = [inputs for inputs, _ in task.train_batches(16, seed=1234)][:16]
    metrics: dict[str, Any] = {BASELINE: task.evaluate(fp32)}
    models: dict[str, nn.Module] = {BASELINE: fp32}
    info: dict[str, Any] = {}
    recover = DistillConfig(
        steps=steps, lr=lr, batch_size=16, optimizer="adamw", hidden=1.0, layers=hidden_layers
    )

    t0 = time.perf_counter()
    ctx = Context(calib=calib, task=task)
    svd = pared.compress_(
        copy.deepcopy(fp32),
        LowRankConfig(ratio=0.5, include=FFN, calibration_batches=16),
        context=ctx,
    )
    info["svd_s"] = round(time.perf_counter() - t0, 1)
    info["ffn_weights_kept_fraction"] = ctx.summary[-1]["selected_weights_kept_fraction"]
    info["ranks"] = sorted({d["rank"] for d in ctx.summary[-1]["layers"].values()})
    metrics["pared-svd-ffn50-oneshot"] = task.evaluate(svd)
    log(
        f"svd one-shot {metrics['pared-svd-ffn50-oneshot']} in {info['svd_s']}s; recovering {steps} steps"
    )
    t0 = time.perf_counter()
    with recovery_setting(svd):
        pared.compress_(svd, recover, context=ctx)
    info["recover_s"] = round(time.perf_counter() - t0, 1)
    metrics["pared-svd-ffn50-recovered"] = task.evaluate(svd)
    models["pared-svd-ffn50-recovered"] = svd
    log(f"svd recovered {metrics['pared-svd-ffn50-recovered']} in {info['recover_s']}s")

    for act in ("gelu_tanh", "quick_gelu", "relu"):
        swapped = pared.compress_(
            copy.deepcopy(fp32), ActivationSwapConfig(mapping={"type:GELUActivation": act})
        )
        metrics[f"pared-swap-{act}-oneshot"] = task.evaluate(swapped)
        models[f"pared-swap-{act}"] = swapped
        log(f"swap {act}: {metrics[f'pared-swap-{act}-oneshot']}")
    if swap_steps:
        t0 = time.perf_counter()
        with recovery_setting(models["pared-swap-relu"]):
            pared.compress_(
                models["pared-swap-relu"],
                dataclasses.replace(recover, steps=swap_steps),
                context=Context(task=task),
            )
        info["swap_relu_recover_s"] = round(time.perf_counter() - t0, 1)
        metrics["pared-swap-relu-recovered"] = task.evaluate(models["pared-swap-relu"])
        log(f"swap relu recovered: {metrics['pared-swap-relu-recovered']}")

    x8 = task.example_inputs(8)
    emit(
        {
            "part": part,
            "metrics": rounded(metrics),
            "recover_steps": steps,
            "swap_recover_steps": swap_steps,
            "recover": pared.config_to_dict(recover),
            "eval_sentences": task.n_eval,
            **info,
            "facts": {n: facts(m, x8, scratch, n) for n, m in models.items()},
        }
    )
    lat = latency_ratios(part, models, x8, batch=8, rounds=rounds)
    for name, v in lat.items():
        emit({"part": part, "method": name, "batch": 8, **v})


@contextlib.contextmanager
def recovery_setting(model: nn.Module) -> Iterator[None]:
    """Recovery trains the encoder layers only, without dropout, on one thread.

    The 11.7M embedding parameters are frozen: the compression did not touch them, and Adam on
    them dominated each step. Dropout is off because recovery should reproduce the eval-mode
    teacher (bench_prune measured dropout costing 0.005-0.007 mean cosine). One thread: on this
    shared 2-core machine a second OpenMP thread spent the steps waiting at barriers (28 s per
    step measured with two threads under load, 1.7 s with one).
    """
    embeddings = list(model.bert.embeddings.parameters())
    dropouts = {m: m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    threads = torch.get_num_threads()
    for p in embeddings:
        p.requires_grad_(False)
    for m in dropouts:
        m.p = 0.0
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for p in embeddings:
            p.requires_grad_(True)
        for m, p in dropouts.items():
            m.p = p


# ----------------------------------------------------------------------------------- digits


def run_digits_svd(rounds: int, scratch: Path) -> None:
    from pared.tasks import get_task

    part = "digits-svd"
    torch.set_num_threads(1)  # 8x8 convs: one thread is faster (see pared.tasks.digits)
    task = get_task("digits")
    fp32 = task.model()
    base = task.evaluate(fp32)["accuracy"]
    x = task.example_inputs(64)
    models: dict[str, nn.Module] = {BASELINE: fp32}
    for conv in ("channel", "spatial"):
        name = f"pared-svd50-{conv}"
        ctx = Context(calib=task.calibration(), task=task)
        cfg = LowRankConfig(
            ratio=0.5, conv=conv, include=("features.3", "features.7", "classifier.1")
        )
        model = pared.compress_(copy.deepcopy(fp32), cfg, context=ctx)
        oneshot = task.evaluate(model)["accuracy"]
        t0 = time.perf_counter()
        pared.compress_(
            model, FinetuneConfig(epochs=4, lr=1e-3, batch_size=64, distill=0.5), context=ctx
        )
        after = task.evaluate(model)["accuracy"]
        models[name] = model
        emit(
            {
                "part": part,
                "method": name,
                "accuracy_fp32": round(base, 3),
                "accuracy_oneshot": round(oneshot, 3),
                "accuracy_recovered": round(after, 3),
                "accuracy_drop": round(base - after, 3),
                "finetune_s": round(time.perf_counter() - t0, 1),
                "ranks": {k: v["rank"] for k, v in ctx.summary[0]["layers"].items()},
                "facts": facts(model, x, scratch, name),
                "facts_fp32": facts(fp32, x, scratch, "fp32"),
            }
        )
    for name, v in latency_ratios(part, models, x, batch=64, rounds=rounds, threads=1).items():
        emit({"part": part, "method": name, "batch": 64, **v})


def run_digits_exit(rounds: int, out: Path) -> None:
    from pared.tasks import get_task
    from pared.tasks.digits import digits_data

    part = "digits-exit"
    torch.set_num_threads(1)  # 8x8 convs: one thread is faster (see pared.tasks.digits)
    task = get_task("digits")
    fp32 = task.model()
    x_test = digits_data()[2]
    n = len(x_test)
    base_acc = task.evaluate(fp32)["accuracy"]
    base_macs = count_macs(fp32, (x_test,)) / n
    cfg = EarlyExitConfig(
        after=("features.2", "features.6"), head_pool=4, steps=1000, lr=1e-2, temperature=1.0
    )
    ctx = Context(calib=task.calibration(), task=task)
    t0 = time.perf_counter()
    model = pared.compress_(copy.deepcopy(fp32), cfg, context=ctx)
    assert isinstance(model, EarlyExitModel)
    train_s = round(time.perf_counter() - t0, 1)
    curve = []
    for t in THRESHOLDS:
        model.threshold = t
        acc = task.evaluate(model)["accuracy"]
        macs = count_macs(model, (x_test,)) / n  # the whole test set in one batch: real exits
        counts = model.last_exit_counts
        curve.append(
            {
                "threshold": t,
                "accuracy": round(acc, 3),
                "accuracy_drop": round(base_acc - acc, 3),
                "macs_per_sample": round(macs),
                "macs_saved": round(1 - macs / base_macs, 4),
                "exit_fractions": [round(c / n, 4) for c in counts],
            }
        )
    # latency per sample over the whole test set, at batch 1 (every sample its own exit) and 64
    for batch in (1, 64):
        chunks = list(x_test.split(batch))
        runners: dict[str, nn.Module] = {BASELINE: fp32}
        for t in (0.8, 0.9, 0.99):
            runners[f"exit@{t}"] = _AtThreshold(model, t)
        lat = latency_ratios(
            part,
            {k: _OverChunks(m, chunks) for k, m in runners.items()},
            (),
            batch=batch,
            rounds=max(3, rounds // 4),
            per_call=n,
            threads=1,
        )
        for row in curve:
            key = f"exit@{row['threshold']}"
            if key in lat:
                row[f"ms_per_sample_b{batch}"] = lat[key]["p50_ms"]
                row[f"latency_ratio_b{batch}"] = lat[key]["ratio_vs_fp32"]
        base_ms = lat[BASELINE]["p50_ms"]
        emit({"part": part, "method": BASELINE, "batch": batch, "ms_per_sample": base_ms})
    for row in curve:
        emit({"part": part, "method": "pared-early-exit", **row})
    meta = {
        "accuracy_fp32": round(base_acc, 3),
        "macs_per_sample_fp32": round(base_macs),
        "train_s": train_s,
        "config": pared.config_to_dict(cfg),
        "head_params": ctx.summary[-1]["head_params"],
        "backbone_params": sum(p.numel() for p in fp32.parameters()),
    }
    emit({"part": part, **meta})
    write_curve(out, meta, curve)


class _AtThreshold(nn.Module):
    def __init__(self, model: EarlyExitModel, threshold: float) -> None:
        super().__init__()
        self.model, self.threshold = model, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.threshold = self.threshold
        return self.model(x)


class _OverChunks(nn.Module):
    """One call runs the whole test set in the given chunks (so exits vary as in real use)."""

    def __init__(self, model: nn.Module, chunks: list[torch.Tensor]) -> None:
        super().__init__()
        self.model, self.chunks = model, chunks

    def forward(self) -> torch.Tensor:
        return torch.cat([self.model(c) for c in self.chunks])


def write_curve(out: Path, meta: dict[str, Any], curve: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "early_exit_curve.json").write_text(json.dumps({**meta, "curve": curve}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no PNG")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([100 * r["macs_saved"] for r in curve], [r["accuracy"] for r in curve], "o-")
    for r in curve:
        ax.annotate(str(r["threshold"]), (100 * r["macs_saved"], r["accuracy"]), fontsize=7)
    ax.axhline(meta["accuracy_fp32"], ls="--", c="grey", label="fp32")
    ax.set_xlabel("average MACs saved (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("digits CNN early exit (labels: threshold)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "early_exit_curve.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=("minilm", "digits-svd", "digits-exit", "all"), default="all"
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds")
    parser.add_argument(
        "--steps", type=int, default=300, help="MiniLM SVD recovery steps (batch 16)"
    )
    parser.add_argument(
        "--swap-steps", type=int, default=100, help="MiniLM ReLU-swap recovery steps (0: none)"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="MiniLM recovery learning rate")
    parser.add_argument(
        "--hidden-layers",
        choices=("all", "last"),
        default="all",
        help="MiniLM recovery: hidden-state distillation of every layer or of the last one",
    )
    parser.add_argument(
        "--n-eval", type=int, default=512, help="MiniLM evaluation sentences (512 = all)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench_lowrank_exit",
        help="folder for the early-exit curve (JSON, PNG)",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    parts = ("digits-exit", "digits-svd", "minilm") if args.part == "all" else (args.part,)
    with tempfile.TemporaryDirectory(prefix="bench_lowrank_exit_") as tmp:
        for part in parts:
            log(f"part {part}")
            if part == "minilm":
                run_minilm(
                    args.rounds,
                    Path(tmp),
                    steps=args.steps,
                    swap_steps=args.swap_steps,
                    lr=args.lr,
                    n_eval=args.n_eval,
                    hidden_layers=args.hidden_layers,
                )
            elif part == "digits-svd":
                run_digits_svd(args.rounds, Path(tmp))
            else:
                run_digits_exit(args.rounds, args.out)
    emit(
        {
            "summary": True,
            "machine": machine(),
            "threads": THREADS,
            "rounds": args.rounds,
            "parts": list(parts),
            "curve": str(args.out / "early_exit_curve.json") if "digits-exit" in parts else None,
            "elapsed_s": round(time.perf_counter() - t0, 1),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
