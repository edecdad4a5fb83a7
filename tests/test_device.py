"""`--device cpu|cuda|auto` for training and generation.

Only the CPU path can run here: with no GPU, these tests check the device choice, the errors,
that the CPU output is unchanged, and that generation creates every tensor on the chosen
device (so nothing is silently left on the CPU when that device is a GPU). A real CUDA run is
not tested.
"""
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from typer.testing import CliRunner

from factory.cli import app
from factory.difflm.device import DeviceError, resolve_device
from factory.generators import GeneratorError, load_generator


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device(no_cuda, monkeypatch):
    assert resolve_device("cpu") == resolve_device("auto") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"--device cuda: no CUDA device is available to torch "
                                          r"\(torch.cuda.is_available\(\) is False\); use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="must be one of cpu, cuda, auto, got 'tpu'"):
        resolve_device("tpu")
    assert issubclass(DeviceError, ValueError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "auto" picks it (nothing runs on it)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")


class _Undeviced(TorchFunctionMode):
    """Records tensor factories called from factory/difflm without an explicit device."""
    FACTORIES = {torch.full, torch.zeros, torch.ones, torch.arange, torch.rand, torch.randn, torch.randint,
                 torch.randperm, torch.tensor, torch.linspace, torch.empty}

    def __init__(self):
        super().__init__()
        self.calls = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            f = sys._getframe(1)
            while f is not None and "torch" in f.f_code.co_filename.replace("\\", "/").split("/"):
                f = f.f_back
            if f is not None and "difflm" in f.f_code.co_filename.replace("\\", "/").split("/"):
                self.calls.add((func.__name__, f.f_code.co_filename, f.f_lineno))
        return func(*args, **kwargs)


@pytest.mark.parametrize("opts", [{}, {"latent": "prior"}, {"constrained": False}])
def test_generation_on_cpu_is_the_default_and_makes_every_tensor_on_its_device(finance, no_cuda, opts):
    default = load_generator(finance, "difflm", batch_size=40, **opts)
    expected = default.generate(100, 1)
    for device in ("cpu", "auto"):
        g = load_generator(finance, "difflm", device=device, batch_size=40, **opts)
        assert g.settings["device"] == "cpu" and g.settings == default.settings
        with _Undeviced() as seen:
            assert g.generate(100, 1) == expected
        assert seen.calls == set(), sorted(seen.calls)
    assert default.settings["device"] == "cpu"
    tensors = [*g.dec.parameters(), *g.inj.parameters(), *g.den.parameters(), *g.stats.values(),
               g.tok.static_mask, g.tok.place]
    assert {t.device for t in tensors} == {torch.device("cpu")}


def test_load_generator_device_errors(finance, no_cuda):
    with pytest.raises(GeneratorError, match="--device cuda: no CUDA device is available to torch"):
        load_generator(finance, "difflm", device="cuda")
    with pytest.raises(GeneratorError, match="must be one of cpu, cuda, auto"):
        load_generator(finance, "difflm", device="gpu")
    with pytest.raises(GeneratorError, match="the baseline runs on CPU only"):
        load_generator(finance, "baseline", device="cuda")
    with pytest.raises(GeneratorError, match="must be one of cpu, cuda, auto"):
        load_generator(finance, "baseline", device="gpu")
    assert load_generator(finance, "baseline", device="auto").model_id == "baseline"


@pytest.mark.parametrize("device, fragment", [("cuda", "--device cuda: no CUDA device is available to torch"),
                                              ("tpu", "--device must be one of cpu, cuda, auto, got 'tpu'")])
def test_cli_train_device_error_is_one_line_exit_2(tmp_path, no_cuda, device, fragment):
    db = tmp_path / "t.duckdb"
    r = CliRunner().invoke(app, ["train", "--domain", "finance", "--device", device, "--out", str(tmp_path / "m"),
                                 "--db", str(db), "--quiet"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.output
    assert "Traceback" not in r.output
    assert not db.exists() and not (tmp_path / "m").exists()  # refused before anything was recorded or written


def test_train_config_device_defaults_to_cpu_and_is_checked_first(finance, no_cuda, tmp_path):
    from factory.difflm.train import TrainConfig, Trainer

    assert TrainConfig().device == TrainConfig.from_dict(finance.config.get("train", {})).device == "cpu"
    assert TrainConfig.from_dict({"device": "auto"}).device == "auto"
    with pytest.raises(DeviceError, match="--device cuda: no CUDA device"):
        Trainer(finance, TrainConfig(device="cuda"), tmp_path / "m")
    assert not (tmp_path / "m").exists()
