import pytest
import torch

from services.trainer import lora
from shared.errors import SpecError
from shared.jobspec import TrainingSpec


def test_trained_job_stores_adapter_and_log(trained_job):
    ctx, job_id = trained_job["ctx"], trained_job["job_id"]
    manifest = ctx.jobs.manifest(job_id, "train")
    assert manifest["steps"] == 6 == trained_job["trained"].steps
    assert manifest["train_loss"] > 0
    assert manifest["plan"] == {
        "device": "cpu",
        "precision": "fp32",
        "quantization": "none",
        "notes": ["precision auto -> fp32 on cpu", "quantization auto -> none on cpu"],
    }
    adapter_keys = ctx.store.list(ctx.store.key_of(manifest["adapter"]))
    assert {k.rsplit("/", 1)[-1] for k in adapter_keys} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    log = ctx.store.get_json(ctx.store.key_of(manifest["log"]))
    assert [e["step"] for e in log if "loss" in e] == [2, 4, 6]


def test_rerun_with_manifest_is_a_no_op(trained_job):
    from services.trainer.handler import handle

    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    from shared.messages import TrainModel

    train = TrainModel(
        job_id=cmd.job_id, spec_uri=cmd.spec_uri, dataset_manifest=cmd.dataset_manifest
    )
    key = ctx.jobs.manifest_key(cmd.job_id, "train")
    before = ctx.store.path(key).stat().st_mtime_ns
    event = handle(train, ctx)
    assert event.steps == 6
    assert ctx.store.path(key).stat().st_mtime_ns == before


def test_fp16_is_refused_for_t5_with_the_reason():
    with pytest.raises(SpecError, match=r"training.precision: fp16 .* overflow"):
        lora.resolve_plan(TrainingSpec(precision="fp16"))


def test_nf4_double_quant_config_matches_the_notebook():
    plan = lora.Plan(device="cuda", precision="bf16", quantization="4bit")
    config = lora.quantization_config(plan)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_lora_wraps_all_linear_layers(tiny_model):
    plan = lora.resolve_plan(TrainingSpec())
    model = lora.build_model(str(tiny_model), TrainingSpec(), plan)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 16, 0.1)
    wrapped = {n.split(".")[-1] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert wrapped == {"lora_A"}
    names = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert names >= {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_collator_masks_label_padding_with_minus_100(tiny_model):
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    batch = collator(
        [{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [5, 1], "labels": [7, 8, 9, 1]}]
    )
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [7, 8, 9, 1]]
    assert batch["input_ids"].tolist()[1] == [5, 1, tokenizer.pad_token_id]
