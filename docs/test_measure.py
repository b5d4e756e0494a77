"""Tests of docs/measure.py, in the order of its functions. Run: python -m pytest -q (at the
top of the repository)."""

import importlib.util
import json
import math
import os
import shutil
import types

import pytest
import torch

import ddpm_mnist as dm
from test_ddpm_mnist import flags, interrupt, mnist_dir, seeded, trained  # noqa: F401 (fixtures)

spec = importlib.util.spec_from_file_location("measure", os.path.join(os.path.dirname(__file__),
                                                                      "measure.py"))
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)


@pytest.fixture
def run2(trained, tmp_path):
    return shutil.copytree(trained[2], tmp_path / "run")


def test_get_classifier_interrupted_while_it_trains_is_one_line(flags, run2, monkeypatch):
    monkeypatch.setattr(measure, "step", interrupt)
    with pytest.raises(SystemExit) as e:
        measure.main(flags(run2, "--eval", "1", "--gammas", "5", part=2))
    assert e.value.code == (f"interrupted; {run2 / 'part2.pt'} holds epoch 1 of 1: --resume "
                            "continues")
    assert not os.path.exists(run2 / "classifier.pt")


def test_frechet_distance_closed_forms_on_any_device():
    f = torch.randn(500, 6, dtype=torch.float64)
    f, m = f - f.mean(0), torch.arange(6.0, dtype=torch.float64)
    mac = types.SimpleNamespace(cpu=lambda: f, double=None)  # a Mac's GPU has no float64
    assert abs(measure.frechet_distance(mac, mac)) < 1e-6
    assert abs(measure.frechet_distance(f, f + m) - (m ** 2).sum().item()) < 1e-6  # ||mu1 - mu2||^2
    assert abs(measure.frechet_distance(f, 2 * f) - torch.cov(f.T).trace().item()) < 1e-6
    assert math.isnan(measure.frechet_distance(torch.full((10, 6), math.nan), f))  # no crash


def test_evaluate_part2_writes_a_table_and_json_and_counts_non_finite_samples(flags, run2,
                                                                               monkeypatch, capsys):
    report = measure.main(flags(run2, "--eval", "2", "--gammas", "0", "5", part=2))
    assert json.load(open(run2 / "part2_eval.json")) == json.loads(json.dumps(report))
    assert [r["frechet"] >= -1e-6 for r in report["rows"].values()] == [True] * 3  # real, 0, 5
    real = dm.DDPM.sample

    def half_nan(self, net, c, gamma):
        x, caches = real(self, net, c, gamma)
        x[::2] = math.nan  # every other sample, digit 0 among them
        x[1, 0, 0, 0] = math.inf  # one pixel of a digit-1 sample
        return x, caches

    monkeypatch.setattr(dm.DDPM, "sample", half_nan)
    (run2 / "classifier.pt").write_bytes(b"broken")  # a damaged judge is trained anew
    row = measure.main(flags(run2, "--eval", "2", "--gammas", "5", part=2))["rows"]["gamma=5"]
    assert row["not_finite"] == 11 and row["frechet"] is None and row["per_digit"][0] == 0
    assert capsys.readouterr().out.count("training one") == 2 and row["accuracy"] < 0.5


def test_evaluate_part1_and_benchmark(flags, trained, capsys):
    rows = measure.main(flags(trained[1], "--eval"))["rows"]
    assert list(rows) == [f"sigma={s:g}" for s in dm.SIGMAS] and rows["sigma=0"]["noisy_input"] == 0
    assert rows["sigma=0.5"]["psnr"] == pytest.approx(
        -10 * math.log10(rows["sigma=0.5"]["denoised"]))
    out = measure.main("--part 2 --benchmark --hidden 4 --batch-size 8 --num-ts 5 --device cpu "
                       "--limit 100 --epochs 3 --precision fp32".split())
    assert out["projected_3_epoch_s"] == pytest.approx(3 * 13 * 8 / out["train_img_per_s"])
    assert "benchmark: part 2, D=4, batch 8, fp32 on cpu" in capsys.readouterr().out


def test_main_wants_one_task_and_checks_its_out_dir_first(flags, run2, capsys):
    for argv in ([], ["--eval", "--benchmark"], ["--eval", "--no-such-flag"]):
        with pytest.raises(SystemExit) as e:
            measure.main(argv)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("docs/measure.py: error:") == 3
    os.mkdir(run2 / "measure.probe.tmp")  # a folder where its probe goes: nothing is written
    with pytest.raises(SystemExit, match="Is a directory"):
        measure.main(flags(run2, "--eval", "1", part=2))
    assert not os.path.exists(run2 / "classifier.pt")
