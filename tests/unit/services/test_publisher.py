import json
import re
import shutil

import pytest
import yaml
from safetensors.torch import save_file

from services.publisher import cmi, export
from services.publisher.handler import handle
from shared import planner
from shared.artifacts import adapter_dir
from shared.errors import ModelError, PreflightError, SpecError
from shared.jobspec import DEFAULT_NOTICE, JobSpec, parse_spec
from shared.trainplan import GIB


def test_publishes_merged_model_and_registers_it(published):
    ctx, publish, event = published
    assert event.model_name == "test-terms" and event.target == "local"
    manifest = ctx.jobs.manifest(publish.job_id, "publish")
    merge = manifest["merge"]
    assert merge["device"] == "cpu" and merge["dtype"] == "bfloat16"  # the export's dtype
    assert re.fullmatch(r"bf16 weights 0\.0 GiB in host memory \([\d.]+ GiB free\); no GPU",
                        merge["reason"])  # fmt: skip
    # bf16: judged by the share of the adapter's effect that bf16's rounding costs
    assert 0 < merge["check"]["effect_share"] < merge["check"]["limit"] == export.BF16_EFFECT_SHARE
    assert merge["check"]["adapter_effect"] > merge["check"]["max_logit_gap"] > 0
    assert manifest["preflight"]["dtypes"] == ["BF16"]
    folder = ctx.store.path(ctx.store.key_of(event.location))
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    assert not any(n.startswith("adapter_") for n in names)
    share = f"{merge['check']['effect_share']:.1%}"
    assert (
        f"Merge check: the merged bf16 weights reproduce base+adapter's logits to within "
        f"{share} of the adapter's effect (root mean square; limit 25%), largest gap "
    ) in (folder / "README.md").read_text()
    entry = ctx.jobs.model("test-terms")
    assert entry["location"] == event.location and entry["job_id"] == publish.job_id


def _memory(monkeypatch, *, gpu_gib=None, host_gib=64.0):
    monkeypatch.setattr(export, "device", lambda: "cuda" if gpu_gib is not None else "cpu")
    free = {"cuda": gpu_gib, "cpu": host_gib}
    monkeypatch.setattr(planner, "device_memory", lambda dev: int(free[dev] * GIB))


def test_a_7b_merge_runs_in_bf16_on_an_a10g_and_falls_back_to_the_host(llama_7b, monkeypatch):
    _memory(monkeypatch, gpu_gib=22.0, host_gib=14.0)  # g5: 24 GB A10G, a 14 GiB task
    plan = export.merge_plan(llama_7b, "bfloat16")
    assert (plan.device, plan.dtype) == ("cuda", "bfloat16")
    assert plan.reason == "bf16 weights 12.6 GiB in GPU memory (22.0 GiB free)"
    _memory(monkeypatch, gpu_gib=10.0, host_gib=28.0)  # a 12 GB GPU, a 30 GB task
    plan = export.merge_plan(llama_7b, "bfloat16")
    assert (plan.device, plan.dtype) == ("cpu", "bfloat16")
    assert plan.reason == (
        "bf16 weights 12.6 GiB in host memory (28.0 GiB free); "
        "bf16 weights 12.6 GiB over 80% of the GPU's 10.0 GiB free"
    )
    _memory(monkeypatch, host_gib=60.0)
    plan = export.merge_plan(llama_7b, "float32")  # an fp32 export merges in fp32
    assert (plan.device, plan.dtype) == ("cpu", "float32") and plan.reason.endswith("; no GPU")


ON_GPU = "run the publisher on a GPU with more memory, or choose a smaller base model"
ON_HOST = (
    "give the publisher more memory or a GPU "
    "(the ECS stack: StageMemory, or EvaluatorPublisherCapacity=Gpu)"
)


@pytest.mark.parametrize(
    ("dtype", "gpu_gib", "host_gib", "size", "advice"),
    [
        ("bfloat16", 10.0, 15.0, "bf16 weights 12.6 GiB", ON_GPU),
        ("bfloat16", None, 15.0, "bf16 weights 12.6 GiB", ON_HOST),
        # bf16 would fit both, but the export is fp32
        ("float32", 22.0, 28.0, "fp32 weights 25.1 GiB",
         ON_GPU + ", or publish.dtype bfloat16 (half the memory)"),
    ],
)  # fmt: skip
def test_a_merge_that_fits_nowhere_is_refused_before_loading_with_what_to_change(
    llama_7b, monkeypatch, dtype, gpu_gib, host_gib, size, advice
):
    _memory(monkeypatch, gpu_gib=gpu_gib, host_gib=host_gib)
    with pytest.raises(ModelError) as refused:
        export.merge_plan(llama_7b, dtype)
    gpu = "no GPU" if gpu_gib is None else f"{size} over 80% of the GPU's {gpu_gib} GiB free"
    assert str(refused.value) == (
        f"the merge of {llama_7b} fits nowhere: {gpu}; "
        f"{size} over 80% of the host's {host_gib} GiB free; {advice}"
    )


def _adapter(published):
    ctx, publish, _ = published
    training = ctx.manifest_at(publish.training_manifest)
    return ctx.spec(publish).base_model, adapter_dir(
        ctx.store, training, cache_dir=ctx.settings.cache_dir
    )


PROBES = [[5, 6, 7], [8], [40, 41, 42, 43, 44]]


def test_merge_loads_the_base_straight_onto_its_device(published, monkeypatch):
    base_model, adapter = _adapter(published)
    asked = {}
    load = export.load_model

    def load_on_cpu(base_model, **kwargs):  # no GPU here: recorded, then loaded on the CPU
        asked.update(kwargs)
        return load(base_model, **{**kwargs, "device_map": None})

    monkeypatch.setattr(export, "load_model", load_on_cpu)
    plan = export.Placement("cuda", "float32", "")
    merged, check = export.merge(base_model, adapter, PROBES, plan=plan)
    assert asked["device_map"] == "cuda" and asked["dtype"] == export.torch.float32
    assert 0 < check.max_logit_gap < export.MERGE_TOLERANCE  # the probe rows' logits compared
    assert check.passed and merged.dtype == export.torch.float32


def test_a_bf16_merge_gives_bf16_weights_that_keep_the_adapters_effect(published):
    base_model, adapter = _adapter(published)
    plan = export.Placement("cpu", "bfloat16", "")
    merged, check = export.merge(base_model, adapter, PROBES, plan=plan)
    assert merged.dtype == export.torch.bfloat16
    assert check.max_logit_gap > export.MERGE_TOLERANCE  # bf16 rounding shows in the logits
    assert 0 < check.effect_share < export.BF16_EFFECT_SHARE and check.passed
    assert check.describe().startswith("the merged bf16 weights reproduce base+adapter's")


def test_an_adapter_that_changes_nothing_merges_to_the_base_exactly_in_bf16(tiny_model, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    from shared.modeling import load_model

    fresh = get_peft_model(  # lora_B starts at zero: no effect on any logit
        load_model(str(tiny_model)),
        LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, target_modules="all-linear"),
    )
    fresh.save_pretrained(tmp_path / "adapter")
    plan = export.Placement("cpu", "bfloat16", "")
    _, check = export.merge(str(tiny_model), tmp_path / "adapter", PROBES, plan=plan)
    assert check.adapter_effect == check.max_logit_gap == check.effect_share == 0.0


@pytest.mark.parametrize(("dtype", "share"), [("float32", 0.01), ("bfloat16", 0.6)])
def test_a_merge_that_loses_part_of_the_adapter_is_refused(published, monkeypatch, dtype, share):
    from peft import LoraModel

    base_model, adapter = _adapter(published)
    merge_and_unload = LoraModel.merge_and_unload

    def lossy(model, **kwargs):  # the adapter's update cut by `share` in the merge
        for name, weights in model.named_parameters():
            if "lora_B" in name:
                weights.data *= 1 - share
        return merge_and_unload(model, **kwargs)

    monkeypatch.setattr(LoraModel, "merge_and_unload", lossy)
    plan = export.Placement("cpu", dtype, "")
    with pytest.raises(ModelError, match=f"merge check failed: the merged {_SHORT[dtype]} ") as e:
        export.merge(base_model, adapter, PROBES, plan=plan)
    # a bf16 merge that fails says how to merge and check in fp32 instead
    fp32_hint = "; publish.dtype float32 merges and checks in fp32"
    assert str(e.value).endswith(fp32_hint) == (dtype == "bfloat16"), e.value


_SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def test_exported_model_loads_and_generates(published):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    ctx, _, event = published
    folder = ctx.store.path(ctx.store.key_of(event.location))
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = model.generate(**tokenizer("What is Asthma", return_tensors="pt"), max_new_tokens=5)
    assert out.shape[1] > 1


COMPAT_SCRIPT = """
import json, sys, transformers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1]).float()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
out = model.generate(**tokenizer("What is Asthma", return_tensors="pt"), max_new_tokens=8,
                     do_sample=False, num_beams=1)
print(json.dumps({"version": transformers.__version__, "ids": out[0].tolist()}))
"""


def test_export_loads_and_generates_in_transformers_4_51_3(published):
    """AWS documents transformers 4.51.3 for Custom Model Import: load the export there."""
    import os
    import subprocess
    from pathlib import Path

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    python = Path(os.environ.get("TERMTUNE_CMI_PYTHON", ".venv-cmi/bin/python"))
    if not python.exists():
        pytest.fail(f"{python} is missing: `make compat` builds the transformers 4.51.3 env")
    ctx, _, event = published
    folder = ctx.store.path(ctx.store.key_of(event.location))
    done = subprocess.run(
        [str(python), "-c", COMPAT_SCRIPT, str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == "4.51.3"
    # The same greedy tokens as the current transformers produces from the same folder.
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).float()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = model.generate(
        **tokenizer("What is Asthma", return_tensors="pt"), max_new_tokens=8, do_sample=False
    )
    assert result["ids"] == ours[0].tolist()


def test_model_card_describes_the_model_with_hugging_face_metadata_and_the_notice(published):
    ctx, publish, event = published
    card = (ctx.store.path(ctx.store.key_of(event.location)) / "README.md").read_text()
    _, header, _ = card.split("---\n", 2)
    front = yaml.safe_load(header)
    spec = ctx.spec(publish)
    assert front["base_model"] == spec.base_model and "datasets" not in front  # a local file
    assert "license" not in front  # none named: the base model's and the data's govern
    assert front["tags"] == ["termtune", "lora-merged", "t5"] and front["language"] == ["en"]
    (entry,) = front["model-index"]
    (result,) = entry["results"]
    assert entry["name"] == spec.model_name
    assert result["dataset"] == {"type": "custom", "name": "medical_terms.jsonl", "split": "test"}
    report = ctx.manifest_at(publish.evaluation_manifest)
    assert [m["type"] for m in result["metrics"]] == report["metric_order"]
    rouge = next(m for m in result["metrics"] if m["type"] == "rougeL")
    assert rouge["value"] == round(report["metrics"]["rougeL"]["tuned"], 4)
    assert rouge["verified"] is False
    assert f"**Notice.** {DEFAULT_NOTICE}" in card and "medical advice" not in card.lower()
    lora = spec.training.lora
    assert f"| LoRA r / alpha / dropout | {lora.r} / {lora.alpha} / {lora.dropout} |" in card
    loss = report["metrics"]["loss"]
    assert f"| loss | {loss['base']:.4f} | {loss['tuned']:.4f} |" in card
    counts = ctx.manifest_at(publish.dataset_manifest)["counts"]
    assert f"train {counts['train']}, validation {counts['validation']}" in card


@pytest.fixture
def model_copy(published, tmp_path):
    ctx, _, event = published
    return shutil.copytree(ctx.store.path(ctx.store.key_of(event.location)), tmp_path / "m")


def test_preflight_passes_on_the_export(model_copy):
    assert cmi.preflight(model_copy)["model_type"] == "t5"


def test_preflight_names_missing_file(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(PreflightError, match="required-files: tokenizer.json is missing"):
        cmi.preflight(model_copy)


def test_preflight_refuses_adapter_files(model_copy):
    (model_copy / "adapter_config.json").write_text("{}")
    with pytest.raises(PreflightError, match="merged-weights"):
        cmi.preflight(model_copy)


def test_preflight_refuses_unsupported_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "bert"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError, match="supported-architecture: model_type 'bert'"):
        cmi.preflight(model_copy)


def test_preflight_refuses_quantized_and_fp16_t5_weights(model_copy):
    import torch

    (model_copy / "model.safetensors").unlink()
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, model_copy / "model.safetensors")
    with pytest.raises(PreflightError, match=r"weight-dtype: tensors of \['U8'\]"):
        cmi.preflight(model_copy)
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, model_copy / "model.safetensors")
    with pytest.raises(PreflightError, match="fp16 T5 weights overflow"):
        cmi.preflight(model_copy)


def test_tokenizer_config_is_made_readable_by_transformers_4_51(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"extra_special_tokens": [], "eos_token": "</s>"}))
    export.make_tokenizer_config_portable(path)
    assert json.loads(path.read_text())["extra_special_tokens"] == {}
    path.write_text(json.dumps({"extra_special_tokens": ["<x>"]}))
    export.make_tokenizer_config_portable(path)
    assert json.loads(path.read_text()) == {
        "extra_special_tokens": {},
        "additional_special_tokens": ["<x>"],
    }


def test_republish_is_a_no_op(published):
    ctx, publish, event = published
    key = ctx.jobs.manifest_key(publish.job_id, "publish")
    before = ctx.store.path(key).stat().st_mtime_ns
    again = handle(publish, ctx)
    assert (again.model_name, again.location, again.manifest) == (
        event.model_name,
        event.location,
        event.manifest,
    )
    assert ctx.store.path(key).stat().st_mtime_ns == before


def test_export_ships_special_tokens_map_and_the_sentencepiece_model(tiny_model, tmp_path):
    import torch

    from shared.modeling import load_seq2seq

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "spiece.model").write_bytes(b"sentencepiece model bytes")
    out = tmp_path / "out"
    export.save(load_seq2seq(str(base), dtype=torch.float32), str(base), out, dtype="float32")
    assert (out / "spiece.model").read_bytes() == b"sentencepiece model bytes"
    tokens = json.loads((out / "special_tokens_map.json").read_text())
    assert tokens["eos_token"] == "</s>" and tokens["pad_token"] == "<pad>"


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_tiny_model_has_a_head_count_bedrock_imports(tiny_model):
    assert json.loads((tiny_model / "config.json").read_text())["num_heads"] % 4 == 0


def test_preflight_refuses_flan_t5_small_head_count(model_copy):
    # flan-t5-small's shape: the AWS sample says it does not import.
    _edit_json(model_copy / "config.json", d_model=512, d_kv=64, num_heads=6, num_layers=8)
    with pytest.raises(PreflightError) as caught:
        cmi.preflight(model_copy)
    assert caught.value.rule == "t5-attention-heads"
    assert str(caught.value).startswith(
        "t5-attention-heads: num_heads 6 is not a multiple of 4: Bedrock shards a T5 model's "
        "attention heads across GPUs"
    )
    _edit_json(model_copy / "config.json", num_heads=16)  # flan-t5-large's
    assert cmi.preflight(model_copy)["model_type"] == "t5"


def test_preflight_names_the_missing_tokenizer_model_file(model_copy):
    assert cmi.preflight(model_copy, tokenizer_files=[])["rules"] == list(cmi.RULES)
    with pytest.raises(PreflightError, match="required-files: spiece.model is missing") as caught:
        cmi.preflight(model_copy, tokenizer_files=["spiece.model"])
    assert caught.value.rule == "required-files"


def test_preflight_refuses_weights_below_the_top_level(model_copy):
    (model_copy / "weights").mkdir()
    (model_copy / "model.safetensors").rename(model_copy / "weights" / "model.safetensors")
    with pytest.raises(
        PreflightError,
        match=r"safetensors-weights: no \*\.safetensors at the top of .* "
        r"\(found \['weights/model\.safetensors'\]\)",
    ) as caught:
        cmi.preflight(model_copy)
    assert caught.value.rule == "safetensors-weights"


def test_preflight_refuses_an_index_naming_a_missing_shard(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    with pytest.raises(
        PreflightError,
        match=r"safetensors-weights: model\.safetensors\.index\.json lists shards missing "
        r"from the folder: \['model-00002-of-00002\.safetensors'\]",
    ):
        cmi.preflight(model_copy)


def test_preflight_refuses_unmerged_lora_tensors(model_copy):
    import torch

    (model_copy / "model.safetensors").unlink()
    tensors = {
        "encoder.q.base_layer.weight": torch.zeros(2),
        "encoder.q.lora_A.weight": torch.zeros(2),
    }
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(
        PreflightError,
        match=r"merged-weights: 2 unmerged LoRA tensors \(e\.g\. encoder\.q\.base_layer\.weight\): "
        r"merge_and_unload\(\) first",
    ):
        cmi.preflight(model_copy)


def test_preflight_refuses_a_quantized_config(model_copy):
    _edit_json(model_copy / "config.json", quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(
        PreflightError,
        match="unquantized-weights: config.json has a bitsandbytes quantization_config; "
        "export the merged model unquantized",
    ):
        cmi.preflight(model_copy)


def test_preflight_refuses_a_tokenizer_class_bedrock_does_not_accept(model_copy):
    _edit_json(model_copy / "tokenizer_config.json", tokenizer_class="BertTokenizer")
    with pytest.raises(
        PreflightError,
        match="tokenizer-class: tokenizer_class 'BertTokenizer' in tokenizer_config.json is not "
        "one Bedrock accepts",
    ):
        cmi.preflight(model_copy)


def test_preflight_refuses_a_tokenizer_config_transformers_4_51_cannot_read(model_copy):
    _edit_json(model_copy / "tokenizer_config.json", extra_special_tokens=["<x>"])
    with pytest.raises(
        PreflightError,
        match=r"tokenizer-config: extra_special_tokens is a list; transformers 4\.51\.3",
    ):
        cmi.preflight(model_copy)


def test_preflight_refuses_a_context_over_128k(model_copy):
    _edit_json(model_copy / "config.json", max_position_embeddings=128 * 1024)
    cmi.preflight(model_copy)  # Llama 3.1's 131072 imports
    _edit_json(model_copy / "config.json", max_position_embeddings=256 * 1024)
    with pytest.raises(
        PreflightError,
        match=r"context-length: 262144 tokens; Bedrock imports at most 128K \(131072\)",
    ):
        cmi.preflight(model_copy)


def test_preflight_refuses_200_gb(model_copy, monkeypatch):
    size = sum(p.stat().st_size for p in model_copy.iterdir())
    monkeypatch.setattr(cmi, "MAX_BYTES", size)
    with pytest.raises(
        PreflightError, match=f"model-size: {size} bytes; the limit is under 200 GB"
    ):
        cmi.preflight(model_copy)


@pytest.mark.parametrize("char", ["#", "=", "+", " "])
def test_import_refuses_s3_keys_with_characters_bedrock_rejects(char):
    with pytest.raises(
        PreflightError,
        match=r"s3-key-characters: S3 key 'b/m/a.+\.json' holds characters the import refuses "
        r".*no '#', '=', '\+' or spaces",
    ) as caught:
        cmi.check_import("job", "model", "t0ken", "s3://b/m/", [f"a{char}b.json"])
    assert caught.value.rule == "s3-key-characters"


def test_import_names_must_match_the_api_patterns():
    with pytest.raises(
        PreflightError, match=r"import-names: jobName '-job' does not match \[a-zA-Z0-9\]"
    ):
        cmi.check_import("-job", "model", "t0ken", "s3://b/m/", [])
    with pytest.raises(PreflightError, match="import-names: importedModelName 'm{64}' must be"):
        cmi.check_import("job", "m" * 64, "t0ken", "s3://b/m/", [])


def _publish_as(published, job_id, **publish):
    ctx, cmd, _ = published
    data = ctx.spec(cmd).model_dump(mode="json")
    data["publish"] = {**data["publish"], **publish}
    uri = ctx.jobs.create(job_id, parse_spec(data))
    return ctx, cmd.model_copy(update={"job_id": job_id, "spec_uri": uri})


def test_publishing_over_a_taken_name_is_refused_unless_overwrite(published, monkeypatch):
    ctx, first = _publish_as(published, "name-1", model_name="taken-name")
    handle(first, ctx)
    old = ctx.jobs.model("taken-name")
    ctx, second = _publish_as(published, "name-2", model_name="taken-name")
    monkeypatch.setattr(export, "merge", _must_not_run)  # refused before any work
    with pytest.raises(SpecError) as caught:
        handle(second, ctx)
    assert str(caught.value) == (
        "field 'publish.model_name': a model named 'taken-name' is already published by job "
        f"name-1 ({old['location']}); set publish.overwrite: true to replace it, or choose "
        "another publish.model_name"
    )
    assert ctx.jobs.model("taken-name") == old
    monkeypatch.undo()
    ctx, third = _publish_as(published, "name-3", model_name="taken-name", overwrite=True)
    handle(third, ctx)
    entry = ctx.jobs.model("taken-name")
    assert entry["job_id"] == "name-3"
    assert entry["replaced"]["job_id"] == "name-1"
    assert entry["replaced"]["location"] == old["location"]


def _must_not_run(*args, **kwargs):
    raise AssertionError("merged a model whose name is taken")


def test_the_registry_keeps_a_name_for_its_first_job(ctx):
    ctx.jobs.register_model("terms", {"job_id": "a", "location": "file:///a"})
    ctx.jobs.register_model("terms", {"job_id": "a", "location": "file:///a2"})  # its retry
    with pytest.raises(SpecError, match="a model named 'terms' is already published by job a"):
        ctx.jobs.register_model("terms", {"job_id": "b", "location": "file:///b"})
    assert ctx.jobs.model("terms")["location"] == "file:///a2"
    ctx.jobs.register_model("terms", {"job_id": "b", "location": "file:///b"}, overwrite=True)
    assert ctx.jobs.model("terms")["job_id"] == "b"


@pytest.mark.parametrize(
    ("ratio", "row"),
    [(1, "| 0.001 / linear |"), (16, "| 0.001 / linear (LoRA+: the B matrices at 16x) |")],
)
def test_the_card_says_when_the_b_matrices_trained_at_a_loraplus_multiple(ratio, row):
    from services.publisher.card import model_card

    spec = parse_spec({
        "name": "terms",
        "training": {"learning_rate": 1e-3, "lr_scheduler": "linear",
                     "lora": {"loraplus_lr_ratio": ratio}},
    })  # fmt: skip
    training = {"plan": {"quantization": "none", "precision": "fp32"}, "steps": 3,
                "train_loss": 1.0}  # fmt: skip
    card = model_card(spec, {}, training, {"metrics": {}}, merge_check="ok")
    assert f"| learning rate / schedule {row}" in card


def test_the_cards_notice_license_tags_and_hub_dataset_come_from_the_spec():
    from services.publisher.card import front_matter

    spec = JobSpec(
        name="terms",
        dataset={"source": "gamino/wiki_medical_terms"},
        publish={
            "card": {
                "notice": "Not medical advice.",
                "license": "apache-2.0",
                "tags": ["medical", "t5"],
                "language": ["en", "de"],
            }
        },
    )
    metrics = {"loss": {"base": 3.0, "tuned": 2.123456}, "bleu": {"base": 1.0, "tuned": None}}
    front = front_matter(spec, {"metric_order": ["loss", "bleu"], "metrics": metrics})
    assert front["datasets"] == ["gamino/wiki_medical_terms"] and front["license"] == "apache-2.0"
    assert front["tags"] == ["termtune", "lora-merged", "t5", "medical"]
    assert front["language"] == ["en", "de"]
    (result,) = front["model-index"][0]["results"]
    assert result["dataset"]["type"] == "gamino/wiki_medical_terms"
    assert result["metrics"] == [
        {"type": "loss", "name": "loss (tuned; base 3.0000)", "value": 2.1235, "verified": False}
    ]


@pytest.mark.parametrize(
    ("card", "field"),
    [
        ({"notice": "ok\x07"}, "publish.card.notice"),
        ({"notice": ""}, "publish.card.notice"),
        ({"license": "Apache 2.0"}, "publish.card.license"),
        ({"tags": ["Has Space"]}, "publish.card.tags.0"),
        ({"language": ["english"]}, "publish.card.language.0"),
    ],
)
def test_a_bad_card_setting_is_refused_naming_the_field(card, field):
    with pytest.raises(SpecError, match=re.escape(field)):
        parse_spec({"name": "terms", "publish": {"card": card}})


def test_the_export_stops_at_the_eos_training_ended_answers_with(tiny_model):
    """A base whose generation config lists other EOS ids than its tokenizer's would have the
    imported model run on past every answer on Bedrock, which stops on the config's."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from services.publisher.export import apply_decoding
    from shared.jobspec import DecodingSpec

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    apply_decoding(model, DecodingSpec(), tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id  # already there
    model.generation_config.eos_token_id = [7, 5]
    apply_decoding(model, DecodingSpec(), tokenizer)
    assert model.generation_config.eos_token_id == sorted([5, 7, tokenizer.eos_token_id])
