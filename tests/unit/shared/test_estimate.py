"""The estimate's plan on a g5's A10G: a model whose weights alone exceed it is refused by
the instance, not planned at batch one."""

from __future__ import annotations

import json

import pytest

from shared.errors import SpecError
from shared.estimate import G5_INSTANCES, Prices, estimate
from shared.jobspec import parse_spec
from shared.trainplan import model_shape

DATASET = {
    "counts": {"train": 200},
    "tokens": {
        "train": {"source": {"mean": 20.0, "max": 40}, "target": {"mean": 60.0, "max": 128}}
    },
}


def test_gpt_oss_20b_is_refused_on_every_g5_naming_the_sizes(tmp_path):
    from transformers import GptOssConfig

    config = GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = parse_spec({"name": "terms", "base_model": str(tmp_path)})
    with pytest.raises(SpecError) as caught:
        estimate(
            spec,
            DATASET,
            instance_type="g5.48xlarge",
            shape=model_shape(str(tmp_path)),
            prices=Prices(G5_INSTANCES, 0.0785),
        )
    assert str(caught.value) == (
        "instance_type 'g5.48xlarge' (A10G GPUs, 24 GB each): the base model's bf16 weights "
        "and the adapter need 50.0 GiB, more than this GPU's 22.0 GiB free: use a GPU with "
        "more memory"
    )


def _stages(base_model: str, **publish):
    spec = parse_spec({"name": "terms", "base_model": base_model, "publish": publish})
    result = estimate(
        spec,
        DATASET,
        instance_type="g5.xlarge",
        shape=model_shape(base_model),
        prices=Prices(G5_INSTANCES, 0.0785),
    )
    return result["stages"]


def test_the_estimate_says_where_a_7b_models_evaluation_and_merge_fit_on_the_stack(llama_7b):
    stages = _stages(llama_7b)
    assert stages["evaluate"] == {  # the smallest StageMemory that holds it in bf16
        "Fargate": "StageMemory 20480: bf16 weights 12.6 GiB in host memory (18.5 GiB free); "
        "no GPU; fp32 weights 25.1 GiB over 80% of the host's 18.5 GiB free",
        "Gpu": "bf16 weights 12.6 GiB in GPU memory (22.0 GiB free)",
    }
    assert stages["publish"] == {  # and its bf16 merge
        "Fargate": "StageMemory 20480: bf16 weights 12.6 GiB in host memory "
        "(18.5 GiB free); no GPU",
        "Gpu": "bf16 weights 12.6 GiB in GPU memory (22.0 GiB free)",
    }
    assert "an assumed 1.5 GiB for the runtime" in stages["basis"]


def test_an_fp32_export_of_a_7b_model_fits_no_fargate_publisher(llama_7b):
    stages = _stages(llama_7b, dtype="float32")
    assert stages["publish"] == {
        "Fargate": "StageMemory 30720 does not fit: no GPU; "
        "fp32 weights 25.1 GiB over 80% of the host's 28.5 GiB free; "
        "a smaller model (the Gpu capacity's A10G does not hold it either), "
        "or publish.dtype bfloat16 (half the memory)",
        "Gpu": "does not fit: fp32 weights 25.1 GiB over 80% of the GPU's 22.0 GiB free; "
        "fp32 weights 25.1 GiB over 80% of the host's 12.5 GiB free",
    }


def test_a_model_too_big_for_any_stage_memory_says_what_to_change(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(  # ~13B: bf16 weights over 80% of even a 30720 MiB task
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
    ).save_pretrained(tmp_path)  # fmt: skip
    evaluate = _stages(str(tmp_path))["evaluate"]["Fargate"]
    assert evaluate.startswith("StageMemory 30720 does not fit: no GPU; fp32 weights "), evaluate
    # nor does the Gpu capacity's A10G, so the estimate does not send it there
    assert evaluate.endswith("; a smaller model (the Gpu capacity's A10G does not hold it either)")


def test_a_small_model_fits_every_capacity_at_the_default_memory(tiny_model):
    stages = _stages(str(tiny_model))
    assert stages["evaluate"]["Fargate"].startswith("StageMemory 16384: fp32 weights 0.0 GiB")
    assert stages["publish"]["Fargate"].startswith("StageMemory 16384: bf16 weights")
