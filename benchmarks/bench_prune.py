"""Structured pruning on CPU: pared against Torch-Pruning and the unpruned fp32 model, in one run.

Prints one JSON object per line on stdout (progress goes to stderr):

- ``part: "resnet"``: a ResNet-18-layout CNN (width 32, random weights, 224x224), per batch size
  (16 and 1) and method: p50/p90 latency, ratio to fp32 PyTorch eager measured in the same
  interleaved run, and realized-vs-theoretical params, MACs, bytes and latency. Methods:
  ``torch-fp32-eager`` (baseline), ``pared-prune50-eager`` (``ChannelPruneConfig(ratio=0.5)``,
  magnitude), ``tp-magnitude50-eager`` (Torch-Pruning ``MagnitudePruner``, L1, ratio 0.5, the
  classifier ignored), ``pared-prune50-fp32-openvino`` and ``pared-prune50-int8-openvino``
  (the pruned model with the built-in ``int8-static`` recipe, exported to ONNX), and
  ``pared-int8-openvino`` (int8 without pruning, to separate the two gains). The weights are
  random: this part measures speed and structure, not accuracy.
- ``part: "minilm"``: all-MiniLM-L6-v2 with 25% of heads and 30% of FFN neurons removed. pared
  selects them with ``importance="fluctuation"`` (heads ranked across layers, ``scope="global"``:
  25% of all heads, layers differ; FFN neurons 30% per layer) and refits the output projections
  by least squares (``reconstruct=True``) on training sentences, then recovers with a short distillation
  fine-tune (teacher: the fp32 encoder; loss: token-level relative MSE of the last hidden states
  plus 1 - cosine of the sentence embeddings; ``pared.distill``) on ``corpus.train_sentences()``,
  which is disjoint from the 512 evaluation sentences. Torch-Pruning (``MagnitudePruner``, L1, the same head and
  neuron counts) and pared's own magnitude variant are scored one-shot. Metrics come from
  ``MiniLMTask().evaluate``; latency is torch eager at batch 8 x 128 and 1 x 128.
- ``part: "digits"``: the digits CNN with 50% of channels removed and fine-tuned (``finetune``):
  accuracy before and after, params, MACs, bytes.
- one ``summary`` line with the machine and library versions; an ``error`` line for anything
  that failed to build (for example Torch-Pruning not installed).

Timing reuses ``bench_int8.timed_rounds``: interleaved rounds in a fresh seeded order, each timed
call right after an untimed call of the same method, and rounds disturbed by other processes set
aside. "Theoretical" means: params, MACs and bytes at the ideal ratio (``(1 - r)^2`` for channel
pruning at a removed fraction r; for MiniLM, params and bytes minus exactly the requested share of
the encoder Linears, MACs from the per-token formula), and latency at the realized MAC ratio (time
proportional to arithmetic).

Usage:
    python benchmarks/bench_prune.py > prune.jsonl
    python benchmarks/bench_prune.py --part resnet --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import Method, machine, timed_rounds  # noqa: E402 - shared timing harness

import pared  # noqa: E402
from pared.apply import Context  # noqa: E402
from pared.distill import DistillConfig  # noqa: E402
from pared.measure import count_macs, count_params, latency_from_samples  # noqa: E402
from pared.onnx_export import export_onnx  # noqa: E402
from pared.prune.heads import TransformerPruneConfig  # noqa: E402
from pared.prune.structured import ChannelPruneConfig, realized_vs_theoretical  # noqa: E402
from pared.recipe import load_recipe  # noqa: E402
from pared.runtime import make_runner  # noqa: E402
from pared.testing.resnet import resnet18_layout  # noqa: E402
from pared.train import FinetuneConfig  # noqa: E402

THREADS = 2
WARMUP = 3
BASELINE = "torch-fp32-eager"


def log(msg: str) -> None:
    print(f"[bench_prune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def state_bytes(model: nn.Module, scratch: Path, name: str) -> int:
    """Bytes of the model's state_dict written as safetensors (what pared's artefact stores)."""
    path = scratch / f"{name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def facts(model: nn.Module, inputs: tuple[torch.Tensor, ...], scratch: Path, name: str) -> dict[str, int]:
    return {"params": count_params(model), "macs": count_macs(model, inputs), "bytes": state_bytes(model, scratch, name)}


def attempt(name: str, build: Callable[[], Any], part: str) -> Any:
    log(f"building {name}")
    t = time.perf_counter()
    try:
        out = build()
    except Exception as exc:  # noqa: BLE001 - a failing method is reported, the rest run
        traceback.print_exc(file=sys.stderr)
        emit({"bench": "prune", "part": part, "method": name, "error": f"{type(exc).__name__}: {exc}"})
        return None
    log(f"built {name} in {time.perf_counter() - t:.1f}s")
    return out


def time_methods(part: str, methods: list[Method], inputs: tuple[torch.Tensor, ...], *, batch: int,
                 rounds: int, extra: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Time ``methods`` interleaved; emit one line per method; return p50 ratios to the baseline."""
    log(f"{part}: timing {len(methods)} methods at batch {batch}, {rounds} rounds")
    samples, stats = timed_rounds(methods, inputs, rounds=rounds, settle=True, seed=batch)
    lat = {m.name: latency_from_samples(samples[m.name], runtime=m.runtime, batch=batch, threads=THREADS, warmup=WARMUP)
           for m in methods}
    base = lat[BASELINE].p50_ms
    ratios = {}
    for m in methods:
        ratios[m.name] = lat[m.name].p50_ms / base
        emit({"bench": "prune", "part": part, "method": m.name, "batch": batch, "threads": THREADS,
              "runtime": m.runtime, "p50_ms": round(lat[m.name].p50_ms, 3), "p90_ms": round(lat[m.name].p90_ms, 3),
              "ratio_vs_fp32_eager": round(ratios[m.name], 4), "runs": lat[m.name].runs, **extra.get(m.name, {})})
    emit({"bench": "prune", "part": part, "batch": batch, "timing": True, **stats})
    return ratios


def rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------- ResNet


def tp_prune_cnn(fp32: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(fp32)
    pruner = tp.pruner.MagnitudePruner(model, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    return model.eval()


def run_resnet(rounds: int, scratch: Path) -> None:
    part = "resnet"
    torch.set_num_threads(THREADS)
    fp32 = resnet18_layout(32, 1000)
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 224, 224, generator=gen),) for _ in range(4)]
    x1 = calib[0][0][:1]
    ctx = Context(calib=calib)
    pruned = pared.compress_(copy.deepcopy(fp32), ChannelPruneConfig(ratio=0.5), context=ctx)
    removed = ctx.summary[-1]["channels_removed_fraction"]
    base_facts = facts(fp32, (x1,), scratch, "fp32")
    models: dict[str, tuple[nn.Module, float]] = {"pared-prune50-eager": (pruned, removed)}
    tp_model = attempt("tp-magnitude50-eager", lambda: tp_prune_cnn(fp32, x1, 0.5), part)
    if tp_model is not None:
        models["tp-magnitude50-eager"] = (tp_model, 0.5)
    methods = [Method(BASELINE, make_runner("torch", model=fp32, threads=THREADS), runtime="torch",
                      size_bytes=base_facts["bytes"], size_what="safetensors (fp32)")]
    info: dict[str, dict[str, Any]] = {}  # method -> facts and the ideal after/before ratio
    for name, (model, r) in models.items():
        f = facts(model, (x1,), scratch, name)
        methods.append(Method(name, make_runner("torch", model=model, threads=THREADS), runtime="torch",
                              size_bytes=f["bytes"], size_what="safetensors (fp32)"))
        info[name] = {"facts": f, "ideal": (1 - r) ** 2, "channels_removed": round(r, 4)}

    def onnx_method(name: str, model: nn.Module, *, quantize: bool) -> Method:
        if quantize:
            model = pared.compress_(copy.deepcopy(model), load_recipe("int8-static"), calib=calib)
        path = scratch / f"{name}.onnx"
        export_onnx(model, (x1,), path, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        runtime = "openvino-bf16" if name.endswith("-bf16") else "openvino"
        run = make_runner(runtime, onnx_path=path, threads=THREADS, input_names=["x"])
        return Method(name, run, runtime=runtime, size_bytes=path.stat().st_size, size_what="ONNX file")

    for name, model, q, r in (("pared-prune50-fp32-openvino", pruned, False, removed),
                              ("pared-prune50-int8-openvino", pruned, True, removed),
                              ("pared-prune50-int8-openvino-bf16", pruned, True, removed),
                              ("pared-int8-openvino", fp32, True, 0.0)):
        m = attempt(name, lambda model=model, q=q, name=name: onnx_method(name, model, quantize=q), part)
        if m is None:
            continue
        methods.append(m)
        f = {"params": count_params(model), "macs": count_macs(model, (x1,)), "bytes": m.size_bytes}
        # bytes of an int8 file ideally a quarter of fp32; params and MACs as for the float model
        info[name] = {"facts": f, "ideal": (1 - r) ** 2, "ideal_bytes": (1 - r) ** 2 * (0.25 if q else 1.0)}
    for batch in (16, 1):
        inputs = (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)),)
        extra = {n: {"facts": e["facts"], "size_bytes": e["facts"]["bytes"]} for n, e in info.items()}
        ratios = time_methods(part, methods, inputs, batch=batch, rounds=rounds, extra=extra)
        for name, e in info.items():
            rvt = realized_vs_theoretical(base_facts, e["facts"], ideal_ratio=e["ideal"], latency_ratio=ratios[name])
            if "ideal_bytes" in e:
                rvt["theoretical"]["bytes"] = e["ideal_bytes"]
            emit({"bench": "prune", "part": part, "method": name, "batch": batch,
                  "realized_vs_theoretical": rounded({"realized": rvt["realized"], "theoretical": rvt["theoretical"]})})
    emit({"bench": "prune", "part": part, "baseline_facts": base_facts, "pared_groups": len(ctx.summary[-1]["groups"]),
          "pared_skipped": ctx.summary[-1]["skipped"]})


# ----------------------------------------------------------------------------------- MiniLM


def tp_prune_bert(fp32: nn.Module, example: tuple[torch.Tensor, ...], head_ratio: float, ffn_ratio: float) -> nn.Module:
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(fp32)
    num_heads, ignored, ratios = {}, [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, BertSelfAttention):
            for lin in (mod.query, mod.key, mod.value):
                num_heads[lin] = mod.num_attention_heads
            ratios[mod.query] = head_ratio
        if name.endswith("output.dense"):
            ignored.append(mod)  # they write the residual stream: the hidden size stays
    for layer in model.bert.encoder.layer:
        ratios[layer.intermediate.dense] = ffn_ratio
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.0,
        pruning_ratio_dict=ratios, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=head_ratio)
    pruner.step()
    for mod in model.modules():
        if isinstance(mod, BertSelfAttention):
            mod.num_attention_heads = pruner.num_heads[mod.query]
            mod.all_head_size = mod.query.out_features
    return model.eval()


def run_minilm(rounds: int, scratch: Path, *, steps: int, lr: float, n_eval: int) -> None:
    from pared.tasks import corpus
    from pared.tasks.minilm import MiniLMTask

    part = "minilm"
    torch.set_num_threads(THREADS)
    task = MiniLMTask(n_eval=n_eval)
    fp32 = task.model()
    train_sentences = corpus.train_sentences()  # disjoint from the evaluation sentences
    log(f"minilm: {len(train_sentences)} training sentences; teacher targets")
    calib = [inputs for inputs, _ in task.train_batches(16, seed=1234)]
    x8 = task.example_inputs(8)
    head_ratio, ffn_ratio = 0.25, 0.30
    metrics: dict[str, Any] = {}
    t0 = time.perf_counter()
    metrics[BASELINE] = task.evaluate(fp32)
    log(f"fp32 evaluated in {time.perf_counter() - t0:.0f}s")

    def prune(cfg: TransformerPruneConfig | list[TransformerPruneConfig]) -> tuple[nn.Module, Context]:
        ctx = Context(calib=calib)
        return pared.compress_(copy.deepcopy(fp32), cfg, context=ctx), ctx

    mag, _ = prune(TransformerPruneConfig(head_ratio=head_ratio, ffn_ratio=ffn_ratio))
    metrics["pared-magnitude-oneshot"] = task.evaluate(mag)
    del mag
    t0 = time.perf_counter()
    # Heads ranked across layers (scope="global": measured +0.011 one-shot mean cosine over the
    # same share per layer), FFN neurons the same share per layer (global FFN gained nothing and
    # uneven FFN widths ran slower); two steps of one recipe.
    common = {"importance": "fluctuation", "reconstruct": True, "calibration_batches": len(calib)}
    recipe = [TransformerPruneConfig(head_ratio=head_ratio, ffn_ratio=0.0, scope="global", **common),
              TransformerPruneConfig(head_ratio=0.0, ffn_ratio=ffn_ratio, scope="layer", **common)]
    pruned, ctx = prune(recipe)
    prune_s = time.perf_counter() - t0
    metrics["pared-fluctuation-reconstruct-oneshot"] = task.evaluate(pruned)
    log(f"pruned in {prune_s:.0f}s: {metrics['pared-fluctuation-reconstruct-oneshot']}")
    t0 = time.perf_counter()
    # Distillation from the fp32 encoder: 1 - cosine of the sentence embeddings (the task's loss)
    # plus the relative MSE of the last hidden states; dropout off (train_mode=False).
    recovery = DistillConfig(steps=steps, lr=lr, batch_size=16, optimizer="adamw", schedule="cosine", hidden=1.0,
                             layers="last", train_mode=False)
    recover_ctx = Context(task=task)
    pared.compress_(pruned, recovery, context=recover_ctx)
    result = recover_ctx.summary[-1]
    recover_s = time.perf_counter() - t0
    pruned.eval()
    name = "pared-pruned-recovered-eager"
    # (the recovered model is what is timed below; one-shot variants share its shapes or TP's)
    metrics[name] = task.evaluate(pruned)
    log(f"recovered in {recover_s:.0f}s ({result['steps']} steps): {metrics[name]}")
    tp_model = attempt("tp-magnitude-eager", lambda: tp_prune_bert(fp32, task.example_inputs(2), head_ratio, ffn_ratio), part)
    if tp_model is not None:
        metrics["tp-magnitude-eager"] = task.evaluate(tp_model)
    base_facts = facts(fp32, x8, scratch, "minilm_fp32")
    models = {BASELINE: fp32, name: pruned} | ({"tp-magnitude-eager": tp_model} if tp_model is not None else {})
    hidden, inter, layers = 384, 1536, len(fp32.bert.encoder.layer)
    ideal_macs = _ideal_transformer_ratio(hidden, inter, 128, head_ratio, ffn_ratio)
    # params: only the encoder Linears shrink; the 11.7M embedding parameters stay
    ideal_params = 1 - layers * (4 * hidden * hidden * head_ratio + 2 * hidden * inter * ffn_ratio) / base_facts["params"]
    methods, extra, rvts = [], {}, {}
    for mname, model in models.items():
        f = facts(model, x8, scratch, mname) if model is not fp32 else base_facts
        methods.append(Method(mname, make_runner("torch", model=model, threads=THREADS), runtime="torch",
                              size_bytes=f["bytes"], size_what="safetensors (fp32)"))
        extra[mname] = {"facts": f, "metrics": rounded(metrics.get(mname, {}))}
        rvts[mname] = f
    # The same two models in OpenVINO: the "same runtime" ratio without eager's per-op overhead.
    names, axes = task.input_names(), task.dynamic_axes()
    for mname, model in ((f"{BASELINE}-as-openvino", fp32), ("pared-pruned-recovered-openvino", pruned)):
        def build_ov(model: nn.Module = model, mname: str = mname) -> Method:
            path = scratch / f"{mname}.onnx"
            export_onnx(model, x8, path, input_names=names, dynamic_axes=axes)
            run = make_runner("openvino", onnx_path=path, threads=THREADS, input_names=names)
            return Method(mname, run, runtime="openvino", size_bytes=path.stat().st_size, size_what="ONNX file (fp32)")

        m = attempt(mname, build_ov, part)
        if m is not None:
            methods.append(m)
    emit({"bench": "prune", "part": part, "metrics": rounded(metrics), "prune_s": round(prune_s, 1),
          "recover_s": round(recover_s, 1), "recover_steps": result["steps"], "recover_lr": lr,
          "train_sentences": len(train_sentences), "eval_sentences": task.n_eval,
          "recipe": [pared.config_to_dict(c) for c in recipe],
          "kept": [e for step in ctx.summary for e in step["layers"]]})
    for batch, inputs in ((8, x8), (1, task.example_inputs(1))):
        ratios = time_methods(part, methods, inputs, batch=batch, rounds=rounds, extra=extra)
        ov_base, ov_pruned = ratios.get(f"{BASELINE}-as-openvino"), ratios.get("pared-pruned-recovered-openvino")
        if ov_base and ov_pruned:
            emit({"bench": "prune", "part": part, "batch": batch, "runtime": "openvino",
                  "pruned_vs_unpruned_same_runtime": round(ov_pruned / ov_base, 4),
                  "eager_pruned_vs_unpruned": round(ratios[name], 4)})
        for mname, f in rvts.items():
            if mname == BASELINE:
                continue
            rvt = realized_vs_theoretical(base_facts, f, ideal_ratio=ideal_macs, latency_ratio=ratios[mname])
            rvt["theoretical"]["params"] = rvt["theoretical"]["bytes"] = ideal_params
            emit({"bench": "prune", "part": part, "method": mname, "batch": batch,
                  "realized_vs_theoretical": rounded({"realized": rvt["realized"], "theoretical": rvt["theoretical"]})})


def _ideal_transformer_ratio(h: int, inter: int, t: int, head_ratio: float, ffn_ratio: float) -> float:
    """MACs per token of one encoder layer after/before: q/k/v/o and attention scale with heads,
    the FFN with neurons (the requested fractions, before rounding to whole heads)."""
    attn = 4 * h * h + 2 * t * h
    ffn = 2 * h * inter
    return (attn * (1 - head_ratio) + ffn * (1 - ffn_ratio)) / (attn + ffn)


# ----------------------------------------------------------------------------------- digits


def run_digits(scratch: Path) -> None:
    from pared.tasks import get_task

    part = "digits"
    torch.set_num_threads(THREADS)
    task = get_task("digits")
    fp32 = task.model()
    x = task.example_inputs(64)
    base = task.evaluate(fp32)["accuracy"]
    ctx = Context(calib=task.calibration(), task=task)
    pruned = pared.compress_(copy.deepcopy(fp32), ChannelPruneConfig(ratio=0.5), context=ctx)
    oneshot = task.evaluate(pruned)["accuracy"]
    t0 = time.perf_counter()
    pared.compress_(pruned, FinetuneConfig(epochs=6, lr=2e-3, batch_size=64), context=ctx)
    finetune_s = time.perf_counter() - t0
    after = task.evaluate(pruned)["accuracy"]
    b, a = facts(fp32, x, scratch, "digits_fp32"), facts(pruned, x, scratch, "digits_pruned")
    rvt = realized_vs_theoretical(b, a, ideal_ratio=0.25)
    emit({"bench": "prune", "part": part, "method": "pared-prune50-finetune", "accuracy_fp32": round(base, 3),
          "accuracy_pruned_oneshot": round(oneshot, 3), "accuracy_pruned_finetuned": round(after, 3),
          "accuracy_drop": round(base - after, 3), "finetune_epochs": 6, "finetune_s": round(finetune_s, 1),
          "realized_vs_theoretical": rounded({"realized": rvt["realized"], "theoretical": rvt["theoretical"]}),
          "facts": {"fp32": b, "pruned": a}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("resnet", "minilm", "digits", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per batch size")
    parser.add_argument("--steps", type=int, default=200, help="MiniLM recovery fine-tuning steps (batch 16)")
    parser.add_argument("--lr", type=float, default=1e-4, help="MiniLM recovery learning rate")
    parser.add_argument("--n-eval", type=int, default=512, help="MiniLM evaluation sentences (512 = all)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    parts = ("resnet", "minilm", "digits") if args.part == "all" else (args.part,)
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        scratch = Path(tmp)
        for part in parts:
            log(f"part {part}")
            if part == "resnet":
                run_resnet(args.rounds, scratch)
            elif part == "minilm":
                run_minilm(args.rounds, scratch, steps=args.steps, lr=args.lr, n_eval=args.n_eval)
            else:
                run_digits(scratch)
    try:
        import torch_pruning

        tp_version = getattr(torch_pruning, "__version__", "unknown")
    except ImportError:
        tp_version = None
    emit({"bench": "prune", "summary": True, "machine": machine(), "threads": THREADS, "rounds": args.rounds,
          "parts": list(parts), "torch_pruning": tp_version, "elapsed_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
