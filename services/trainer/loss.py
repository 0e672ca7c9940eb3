"""The loss a micro-batch adds to its optimizer update: its label tokens' share of the whole.

transformers' Trainer takes a model whose ``forward`` has ``**kwargs`` to divide its loss by
``num_items_in_batch``, the label tokens of every micro-batch of the update (and of every
rank), and then skips its own division by the accumulation steps. T5 (5.x) takes the
kwargs but ignores them: its loss is each micro-batch's mean, so at accumulation k the
update's gradient and the logged loss came out k times too large, and each micro-batch
weighed the same however many tokens it held (transformers issue 37766). With this loss the
update is the mean over all its tokens, at any split into micro-batches and ranks.
"""

from __future__ import annotations

from typing import Any


def token_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy summed over the labels' tokens (-100: none) over ``num_items_in_batch``,
    or, without a count (evaluation), over this batch's own tokens. Logits are taken in
    fp32, as transformers' own causal-LM loss takes them."""
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    total = F.cross_entropy(
        logits.float().flatten(0, -2),
        labels.to(logits.device).flatten(),
        ignore_index=-100,
        reduction="sum",
    )
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count
