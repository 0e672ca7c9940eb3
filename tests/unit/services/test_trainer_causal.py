"""Training a decoder-only model: trl's SFTTrainer on the prepared split, the loss on the
answer's tokens only, a LoRA adapter of the causal-LM kind, and the planner's shape of a
decoder-only model."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from services.cli.tinycausal import build_tiny_causal
from services.trainer import causal, lora, train
from shared import planner
from shared.artifacts import read_split
from shared.errors import ModelError
from shared.jobspec import TrainingSpec
from shared.messages import PrepareDataset
from shared.pipeline import next_command
from shared.trainplan import model_shape
from shared.worker import run_stage
from tests.conftest import _handler
from tests.factories import SAMPLE_DATA, make_ctx, make_spec


def test_a_decoder_only_model_trains_with_trl_and_stores_a_causal_adapter(trained_qwen, tiny_qwen):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ctx, trained = trained_qwen["ctx"], trained_qwen["trained"]
    manifest = ctx.jobs.manifest("qwen-job", "train")
    assert manifest["steps"] == trained.steps == 6 and manifest["plan"]["kind"] == "causal"
    log = ctx.store.get_json(ctx.store.key_of(manifest["log"]))
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert manifest["validation"]["passes"] >= 1
    assert 0 <= manifest["padding_waste"]["all"] < 0.6
    folder = ctx.store.path(ctx.store.key_of(manifest["adapter"]))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    adapted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    # all-linear: every projection of the attention and the gated feed-forward, not the head
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen), folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_the_loss_is_on_the_answer_only(trained_qwen, tiny_qwen, tmp_path):
    from shared.modeling import load_tokenizer

    ctx = trained_qwen["ctx"]
    dataset = ctx.jobs.manifest("qwen-job", "prepare")
    table = read_split(ctx.store, dataset, "train", cache_dir=ctx.settings.cache_dir).slice(0, 4)
    spec = TrainingSpec(max_steps=1, packing="off")  # padded: one row an example
    plan = planner.resolve(spec, model_shape(str(tiny_qwen)), planner.Rows(4, 8, 8), dev="cpu")
    model = lora.build_model(str(tiny_qwen), spec, plan)
    trainer = train._trainer(
        model, load_tokenizer(str(tiny_qwen)), table, None, spec, plan, tmp_path, []
    )
    batch = next(iter(trainer.get_train_dataloader()))
    rows = table.to_pylist()
    assert len(batch["input_ids"]) == 4
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        answer = [x for x in labels if x != -100]
        row = next(r for r in rows if r["labels"] == answer)  # the answer ends with EOS
        prompt, end = len(row["input_ids"]), len(row["input_ids"]) + len(answer)
        assert ids[:end] == row["input_ids"] + answer
        assert labels[:prompt] == [-100] * prompt and labels[prompt:end] == answer
        assert set(labels[end:]) <= {-100}  # padding


def test_a_dataset_prepared_for_another_kind_of_model_is_refused(trained_qwen, tiny_model):
    from services.trainer.handler import handle
    from shared.messages import TrainModel

    ctx, prepared = trained_qwen["ctx"], trained_qwen["prepared"]
    spec = make_spec(tiny_model)
    uri = ctx.jobs.create("t5-on-qwen-data", spec)
    command = TrainModel(job_id="t5-on-qwen-data", spec_uri=uri, dataset_manifest=prepared.manifest)
    with pytest.raises(ModelError, match="prepared for a causal model but base_model .* seq2seq"):
        handle(command, ctx)


def test_a_decoder_only_shape_charges_every_token_to_the_whole_stack(tiny_qwen):
    shape = model_shape(str(tiny_qwen))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    assert shape.kind == "causal" and shape.parameters == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert shape.decoder_matmul_parameters == linear  # the LM head included
    assert shape.training_flops(10, 20) == 4 * linear * 30
    plan = planner.resolve(TrainingSpec(), shape, planner.Rows(100, 10, 20), dev="cpu")
    assert plan.kind == "causal" and not any("fused layers" in n for n in plan.notes)


def test_a_mixture_of_experts_token_is_charged_only_its_experts(tmp_path):
    from transformers import AutoModelForCausalLM

    base = build_tiny_causal("mixtral", tmp_path / "m", data_file=SAMPLE_DATA, hidden=64)
    shape, model = model_shape(str(base)), AutoModelForCausalLM.from_pretrained(base)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)  # fused, 4 a layer
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.linear_parameters == linear - model.lm_head.weight.numel()  # what nf4 takes
    assert shape.decoder_matmul_parameters == linear + experts // 2  # 2 of the 4 experts
    assert shape.d_ff == 2 * model.config.intermediate_size  # a token's two experts' widths


def _lengths(rows):
    return [[len(f["input_ids"]) for f in row] for row in rows]


def test_packing_takes_the_row_width_that_costs_least_by_the_models_shape():
    features = [{"input_ids": [0] * n} for n in (100, 60, 60, 60, 20)]  # longest first
    # Attention cheap beside the weights (a wide model): the fewest positions. Rows 120 wide
    # hold the batch in 360 positions for 300 tokens; 100 wide take 400, one row of 300
    # would cost more attention (300^2) than padding does (5 x 100^2), as would 160 (2 rows).
    assert _lengths(causal.bins(features, 0.0)) == [[100, 20], [60, 60], [60]]
    assert _lengths(causal.bins(features, 0.01)) == [[100, 20], [60, 60], [60]]
    # Attention dear (a narrow model): 400 positions 100 wide cost less than 360 at 120.
    assert _lengths(causal.bins(features, 0.1)) == [[100], [60, 20], [60], [60]]


@pytest.mark.parametrize("attention", [0.0, 1e-3, 0.1])
def test_packed_rows_never_cost_more_than_padding(attention):
    import random

    draw = random.Random(0)
    for _ in range(200):
        sizes = sorted((draw.randint(1, 300) for _ in range(draw.randint(1, 40))), reverse=True)
        rows = causal.bins([{"input_ids": [0] * n} for n in sizes], attention)
        widths = [sum(len(f["input_ids"]) for f in row) for row in rows]
        assert sorted(n for row in _lengths(rows) for n in row) == sorted(sizes)  # each once
        width, longest, n = max(widths), sizes[0], len(sizes)
        assert len(rows) * width <= n * longest  # no more positions than padding
        assert len(rows) * width * width <= n * longest * longest  # nor attention


def test_the_plan_for_packing_weighs_attention_and_mixes_lengths(tmp_path):
    base = build_tiny_causal("llama", tmp_path / "m", data_file=SAMPLE_DATA, hidden=64)
    shape = model_shape(str(base))
    # two layers x scores and values x 64 wide, per weight a position passes through
    assert shape.attention_per_width() == 2 * 2 * 64 / shape.decoder_matmul_parameters
    rows = planner.Rows(count=100, source_tokens=32, target_tokens=64)
    packed = planner.resolve(TrainingSpec(), shape, rows)
    assert packed.packing and packed.row_attention == round(shape.attention_per_width(), 8)
    assert not packed.group_by_length and "group by length -> off (packing" in str(packed.notes)
    padded = planner.resolve(TrainingSpec(packing="off"), shape, rows)
    assert padded.row_attention == 0.0 and padded.group_by_length
    # a checkpoint's plan from before either field resumes as it ran: grouped, by positions
    stored = {k: v for k, v in dataclasses.asdict(packed).items()
              if k not in ("row_attention", "group_by_length")}  # fmt: skip
    assert lora.Plan(**stored).group_by_length and lora.Plan(**stored).row_attention == 0.0


def test_attention_is_as_wide_as_its_query_heads_where_head_dim_is_set():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, Qwen3Config

    from shared.trainplan import shape_from

    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         vocab_size=100)  # fmt: skip
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shape = shape_from(model, config)
    assert shape.attention_width == 4 * 32  # Qwen3's heads are wider than hidden / heads
    assert shape.attention_per_width() == 2 * 2 * 128 / shape.decoder_matmul_parameters


def test_packed_examples_restart_their_positions_and_keep_their_labels():
    collate = causal.PackingCollator(pad_token_id=0)
    batch = collate(
        [{"input_ids": [5] * n, "labels": [-100] * (n - 2) + [7, 8]} for n in (6, 3, 2)]
    )
    # rows 6 wide: the 6 alone, the 3 and the 2 together, padded by one
    assert batch["input_ids"].tolist() == [[5] * 6, [5] * 5 + [0]]
    assert batch["position_ids"].tolist() == [list(range(6)), [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100] * 4 + [7, 8], [-100, 7, 8, 7, 8, -100]]


def test_causal_rows_become_one_sequence_with_the_answer_masked_in():
    import pyarrow as pa

    table = pa.table({"input_ids": [[1, 2, 3], [4]], "labels": [[7, 8], [9, 10, 11]]})
    data = causal.to_dataset(table)
    assert data["input_ids"] == [[1, 2, 3, 7, 8], [4, 9, 10, 11]]
    assert data["completion_mask"] == [[0, 0, 0, 1, 1], [0, 1, 1, 1]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_every_decoder_only_family_termtune_trains_prepares_and_trains(family, tmp_path):
    model = build_tiny_causal(family, tmp_path / family, data_file=SAMPLE_DATA, hidden=64)
    ctx = make_ctx(tmp_path / "var")
    spec = make_spec(model, training={"max_steps": 2, "logging_steps": 1})
    prepare = PrepareDataset(job_id="j", spec_uri=ctx.jobs.create("j", spec))
    prepared = run_stage(prepare, _handler("dataprep"), ctx)
    run_stage(next_command(prepare, prepared), _handler("trainer"), ctx)
    manifest = ctx.jobs.manifest("j", "train")
    assert manifest["steps"] == 2 and manifest["plan"]["kind"] == "causal"
    log = ctx.store.get_json(ctx.store.key_of(manifest["log"]))
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)


def test_packed_batches_keep_each_example_apart(trained_qwen, tiny_qwen, tmp_path):
    """A packed batch (rows of the width that costs least, position ids restarting per
    example) has the loss of the same examples padded: no example attends to another."""
    from shared.modeling import load_tokenizer

    ctx = trained_qwen["ctx"]
    dataset = ctx.jobs.manifest("qwen-job", "prepare")
    table = read_split(ctx.store, dataset, "train", cache_dir=ctx.settings.cache_dir)
    lengths = [
        len(p) + len(a)
        for p, a in zip(*table.select(["input_ids", "labels"]).to_pydict().values(), strict=True)
    ]
    by_length = sorted(range(table.num_rows), key=lengths.__getitem__)
    table = table.take(by_length[:3] + by_length[-3:])  # three short, three long
    shape, rows = model_shape(str(tiny_qwen)), planner.Rows(6, 8, 8)
    losses, batches = {}, {}
    for packing in ("on", "off"):
        spec = TrainingSpec(max_steps=1, packing=packing, lora={"dropout": 0.0})
        plan = planner.resolve(spec, shape, rows, dev="cpu")
        assert plan.packing is (packing == "on")
        torch.manual_seed(0)
        model = lora.build_model(str(tiny_qwen), spec, plan)
        tokenizer = load_tokenizer(str(tiny_qwen))
        trainer = train._trainer(model, tokenizer, table, None, spec, plan, tmp_path, [])
        features = [trainer.train_dataset[i] for i in range(6)]
        batch = trainer.data_collator(features)
        with torch.no_grad():
            losses[packing] = float(trainer.compute_loss(model.eval(), batch))
            if packing == "on":  # with a cache transformers skips the packed mask: they mix
                inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
                losses["mixed"] = float(model(**inputs, use_cache=True).loss)
        batches[packing] = batch
    packed, sizes = batches["on"], sorted(len(f["input_ids"]) for f in features)
    count, width = packed["input_ids"].shape
    assert count < 6 and count * width * width <= 6 * sizes[-1] ** 2  # attention within padding's
    assert packed["input_ids"].numel() < 6 * sizes[-1]  # fewer positions than padded
    assert "attention_mask" not in packed
    starts = (packed["position_ids"] == 0).sum().item()
    assert starts == 6  # every example starts its own positions; padding continues the last
    assert batches["off"]["input_ids"].shape[0] == 6
    assert trainer.data_collator.waste()["all"] > 0  # the padded one padded
    # equal to float rounding; letting the examples see each other moves it (1e-4 here)
    assert abs(losses["on"] - losses["off"]) < 1e-5 < abs(losses["mixed"] - losses["off"])
    assert "packing -> on (each batch's examples packed into rows of the width" in " ".join(
        planner.resolve(TrainingSpec(), shape, rows, dev="cpu").notes
    )


def test_loraplus_reaches_trls_trainer(trained_qwen, tiny_qwen, tmp_path):
    """The B matrices of a decoder-only adapter (trl's SFTTrainer) train at the ratio too."""
    from transformers import TrainerCallback

    from shared.modeling import load_tokenizer

    class Groups(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **_):
            self.groups = [(g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]

    ctx = trained_qwen["ctx"]
    dataset = ctx.jobs.manifest("qwen-job", "prepare")
    table = read_split(ctx.store, dataset, "train", cache_dir=ctx.settings.cache_dir)
    spec = TrainingSpec(max_steps=1, learning_rate=0.01, lora={"loraplus_lr_ratio": 8.0})
    plan = planner.resolve(spec, model_shape(str(tiny_qwen)), planner.Rows(6, 8, 8), dev="cpu")
    model = lora.build_model(str(tiny_qwen), spec, plan)
    groups = Groups()
    summary = train.train(
        model, load_tokenizer(str(tiny_qwen)), table, spec=spec, plan=plan,
        output_dir=tmp_path, callbacks=[groups],
    )  # fmt: skip
    assert summary["steps"] == 1
    for kind, lr in (("lora_A.", 0.01), ("lora_B.", 0.08)):
        ids = {id(p) for n, p in model.named_parameters() if kind in n and p.requires_grad}
        assert ids and sorted({r for r, held in groups.groups if held & ids}) == [pytest.approx(lr)]


def test_fp16_reaches_the_trainer_and_needs_cuda(tiny_qwen, tmp_path):
    """``training.precision: fp16`` is the Trainer's mixed precision (fp32 weights, fp16
    autocast): on CUDA only, as the CPU would train in fp32 unannounced."""
    from shared.errors import SpecError

    spec = TrainingSpec(precision="fp16")
    shape, rows = model_shape(str(tiny_qwen)), planner.Rows(6, 8, 8)
    with pytest.raises(SpecError, match="training.precision: fp16 needs a CUDA GPU"):
        planner.resolve(spec, shape, rows, dev="cpu")
    plan = planner.resolve(spec, shape, rows, dev="cuda", memory_bytes=24 << 30, bf16=True)
    assert plan.precision == "fp16" and plan.dtype == torch.float32  # fp32 master weights
    arguments = train.training_arguments(spec, plan, tmp_path)
    assert arguments["fp16"] and not arguments["bf16"]
    nf4 = lora.quantization_config(dataclasses.replace(plan, quantization="4bit"))
    assert nf4.bnb_4bit_compute_dtype == torch.float16
