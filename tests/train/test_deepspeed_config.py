"""The DeepSpeed config a stage's options turn into (ZeRO stage, offload, precision, optimizer),
checked key by key; no engine is started here (tests/test_train.py trains with them).
"""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from alloylm.train.deepspeed import deepspeed_config
from alloylm.train.options import DeepSpeedOptions

_AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}
_TORCH_ADAMW = {
    "type": "AdamW",
    "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
}


def config(on_gpu: bool = False, **options) -> dict | None:
    return deepspeed_config(DeepSpeedOptions(**options), on_gpu=on_gpu)


def unchecked(on_gpu: bool = False, **options) -> dict | None:
    """The builder on options a run config refuses (stage 3 without gathering): what it maps."""
    return deepspeed_config(DeepSpeedOptions.model_construct(**options), on_gpu=on_gpu)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_no_stage_means_plain_ddp(on_gpu):
    assert config(on_gpu) is None
    assert config(on_gpu, stage=None, precision="fp32") is None


def test_stage_0_and_1_name_only_their_stage():
    assert config(stage=0)["zero_optimization"] == {"stage": 0}
    assert config(stage=1)["zero_optimization"] == {"stage": 1}


@pytest.mark.parametrize("on_gpu", [False, True])
def test_stage_2_overlaps_communication_only_on_gpu(on_gpu):
    assert config(on_gpu, stage=2)["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_scatter": True,
    }


@pytest.mark.parametrize("gather", [True, False])
def test_stage_3_partitions_parameters_and_gathers_them_on_save_as_asked(gather):
    zero = unchecked(stage=3, gather_16bit_weights_on_save=gather)["zero_optimization"]
    assert zero == {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "stage3_gather_16bit_weights_on_model_save": gather,
        "stage3_param_persistence_threshold": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "reduce_bucket_size": "auto",
    }
    assert zero["stage3_gather_16bit_weights_on_model_save"] is gather


def test_gathering_is_the_default_so_the_output_is_a_plain_model():
    assert config(stage=3)["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(("stage", "on_gpu"), [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_offloaded_optimizer_states_go_to_cpu_pinned_only_on_gpu(stage, on_gpu):
    zero = config(on_gpu, stage=stage, offload_optimizer=True)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": on_gpu}
    assert "offload_param" not in zero
    assert zero["stage"] == stage


@pytest.mark.parametrize("on_gpu", [False, True])
def test_offloaded_parameters_go_to_cpu_with_stage_3(on_gpu):
    zero = config(on_gpu, stage=3, offload_params=True, offload_optimizer=True)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": on_gpu}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": on_gpu}
    only_params = config(on_gpu, stage=3, offload_params=True)["zero_optimization"]
    assert "offload_optimizer" not in only_params and only_params["offload_param"]["device"] == "cpu"


def test_nothing_is_offloaded_unless_asked():
    for stage in (0, 1, 2, 3):
        zero = config(stage=stage)["zero_optimization"]
        assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"), [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)]
)
def test_precision_sets_exactly_one_mode(precision, bf16, fp16):
    built = config(True, stage=2, precision=precision)
    assert built["bf16"] == {"enabled": bf16}
    assert built["fp16"] == {"enabled": fp16}


def test_batch_sizes_learning_rate_and_clipping_come_from_the_training_arguments():
    built = config(stage=2)
    for key, value in _AUTO.items():
        assert built[key] == value
    assert built["wall_clock_breakdown"] is False
    assert set(built) == {"zero_optimization", *_AUTO, "bf16", "fp16", "wall_clock_breakdown", "optimizer"}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cpu_training_uses_torchs_adamw_not_the_fused_cuda_adam(stage):
    assert config(False, stage=stage)["optimizer"] == _TORCH_ADAMW


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gpu_training_leaves_the_optimizer_to_transformers(stage):
    assert "optimizer" not in config(True, stage=stage)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gpu_training_with_offloaded_optimizer_states_uses_deepspeeds_cpu_adam(stage):
    """DeepSpeed refuses a torch optimizer whose states it offloads (zero_force_ds_cpu_optimizer,
    true by default): without an optimizer block of its own, `offload_optimizer` (what
    `alloylm plan` advises when a stage does not fit) failed at engine start on every GPU."""
    built = config(True, stage=stage, offload_optimizer=True)
    assert built["optimizer"] == {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stage": 2, "offload_params": True}, "offload_params needs stage 3"),
        ({"stage": None, "offload_optimizer": True}, "offload_optimizer needs stage 1, 2 or 3"),
        ({"stage": 0, "offload_optimizer": True}, "offload_optimizer needs stage 1, 2 or 3"),
        ({"stage": 4}, "stage"),
        ({"stage": 2, "precision": "fp8"}, "precision"),
        # Measured before the check: a committed stage with only ZeRO shards, which nothing can load.
        ({"stage": 3, "gather_16bit_weights_on_save": False}, "saves only sharded ZeRO checkpoints"),
    ],
)
def test_impossible_options_are_refused_when_the_config_loads(options, message):
    with pytest.raises(ValidationError, match=message):
        DeepSpeedOptions(**options)


def test_deepspeed_reads_the_config_as_the_zero_stage_and_offload_asked_for():
    """After transformers fills the "auto" values, DeepSpeed's own parser sees the same stage,
    offload devices and gather flag (a key misspelt here would be silently ignored by it)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    built = unchecked(False, stage=3, offload_optimizer=True, offload_params=True, gather_16bit_weights_on_save=False)
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, gradient_accumulation_steps=3, use_cpu=True, report_to=[])
    hf = HfTrainerDeepSpeedConfig(built)
    hf.trainer_config_process(args)
    # The stage-3 bucket sizes are filled from the model's hidden size.
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=16))
    hf.trainer_config_finalize(args, model=model, num_training_steps=10)
    parsed = DeepSpeedConfig(hf.config)
    assert parsed.zero_optimization_stage == 3
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.zero_config.offload_param.device == "cpu"
    assert parsed.zero_config.gather_16bit_weights_on_model_save is False
    assert parsed.train_micro_batch_size_per_gpu == 2
    assert parsed.gradient_accumulation_steps == 3
    assert parsed.optimizer_name == "adamw"
    assert parsed.optimizer_params["torch_adam"] is True


# ----------------------------------------------------------------------------- what ran


class _OffloadDevice(str, Enum):
    """As deepspeed.runtime.zero.offload_config.OffloadDeviceEnum (not imported: it is slow)."""

    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class _FakeEngine:
    """The engine methods deepspeed_record reads, answering as a configured DeepSpeedEngine would."""

    def __init__(self, stage, offload_optimizer=None, offload_param=None, bf16=False, fp16=False, gather=True):
        def section(device):
            return None if device is None else SimpleNamespace(device=_OffloadDevice(device))

        self._answers = (stage, section(offload_optimizer), section(offload_param), bf16, fp16, gather)
        self.optimizer = type("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer", (), {})()

    def zero_optimization_stage(self):
        return self._answers[0]

    def zero_offload_optimizer(self):
        return self._answers[1]

    def zero_offload_param(self):
        return self._answers[2]

    def bfloat16_enabled(self):
        return self._answers[3]

    def fp16_enabled(self):
        return self._answers[4]

    def zero_gather_16bit_weights_on_model_save(self):
        return self._answers[5]


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """`deepspeed` with _FakeEngine as its DeepSpeedEngine (deepspeed_record checks the type)."""
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", SimpleNamespace(DeepSpeedEngine=_FakeEngine))


def test_no_engine_is_recorded_as_disabled(fake_deepspeed):
    from alloylm.train.deepspeed import deepspeed_record

    off = {"enabled": False, "zero_stage": None, "offload": {"optimizer": None, "params": None}}
    assert deepspeed_record(SimpleNamespace(model_wrapped=object(), deepspeed=None)) == off
    assert deepspeed_record(SimpleNamespace()) == off


def test_without_deepspeed_imported_nothing_ran(monkeypatch):
    import sys

    from alloylm.train.deepspeed import deepspeed_record

    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    assert deepspeed_record(SimpleNamespace(model_wrapped=_FakeEngine(3)))["enabled"] is False


def test_the_engine_gives_stage_offload_and_precision(fake_deepspeed):
    from alloylm.train.deepspeed import deepspeed_record

    record = deepspeed_record(SimpleNamespace(model_wrapped=_FakeEngine(3, "cpu", "cpu", bf16=True, gather=False)))
    assert record == {
        "enabled": True,
        "zero_stage": 3,
        "offload": {"optimizer": "cpu", "params": "cpu"},
        "gather_16bit_weights_on_save": False,
        "precision": "bf16",
        "optimizer": "DeepSpeedZeroOptimizer_Stage3",
    }
    two = deepspeed_record(SimpleNamespace(model_wrapped=None, deepspeed=_FakeEngine(2, "none", None, fp16=True)))
    assert (two["zero_stage"], two["offload"], two["precision"], two["optimizer"]) == (
        2,
        {"optimizer": None, "params": None},
        "fp16",
        "DeepSpeedZeroOptimizer",
    )
    assert two["gather_16bit_weights_on_save"] is True
    assert deepspeed_record(SimpleNamespace(model_wrapped=_FakeEngine(1, None, "nvme")))["offload"] == {"optimizer": None, "params": "nvme"}
    assert deepspeed_record(SimpleNamespace(model_wrapped=_FakeEngine(0)))["precision"] == "fp32"


def test_an_offload_device_given_as_plain_text_is_read_too(fake_deepspeed):
    from alloylm.train.deepspeed import deepspeed_record

    engine = _FakeEngine(3)
    engine._answers = (3, SimpleNamespace(device="cpu"), SimpleNamespace(device="none"), False, False, True)
    assert deepspeed_record(SimpleNamespace(model_wrapped=engine))["offload"] == {"optimizer": "cpu", "params": None}
