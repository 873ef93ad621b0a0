"""A tiny BERT sentence encoder of any depth and width, and an unlabeled token task to distil it.

For the student-construction and distillation tests; needs transformers.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 100


def tiny_bert(layers: int = 4, hidden: int = 32, *, heads: int = 4, seed: int = 0) -> nn.Module:
    """A seeded ``layers``-deep BERT (vocab 100, FFN 2 x hidden) inside ``SentenceEncoder``, eval mode.

    Weights are drawn 5x wider than BERT's default (std 0.1, not 0.02): at the default, every
    layer is so close to the identity that removing half of them changes almost nothing, and a
    distillation test could not fail.
    """
    from transformers import BertConfig, BertModel

    from pared.tasks.minilm import SentenceEncoder

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = BertModel(config, add_pooling_layer=False)
    return SentenceEncoder(bert).eval()


def token_batch(batch: int, *, seed: int, max_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of random lengths 4..max_len (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, max_len + 1, (batch,), generator=gen)
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (batch, width), generator=gen) * mask
    return ids, mask


class TokenDistillTask:
    """Unlabeled random token sequences; the loss is embedding distillation from ``model()``.

    Like ``MiniLMTask``: each epoch reshuffles the same samples and pads every batch to its own
    longest sequence, so a sample appears with different padding in different epochs.
    """

    name = "tokens"

    def __init__(self, teacher_layers: int = 4, *, samples: int = 64) -> None:
        self.teacher_layers = teacher_layers
        self.ids, self.mask = token_batch(samples, seed=11)
        with torch.no_grad():
            self.targets = self.model()(self.ids, self.mask)

    def model(self) -> nn.Module:
        return tiny_bert(self.teacher_layers)

    def train_batches(
        self, batch_size: int, *, seed: int
    ) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        order = torch.randperm(len(self.ids), generator=torch.Generator().manual_seed(seed))
        out = []
        for idx in order.split(batch_size):
            width = int(self.mask[idx].sum(dim=1).max())
            out.append(((self.ids[idx, :width], self.mask[idx, :width]), self.targets[idx]))
        return out

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from pared.distill import embedding_loss

        return embedding_loss(output, target)
