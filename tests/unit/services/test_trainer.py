import math
import os
from pathlib import Path

import pytest
import torch

from services.trainer import lora
from shared import planner
from shared.errors import SpecError
from shared.jobspec import TrainingSpec
from tests.unit.shared.test_planner import ROWS, T5_LARGE


def test_trained_job_stores_adapter_and_log(trained_job):
    ctx, job_id = trained_job["ctx"], trained_job["job_id"]
    manifest = ctx.jobs.manifest(job_id, "train")
    assert manifest["steps"] == 6 == trained_job["trained"].steps
    assert manifest["train_loss"] > 0
    plan = manifest["plan"]
    assert {k: plan[k] for k in ("device", "precision", "quantization", "optimizer")} == {
        "device": "cpu",
        "precision": "fp32",
        "quantization": "none",
        "optimizer": "adamw_torch_fused",
    }
    assert (plan["batch_size"], plan["gradient_accumulation_steps"]) == (8, 1)
    assert (plan["attention"], plan["compile"]) == ("sdpa", False)
    assert "precision auto -> fp32 on cpu" in plan["notes"]
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
        planner.resolve(TrainingSpec(precision="fp16"), T5_LARGE, ROWS, dev="cpu")


def test_nf4_double_quant_config_matches_the_notebook():
    plan = lora.Plan(device="cuda", precision="bf16", quantization="4bit")
    config = lora.quantization_config(plan)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("device", "quantization", "device_map"),
    [("cuda", "none", {"": 1}), ("cuda", "4bit", {"": 1}), ("cpu", "none", None),
     ("cpu", "4bit", {"": "cpu"})],
)  # fmt: skip
def test_the_base_loads_straight_onto_its_ranks_gpu_quantized_or_not(
    tiny_model, monkeypatch, device, quantization, device_map
):
    """On CUDA the weights go shard by shard to the rank's GPU, bf16 as well as nf4: the
    host never holds them whole (a trainer task's memory is smaller than a 7B model's)."""
    seen = {}

    class Loaded(Exception):
        pass

    def load(base_model, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(lora, "load_seq2seq", load)
    monkeypatch.setenv("LOCAL_RANK", "1")
    precision = "bf16" if device == "cuda" else "fp32"
    plan = lora.Plan(device=device, precision=precision, quantization=quantization)
    with pytest.raises(Loaded):
        lora.build_model(str(tiny_model), TrainingSpec(), plan)
    assert seen["device_map"] == device_map


@pytest.mark.parametrize(
    ("device", "world", "calls"),
    [("cuda", "2", ["set_device 1", "init nccl 1800"]), ("cuda", "1", ["set_device 1"]),
     ("cpu", "2", [])],
)  # fmt: skip
def test_a_rank_takes_its_gpu_and_joins_its_group_before_the_probe(
    monkeypatch, device, world, calls
):
    """Rank 1's probe reads its own GPU's counters, not GPU 0's, and agrees with the other
    ranks on the batch through a live group (the Trainer starts one only later)."""
    from services.trainer import ranks

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.append(f"set_device {i}"))
    monkeypatch.setattr(ranks.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        ranks.dist,
        "init_process_group",
        lambda backend, timeout: seen.append(f"init {backend} {timeout.seconds}"),
    )
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", world)
    ranks.join(device)
    assert seen == calls


def test_fit_joins_before_it_loads_the_model(monkeypatch, tmp_path):
    from services.trainer import fit, ranks

    order = []

    class Loaded(Exception):
        pass

    def build_model(*_):
        order.append("load")
        raise Loaded

    monkeypatch.setattr(ranks, "join", lambda device: order.append(f"join {device}"))
    monkeypatch.setattr(fit.lora, "build_model", build_model)
    monkeypatch.setattr(fit, "load_tokenizer", lambda _: None)
    plan = {"device": "cuda", "precision": "bf16", "quantization": "none"}
    job = fit.TrainJob("m", {}, plan, str(tmp_path), "ck", 1.0)
    with pytest.raises(Loaded):
        fit.fit(job, None, None, store=None, report=None, should_stop=lambda: None)
    assert order == ["join cuda", "load"]


@pytest.mark.parametrize(("stored", "kept"), [(20, 20), (0, 16)])
def test_the_probe_keeps_the_plans_effective_batch_or_a_stored_plans_product(
    monkeypatch, tmp_path, stored, kept
):
    """A plan stored before effective_batch_size (0) keeps batch x accumulation x ranks."""
    from services.trainer import fit

    asked = []
    monkeypatch.setattr(
        fit.probe,
        "on_device",
        lambda model, plan, rows, *, effective_batch, processes, **_: (
            asked.append((effective_batch, processes)) or plan
        ),
    )
    plan = {"device": "cuda", "precision": "bf16", "quantization": "none", "batch_size": 4,
            "gradient_accumulation_steps": 2, "effective_batch_size": stored}  # fmt: skip
    rows = {"count": 176, "source_tokens": 40, "target_tokens": 128}
    job = fit.TrainJob("m", {}, plan, str(tmp_path), "ck", 1.0, processes=2, rows=rows)
    assert fit._probed(job, None, job.resolved) == job.resolved
    assert asked == [(kept, 2)]


def test_lora_wraps_all_linear_layers(tiny_model):
    plan = planner.resolve(TrainingSpec(), T5_LARGE, ROWS, dev="cpu")
    model = lora.build_model(str(tiny_model), TrainingSpec(), plan)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 16, 0.0)
    assert model.config._attn_implementation == "sdpa"
    notebook = TrainingSpec(recipe="notebook")
    model = lora.build_model(str(tiny_model), notebook, planner.resolve(notebook, T5_LARGE, ROWS))
    assert model.peft_config["default"].lora_dropout == 0.1
    assert model.config._attn_implementation == "eager"
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


@pytest.fixture
def prepared(ctx, tiny_model):
    """A prepared dataset and a TrainModel command for a 6-step run, checkpoints every 2."""
    from services.dataprep.handler import handle as prepare
    from shared.messages import PrepareDataset, TrainModel
    from tests.factories import make_spec

    spec = make_spec(tiny_model, training={"logging_steps": 1, "checkpoint_every_steps": 2})
    cmd = PrepareDataset(job_id="job-1", spec_uri=ctx.jobs.create("job-1", spec))
    event = prepare(cmd, ctx)
    return TrainModel(job_id="job-1", spec_uri=cmd.spec_uri, dataset_manifest=event.manifest)


def _progress_hook(ctx, at_step, action):
    def progress(data, *, force=False):
        if data.get("step") == at_step and "phase" not in data and data.get("loss") is not None:
            action()

    return progress


def _run(ctx, cmd, hook=None):
    from services.trainer.handler import handle

    if hook is not None:
        ctx.progress = hook
    return handle(cmd, ctx)


def test_resumes_from_the_latest_checkpoint_after_a_crash(ctx, prepared):
    def crash():
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(ctx, prepared, _progress_hook(ctx, 5, crash))
    assert ctx.jobs.manifest("job-1", "train") is None
    event = _run(ctx, prepared, lambda data, *, force=False: None)
    manifest = ctx.jobs.manifest("job-1", "train")
    assert manifest["resumed_from_step"] == 4
    assert event.steps == manifest["steps"] == manifest["max_steps"] == 6
    log = ctx.store.get_json(ctx.store.key_of(manifest["log"]))
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(ctx, prepared, damage):
    """Issue 19: with the checkpoint latest.json names gone, the job failed ("Can't find a
    valid checkpoint") and so did every retry, though an older checkpoint was stored."""

    def crash():
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(ctx, prepared, _progress_hook(ctx, 5, crash))
    prefix = "jobs/job-1/train/checkpoints"
    assert [k.rsplit("/", 1)[1] for k in ctx.store.list(prefix) if k.endswith("state.json")]
    assert {k.split("/")[4] for k in ctx.store.list(prefix) if "/step-" in k} == {
        "step-00000002",
        "step-00000004",
    }  # the two newest are kept
    if damage == "deleted":
        ctx.store.delete_prefix(f"{prefix}/step-00000004")
    else:
        ctx.store.put_bytes(f"{prefix}/step-00000004/adapter_model.safetensors", b"\x08\x00")
    _run(ctx, prepared, lambda data, *, force=False: None)
    manifest = ctx.jobs.manifest("job-1", "train")
    assert manifest["resumed_from_step"] == 2 and manifest["steps"] == 6


def test_cancel_stops_within_one_poll_and_one_optimizer_step(ctx, prepared, monkeypatch):
    """The cancel request is read off the training thread every STOP_POLL_SECONDS; a step
    longer than that (here step 3, made slow) is the last one."""
    import time

    from services.trainer import callbacks
    from shared.errors import Cancelled

    monkeypatch.setattr(callbacks, "STOP_POLL_SECONDS", 0.05)
    steps = []

    def progress(data, *, force=False):
        if data.get("loss") is not None and "phase" not in data:  # a step, not a checkpoint
            steps.append(data["step"])
            if data["step"] == 2:
                ctx.jobs.request_cancel("job-1")
                time.sleep(0.5)  # several polls go by during step 3

    with pytest.raises(Cancelled, match="cancelled at step 3"):
        _run(ctx, prepared, progress)
    assert steps == [1, 2, 3]
    assert ctx.jobs.manifest("job-1", "train") is None


def test_shutdown_stores_a_checkpoint_and_hands_the_job_back(ctx, prepared):
    from shared.errors import Interrupted

    with pytest.raises(Interrupted, match="checkpoint stored at step 4"):
        _run(ctx, prepared, _progress_hook(ctx, 3, ctx.stop.set))
    ctx.stop.clear()
    event = _run(ctx, prepared, lambda data, *, force=False: None)
    assert ctx.jobs.manifest("job-1", "train")["resumed_from_step"] == 4
    assert event.steps == 6


def test_out_of_memory_names_sizes_and_what_to_lower(ctx, prepared, monkeypatch):
    from transformers import Seq2SeqTrainer

    from shared.errors import OutOfMemory

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Seq2SeqTrainer, "train", oom)
    with pytest.raises(OutOfMemory, match=r"batch_size=8.*lower training.batch_size"):
        _run(ctx, prepared)


def test_progress_reports_throughput_and_memory(trained_job):
    ctx, job_id = trained_job["ctx"], trained_job["job_id"]
    steps = [
        e.progress
        for e in ctx.jobs.events(job_id)
        if e.type == "StageProgress" and "total_steps" in e.progress
    ]
    assert steps, "no training progress recorded"
    last = steps[-1]
    assert last["total_steps"] == 6
    assert last["examples_per_s"] > 0 and last["tokens_per_s"] > 0
    assert last["peak_memory_mb"] > 0
    assert last["step"] == 6 and last["eta_s"] == 0  # the last step: nothing left to run


@pytest.fixture
def prepared_two_ranks(ctx, tiny_model):
    """Like ``prepared``, for two gloo processes: one epoch, checkpoints every 2 steps."""
    return _two_ranks(ctx, tiny_model, epochs=1)


def _two_ranks(ctx, tiny_model, *, epochs, job_id="job-2", **training):
    from services.dataprep.handler import handle as prepare
    from shared.messages import PrepareDataset, TrainModel
    from tests.factories import make_spec

    training = {
        "logging_steps": 1,
        "checkpoint_every_steps": 2,
        "data_parallel": 2,
        "max_steps": -1,
        "epochs": epochs,
        **training,
    }
    spec = make_spec(tiny_model, training=training)
    cmd = PrepareDataset(job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec))
    event = prepare(cmd, ctx)
    return TrainModel(job_id=job_id, spec_uri=cmd.spec_uri, dataset_manifest=event.manifest)


def test_two_processes_train_data_parallel_on_gloo(ctx, prepared_two_ranks):
    seen = []
    event = _run(ctx, prepared_two_ranks, lambda data, *, force=False: seen.append(data))
    manifest = ctx.jobs.manifest("job-2", "train")
    assert manifest["processes"] == 2
    # Each optimizer step takes one batch of 8 on each process: 16 examples a step.
    rows = ctx.manifest_at(prepared_two_ranks.dataset_manifest)["counts"]["train"]
    assert event.steps == manifest["max_steps"] == math.ceil(rows / 16)
    losses = [d["step"] for d in seen if d.get("loss") is not None and "phase" not in d]
    assert losses == list(range(1, event.steps + 1))
    assert seen[-1 if "loss" in seen[-1] else -2]["examples_per_s"] > 0
    keys = ctx.store.list(ctx.store.key_of(manifest["adapter"]))
    assert any(k.endswith("adapter_model.safetensors") for k in keys)


def test_data_parallel_shutdown_checkpoints_and_resumes_to_the_same_step(ctx, tiny_model):
    from shared.errors import Interrupted

    # Four epochs: the stop, relayed through a file, lands long before the last step even
    # when the ranks run fast (with one epoch's 11 steps it sometimes came after them).
    prepared_two_ranks = _two_ranks(ctx, tiny_model, epochs=4)
    rows = ctx.manifest_at(prepared_two_ranks.dataset_manifest)["counts"]["train"]
    total = 4 * math.ceil(rows / 16)
    # The worker relays the stop to the ranks through a file it checks twice a second.
    with pytest.raises(Interrupted, match=r"checkpoint stored at step \d+") as stopped:
        _run(ctx, prepared_two_ranks, _progress_hook(ctx, 1, ctx.stop.set))
    step = int(str(stopped.value).rsplit(" ", 1)[1])
    assert 1 < step < total
    assert ctx.jobs.manifest("job-2", "train") is None
    ctx.stop.clear()
    event = _run(ctx, prepared_two_ranks, lambda data, *, force=False: None)
    assert ctx.jobs.manifest("job-2", "train")["resumed_from_step"] == step
    assert event.steps == total


def test_ranks_stop_as_lost_when_the_worker_is_gone(tmp_path):
    """A rank whose worker died (kill -9) stops: no orphan trains beside the new owner."""
    import subprocess
    import sys

    from services.trainer.distributed import _Files, _rank_should_stop

    files = _Files(tmp_path / "ranks")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert _rank_should_stop(files, gone.pid)() == "lost"
    alive = _rank_should_stop(files, os.getpid())
    assert alive() is None
    (files.folder / "stop").write_text("cancel")
    assert alive() == "cancel"


def test_data_parallel_training_outlives_a_database_hiccup_in_the_stop_check(
    ctx, prepared_two_ranks, monkeypatch
):
    """The worker asks the database for a cancel off its loop, as one process does: an
    error there is logged and asked again, not the end of the ranks' run."""
    from shared.errors import LedgerUnavailable

    asked, cancel_requested = [], ctx.jobs.cancel_requested

    def flaky(job_id):
        asked.append(job_id)
        if len(asked) <= 3:
            raise LedgerUnavailable("the job ledger is unreachable: connection refused")
        return cancel_requested(job_id)

    monkeypatch.setattr(ctx.jobs, "cancel_requested", flaky)
    event = _run(ctx, prepared_two_ranks, lambda data, *, force=False: None)
    assert len(asked) > 3  # asked again after the errors
    assert event.steps == ctx.jobs.manifest("job-2", "train")["max_steps"]


RANKS_READING_STOP = """
import json, sys, time
from pathlib import Path

folder = Path(sys.argv[1])
seen, deadline = [], time.monotonic() + 20
while time.monotonic() < deadline and seen[-1:] != ["lost"]:
    stop = folder / "stop"
    reason = stop.read_text() if stop.exists() else None
    if reason and seen[-1:] != [reason]:
        seen.append(reason)
        (folder / f"seen-{reason}").touch()
    time.sleep(0.01)
(folder / "result.json").write_text(json.dumps({"summary": {"seen": seen}}))
"""


def test_a_stronger_stop_reason_reaches_the_ranks_after_a_weaker_one(tmp_path, monkeypatch):
    """A shutdown, then the lease lost before the ranks stopped: the ranks must learn of the
    loss (a shutdown's checkpoint would be stored for a job another worker now owns)."""
    import sys

    import pyarrow as pa

    from services.trainer import distributed
    from services.trainer.fit import TrainJob

    monkeypatch.setattr(
        distributed,
        "_torchrun",
        lambda files, n: [sys.executable, "-c", RANKS_READING_STOP, str(files.folder)],
    )
    ranks = tmp_path / "ranks"
    job = TrainJob("base", {}, {}, str(tmp_path), "prefix", 1.0, processes=2)
    summary = distributed.launch(
        job,
        pa.table({"input_ids": [[1]]}),
        None,
        store_url="file:///nowhere",
        s3_endpoint_url=None,
        report=lambda *a, **k: None,
        # the lease is lost once the ranks saw the shutdown (however long they took to start)
        should_stop=lambda: "lost" if (ranks / "seen-shutdown").exists() else "shutdown",
        folder=ranks,
    )
    assert summary == {"seen": ["shutdown", "lost"]}


def test_a_failing_worker_kills_ranks_that_read_no_stop_file(tmp_path):
    """torchrun starts each rank in its own session: killing torchrun's alone would leave a
    rank that is still loading (and reads no stop file) holding its GPU. A pid file whose
    process is not a rank of this launch (the pid reused) is left alone."""
    import subprocess
    import sys
    import time

    from services.trainer.distributed import _Files, _wait_or_kill

    files = _Files(tmp_path / "ranks")
    rank = (
        "import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
        '\'import os, sys, time; open(sys.argv[1], "w").write(str(os.getpid())); '
        "time.sleep(600)', sys.argv[1], sys.argv[2]], start_new_session=True); time.sleep(600)"
    )
    torchrun = subprocess.Popen(
        [sys.executable, "-c", rank, str(files.rank_pid("0")), str(files.launch)],
        start_new_session=True,
    )
    other = subprocess.Popen(["sleep", "600"])
    files.rank_pid("1").write_text(str(other.pid))
    try:
        deadline = time.monotonic() + 30
        while not files.rank_pids():  # the rank wrote its pid
            assert time.monotonic() < deadline, "the rank never started"
            time.sleep(0.05)
        pid = int(files.rank_pid("0").read_text())
        assert files.rank_pids() == [pid]
        _wait_or_kill(torchrun, files, grace=0.5)
        assert torchrun.returncode == -9
        while _running(pid):
            assert time.monotonic() < deadline, f"rank {pid} outlived the kill"
            time.sleep(0.05)
        assert other.poll() is None  # not a rank: left alone
    finally:
        other.kill()
        torchrun.kill()
        for pid in files.rank_pids():  # a rank the kill missed: not left sleeping
            os.kill(pid, 9)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_ranks_replacing_one_file_at_once_do_not_trip_on_each_other(tmp_path):
    """Every rank may write compile-failed at once (the same graph fails everywhere): each
    writes its own temporary file, so none raises FileNotFoundError in place of its error."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; "
        "from services.trainer.distributed import _write_atomic; "
        "[_write_atomic(Path(sys.argv[1]), str(i)) for i in range(500)]"
    )
    target = tmp_path / "compile-failed"
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(target)]) for _ in range(2)]
    assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
    assert target.read_text() == "499" and list(tmp_path.iterdir()) == [target]


def test_a_plan_resumed_again_and_again_says_so_once(tmp_path):
    import dataclasses
    import json

    from services.trainer.callbacks import PLAN_FILE
    from services.trainer.handler import RESUMED, _resumed_plan

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    plan = lora.Plan(device="cpu", precision="fp32", quantization="none", notes=("batch 8",))
    for _ in range(3):  # stored with the next checkpoint, resumed from it
        (checkpoint / PLAN_FILE).write_text(json.dumps(dataclasses.asdict(plan)))
        plan = _resumed_plan(checkpoint)
    assert plan.notes == ("batch 8", RESUMED)


def test_a_cancel_asked_when_compile_failed_is_obeyed_before_the_ranks_start_again(
    ctx, tiny_model, monkeypatch
):
    from services.trainer import distributed
    from shared.errors import Cancelled, CompileFailed

    launched = []

    def compile_fails(job, **_):
        launched.append(job)
        raise CompileFailed("compile on -> off: torch.compile failed (RuntimeError: boom)")

    monkeypatch.setattr(distributed, "launch", compile_fails)
    monkeypatch.setattr(ctx.jobs, "cancel_requested", lambda job_id: bool(launched))
    cmd = _two_ranks(ctx, tiny_model, epochs=1, job_id="job-3", compile="on")
    with pytest.raises(Cancelled, match=r"job job-3 cancelled \(compile on -> off: .*boom\); not"):
        _run(ctx, cmd, lambda data, *, force=False: None)
    assert len(launched) == 1  # not started again
    assert ctx.jobs.manifest("job-3", "train") is None


def test_a_crash_after_the_last_checkpoint_resumes_without_training_more(ctx, prepared):
    def crash_once_the_final_checkpoint_is_stored(data, *, force=False):
        if data.get("phase") == "checkpoint stored" and data["step"] == 6:
            raise RuntimeError("killed after the last checkpoint")

    with pytest.raises(RuntimeError, match="killed after the last checkpoint"):
        _run(ctx, prepared, crash_once_the_final_checkpoint_is_stored)
    assert ctx.jobs.manifest("job-1", "train") is None
    event = _run(ctx, prepared, lambda data, *, force=False: None)
    manifest = ctx.jobs.manifest("job-1", "train")
    assert manifest["resumed_from_step"] == 6
    assert event.steps == manifest["steps"] == manifest["max_steps"] == 6
    log = ctx.store.get_json(ctx.store.key_of(manifest["log"]))
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4, 5, 6]
    # the stored adapter is the checkpoint's, not a fresh initialisation
    from safetensors.torch import load_file

    def tensors(key):
        return load_file(ctx.store.path(key))

    prefix = "jobs/job-1/train"
    stored = tensors(f"{prefix}/adapter/adapter_model.safetensors")
    saved = tensors(f"{prefix}/checkpoints/step-00000006/adapter_model.safetensors")
    assert stored.keys() == saved.keys()
    assert all(torch.equal(stored[k], saved[k]) for k in stored)


def test_validation_runs_on_its_own_clock_in_the_step_records(ctx, tiny_model):
    from services.dataprep.handler import handle as prepare
    from shared.messages import PrepareDataset, TrainModel
    from tests.factories import make_spec

    spec = make_spec(
        tiny_model,
        dataset={"validation_size": 0.2},
        training={"max_steps": 30, "logging_steps": 1, "checkpoint_every_steps": 1000},
    )
    cmd = PrepareDataset(job_id="job-v", spec_uri=ctx.jobs.create("job-v", spec))
    train = TrainModel(
        job_id="job-v", spec_uri=cmd.spec_uri, dataset_manifest=prepare(cmd, ctx).manifest
    )
    records = []
    _run(ctx, train, lambda data, *, force=False: records.append(data))
    steps = [r for r in records if "total_steps" in r and "phase" not in r]
    assert [r["step"] for r in steps] == list(range(1, 31))  # one record a step
    assert all(r["loss"] is not None for r in steps)
    validated = [r["step"] for r in steps if r["eval_loss"] != (steps[0]["eval_loss"])]
    assert steps[2]["eval_loss"] is not None and steps[1]["eval_loss"] is None
    assert validated[0] == 3
    validation = ctx.jobs.manifest("job-v", "train")["validation"]
    assert validation["passes"] == 10 and validation["every_steps"] == 3  # "auto": ~10 a run
    assert 0 < validation["share_of_training_time"] < 1


def test_fused_layers_compute_the_same_model(tiny_model):
    from transformers import AutoModelForSeq2SeqLM

    from services.trainer import kernels

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    labels = torch.tensor([[4, 5, 1], [6, 1, -100]])
    before = model(input_ids=ids, labels=labels)
    done = kernels.fuse(model)
    after = model(input_ids=ids, labels=labels)
    encoder, decoder = model.config.num_layers, model.config.num_decoder_layers
    norms = 2 * encoder + 3 * decoder + 2  # each block's, plus each stack's final norm
    assert done == [
        f"{encoder + decoder} gelu_new -> torch gelu(tanh)",
        f"{norms} T5LayerNorm -> torch rms_norm",
    ]
    assert torch.allclose(before.logits, after.logits, atol=1e-5)
    assert after.loss.item() == pytest.approx(before.loss.item(), abs=1e-5)


def _live_job(ctx, tiny_model, name, backend):
    """A prepared 12-step job logging every step, tracked by ``backend``, whose curves are
    sent every 0.2 s; its training command."""
    from services.dataprep.handler import handle as prepare
    from shared.messages import PrepareDataset, TrainModel
    from tests.factories import make_spec

    spec = make_spec(
        tiny_model,
        name=name,
        dataset={"validation_size": 0.2},
        tracking={"backend": backend},
        training={"max_steps": 12, "logging_steps": 1, "checkpoint_every_steps": 1000},
    )
    ctx.settings = ctx.settings.model_copy(update={"tracking_live_seconds": 0.2})
    job_id = f"job-{name}"
    cmd = PrepareDataset(job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec))
    return TrainModel(
        job_id=job_id, spec_uri=cmd.spec_uri, dataset_manifest=prepare(cmd, ctx).manifest
    )


def test_the_curves_reach_the_mlflow_run_while_it_trains(ctx, tiny_model, mlflow_server):
    """Issue 23: the curves reached MLflow only when the stage ended. Here training is held
    at step 8 until the server has steps 1-7; at the end each step is there once."""
    import time

    from mlflow import MlflowClient

    from shared.tracking import mlflow_run

    ctx.settings = ctx.settings.model_copy(update={"mlflow_tracking_uri": mlflow_server.uri})
    train = _live_job(ctx, tiny_model, "live", "mlflow")
    client = MlflowClient(mlflow_server.uri)

    def loss_steps():
        experiment = client.get_experiment_by_name("termtune/live")
        run_id = mlflow_run._find(client, experiment.experiment_id, "job-live")
        return run_id, [m.step for m in client.get_metric_history(run_id, "train/loss")]

    held = []

    def hook(data, *, force=False):
        if data.get("step") == 8 and "phase" not in data and not held:
            deadline = time.monotonic() + 30
            while not set(range(1, 8)) <= set(loss_steps()[1]) and time.monotonic() < deadline:
                time.sleep(0.1)
            held.append(loss_steps()[1])

    _run(ctx, train, hook)
    assert set(range(1, 8)) <= set(held[0]) and max(held[0]) <= 8  # sent while training
    run_id, steps = loss_steps()
    assert steps == list(range(1, 13))  # each step once: the end sent only what was missing
    log = ctx.store.get_json(ctx.store.key_of(ctx.jobs.manifest("job-live", "train")["log"]))
    validated = [e["step"] for e in log if "eval_loss" in e]
    assert validated and [m.step for m in client.get_metric_history(run_id, "train/eval_loss")] == (
        validated
    )
    losses = {e["step"]: e["loss"] for e in log if "loss" in e}
    sent = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sent == pytest.approx(losses)
    assert len(client.get_metric_history(run_id, "train/examples_per_s")) == 12


def test_the_curves_reach_the_tensorboard_files_while_it_trains(ctx, tiny_model, monkeypatch):
    """Issue 23: TensorBoard's files reached the store only when the stage ended. Here
    training is held at step 8 until the stored files, read with TensorBoard's own reader,
    have steps 1-7; at the end each step is there once."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shared.tracking.tensorboard_run import TensorBoardRun

    monkeypatch.setattr(TensorBoardRun, "ROTATE_EVERY_S", 0.0)
    train = _live_job(ctx, tiny_model, "live-tb", "tensorboard")
    stored = ctx.store.path("jobs/job-live-tb/tracking/tensorboard")

    def loss_steps():
        if not stored.exists():
            return []
        events = EventAccumulator(str(stored), size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        return [e.step for e in events.Scalars("train/loss")] if "train/loss" in tags else []

    held = []

    def hook(data, *, force=False):
        if data.get("step") == 8 and "phase" not in data and not held:
            deadline = time.monotonic() + 30
            while not set(range(1, 8)) <= set(loss_steps()) and time.monotonic() < deadline:
                time.sleep(0.1)
            held.append(loss_steps())

    _run(ctx, train, hook)
    assert set(range(1, 8)) <= set(held[0]) and max(held[0]) <= 8  # stored while training
    assert loss_steps() == list(range(1, 13))  # each step once, in order, over several files
    assert len(list(stored.iterdir())) >= 2
    log = ctx.store.get_json(ctx.store.key_of(ctx.jobs.manifest("job-live-tb", "train")["log"]))
    events = EventAccumulator(str(stored), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e["step"]: e["loss"] for e in log if "loss" in e}
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses)


class _Recording:
    """A trainer's collator that also keeps each batch's rows (as sorted token tuples)."""

    def __init__(self, collate, seen):
        self.collate, self.seen = collate, seen

    def __call__(self, features):
        self.seen.append(sorted(tuple(f["input_ids"]) for f in features))
        return self.collate(features)

    def __getattr__(self, name):
        return getattr(self.collate, name)


@pytest.mark.parametrize("family", ["t5", "qwen3"])
def test_a_run_resumed_after_the_first_epoch_trains_on_the_same_rows(
    ctx, tiny_model, tiny_qwen, family, monkeypatch
):
    """Length-grouped orders came from torch's global generator: a run resumed in the
    middle of epoch 2 drew another order than the run it continued, training on some rows
    of that epoch twice and on others not at all (seq2seq and decoder-only alike)."""
    from services.dataprep.handler import handle as prepare
    from services.trainer import train as train_module
    from services.trainer.handler import handle
    from shared.messages import PrepareDataset, TrainModel
    from tests.factories import make_spec

    seen = []
    build = train_module._trainer

    def recording(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.data_collator = _Recording(trainer.data_collator, seen)
        return trainer

    monkeypatch.setattr(train_module, "_trainer", recording)

    def job(job_id):
        spec = make_spec(
            tiny_model if family == "t5" else tiny_qwen,
            training={
                "batch_size": 32, "gradient_accumulation_steps": 1, "epochs": 3,
                "max_steps": -1, "checkpoint_every_steps": 8, "logging_steps": 1,
            },
        )  # fmt: skip
        cmd = PrepareDataset(job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec))
        event = prepare(cmd, ctx)
        return TrainModel(job_id=job_id, spec_uri=cmd.spec_uri, dataset_manifest=event.manifest)

    ctx.progress = lambda data, *, force=False: None
    handle(job("whole"), ctx)
    whole, per_epoch = list(seen), len(seen) // 3
    assert per_epoch < 8  # the checkpoint at step 8 is in the second epoch
    seen.clear()

    def crash(data, *, force=False):
        if data.get("step") == 10 and "phase" not in data and data.get("loss") is not None:
            raise RuntimeError("simulated crash")

    ctx.progress = crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        handle(job("cut"), ctx)
    seen.clear()
    ctx.progress = lambda data, *, force=False: None
    handle(job("cut"), ctx)
    assert ctx.jobs.manifest("cut", "train")["resumed_from_step"] == 8
    assert seen == whole[8:]
    # Each epoch is a new order (drawn from the seed and the epoch), each row once in it.
    epochs = [whole[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    rows = [sorted(r for batch in epoch for r in batch) for epoch in epochs]
    assert rows[0] == rows[1] == rows[2]


def _loraplus_run(tiny_model, out, ratio, resume_from=None, stop_at=None):
    """Train a fresh adapter at LoRA+ ``ratio`` for 3 optimizer steps (or until ``stop_at``,
    a checkpoint every 2); the optimizer's groups as the first step found them, the model."""
    from transformers import AutoTokenizer, TrainerCallback

    from services.trainer import train
    from shared.trainplan import model_shape
    from tests.factories import token_rows

    class Groups(TrainerCallback):
        def __init__(self):
            self.groups = []

        def on_step_begin(self, args, state, control, optimizer=None, **_):
            if not self.groups:
                self.groups = [(g["lr"], list(g["params"])) for g in optimizer.param_groups]
                moments = getattr(optimizer, "optimizer", optimizer).state.values()
                self.steps = sorted({int(m["step"]) for m in moments})

        def on_step_end(self, args, state, control, **_):
            control.should_training_stop = state.global_step == stop_at

    spec = TrainingSpec.model_validate(
        {"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 3,
         "learning_rate": 0.01, "lr_scheduler": "constant", "checkpoint_every_steps": 2,
         "lora": {"loraplus_lr_ratio": ratio}}
    )  # fmt: skip
    plan = planner.resolve(spec, model_shape(str(tiny_model)), planner.Rows(8, 6, 5), dev="cpu")
    torch.manual_seed(0)
    model = lora.build_model(str(tiny_model), spec, plan)
    table = token_rows(8, 6, 5)
    groups = Groups()
    train.train(
        model, AutoTokenizer.from_pretrained(tiny_model), table, spec=spec, plan=plan,
        output_dir=out, callbacks=[groups], resume_from=resume_from,
    )  # fmt: skip
    return groups.groups, model, groups.steps


def _lrs(groups, model, kind):
    """The learning rates of the groups holding ``kind``'s (lora_A, lora_B) parameters."""
    ids = {id(p) for n, p in model.named_parameters() if f"{kind}." in n and p.requires_grad}
    assert ids
    return sorted({lr for lr, params in groups for p in params if id(p) in ids})


def test_loraplus_trains_the_b_matrices_at_the_ratio_and_resumes(tiny_model, tmp_path):
    groups, model, steps = _loraplus_run(tiny_model, tmp_path / "plus", 16.0, stop_at=2)
    assert steps == []  # a fresh optimizer: no moments yet
    assert _lrs(groups, model, "lora_A") == [0.01]
    assert _lrs(groups, model, "lora_B") == [pytest.approx(0.16)]
    assert all(  # B starts at zero: it learned
        p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B." in n
    )
    # its checkpoint holds the groups and their moments, and a run resumed from it restores
    # both: the rates, and every parameter's state two steps in
    checkpoint = tmp_path / "plus" / "checkpoint-2"
    groups, model, steps = _loraplus_run(
        tiny_model, tmp_path / "plus", 16.0, resume_from=checkpoint
    )
    assert _lrs(groups, model, "lora_B") == [pytest.approx(0.16)]
    assert steps == [2]
    plain, model, _ = _loraplus_run(tiny_model, tmp_path / "plain", 1.0, stop_at=1)
    assert _lrs(plain, model, "lora_A") == _lrs(plain, model, "lora_B") == [0.01]


def test_max_steps_0_trains_the_epochs_as_the_plan_counts_them(tmp_path):
    """The spec takes 0 and the planner reads it as "use epochs"; transformers reads only
    -1 so: it trained one step at learning rate 0 and published an untrained adapter."""
    from services.trainer import train

    spec = TrainingSpec(max_steps=0, epochs=2)
    plan = planner.resolve(spec, T5_LARGE, ROWS, dev="cpu")
    assert train.training_arguments(spec, plan, tmp_path)["max_steps"] == -1
    assert train.planned_steps(spec, plan, 176) == train.planned_steps(
        TrainingSpec(epochs=2), plan, 176
    )
