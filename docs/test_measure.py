"""Tests of docs/measure.py, in the order of its functions. Run: python -m pytest -q (from the top)."""

import json
import math
import os
import shutil

import pytest
import torch

import ddpm_mnist as dm
from test_ddpm_mnist import flags, interrupt, mnist_dir, seeded, trained  # noqa: F401 (fixtures)

import importlib.util
spec = importlib.util.spec_from_file_location("measure", os.path.join(os.path.dirname(__file__),
                                                                      "measure.py"))
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)


@pytest.fixture
def run2(trained, tmp_path):
    shutil.copytree(trained[2], tmp_path / "run")
    return tmp_path / "run"


def test_get_classifier_interrupted_while_it_trains_is_one_line(flags, run2, monkeypatch):
    monkeypatch.setattr(measure, "step", interrupt)
    with pytest.raises(SystemExit) as e:
        measure.main(flags(run2, "--eval", "1", "--gammas", "5", part=2))
    assert e.value.code == f"interrupted; {run2 / 'part2.pt'} holds epoch 1 of 1: --resume continues"
    assert not os.path.exists(run2 / "classifier.pt")


def test_frechet_distance_closed_forms():
    f = torch.randn(500, 6, dtype=torch.float64)
    f, m = f - f.mean(0), torch.arange(6.0, dtype=torch.float64)
    assert abs(measure.frechet_distance(f, f)) < 1e-6
    assert abs(measure.frechet_distance(f, f + m) - (m ** 2).sum().item()) < 1e-6  # ||mu1 - mu2||^2
    assert abs(measure.frechet_distance(f, 2 * f) - torch.cov(f.T).trace().item()) < 1e-6
    assert math.isnan(measure.frechet_distance(torch.full((10, 6), math.nan), f))  # no crash


class MPSFeatures:
    """Features on a Mac's GPU, which has no float64: .double() there raises."""
    def __init__(self, f):
        self.f = f

    def double(self):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    def cpu(self):
        return self.f


def test_frechet_distance_of_features_on_a_macs_gpu():
    f = torch.randn(50, 3)
    assert measure.frechet_distance(MPSFeatures(f), MPSFeatures(f)) == pytest.approx(0, abs=1e-6)


def test_evaluate_part2_writes_a_table_and_json(flags, run2, capsys):
    report = measure.main(flags(run2, "--eval", "2", "--gammas", "0", "5", part=2))
    assert json.load(open(run2 / "part2_eval.json")) == json.loads(json.dumps(report))
    assert list(report["rows"]) == ["real", "gamma=0", "gamma=5"] and report["n_per_digit"] == 2
    for r in report["rows"].values():
        assert 0 <= r["accuracy"] <= 1 and r["frechet"] >= -1e-6 and len(r["per_digit"]) == 10
    out = capsys.readouterr().out
    assert "training one" in out and "test accuracy" in out and "gamma=5" in out
    (run2 / "classifier.pt").write_bytes(b"broken")  # a damaged judge is trained anew
    measure.main(flags(run2, "--eval", "1", "--gammas", "5", part=2))
    assert "training one" in capsys.readouterr().out


def test_evaluate_part2_counts_non_finite_samples(flags, run2, monkeypatch, capsys):
    real = dm.DDPM.sample

    def half_nan(self, net, c, gamma):
        x, caches = real(self, net, c, gamma)
        x[::2] = math.nan  # every other sample, digit 0 among them
        x[1, 0, 0, 0] = math.inf  # one pixel of a digit-1 sample
        return x, caches

    monkeypatch.setattr(dm.DDPM, "sample", half_nan)
    row = measure.main(flags(run2, "--eval", "2", "--gammas", "5", part=2))["rows"]["gamma=5"]
    assert row["not_finite"] == 11 and row["frechet"] is None and row["per_digit"][0] == 0
    assert "|     n/a |" in capsys.readouterr().out


def test_evaluate_part1_psnr_per_sigma(flags, trained, capsys):
    report = measure.main(flags(trained[1], "--eval"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test MSE")]
    assert [line.split()[4][:-1] for line in lines] == [f"{s:g}" for s in dm.SIGMAS]
    rows = report["rows"]
    assert rows["sigma=0"]["noisy_input"] == 0 and abs(rows["sigma=0.5"]["noisy_input"] - 0.25) < 0.02
    assert rows["sigma=0.5"]["psnr"] == pytest.approx(-10 * math.log10(rows["sigma=0.5"]["denoised"]))


def test_benchmark_prints_speed_flops_and_the_projected_run(capsys):
    out = measure.main(["--part", "2", "--benchmark", "--hidden", "4", "--batch-size", "8",
                        "--num-ts", "5", "--device", "cpu", "--limit", "100", "--epochs", "3",
                        "--precision", "fp32"])
    assert list(out) == ["train_img_per_s", "achieved_tflop_per_s", "projected_3_epoch_s"]
    assert out["projected_3_epoch_s"] == pytest.approx(3 * 13 * 8 / out["train_img_per_s"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("benchmark: part 2, D=4, batch 8, fp32 on cpu")


def test_main_wants_one_task_and_checks_its_out_dir_first(flags, run2, capsys):
    for argv in ([], ["--eval", "--benchmark"], ["--eval", "--no-such-flag"]):
        with pytest.raises(SystemExit) as e:
            measure.main(argv)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("docs/measure.py: error:") == 3
    (run2 / "measure.probe.tmp").mkdir()  # a folder where its probe goes: nothing is written
    with pytest.raises(SystemExit, match="Is a directory"):
        measure.main(flags(run2, "--eval", "1", part=2))
    assert not os.path.exists(run2 / "classifier.pt")
