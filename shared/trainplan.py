"""How much an encoder-decoder LoRA step holds in memory, and the batch and precision that fit.

Pure arithmetic on a model's shape (read from its config) and the prepared data's longest
rows, shared by the trainer (which then checks the figure on CUDA with a short probe that
backs off on out-of-memory) and by ``termtune estimate`` (which plans for an instance's GPU).

The memory of a step is the weights (by quantization), the adapter with its gradient and
Adam's two moments (fp32), and the activations kept for the backward pass: per encoder
token and per decoder token, by layer, from the widths of the attention and feed-forward
blocks, the attention bias the T5 stacks expand over the batch, and the logits (kept in the
compute dtype, upcast to fp32 for the loss, and their gradient). The activation
coefficients are calibrated on the H200 record of 2026-11-28 (flan-t5-large's shape, bf16
LoRA r=64 on every linear layer, 128 + 256 tokens: 12.7 GiB at batch 8 and 42.8 GiB at
batch 32, i.e. 1.25 GiB an example); with eager attention, as that run had, the model gives
12.7 and 42.8 GiB.

A decoder-only model (Llama, Qwen, Mistral) reads the prompt and the answer as one sequence:
every token passes every layer and the LM head, and its layers keep what a T5 encoder layer
keeps plus the gated feed-forward's third projection. Its coefficients follow from the same
layer widths; they are not yet calibrated on a GPU record. A mixture-of-experts layer
(Mixtral, Qwen3 MoE) holds every expert's weights but passes a token through
``num_experts_per_tok`` of them: its FLOPs and activations are those experts', its weights
all of them (unquantized under QLoRA: bitsandbytes takes only ``nn.Linear`` layers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from shared import families
from shared.modeling import stored_quantization

GIB = 2**30
#: share of the device's free memory a plan may fill (the rest: allocator fragmentation)
MEMORY_FRACTION = 0.85
#: kept back for the CUDA context, cuBLAS workspaces and kernels' scratch
RESERVED_BYTES = 1 * GIB
#: fp32 adapter weight, its gradient and AdamW's two moments
ADAPTER_BYTES_PER_PARAMETER = 16
#: the per-device batch quantization "auto" wants to reach in bf16 before it takes nf4
MIN_BF16_BATCH = 8
#: effective_batch_size "auto": this many examples an update, fewer where a run would then
#: make fewer than MIN_UPDATES updates. On bench.training's 176 rows x 3 epochs, each batch at
#: its best rate, the held-out loss follows the updates: 66 updates 5.67, 108 5.60, 132 5.58,
#: 177 5.55, 264 5.52, 528 5.50 (medians of 3 seeds, 2026-12-06). 250 is the knee: from 132 to
#: 264 updates the loss falls 0.06, from 264 to 528 (twice the steps' time on a GPU) 0.02
AUTO_EFFECTIVE_BATCH = 32
MIN_UPDATES = 250


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from an encoder-decoder's config and modules."""

    parameters: int
    linear_parameters: int  # in the Linear layers bitsandbytes quantizes (not the LM head)
    lora_dims: int  # sum of in + out features over the Linear layers LoRA adapts
    d_model: int
    d_ff: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    vocab: int
    dropout: float  # the model's own dropout (its masks are kept for the backward)
    model_type: str = "t5"
    encoder_matmul_parameters: int = 0  # weights a source token is multiplied by
    decoder_matmul_parameters: int = 0  # ...and a target token (the LM head included)
    kind: str = "seq2seq"  # or "causal": one stack reads the prompt and the answer
    attention_width: int = 0  # query heads x head width, where it is not d_model
    prequantized: str = ""  # how the checkpoint stores its weights (GPT-OSS: "mxfp4")

    def training_flops(self, source_tokens: float, target_tokens: float) -> float:
        """FLOPs to train on one example with the base frozen: forward 2 and backward 2
        (activation gradients only) per weight, each half charged for its own tokens (a
        decoder-only model passes both through the one stack)."""
        if self.kind == "causal":
            return 4 * self.decoder_matmul_parameters * (source_tokens + target_tokens)
        return 4 * (
            self.encoder_matmul_parameters * source_tokens
            + self.decoder_matmul_parameters * target_tokens
        )

    def attention_per_width(self) -> float:
        """A causal stack's attention work a position, per position of its row's width
        (scores and the values they weigh: 2 x the attention width a layer), relative to
        the weights' work a position: what packing examples into wider rows costs."""
        if self.kind != "causal" or not self.decoder_matmul_parameters:
            return 0.0
        width = self.attention_width or self.d_model
        return 2 * self.decoder_layers * width / self.decoder_matmul_parameters

    def adapter_parameters(self, r: int) -> int:
        """Trainable parameters of a rank-r LoRA adapter on every adapted Linear layer."""
        return r * self.lora_dims


def weight_bytes(shape: ModelShape, quantization: str, dtype_bytes: int) -> int:
    """The frozen weights: nf4 is half a byte a weight plus its double-quantized scales;
    what bitsandbytes leaves unquantized (embeddings, norms, the LM head) is fp32, as peft's
    ``prepare_model_for_kbit_training`` casts it (a 7B Qwen's 1.09B such weights: 2 GiB
    more than in bf16)."""
    others = shape.parameters - shape.linear_parameters
    per_linear = {"4bit": 0.5 + 0.5 / 64 * 1.1, "8bit": 1.0 + 4 / 64}.get(quantization)
    if per_linear is None:
        return shape.parameters * dtype_bytes
    return int(shape.linear_parameters * per_linear + others * 4)


def adapter_bytes(shape: ModelShape, r: int) -> int:
    """The adapter, its gradient and the optimizer's moments, all fp32."""
    return shape.adapter_parameters(r) * ADAPTER_BYTES_PER_PARAMETER


def example_bytes(
    shape: ModelShape,
    source_tokens: int,
    target_tokens: int,
    *,
    dtype_bytes: int,
    gradient_checkpointing: bool = False,
    eager_attention: bool = False,
) -> int:
    """Activations one example of these lengths keeps for the backward pass.

    With a bf16 model peft runs the fp32 adapter on an fp32 copy of each adapted layer's
    input, kept for the backward pass too; eager attention also keeps its probabilities
    (and their dropout mask), which SDPA recomputes.
    """
    if shape.kind == "causal":
        return _causal_example_bytes(
            shape, source_tokens + target_tokens, dtype_bytes=dtype_bytes,
            gradient_checkpointing=gradient_checkpointing, eager_attention=eager_attention,
        )  # fmt: skip
    d, f, b = shape.d_model, shape.d_ff, dtype_bytes
    mask = 1 if shape.dropout > 0 else 0  # dropout keeps a byte-per-value mask
    copy = 4 if dtype_bytes != 4 else 0  # peft's fp32 copies of the adapted layers' inputs
    if gradient_checkpointing:  # each layer's input, plus one layer recomputed at a time
        encoder = shape.encoder_layers * b * d + b * (12 * d + 4 * f)
        decoder = shape.decoder_layers * b * d + b * (22 * d + 4 * f)
        cross = 2 * b * d  # one layer's keys and values over the source
    else:
        encoder = shape.encoder_layers * (
            b * (12 * d + 4 * f) + mask * (3 * d + f) + copy * (6 * d + f)
        )
        decoder = shape.decoder_layers * (
            b * (22 * d + 4 * f) + mask * (4 * d + f) + copy * (8 * d + f)
        )
        cross = shape.decoder_layers * (2 * b * d + copy * 2 * d)
    logits = shape.vocab * (b + 4 + 4)
    pairs = source_tokens**2 + target_tokens**2 + source_tokens * target_tokens
    bias = shape.heads * pairs * b  # the position bias and mask, expanded over the batch
    if eager_attention and not gradient_checkpointing:
        layers_pairs = shape.encoder_layers * source_tokens**2 + shape.decoder_layers * (
            target_tokens**2 + source_tokens * target_tokens
        )
        bias += shape.heads * layers_pairs * (2 * b + mask)
    return int(source_tokens * (encoder + cross) + target_tokens * (decoder + logits) + bias)


def _causal_example_bytes(
    shape: ModelShape,
    tokens: int,
    *,
    dtype_bytes: int,
    gradient_checkpointing: bool,
    eager_attention: bool,
) -> int:
    """A decoder-only example of ``tokens`` (prompt and answer): per layer and token, a T5
    encoder layer's widths plus the gated feed-forward's third projection (its input and
    output are the width of the others), the logits of every position, and with eager
    attention the probabilities (and their dropout mask) over the causal pairs."""
    d, f, b = shape.d_model, shape.d_ff, dtype_bytes
    mask = 1 if shape.dropout > 0 else 0
    copy = 4 if dtype_bytes != 4 else 0
    if gradient_checkpointing:
        layers = shape.decoder_layers * b * d + b * (12 * d + 6 * f)
    else:
        layers = shape.decoder_layers * (
            b * (12 * d + 6 * f) + mask * (3 * d + f) + copy * (6 * d + f)
        )
    logits = shape.vocab * (b + 4 + 4)
    attention = 0
    if eager_attention and not gradient_checkpointing:
        attention = shape.decoder_layers * shape.heads * tokens * tokens * (2 * b + mask)
    return int(tokens * (layers + logits) + attention)


def generation_row_bytes(
    shape: ModelShape, source_tokens: int, new_tokens: int, *, dtype_bytes: int, beams: int = 1
) -> int:
    """What one row of batched generation holds: the encoder's output, every decoder
    layer's keys and values over the source (cross) and the answer so far (self), and the
    step's logits in fp32, for each beam."""
    d, b = shape.d_model, dtype_bytes
    cache = shape.decoder_layers * 2 * d * b * (source_tokens + new_tokens)
    if shape.kind == "causal":  # no encoder output; the cache spans prompt and answer
        return int(beams * (cache + shape.vocab * 4 * 2))
    return int(source_tokens * d * b * 4 + beams * (cache + shape.vocab * 4 * 2))


@dataclass(frozen=True)
class BatchPlan:
    """The per-device batch, the accumulation that keeps the effective batch, and why."""

    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int  # examples per optimizer update over every process
    fits: int | None  # examples the memory model says fit (None: not memory-bound here)
    example_bytes: int
    fixed_bytes: int  # weights and adapter state
    token_budget: int  # batch x the longest rows' tokens
    reason: str


def auto_effective_batch(examples: float, processes: int) -> tuple[int, str]:
    """Examples an update for effective_batch_size "auto", and why: ``AUTO_EFFECTIVE_BATCH``,
    or as many as leave a run of ``examples`` (train rows x epochs) ``MIN_UPDATES`` updates
    where that is fewer, never fewer than one a process."""
    if examples >= AUTO_EFFECTIVE_BATCH * MIN_UPDATES:
        return AUTO_EFFECTIVE_BATCH, (
            f"{examples:,.0f} examples make {math.ceil(examples / AUTO_EFFECTIVE_BATCH):,} "
            f"updates at {AUTO_EFFECTIVE_BATCH}"
        )
    batch = max(1, processes, int(examples // MIN_UPDATES))
    return batch, (
        f"{examples:,.0f} examples make {math.ceil(examples / batch):,} updates at {batch} "
        f"(at least {MIN_UPDATES} wanted; {AUTO_EFFECTIVE_BATCH} would make "
        f"{math.ceil(examples / AUTO_EFFECTIVE_BATCH):,})"
    )


def fitting_batch(available_bytes: int, fixed_bytes: int, per_example: int) -> int:
    """How many examples fit beside the fixed part (0: not even one)."""
    room = int(available_bytes * MEMORY_FRACTION) - RESERVED_BYTES - fixed_bytes
    return max(0, room // max(per_example, 1))


def plan_batch(
    *,
    wanted_batch: int | None,
    wanted_accumulation: int | None,
    effective_batch: int,
    processes: int,
    fits: int | None,
    example_bytes: int,
    fixed_bytes: int,
    longest_tokens: int,
) -> BatchPlan:
    """Per-device batch and accumulation from the spec's numbers or "auto" (None).

    "auto" takes the effective batch's share per device, capped by what fits; the
    accumulation then makes up the rest of the effective batch.
    """
    share = math.ceil(effective_batch / processes)
    if wanted_batch is not None:
        batch, why = wanted_batch, f"batch_size {wanted_batch} from the spec"
    elif fits is None:
        batch, why = share, f"the effective batch {effective_batch} over {processes} process(es)"
    else:
        batch = max(1, min(share, fits))
        why = (
            f"{fits} example(s) of the longest rows ({longest_tokens} tokens) fit in memory; "
            f"the effective batch {effective_batch} asks {share} a device"
        )
    if wanted_accumulation is not None:
        accumulation = wanted_accumulation
    else:
        accumulation = max(1, math.ceil(effective_batch / (batch * processes)))
    return BatchPlan(
        batch_size=batch,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=batch * accumulation * processes,
        fits=fits,
        example_bytes=example_bytes,
        fixed_bytes=fixed_bytes,
        token_budget=batch * longest_tokens,
        reason=why,
    )


def choose_quantization(
    shape: ModelShape,
    *,
    available_bytes: int,
    r: int,
    source_tokens: int,
    target_tokens: int,
    wanted_batch: int,
    gradient_checkpointing: bool,
) -> tuple[str, str]:
    """bf16 LoRA when the weights and the wanted batch (or 8) fit; else nf4; and why."""
    per_example = example_bytes(
        shape, source_tokens, target_tokens, dtype_bytes=2,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    fixed = weight_bytes(shape, "none", 2) + adapter_bytes(shape, r)
    fits = fitting_batch(available_bytes, fixed, per_example)
    needed = min(wanted_batch, MIN_BF16_BATCH)
    memory = f"{available_bytes / GIB:.1f} GiB"
    if fits >= needed:
        return "none", (
            f"bf16 weights ({fixed / GIB:.1f} GiB with the adapter state) leave room for "
            f"{fits} example(s) of {source_tokens}+{target_tokens} tokens in {memory}: "
            "no quantization needed"
        )
    return "4bit", (
        f"bf16 weights and adapter state ({fixed / GIB:.1f} GiB) leave room for only {fits} "
        f"example(s) of {source_tokens}+{target_tokens} tokens in {memory} (wanted "
        f"{needed}): nf4 4-bit QLoRA"
    )


def model_shape(base_model: str) -> ModelShape:
    """The shape of a model from its config alone (modules built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(base_model)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with init_empty_weights():
        model = auto.from_config(config)
    model.tie_weights()  # on the meta device the shared embeddings are not tied yet
    stored = stored_quantization(config)  # built without it: plain weights
    return dataclasses.replace(shape_from(model, config), prequantized=stored or "")


def shape_from(model: object, config: object) -> ModelShape:
    """ModelShape of a built (possibly meta-device) model and its config."""
    from torch import nn

    head = model.get_output_embeddings()  # type: ignore[attr-defined]
    linears = [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not head  # type: ignore[attr-defined]
    ]

    def matmul(stack: object) -> int:
        return sum(m.weight.numel() for m in stack.modules() if isinstance(m, nn.Linear))  # type: ignore[attr-defined]

    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None))  # noqa: E731
    if not getattr(config, "is_encoder_decoder", True):
        return _causal_shape(model, config, linears, head)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),  # type: ignore[attr-defined]
        linear_parameters=sum(m.weight.numel() for m in linears),
        lora_dims=sum(m.in_features + m.out_features for m in linears),
        d_model=get("d_model", "hidden_size"),
        d_ff=get("d_ff", "encoder_ffn_dim", "intermediate_size"),
        heads=get("num_heads", "encoder_attention_heads", "num_attention_heads"),
        encoder_layers=get("num_layers", "encoder_layers"),
        decoder_layers=get("num_decoder_layers", "decoder_layers", "num_layers"),
        vocab=get("vocab_size"),
        dropout=float(getattr(config, "dropout_rate", getattr(config, "dropout", 0.0)) or 0.0),
        model_type=str(getattr(config, "model_type", "")),
        encoder_matmul_parameters=matmul(model.get_encoder()),  # type: ignore[attr-defined]
        decoder_matmul_parameters=matmul(model.get_decoder()) + head.weight.numel(),
    )


def _causal_shape(model: object, config: object, linears: list, head: object) -> ModelShape:
    """ModelShape of a decoder-only model: one stack, every token through all of it (and
    through ``num_experts_per_tok`` of a mixture-of-experts layer's experts)."""
    from torch import nn

    stack = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # type: ignore[attr-defined]
    experts = Experts.of(model, config)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),  # type: ignore[attr-defined]
        # bitsandbytes quantizes nn.Linear layers only: fused experts keep the compute dtype
        linear_parameters=sum(m.weight.numel() for m in linears),
        lora_dims=sum(m.in_features + m.out_features for m in linears) + experts.lora_dims,
        d_model=int(config.hidden_size),  # type: ignore[attr-defined]
        d_ff=experts.ffn_width(config),
        heads=int(config.num_attention_heads),  # type: ignore[attr-defined]
        attention_width=int(config.num_attention_heads) * _head_width(config),  # type: ignore[attr-defined]
        encoder_layers=0,
        decoder_layers=int(config.num_hidden_layers),  # type: ignore[attr-defined]
        vocab=int(config.vocab_size),  # type: ignore[attr-defined]
        dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        model_type=str(getattr(config, "model_type", "")),
        # the LM head is one of the Linear layers; a token meets only its experts' weights
        decoder_matmul_parameters=stack + experts.active_weights,
        kind="causal",
    )


def _head_width(config: object) -> int:
    """An attention head's width: ``head_dim`` where the config sets it (Qwen3: wider than
    hidden_size / heads), else hidden_size / heads."""
    width = getattr(config, "head_dim", None)
    return int(width or config.hidden_size // config.num_attention_heads)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts model's experts, as transformers 5 holds them: one fused
    ``(experts, out, in)`` parameter per projection and layer, and a router per layer."""

    count: int  # experts a layer has (0: a dense model)
    per_token: int  # experts a token passes through
    weights: int  # every expert's weights
    lora_dims: int  # what peft's all-linear adapts: each expert's projections, the routers

    @classmethod
    def of(cls, model: object, config: object) -> Experts:
        count = int(_config_value(config, "num_local_experts", "num_experts") or 0)
        if not count:
            return cls(0, 0, 0, 0)
        dims = 0
        # peft gives a gate/up projection it fused from two (Mixtral's, Qwen MoE's) twice
        # the rank; one released fused (GPT-OSS's, named in lora_parameters) once
        family = families.FAMILIES.get(str(getattr(config, "model_type", "")))
        fused_by_peft = not (family and family.lora_parameters)
        for name, p in model.named_parameters():  # type: ignore[attr-defined]
            if p.dim() == 3:
                twice = fused_by_peft and "gate_up" in name
                dims += p.shape[0] * (p.shape[1] + p.shape[2]) * (2 if twice else 1)
        for m in model.modules():  # type: ignore[attr-defined]
            if type(m).__name__.endswith("Router"):
                dims += sum(m.weight.shape)
        weights = sum(p.numel() for p in model.parameters() if p.dim() == 3)  # type: ignore[attr-defined]
        return cls(count, int(config.num_experts_per_tok), weights, dims)  # type: ignore[attr-defined]

    @property
    def active_weights(self) -> int:
        """Expert weights one token is multiplied by."""
        return self.weights * self.per_token // self.count if self.count else 0

    def ffn_width(self, config: object) -> int:
        """The feed-forward width a token's activations have: its experts' together in a
        mixture-of-experts layer, GPTBigCode's ``n_inner`` (4 x the width when unset)."""
        if self.count:
            width = _config_value(config, "moe_intermediate_size", "intermediate_size")
            return int(width) * self.per_token
        width = _config_value(config, "intermediate_size", "n_inner")
        return int(width or 4 * config.hidden_size)  # type: ignore[attr-defined]


def _config_value(config: object, *names: str) -> object:
    """The first of ``names`` the config sets (families name some settings differently)."""
    return next((getattr(config, n) for n in names if getattr(config, n, None)), None)
