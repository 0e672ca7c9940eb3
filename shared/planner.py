"""The training plan for this machine: device, precision, quantization, batch and kernels.

Every "auto" in the training spec is resolved here, each with the reason in ``notes`` (the
trainer prints them, stores them with the job, and ``termtune estimate`` shows the same
plan for an instance's GPU). The batch comes from ``shared.trainplan``'s memory model; on
CUDA ``probe`` then runs a step at the planned batch on the longest rows and halves it on
out-of-memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared import families, trainplan
from shared.errors import ModelError, OutOfMemory, SpecError
from shared.jobspec import TrainingSpec
from shared.modeling import device as current_device

T5_TYPES = ("t5", "mt5", "umt5")


@dataclass(frozen=True)
class Plan:
    """What the trainer resolved from the spec for this machine."""

    device: str
    precision: str
    quantization: str
    notes: tuple[str, ...] = ()
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw_torch"
    attention: str = "sdpa"
    compile: bool = False
    token_budget: int | None = None  # the per-device batch x the longest rows' tokens
    memory_gib: float | None = None  # the device memory the plan was sized for
    #: examples an optimizer update over every process that the batch and accumulation keep
    #: (0: a plan stored before this field: batch x accumulation x processes)
    effective_batch_size: int = 0
    kind: str = "seq2seq"  # the base model's kind (shared.families): which trainer runs
    packing: bool = False  # decoder-only: examples packed into rows (kept apart by positions)
    row_attention: float = 0.0  # packing: attention's work per position of row width (shape)
    group_by_length: bool = True  # batches of alike lengths (not when packing: rows want a mix)

    @property
    def dtype(self) -> Any:
        """Storage and compute dtype of the non-quantized weights (a torch.dtype)."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32


@dataclass(frozen=True)
class Rows:
    """The prepared train split's size and longest rows (from the data-prep manifest)."""

    count: int
    source_tokens: int
    target_tokens: int

    @classmethod
    def from_manifest(cls, dataset: dict) -> Rows:
        """Rows of a data-prep manifest (longest kept lengths of the train split)."""
        stats = dataset.get("tokens", {}).get("train", {})
        return cls(
            count=int(dataset.get("counts", {}).get("train", 0)),
            source_tokens=int(stats.get("source", {}).get("max", 0)) or 1,
            target_tokens=int(stats.get("target", {}).get("max", 0)) or 1,
        )

    @property
    def longest(self) -> int:
        """Tokens of the longest source plus the longest target."""
        return self.source_tokens + self.target_tokens


def device_memory(dev: str) -> int:
    """Free memory of the device training runs on (CUDA), or the host memory this process
    may still take (CPU: ``host_memory``)."""
    if dev == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return host_memory()


#: share of a device's free memory the weights may take when a stage loads them whole
#: (the rest: the adapter, activations, the allocator; safetensors writes each shard from
#: the tensors' own memory, without a copy)
WEIGHTS_SHARE = 0.8
_SHORT = {"float32": "fp32", "bfloat16": "bf16"}
_WHERE = {"cuda": "GPU", "cpu": "host"}


@dataclass(frozen=True)
class Placement:
    """Where a stage loads the base model's weights, in which dtype, and why."""

    device: str
    dtype: str  # "float32" or "bfloat16"
    reason: str

    def record(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype, "reason": self.reason}


def evaluation_options(gpu: bool) -> list[tuple[str, str]]:
    """Where the evaluator may load the base model, best first: bf16 on the GPU (loaded
    straight there, shard by shard), else fp32 on the host, else bf16 there."""
    return [*([("cuda", "bfloat16")] if gpu else []), ("cpu", "float32"), ("cpu", "bfloat16")]


def merge_options(gpu: bool, export_dtype: str) -> list[tuple[str, str]]:
    """Where the publisher may merge: in the export's dtype (for a bf16 export, merging in
    fp32 and casting would take twice the memory and differ by at most one bf16 step), on
    the GPU, else on the host."""
    return [(dev, export_dtype) for dev in (["cuda", "cpu"] if gpu else ["cpu"])]


#: what an fp32 export may change when its weights fit nowhere
HALVE_WITH_BF16 = ", or publish.dtype bfloat16 (half the memory)"


def advice(stage: str, gpu: bool) -> str:
    """What to change when a stage's weights fit nowhere on this machine."""
    if gpu:
        return f"run the {stage} on a GPU with more memory, or choose a smaller base model"
    return (
        f"give the {stage} more memory or a GPU (the ECS stack: StageMemory, or "
        "EvaluatorPublisherCapacity=Gpu)"
    )


def place_weights(
    parameters: int, options: list[tuple[str, str]], *, what: str, advice: str
) -> Placement:
    """``first_fit`` on this machine; ModelError naming every option passed over, before
    anything is loaded (a task past its memory limit is killed, and its message delivered
    again)."""
    placement, passed_over = first_fit(parameters, options)
    if placement is None:
        raise ModelError(f"{what} fits nowhere: {'; '.join(passed_over)}; {advice}")
    return placement


def first_fit(
    parameters: int, options: list[tuple[str, str]], free: dict[str, int] | None = None
) -> tuple[Placement | None, list[str]]:
    """The first (device, dtype) option whose weights fit in ``WEIGHTS_SHARE`` of that
    device's free memory (this machine's, or ``free``'s by device), and the options passed
    over, each with its size."""
    passed_over = [] if any(dev == "cuda" for dev, _ in options) else ["no GPU"]
    free = dict(free or {})
    for dev, dtype in options:
        if dev not in free:
            free[dev] = device_memory(dev)
        need = parameters * (4 if dtype == "float32" else 2)
        size = f"{_SHORT[dtype]} weights {need / trainplan.GIB:.1f} GiB"
        gib = free[dev] / trainplan.GIB
        if need <= free[dev] * WEIGHTS_SHARE:
            reason = f"{size} in {_WHERE[dev]} memory ({gib:.1f} GiB free)"
            return Placement(dev, dtype, "; ".join([reason, *passed_over])), passed_over
        passed_over.append(
            f"{size} over {WEIGHTS_SHARE:.0%} of the {_WHERE[dev]}'s {gib:.1f} GiB free"
        )
    return None, passed_over


def host_memory(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Host memory this process may still take: the kernel's MemAvailable (free memory and
    the page cache it can reclaim; MemFree alone leaves the cache out), capped by the
    container's memory limit less its working set (cgroup v2, else v1: a container sees the
    host's meminfo, not its own limit, and is killed at the limit)."""
    available = _meminfo_available(proc / "meminfo")
    headroom = _cgroup_headroom(cgroup)
    return min(available, headroom) if headroom is not None else available


def _meminfo_available(path: Path) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _cgroup_headroom(root: Path) -> int | None:
    """The cgroup's limit less its usage net of inactive file cache (the working set, as
    docker stats counts it); None without a limit. Under v1 the limit is also the one a
    parent cgroup sets (``hierarchical_memory_limit``); under v2 a container sees only its
    own cgroup, so its runtime must set the limit there (the ECS template does)."""
    for limit, usage, stat, inactive, inherited in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file", None),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
         "total_inactive_file", "hierarchical_memory_limit"),
    ):  # fmt: skip
        try:
            cap = (root / limit).read_text().strip()
            used = int((root / usage).read_text().strip())
            caps = [] if cap == "max" else [int(cap)]
        except (OSError, ValueError):
            continue
        if inherited and (parent := _stat(root / stat, inherited)):
            caps.append(parent)
        caps = [c for c in caps if c < 1 << 60]  # v1 writes "no limit" as a huge number
        if not caps:
            return None
        return max(0, min(caps) - used + _stat(root / stat, inactive))
    return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def resolve(
    spec: TrainingSpec,
    shape: trainplan.ModelShape,
    rows: Rows,
    *,
    processes: int = 1,
    dev: str | None = None,
    memory_bytes: int | None = None,
    bf16: bool | None = None,
) -> Plan:
    """Resolve every "auto" of the spec for this device (this machine's unless given: its
    kind, free memory and bf16 support); refuse what cannot work."""
    dev = dev or current_device()
    notes: list[str] = []
    precision = _precision(spec, shape.model_type, dev, _bf16(dev) if bf16 is None else bf16, notes)
    memory = memory_bytes if memory_bytes is not None else device_memory(dev)
    effective = _effective_batch(spec, rows, processes, notes)
    quantization = _quantization(
        spec, shape, rows, dev, memory, precision, -(-effective // processes), notes
    )
    dtype_bytes = 2 if precision == "bf16" else 4
    attention = _attention(spec, shape.model_type, notes)
    per_example = trainplan.example_bytes(
        shape,
        rows.source_tokens,
        rows.target_tokens,
        dtype_bytes=dtype_bytes,
        gradient_checkpointing=spec.gradient_checkpointing,
        eager_attention=attention == "eager",
    )
    fixed = trainplan.weight_bytes(shape, quantization, dtype_bytes) + trainplan.adapter_bytes(
        shape, spec.lora.r
    )
    if dev == "cuda":
        _check_weights_fit(fixed, memory, quantization, precision, shape)
    fits = trainplan.fitting_batch(memory, fixed, per_example) if dev == "cuda" else None
    batch = trainplan.plan_batch(
        wanted_batch=None if spec.batch_size == "auto" else spec.batch_size,
        wanted_accumulation=None
        if spec.gradient_accumulation_steps == "auto"
        else spec.gradient_accumulation_steps,
        effective_batch=effective,
        processes=processes,
        fits=fits,
        example_bytes=per_example,
        fixed_bytes=fixed,
        longest_tokens=rows.longest,
    )
    notes.append(
        f"batch {batch.batch_size} x accumulation {batch.gradient_accumulation_steps} x "
        f"{processes} process(es) = {batch.effective_batch_size}: {batch.reason}"
    )
    optimizer = _optimizer(spec, notes)
    if spec.fused_layers and shape.kind == "seq2seq":
        notes.append("fused layers: torch's gelu(tanh) and rms_norm in place of T5's")
    if spec.fused_lora:
        notes.append(_fused_lora_note(spec, quantization))
    compile_model = _compile(spec, dev, quantization, notes)
    packing = _packing(spec, shape.kind, shape.model_type, notes)
    grouped = _grouped(spec, packing, notes)
    return Plan(
        device=dev,
        precision=precision,
        quantization=quantization,
        notes=tuple(notes),
        batch_size=batch.batch_size,
        gradient_accumulation_steps=batch.gradient_accumulation_steps,
        effective_batch_size=effective,
        optimizer=optimizer,
        attention=attention,
        compile=compile_model,
        token_budget=batch.token_budget,
        memory_gib=round(memory / trainplan.GIB, 1),
        kind=shape.kind,
        packing=packing,
        row_attention=round(shape.attention_per_width(), 8) if packing else 0.0,
        group_by_length=grouped,
    )


def _fused_lora_note(spec: TrainingSpec, quantization: str) -> str:
    if spec.lora.dropout > 0:
        return "fused LoRA: off, peft's forward (LoRA dropout is not plain LoRA)"
    if quantization != "none":
        return (
            "fused LoRA: only in the layers left unquantized (the quantized ones take "
            "peft's bitsandbytes forward)"
        )
    return "fused LoRA: each adapted layer, base and update, in one autograd node"


def _bf16(dev: str) -> bool:
    import torch

    return dev == "cuda" and torch.cuda.is_bf16_supported()


def _precision(spec: TrainingSpec, model_type: str, dev: str, bf16: bool, notes: list[str]) -> str:
    if spec.precision == "fp16" and model_type in T5_TYPES:
        raise SpecError(
            "training.precision: fp16 is refused for T5 models: their activations "
            "overflow fp16's range and the loss becomes NaN; use bf16 or fp32"
        )
    if spec.precision == "fp16" and dev != "cuda":
        raise SpecError(
            f"training.precision: fp16 needs a CUDA GPU (on {dev} mixed precision would "
            "train in fp32 unannounced); use fp32 or auto"
        )
    if spec.precision != "auto":
        return spec.precision
    precision = "bf16" if bf16 and dev == "cuda" else "fp32"
    notes.append(f"precision auto -> {precision} on {dev}")
    return precision


def _effective_batch(spec: TrainingSpec, rows: Rows, processes: int, notes: list[str]) -> int:
    """The effective batch the plan keeps: the spec's batch x accumulation where it sets both,
    else its effective batch or "auto"'s by the run's length (``trainplan``)."""
    if spec.batch_size != "auto" and spec.gradient_accumulation_steps != "auto":
        return spec.batch_size * spec.gradient_accumulation_steps * processes
    if spec.effective_batch_size != "auto":
        return spec.effective_batch_size
    if spec.max_steps > 0 or rows.count <= 0:
        why = "max_steps sets the updates" if spec.max_steps > 0 else "the train rows unknown"
        notes.append(f"effective batch auto -> {trainplan.AUTO_EFFECTIVE_BATCH} ({why})")
        return trainplan.AUTO_EFFECTIVE_BATCH
    effective, why = trainplan.auto_effective_batch(rows.count * spec.epochs, processes)
    notes.append(
        f"effective batch auto -> {effective}: {rows.count:,} train rows x {spec.epochs:g} "
        f"epoch(s) = {why}"
    )
    return effective


def _quantization(
    spec: TrainingSpec,
    shape: trainplan.ModelShape,
    rows: Rows,
    dev: str,
    memory: int,
    precision: str,
    share: int,
    notes: list[str],
) -> str:
    """Quantization "auto": bf16 LoRA where the weights and ``share`` (the effective batch's
    share a device) fit, else nf4."""
    if shape.prequantized:  # GPT-OSS's MXFP4 experts load as plain weights (shared.modeling)
        if spec.quantization in ("4bit", "8bit"):
            raise SpecError(
                f"training.quantization {spec.quantization}: the base model keeps its experts "
                f"in {shape.prequantized.upper()}, which trains only as plain "
                f"{precision} weights that bitsandbytes cannot quantize again; set none or auto"
            )
        if spec.quantization == "auto":
            notes.append(
                f"quantization auto -> none (the {shape.prequantized.upper()} experts load "
                f"as {precision} weights)"
            )
        return "none"
    if spec.quantization != "auto":
        return spec.quantization
    if dev != "cuda":
        notes.append(f"quantization auto -> none on {dev} (bitsandbytes' 4-bit needs CUDA)")
        return "none"
    if spec.recipe == "notebook" or precision != "bf16":
        why = "the notebook's recipe" if spec.recipe == "notebook" else f"{precision} compute"
        notes.append(f"quantization auto -> 4bit ({why})")
        return "4bit"
    wanted = spec.batch_size if spec.batch_size != "auto" else share
    choice, why = trainplan.choose_quantization(
        shape,
        available_bytes=memory,
        r=spec.lora.r,
        source_tokens=rows.source_tokens,
        target_tokens=rows.target_tokens,
        wanted_batch=wanted,
        gradient_checkpointing=spec.gradient_checkpointing,
    )
    notes.append(f"quantization auto -> {choice}: {why}")
    return choice


def _check_weights_fit(
    fixed: int, memory: int, quantization: str, precision: str, shape: trainplan.ModelShape
) -> None:
    """OutOfMemory, before anything loads, when the weights and the adapter alone exceed the
    GPU's free memory (gpt-oss-20b's 42 GB of bf16 on a 24 GB A10G): no batch can fit."""
    if fixed <= memory:
        return
    stored = f"{quantization} weights" if quantization != "none" else f"{precision} weights"
    lower = (
        "set training.quantization to 4bit, or use a GPU with more memory"
        if quantization != "4bit" and not shape.prequantized
        else "use a GPU with more memory"
    )
    raise OutOfMemory(
        f"the base model's {stored} and the adapter need {fixed / trainplan.GIB:.1f} GiB, "
        f"more than this GPU's {memory / trainplan.GIB:.1f} GiB free: {lower}"
    )


def _attention(spec: TrainingSpec, model_type: str, notes: list[str]) -> str:
    """SDPA where transformers has it for the family, else eager."""
    family = families.FAMILIES.get(model_type)
    if family is None or family.sdpa:
        return "sdpa" if spec.attention == "auto" else spec.attention
    if spec.attention == "sdpa":
        raise SpecError(
            f"training.attention sdpa: transformers has no SDPA attention for {family.label} "
            "models; set eager or auto"
        )
    if spec.attention == "auto":
        notes.append(f"attention auto -> eager (transformers has no SDPA for {family.label})")
    return "eager"


def _optimizer(spec: TrainingSpec, notes: list[str]) -> str:
    if spec.optimizer != "auto":
        return spec.optimizer
    notes.append("optimizer auto -> adamw_torch_fused (one kernel for every parameter)")
    return "adamw_torch_fused"


def packed_masks_supported() -> bool:
    """Whether the installed transformers keeps packed examples apart in SDPA and eager
    attention: it finds them from position ids that restart (masking_utils, 5.x)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def _packing(spec: TrainingSpec, kind: str, model_type: str, notes: list[str]) -> bool:
    if kind != "causal" or spec.packing == "off":
        return False
    family = families.FAMILIES.get(model_type)
    if family is not None and not family.packs:
        if spec.packing == "on":
            raise SpecError(
                f"training.packing: on would let packed examples mix in {family.label} "
                "models' attention (transformers keeps them apart only in other families); "
                "set it to auto or off"
            )
        notes.append(f"packing auto -> off (packed examples would mix in {family.label})")
        return False
    if not packed_masks_supported():
        if spec.packing == "on":
            raise SpecError(
                "training.packing: on needs a transformers that keeps packed examples apart "
                "(5.x); set it to auto or off"
            )
        notes.append("packing auto -> off (this transformers would let packed examples mix)")
        return False
    notes.append(
        "packing -> on (each batch's examples packed into rows of the width that costs least "
        "by the model's shape, attention kept within each example and costing no more than "
        "the padded batch's)"
    )
    return True


def _grouped(spec: TrainingSpec, packing: bool, notes: list[str]) -> bool:
    if spec.group_by_length and packing:
        notes.append(
            "group by length -> off (packing: batches of mixed lengths fill rows with less "
            "padding than batches of alike ones)"
        )
        return False
    return spec.group_by_length


def _compile(spec: TrainingSpec, dev: str, quantization: str, notes: list[str]) -> bool:
    if spec.compile != "auto":
        return spec.compile == "on"
    if dev != "cuda":
        notes.append(f"compile auto -> off on {dev} (compiling takes longer than it saves)")
        return False
    if quantization != "none":
        notes.append(f"compile auto -> off ({quantization} bitsandbytes weights break graphs)")
        return False
    notes.append("compile auto -> on (torch.compile of the model)")
    return True


def backed_off(plan: Plan, batch: int, effective: int, processes: int, why: str) -> Plan:
    """The plan with a smaller per-device batch and the accumulation that keeps the
    effective batch."""
    accumulation = max(1, -(-effective // (batch * processes)))
    per_row = (plan.token_budget or plan.batch_size) // plan.batch_size
    return replace(
        plan,
        batch_size=batch,
        gradient_accumulation_steps=accumulation,
        token_budget=batch * per_row,
        notes=(*plan.notes, why),
    )
