"""Running one model over the held-out rows: per-row reference loss and generations."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from services.evaluator.scoring import RowScores, score_rows
from shared.harmony import reply_text
from shared.jobspec import DecodingSpec, EvaluationSpec
from shared.prompting import pad_id, padded, stop_ids

Progress = Callable[..., None]


#: rows a forward pass takes on CPU when evaluation.batch_size is "auto"
CPU_BATCH = 16
#: the most rows a GPU batch takes however much memory is free
MAX_BATCH = 512


@dataclass
class Batches:
    """The batch size a model's passes were given and, per pass, the sizes (rows) their
    batches ran at: smaller where the table had fewer rows or an out-of-memory split one."""

    planned: int
    loss: set[int] = field(default_factory=set)
    generation: set[int] = field(default_factory=set)

    def report(self) -> dict[str, Any]:
        """The planned size and each pass's sizes, largest first."""
        return {
            "planned": self.planned,
            "loss": sorted(self.loss, reverse=True),
            "generation": sorted(self.generation, reverse=True),
        }


def _batches(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def longest_first(table: pa.Table, *columns: str) -> list[int]:
    """Row order by the summed lengths of ``columns``, longest first: batches of alike
    lengths pad little, and an out-of-memory shows at the first batch."""
    sides = [pc.list_value_length(table.column(c)).to_pylist() for c in columns]
    lengths = [sum(n) for n in zip(*sides, strict=True)]
    return sorted(range(table.num_rows), key=lambda i: -lengths[i])


def restored(values: list[Any], order: list[int]) -> list[Any]:
    """Values computed in ``order`` put back in the table's own order."""
    out: list[Any] = [None] * len(order)
    for value, row in zip(values, order, strict=True):
        out[row] = value
    return out


def halving(run: Callable[[pa.Table], list[Any]], chunk: pa.Table) -> list[Any]:
    """``run`` on a chunk; on out-of-memory, on each half (down to one row)."""
    try:
        return run(chunk)
    except torch.OutOfMemoryError:
        if chunk.num_rows == 1:
            raise
        torch.cuda.empty_cache()
        half = chunk.num_rows // 2
        return halving(run, chunk.slice(0, half)) + halving(run, chunk.slice(half))


def prompt_ids(table: pa.Table) -> str:
    """The column answers are generated from: ``served_ids`` (each prompt in full, as served),
    where the evaluator added it, else ``input_ids`` (as data-prep stored them)."""
    return "served_ids" if "served_ids" in table.column_names else "input_ids"


def batch_size(spec: EvaluationSpec, model: Any, table: pa.Table, decoding: DecodingSpec) -> int:
    """The spec's number, or "auto": CPU_BATCH on CPU; on CUDA what the memory model fits."""
    if spec.batch_size != "auto":
        return spec.batch_size
    if model.device.type != "cuda":
        return CPU_BATCH
    from shared import trainplan

    shape = trainplan.shape_from(model, model.config)
    longest = max(pc.list_value_length(table.column(prompt_ids(table))).to_pylist(), default=1)
    dtype_bytes = next(model.parameters()).element_size()
    per_row = trainplan.generation_row_bytes(
        shape, longest, decoding.max_new_tokens, dtype_bytes=dtype_bytes,
        beams=getattr(decoding, "num_beams", 1) or 1,
    )  # fmt: skip
    free, _ = torch.cuda.mem_get_info()
    rows = int(free * trainplan.MEMORY_FRACTION) // max(per_row, 1)
    return max(1, min(MAX_BATCH, rows))


@torch.no_grad()
def row_losses(
    model: Any,
    tokenizer: Any,
    table: pa.Table,
    *,
    batch_size: int,
    ran: Callable[[int], None] = lambda rows: None,
) -> tuple[list[float], list[int]]:
    """Summed token cross-entropy of each row's reference (teacher forcing) and its length;
    a decoder-only model reads the prompt and the reference as one sequence and is scored
    on the reference's tokens only, as it was trained; ``ran`` hears each batch's rows."""
    collator = _loss_collator(model, tokenizer)
    model.eval()

    def run(chunk: pa.Table) -> list[tuple[float, int]]:
        batch = {k: v.to(model.device) for k, v in collator(chunk.to_pylist()).items()}
        logits = model(**batch, use_cache=False).logits.float()
        labels = batch["labels"]
        if not model.config.is_encoder_decoder:  # position i predicts token i + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        counted = (labels != -100).sum(dim=1).tolist()
        ran(chunk.num_rows)
        return list(zip(losses.sum(dim=1).tolist(), counted, strict=True))

    order = longest_first(table, "input_ids", "labels")
    ordered = table.select(["input_ids", "labels"]).take(order)
    pairs = [pair for chunk in _batches(ordered, batch_size) for pair in halving(run, chunk)]
    pairs = restored(pairs, order)
    return [nll for nll, _ in pairs], [tokens for _, tokens in pairs]


def _loss_collator(model: Any, tokenizer: Any) -> Callable[[list[dict]], dict]:
    """Rows of prompt and reference ids to a padded batch with the reference as labels."""
    from transformers import DataCollatorForSeq2Seq

    if model.config.is_encoder_decoder:
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    def collate(rows: list[dict]) -> dict:
        batch = padded([r["input_ids"] + r["labels"] for r in rows], pad_id(tokenizer), left=False)
        answers = [[-100] * len(r["input_ids"]) + r["labels"] for r in rows]
        return {**batch, "labels": padded(answers, -100, left=False)["input_ids"]}

    return collate


def row_seed(seed: int, row: int) -> int:
    """The seed of one row's sampling: evaluation.seed and the row's place in the table."""
    return int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint64)[0])


def row_sampling(model: Any, decoding: DecodingSpec, *, rows: list[int], seed: int) -> dict:
    """``generate``'s arguments that sample each row from a generator of its own, seeded by
    ``row_seed``: a row's answer is the same in any batch, at any batch size (transformers
    samples a batch from the one global generator). The warpers sampling applies
    (``sampling_warpers``) run as they would, then each row draws its token, which greedy
    decoding then takes. Beam search samples across a batch's beams: the batch is reseeded
    from its first row instead."""
    kwargs = decoding.generate_kwargs()
    if decoding.temperature == 0:
        return kwargs
    if decoding.num_beams > 1:
        torch.manual_seed(row_seed(seed, rows[0]))
        return kwargs
    from transformers import LogitsProcessorList

    generators = [torch.Generator().manual_seed(row_seed(seed, row)) for row in rows]
    warpers = sampling_warpers(model, kwargs)
    return {
        **kwargs,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "logits_processor": LogitsProcessorList([*warpers, _RowDraw(generators)]),
    }


def sampling_warpers(model: Any, kwargs: dict[str, Any]) -> list[Any]:
    """The warpers ``generate(do_sample=True, **kwargs)`` applies on this model, in
    transformers' order: ``kwargs`` over the model's generation config over transformers'
    defaults, which it fills in only as it generates (top_k 50 where the model sets none)."""
    from transformers import GenerationConfig
    from transformers import generation as g

    own = {k: v for k, v in model.generation_config.to_dict().items() if v is not None}
    given = {k: v for k, v in kwargs.items() if v is not None}
    c = {**GenerationConfig._get_default_generation_params(), **own, **given}
    steps = [
        (c.get("temperature", 1.0) != 1.0, lambda: g.TemperatureLogitsWarper(c["temperature"])),
        (c.get("top_h") is not None, lambda: g.TopHLogitsWarper(top_h=c["top_h"])),
        (c.get("top_k") not in (None, 0), lambda: g.TopKLogitsWarper(top_k=c["top_k"])),
        (c.get("top_p", 1.0) < 1.0, lambda: g.TopPLogitsWarper(top_p=c["top_p"])),
        (c.get("min_p") is not None, lambda: g.MinPLogitsWarper(min_p=c["min_p"])),
        (c.get("typical_p", 1.0) < 1.0, lambda: g.TypicalLogitsWarper(mass=c["typical_p"])),
        (0.0 < (c.get("epsilon_cutoff") or 0.0) < 1.0,
         lambda: g.EpsilonLogitsWarper(epsilon=c["epsilon_cutoff"])),
        (0.0 < (c.get("eta_cutoff") or 0.0) < 1.0,
         lambda: g.EtaLogitsWarper(epsilon=c["eta_cutoff"], device=model.device)),
    ]  # fmt: skip
    return [make() for wanted, make in steps if wanted]


class _RowDraw:
    """A logits processor that draws each row's next token from its own generator and
    leaves that token the only one possible."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=g) for g in self.generators])
        draws = draws.to(scores.device).unsqueeze(1) * cdf[:, -1:]
        token = torch.searchsorted(cdf, draws, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    table: pa.Table,
    *,
    decoding: DecodingSpec,
    batch_size: int,
    on_batch: Progress,
    ran: Callable[[int], None] = lambda rows: None,
    seed: int = 0,
) -> list[str]:
    """The model's answers to the prompts of a table (``prompt_ids``), decoded as served, in
    batches of alike prompt lengths (longest first), returned in the table's order; ``ran``
    hears each batch's rows. Sampling (decoding.temperature > 0) draws each row's tokens
    from ``seed`` and the row's place in the table alone (``row_sampling``)."""
    model.eval()

    causal = not model.config.is_encoder_decoder
    stops = stop_ids(model.generation_config.eos_token_id, tokenizer)

    def run(chunk: pa.Table) -> list[str]:
        ids = chunk.column(0).to_pylist()
        batch = padded(ids, pad_id(tokenizer), left=causal).to(model.device)
        rows = chunk.column("row").to_pylist()
        generated = model.generate(
            **batch,
            pad_token_id=pad_id(tokenizer),
            eos_token_id=stops,  # as served: the trained EOS, whatever the config lists
            **row_sampling(model, decoding, rows=rows, seed=seed),
        )
        if causal:  # the answer only: a decoder-only model's output starts with the prompt
            generated = generated[:, batch["input_ids"].shape[1] :]
        ran(chunk.num_rows)
        return [reply_text(tokenizer, row) for row in generated.tolist()]

    column = prompt_ids(table)
    order = longest_first(table, column)
    ordered = table.select([column]).take(order).append_column("row", pa.array(order))
    outputs: list[str] = []
    for chunk in _batches(ordered, batch_size):
        outputs += halving(run, chunk)
        on_batch(len(outputs))
    return restored(outputs, order)


def run_model(
    model: Any,
    tokenizer: Any,
    table: pa.Table,
    *,
    spec: EvaluationSpec,
    decoding: DecodingSpec,
    progress: Progress,
    label: str,
) -> tuple[RowScores, list[str], Batches]:
    """Per-row scores and generations of one model, and the batch sizes they ran at."""
    batches = Batches(planned=batch_size(spec, model, table, decoding))
    size = batches.planned
    progress(
        {"phase": f"{label}: reference loss", "rows": table.num_rows, "batch_size": size},
        force=True,
    )
    nll, tokens = row_losses(model, tokenizer, table, batch_size=size, ran=batches.loss.add)

    def on_batch(done: int) -> None:
        progress({"phase": f"{label}: generating", "rows_done": done, "rows": table.num_rows})

    predictions = generate(
        model,
        tokenizer,
        table,
        decoding=decoding,
        batch_size=size,
        on_batch=on_batch,
        ran=batches.generation.add,
        seed=spec.seed,
    )
    references, prompts = table.column("target").to_pylist(), table.column("prompt").to_pylist()
    scores = score_rows(predictions, references, nll=nll, tokens=tokens, prompts=prompts)
    return scores, predictions, batches
