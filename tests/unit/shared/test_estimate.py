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
