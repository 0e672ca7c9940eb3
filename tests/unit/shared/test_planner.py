"""The memory model, the batch and quantization plan, and the probe's back-off."""

import pytest
import torch

from services.trainer import callbacks, probe
from shared import planner, trainplan
from shared.errors import OutOfMemory
from shared.jobspec import TrainingSpec

GIB = trainplan.GIB
#: flan-t5-large's shape, as trainplan.model_shape reads it from the config
T5_LARGE = trainplan.ModelShape(
    parameters=750_251_008,
    linear_parameters=717_225_984,
    lora_dims=1_142_784,
    d_model=1024,
    d_ff=2816,
    heads=16,
    encoder_layers=24,
    decoder_layers=24,
    vocab=32128,
    dropout=0.1,
    encoder_matmul_parameters=308_281_344,
    decoder_matmul_parameters=441_843_712,
)
#: the GPU record's rows: 128 source and 256 target tokens
ROWS = planner.Rows(count=9600, source_tokens=128, target_tokens=256)
A10G = 22 * GIB


def test_the_shape_is_read_from_a_config(tiny_model):
    shape = trainplan.model_shape(str(tiny_model))
    assert shape.model_type == "t5"
    assert 0 < shape.linear_parameters < shape.parameters
    assert shape.lora_dims > 0 and shape.encoder_layers > 0 and shape.vocab > 0


def test_the_memory_model_matches_the_h200_record():
    """bf16 LoRA r=64, eager attention, 128 + 256 tokens: 12.7 GiB at 8, 42.8 GiB at 32."""
    fixed = trainplan.weight_bytes(T5_LARGE, "none", 2) + trainplan.adapter_bytes(T5_LARGE, 64)
    per = trainplan.example_bytes(T5_LARGE, 128, 256, dtype_bytes=2, eager_attention=True)
    for batch, measured in ((8, 12.7), (32, 42.8)):
        assert (fixed + batch * per) / GIB == pytest.approx(measured, rel=0.05)
    sdpa = trainplan.example_bytes(T5_LARGE, 128, 256, dtype_bytes=2)
    checkpointed = trainplan.example_bytes(
        T5_LARGE, 128, 256, dtype_bytes=2, gradient_checkpointing=True
    )
    assert checkpointed < sdpa < per
    nf4, bf16 = (trainplan.weight_bytes(T5_LARGE, q, 2) for q in ("4bit", "none"))
    assert nf4 < bf16 / 2


def test_the_4bit_memory_model_counts_the_weights_left_unquantized_as_peft_keeps_them(
    tiny_model,
):
    """peft's prepare_model_for_kbit_training casts every bf16 weight bitsandbytes leaves
    unquantized (embeddings, norms, the LM head) to fp32: the model counted them at 2 bytes."""
    import dataclasses

    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForSeq2SeqLM

    shape = trainplan.model_shape(str(tiny_model))
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    quantized = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    }
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    kept = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized)
    linears_only = dataclasses.replace(shape, parameters=shape.linear_parameters)
    counted = trainplan.weight_bytes(shape, "4bit", 2) - trainplan.weight_bytes(
        linears_only, "4bit", 2
    )
    assert counted == kept


def test_on_an_a10g_flan_t5_large_trains_in_bf16_with_the_effective_batch_kept():
    plan = planner.resolve(TrainingSpec(), T5_LARGE, ROWS, dev="cuda", memory_bytes=A10G, bf16=True)
    assert (plan.quantization, plan.precision) == ("none", "bf16")
    assert 8 <= plan.batch_size < 32  # memory-bound: fewer than the effective batch fit
    assert plan.batch_size * plan.gradient_accumulation_steps >= 32
    assert plan.token_budget == plan.batch_size * ROWS.longest
    assert plan.compile and plan.optimizer == "adamw_torch_fused" and plan.attention == "sdpa"
    assert any(n.startswith("quantization auto -> none: bf16 weights") for n in plan.notes)


def test_a_small_gpu_takes_nf4_and_says_why():
    plan = planner.resolve(
        TrainingSpec(), T5_LARGE, ROWS, dev="cuda", memory_bytes=8 * GIB, bf16=True
    )
    assert plan.quantization == "4bit"
    assert not plan.compile  # bitsandbytes weights: compile stays off, with the reason
    assert any("leave room for only" in n for n in plan.notes)
    assert any("compile auto -> off (4bit" in n for n in plan.notes)


def test_a_gpu_too_small_for_one_example_still_plans_batch_one():
    plan = planner.resolve(
        TrainingSpec(), T5_LARGE, ROWS, dev="cuda", memory_bytes=2 * GIB, bf16=True
    )
    assert (plan.quantization, plan.batch_size, plan.gradient_accumulation_steps) == (
        "4bit",
        1,
        32,
    )


def test_on_cpu_the_effective_batch_is_shared_between_processes():
    spec = TrainingSpec(effective_batch_size=32)
    plan = planner.resolve(spec, T5_LARGE, ROWS, dev="cpu", memory_bytes=24 * GIB, processes=2)
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (16, 1)
    assert (plan.quantization, plan.precision, plan.compile) == ("none", "fp32", False)


def test_a_batch_from_the_spec_gets_the_accumulation_that_keeps_the_effective_batch():
    spec = TrainingSpec(batch_size=8, effective_batch_size=64)
    plan = planner.resolve(spec, T5_LARGE, ROWS, dev="cpu", memory_bytes=24 * GIB)
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (8, 8)
    both = TrainingSpec(batch_size=8, gradient_accumulation_steps=3)
    plan = planner.resolve(both, T5_LARGE, ROWS, dev="cpu", memory_bytes=24 * GIB)
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (8, 3)


def test_auto_effective_batch_leaves_a_short_run_250_updates():
    """176 rows x 3 epochs (bench.training's run) would make 17 updates at 32: auto takes 2."""
    small = planner.Rows(count=176, source_tokens=40, target_tokens=128)
    plan = planner.resolve(
        TrainingSpec(epochs=3), T5_LARGE, small, dev="cpu", memory_bytes=24 * GIB
    )
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (2, 1)
    assert plan.effective_batch_size == 2
    assert (
        "effective batch auto -> 2: 176 train rows x 3 epoch(s) = 528 examples make 264 "
        "updates at 2 (at least 250 wanted; 32 would make 17)"
    ) in plan.notes
    cuda = planner.resolve(
        TrainingSpec(epochs=10), T5_LARGE, small, dev="cuda", memory_bytes=A10G, bf16=True
    )  # 1,760 examples: 7 an update
    assert (cuda.batch_size, cuda.gradient_accumulation_steps) == (7, 1)
    two = planner.resolve(
        TrainingSpec(epochs=1), T5_LARGE, small, dev="cpu", memory_bytes=24 * GIB, processes=2
    )  # 176 examples: fewer than 250 updates can be had, one example a process
    assert (two.effective_batch_size, two.batch_size, two.gradient_accumulation_steps) == (2, 1, 1)


def test_auto_effective_batch_is_32_on_a_long_run_a_fixed_one_or_unknown_rows():
    cpu = {"dev": "cpu", "memory_bytes": 24 * GIB}
    long = planner.resolve(TrainingSpec(), T5_LARGE, ROWS, **cpu)  # 9,600 rows x 1 epoch
    assert (long.effective_batch_size, long.batch_size) == (32, 32)
    assert any(n.endswith("= 9,600 examples make 300 updates at 32") for n in long.notes)
    edge = planner.Rows(count=8000, source_tokens=128, target_tokens=256)
    assert planner.resolve(TrainingSpec(), T5_LARGE, edge, **cpu).effective_batch_size == 32
    below = planner.Rows(count=7999, source_tokens=128, target_tokens=256)
    assert planner.resolve(TrainingSpec(), T5_LARGE, below, **cpu).effective_batch_size == 31
    half = planner.Rows(count=4800, source_tokens=128, target_tokens=256)
    assert planner.resolve(TrainingSpec(), T5_LARGE, half, **cpu).effective_batch_size == 19
    fixed = planner.resolve(TrainingSpec(max_steps=10), T5_LARGE, edge, **cpu)
    assert "effective batch auto -> 32 (max_steps sets the updates)" in fixed.notes
    unknown = planner.resolve(TrainingSpec(), T5_LARGE, planner.Rows(0, 128, 256), **cpu)
    assert "effective batch auto -> 32 (the train rows unknown)" in unknown.notes


def test_an_effective_batch_the_spec_sets_or_a_set_batch_and_accumulation_are_kept():
    cpu = {"dev": "cpu", "memory_bytes": 24 * GIB}
    small = planner.Rows(count=176, source_tokens=40, target_tokens=128)
    asked = planner.resolve(TrainingSpec(effective_batch_size=32), T5_LARGE, small, **cpu)
    assert (asked.batch_size, asked.effective_batch_size) == (32, 32)
    both = TrainingSpec(batch_size=1, gradient_accumulation_steps=2)
    plan = planner.resolve(both, T5_LARGE, small, **cpu, processes=2)
    assert (plan.batch_size, plan.gradient_accumulation_steps) == (1, 2)
    assert plan.effective_batch_size == 4
    assert not any(n.startswith("effective batch") for n in plan.notes)


def test_recipe_notebook_is_exactly_the_old_defaults():
    spec = TrainingSpec(recipe="notebook")
    assert (spec.batch_size, spec.gradient_accumulation_steps, spec.learning_rate) == (1, 2, 2e-4)
    assert (spec.optimizer, spec.attention, spec.compile) == ("adamw_torch", "eager", "off")
    assert not spec.fused_layers and not spec.fused_lora  # peft's own LoRA forward
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (64, 16, 0.1)
    cuda = planner.resolve(spec, T5_LARGE, ROWS, dev="cuda", memory_bytes=80 * GIB, bf16=True)
    assert (cuda.quantization, cuda.precision, cuda.batch_size) == ("4bit", "bf16", 1)
    assert (cuda.gradient_accumulation_steps, cuda.optimizer) == (2, "adamw_torch")
    assert not cuda.compile
    cpu = planner.resolve(spec, T5_LARGE, ROWS, dev="cpu", memory_bytes=24 * GIB)
    assert (cpu.quantization, cpu.precision) == ("none", "fp32")


def test_what_the_spec_sets_beats_the_recipe():
    spec = TrainingSpec.model_validate(
        {"recipe": "notebook", "batch_size": 8, "lora": {"r": 8}, "learning_rate": 0.01}
    )
    assert (spec.batch_size, spec.gradient_accumulation_steps, spec.learning_rate) == (8, 2, 0.01)
    assert (spec.lora.r, spec.lora.dropout) == (8, 0.1)


def _oom_above(limit: int, peak_per_example: int = GIB):
    tried = []

    def run(batch: int) -> int:
        tried.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * peak_per_example

    return run, tried


def test_the_probe_halves_the_batch_until_it_fits():
    plan = planner.resolve(TrainingSpec(), T5_LARGE, ROWS, dev="cuda", memory_bytes=A10G, bf16=True)
    run, tried = _oom_above(5)
    probed = probe.fit_batch(
        plan, run=run, effective_batch=32, processes=1, total_bytes=80 * GIB, optimizer_bytes=0
    )
    assert tried == [plan.batch_size, plan.batch_size // 2, plan.batch_size // 4][: len(tried)]
    assert probed.batch_size <= 5 and tried[-1] == probed.batch_size
    assert probed.batch_size * probed.gradient_accumulation_steps >= 32
    assert probed.token_budget == probed.batch_size * ROWS.longest
    assert "did not fit" in probed.notes[-1]


def test_the_probe_keeps_an_accumulation_the_spec_set():
    """batch_size auto with gradient_accumulation_steps 1: halving the batch recomputed the
    accumulation for the auto effective batch (6 x 1 became 3 x 11)."""
    spec = TrainingSpec(gradient_accumulation_steps=1)
    plan = planner.resolve(spec, T5_LARGE, ROWS, dev="cuda", memory_bytes=A10G, bf16=True)
    assert plan.gradient_accumulation_steps == 1 and plan.batch_size > 2
    run, _ = _oom_above(plan.batch_size - 1)
    probed = probe.fit_batch(
        plan, run=run, effective_batch=plan.effective_batch_size, processes=1,
        total_bytes=80 * GIB, optimizer_bytes=0, keep_accumulation=True,
    )  # fmt: skip
    assert probed.batch_size < plan.batch_size and probed.gradient_accumulation_steps == 1


def test_the_probe_runs_its_step_in_training_mode(tiny_model, monkeypatch):
    """A model loaded for training is in eval mode but for its adapter: the probe measured
    a step without gradient checkpointing or dropout masks, unlike the run's."""
    from transformers import AutoModelForSeq2SeqLM

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model).eval()
    modes = []
    model.encoder.block[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    probe.step(model, planner.Rows(count=1, source_tokens=8, target_tokens=8), 2)
    assert modes == [True] and not model.training  # and back as it was


def test_the_probe_keeps_a_batch_that_fits_and_counts_the_optimizer():
    plan = planner.resolve(TrainingSpec(), T5_LARGE, ROWS, dev="cuda", memory_bytes=A10G, bf16=True)
    run, tried = _oom_above(1000)
    kept = probe.fit_batch(
        plan, run=run, effective_batch=32, processes=1, total_bytes=80 * GIB, optimizer_bytes=0
    )
    assert kept is plan and tried == [plan.batch_size]
    # the step fits, but not with the optimizer's moments beside it: backs off too
    run, tried = _oom_above(1000, peak_per_example=4 * GIB)
    smaller = probe.fit_batch(
        plan, run=run, effective_batch=32, processes=1, total_bytes=24 * GIB, optimizer_bytes=GIB
    )
    assert smaller.batch_size * 4 + 1 <= 24 * trainplan.MEMORY_FRACTION


def test_the_probe_fails_with_what_to_lower_when_one_example_does_not_fit():
    plan = planner.resolve(
        TrainingSpec(), T5_LARGE, ROWS, dev="cuda", memory_bytes=2 * GIB, bf16=True
    )
    run, _ = _oom_above(0)
    with pytest.raises(OutOfMemory, match="max_target_length.*gradient_checkpointing"):
        probe.fit_batch(
            plan, run=run, effective_batch=32, processes=1, total_bytes=2 * GIB, optimizer_bytes=0
        )


def test_stop_requests_are_asked_on_a_timer_not_every_step():
    asked = []
    answers = iter([None, None, "cancel", None])

    def should_stop():
        asked.append(1)
        return next(answers, None)

    flags = []  # the in-memory flags (shutdown), read at every step
    with callbacks.PolledStop(
        should_stop, every=0.05, immediate=lambda: next(iter(flags), None)
    ) as polled:
        reads = [polled() for _ in range(10_000)]  # the training loop's steps
        assert len(asked) <= 2  # asked once at the start, maybe once by the timer
        while polled() is None:
            pass
        assert polled() == "cancel"  # a reason, once seen, stays
        flags.append("shutdown")
        assert polled() == "shutdown"  # at once, and it outranks cancel
    assert reads[0] is None


def test_mfu_charges_each_half_for_its_own_tokens():
    """The H200 record's best row (bf16 LoRA, batch 32: 19,615 tokens/s of 128 + 256 a row)
    is ~3.2% of 989 TFLOPS, not the 8.9% that 6 x every parameter x every token gave."""
    examples_per_s = 19_615 / (128 + 256)
    mfu = T5_LARGE.training_flops(128, 256) * examples_per_s / 989e12
    assert mfu == pytest.approx(0.0315, abs=0.0005)


def test_the_shape_splits_the_weights_between_the_halves(tiny_model):
    shape = trainplan.model_shape(str(tiny_model))
    assert shape.encoder_matmul_parameters > 0
    assert shape.decoder_matmul_parameters > shape.encoder_matmul_parameters  # cross-attention
    assert shape.training_flops(10, 0) == 4 * shape.encoder_matmul_parameters * 10


@pytest.fixture(scope="module")
def gpt_oss_20b(tmp_path_factory):
    """gpt-oss-20b's shape, as trainplan.model_shape reads it from its released config
    (experts stored in MXFP4)."""
    import json

    from transformers import GptOssConfig

    folder = tmp_path_factory.mktemp("gpt-oss-20b")
    config = GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    return trainplan.model_shape(str(folder))


def test_gpt_oss_trains_its_mxfp4_experts_as_bf16_with_eager_attention_and_padded_rows(
    gpt_oss_20b,
):
    assert gpt_oss_20b.prequantized == "mxfp4" and gpt_oss_20b.model_type == "gpt_oss"
    assert 20e9 < gpt_oss_20b.parameters < 22e9  # 21B, every expert in bf16
    plan = planner.resolve(
        TrainingSpec(), gpt_oss_20b, ROWS, dev="cuda", memory_bytes=78 * GIB, bf16=True
    )
    assert (plan.quantization, plan.precision, plan.attention) == ("none", "bf16", "eager")
    assert plan.packing is False and plan.group_by_length is True
    assert "quantization auto -> none (the MXFP4 experts load as bf16 weights)" in plan.notes
    assert "attention auto -> eager (transformers has no SDPA for GPT-OSS)" in plan.notes
    assert "packing auto -> off (packed examples would mix in GPT-OSS)" in plan.notes


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ({"quantization": "4bit"}, "training.quantization 4bit: the base model keeps its experts"),
        ({"attention": "sdpa"}, "training.attention sdpa: transformers has no SDPA attention"),
        ({"packing": "on"}, "training.packing: on would let packed examples mix in GPT-OSS"),
    ],
)
def test_what_gpt_oss_cannot_do_is_refused_by_setting(gpt_oss_20b, setting, refusal):
    from shared.errors import SpecError

    with pytest.raises(SpecError, match=refusal):
        planner.resolve(
            TrainingSpec(**setting), gpt_oss_20b, ROWS, dev="cuda", memory_bytes=78 * GIB,
            bf16=True,
        )  # fmt: skip


def test_weights_that_alone_exceed_the_gpu_are_refused_before_loading(gpt_oss_20b):
    with pytest.raises(OutOfMemory) as caught:
        planner.resolve(TrainingSpec(), gpt_oss_20b, ROWS, dev="cuda", memory_bytes=A10G, bf16=True)
    assert str(caught.value) == (  # 39 GiB of bf16 weights; r=64 on every expert, 11 more
        "the base model's bf16 weights and the adapter need 50.0 GiB, more than this GPU's "
        "22.0 GiB free: use a GPU with more memory"
    )
    spec = TrainingSpec(quantization="none")
    with pytest.raises(OutOfMemory, match="set training.quantization to 4bit, or use a GPU"):
        planner.resolve(spec, T5_LARGE, ROWS, dev="cuda", memory_bytes=1 * GIB, bf16=True)


def _host(root, meminfo_kib, **files):
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal:       24000000 kB\nMemFree:         1000000 kB\n"
        f"MemAvailable:   {meminfo_kib} kB\n"
    )
    for name, text in files.items():
        path = root / "cgroup" / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return planner.host_memory(root / "proc", root / "cgroup")


def test_host_memory_counts_the_page_cache_the_kernel_can_reclaim(tmp_path):
    # MemFree is 1 GB; MemAvailable (free plus reclaimable cache) is what a load can take
    assert _host(tmp_path, 20_000_000) == 20_000_000 * 1024


def test_host_memory_is_capped_by_the_containers_cgroup_v2_limit(tmp_path):
    stat = "anon 4000000000\ninactive_file 1000000000\nactive_file 500000000\n"
    got = _host(tmp_path, 20_000_000, **{
        "memory.max": "16000000000\n", "memory.current": "6000000000\n", "memory.stat": stat,
    })  # fmt: skip
    assert got == 16_000_000_000 - (6_000_000_000 - 1_000_000_000)  # limit less working set


def test_host_memory_reads_cgroup_v1_and_ignores_an_unlimited_cgroup(tmp_path):
    v1 = _host(tmp_path / "v1", 20_000_000, **{
        "memory__memory.limit_in_bytes": "8000000000\n",
        "memory__memory.usage_in_bytes": "3000000000\n",
        "memory__memory.stat": "total_inactive_file 500000000\n",
    })  # fmt: skip
    assert v1 == 8_000_000_000 - 2_500_000_000
    unlimited_v1 = _host(tmp_path / "u1", 20_000_000, **{
        "memory__memory.limit_in_bytes": str(2**63 - 4096),
        "memory__memory.usage_in_bytes": "3000000000",
    })  # fmt: skip
    unlimited_v2 = _host(tmp_path / "u2", 20_000_000, **{
        "memory.max": "max\n", "memory.current": "3000000000\n",
    })  # fmt: skip
    assert unlimited_v1 == unlimited_v2 == 20_000_000 * 1024


def test_host_memory_under_cgroup_v1_takes_a_parent_cgroups_limit(tmp_path):
    # ECS on EC2 limits the task's cgroup; the container's own reads unlimited
    got = _host(tmp_path, 20_000_000, **{
        "memory__memory.limit_in_bytes": str(2**63 - 4096),
        "memory__memory.usage_in_bytes": "3000000000\n",
        "memory__memory.stat": "hierarchical_memory_limit 14000000000\n"
        "total_inactive_file 500000000\n",
    })  # fmt: skip
    assert got == 14_000_000_000 - 2_500_000_000
    unlimited = _host(tmp_path / "u", 20_000_000, **{
        "memory__memory.limit_in_bytes": str(2**63 - 4096),
        "memory__memory.usage_in_bytes": "3000000000\n",
        "memory__memory.stat": f"hierarchical_memory_limit {2**63 - 4096}\n",
    })  # fmt: skip
    assert unlimited == 20_000_000 * 1024
