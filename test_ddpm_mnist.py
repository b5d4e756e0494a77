"""Tests of ddpm_mnist.py, in the order of its sections. Run: python -m pytest -q (CPU, no network).

Fixtures build what many tests share: small MNIST-format files, a small UNet, the schedule, and a
tiny trained run of each part, trained once and copied where a test changes it.
"""

import argparse
import ast
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

import ddpm_mnist as dm

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)  # steady on a busy machine; subprocesses get one thread too
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def write_idx(path, data):
    """A uint8 tensor in MNIST's idx format (magic 0x08 + dimensions, big-endian sizes)."""
    head = bytes([0, 0, 8, data.dim()]) + b"".join(n.to_bytes(4, "big") for n in data.shape)
    path.write_bytes(head + bytes(data.flatten().tolist()))


def write_mnist(root, train=64, test=20, labels=None):
    """MNIST's four files under root/MNIST/raw: class k lights a bar at row 2 + 2k over faint noise."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", train), ("t10k", test)):
        y = torch.arange(n) % 10
        x = (torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(n)) * 40).byte()
        for i, k in enumerate(y.tolist()):
            x[i, 2 + 2 * k:4 + 2 * k, 4:24] = 255
        write_idx(raw / f"{split}-images-idx3-ubyte", x)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y[:labels].byte())
    return str(root)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def flags(mnist_dir):
    """A tiny run's flags in fp32 (auto picks bf16 where a CPU has it): Part 1, or Part 2 with
    5 diffusion steps and one step an epoch."""
    def make(out, *extra, part=1):
        base = ["--hidden", "8", "--batch-size", "32", "--limit", "32", "--data-dir", mnist_dir,
                "--out-dir", str(out), "--device", "cpu", "--precision", "fp32"]
        return base + (["--part", "2", "--num-ts", "5"] if part == 2 else []) + list(extra)
    return make


def exits(argv):
    """main(argv)'s one line, from the SystemExit it raises."""
    with pytest.raises(SystemExit) as e:
        dm.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def load(path):
    return torch.load(path, weights_only=True)


def same_run(a, b):
    """Two checkpoints with equal weights, buffers, losses and optimizer state."""
    a, b = load(a), load(b)
    assert a["epoch"] == b["epoch"] and a["losses"] == b["losses"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    return all(torch.equal(u["exp_avg"], v["exp_avg"]) for u, v in
               zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, flags):
    """One tiny run of each part, 1 epoch, trained once: {1: folder, 2: folder}."""
    runs = {}
    for part in (1, 2):
        runs[part] = tmp_path_factory.mktemp(f"part{part}")
        dm.main(flags(runs[part], "--epochs", "1", part=part))
    return runs


@pytest.fixture
def copied(trained, tmp_path):
    """A copy of a trained run to change: copied(part) -> its folder."""
    def copy(part):
        shutil.copytree(trained[part], tmp_path / f"run{part}")
        return tmp_path / f"run{part}"
    return copy


@pytest.fixture
def unet():
    return dm.ConditionalUNet(1, 10, 4).eval()


@pytest.fixture
def schedule():
    return dm.ddpm_schedule(1e-4, 0.02, 20)


# --------------------------------------------------------------------------- Part 1: the UNet
@pytest.mark.parametrize("op, cin, hw, cout, hw_out", [
    ("Conv", 3, 28, 5, 28), ("DownConv", 3, 28, 5, 14), ("UpConv", 3, 14, 5, 28),
    ("ConvBlock", 3, 14, 5, 14), ("DownBlock", 3, 14, 5, 7), ("UpBlock", 3, 7, 5, 14)])
def test_ops_shapes(op, cin, hw, cout, hw_out):
    assert getattr(dm, op)(cin, cout)(torch.randn(2, cin, hw, hw)).shape == (2, cout, hw_out, hw_out)
    assert dm.Flatten()(torch.randn(2, 6, 7, 7)).shape == (2, 6, 1, 1)
    assert dm.Unflatten(6)(torch.randn(2, 6, 1, 1)).shape == (2, 6, 7, 7)


def test_ops_are_the_specs_layers():
    conv, up = dm.Conv(3, 5), dm.UpConv(3, 5)
    assert [type(m) for m in conv] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.GELU]
    assert (conv[0].kernel_size, conv[0].stride, conv[0].padding) == ((3, 3), (1, 1), (1, 1))
    assert (up[0].kernel_size, up[0].stride, up[0].padding) == ((4, 4), (2, 2), (1, 1))
    assert dm.DownConv(3, 5)[0].stride == (2, 2)


def test_unconditional_unet_shape():
    assert dm.UnconditionalUNet(1, 4)(torch.randn(3, 1, 28, 28)).shape == (3, 1, 28, 28)


def test_denoise_loss_is_mse_to_the_clean_image():
    x, seen = torch.rand(4, 1, 28, 28), []
    torch.manual_seed(1)
    loss = dm.denoise_loss(lambda z: seen.append(z) or torch.zeros_like(z), x, 0.5)
    torch.manual_seed(1)
    torch.testing.assert_close(seen[0], x + 0.5 * torch.randn_like(x))  # z = x + sigma eps
    assert loss.item() == pytest.approx((x ** 2).mean().item())


# --------------------------------------------------------------------------- Part 2: DDPM and CFG
def test_fcblock_shape():
    assert dm.FCBlock(10, 12)(torch.randn(4, 10)).shape == (4, 12)


def test_conditional_unet_mask_convention(unet):
    x, t, c = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 7])
    with torch.no_grad():
        dropped = unet(x, c, t, torch.zeros(2))
        zero = torch.zeros(2, 10)
        fcs = [unet.fc1_c(zero), unet.fc1_t(t[:, None]), unet.fc2_c(zero), unet.fc2_t(t[:, None])]
        expected = dm.UnconditionalUNet.forward(unet, x, *[v[:, :, None, None] for v in fcs])
        torch.testing.assert_close(dropped, expected)  # mask 0: the zero class vector
        torch.testing.assert_close(unet(x, c, t), unet(x, c, t, torch.ones(2)))  # None keeps all
        assert not torch.allclose(unet(x, c, t), dropped)
        mixed = unet(x, c, t, torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(mixed, torch.stack([unet(x, c, t)[0], dropped[1]]))


def test_conditional_unet_is_u0_c1_times_u0_plus_t1(unet):
    """With c1 = c2 = 1 and t1 = t2 = 0, the conditioning changes nothing."""
    x, one, zero = torch.randn(2, 1, 28, 28), torch.ones(2, 8, 1, 1), torch.zeros(2, 8, 1, 1)
    with torch.no_grad():
        same = dm.UnconditionalUNet.forward(unet, x, one, zero, one[:, :4], zero[:, :4])
        torch.testing.assert_close(same, dm.UnconditionalUNet.forward(unet, x))
        shifted = dm.UnconditionalUNet.forward(unet, x, one, zero + 1, one[:, :4], zero[:, :4])
        assert not torch.allclose(shifted, same)


def test_ddpm_schedule_closed_forms():
    s = dm.ddpm_schedule(1e-4, 0.02, 300)
    assert all(v.shape == (300,) for v in s.values())
    assert s["betas"][[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    torch.testing.assert_close(s["alphas"], 1 - s["betas"])
    torch.testing.assert_close(s["alpha_bars"][9], torch.prod(1 - s["betas"][:10]))
    abar, t = s["alpha_bars"], 150  # index t - 1 holds timestep t
    assert torch.all(abar[1:] < abar[:-1]) and torch.all((abar > 0) & (abar < 1))
    expect = (1 - abar[t - 2]) / (1 - abar[t - 1]) * s["betas"][t - 1]
    torch.testing.assert_close(s["beta_tildes"][t - 1], expect)
    assert s["beta_tildes"][0].item() == 0.0 and torch.all(s["beta_tildes"] <= s["betas"])
    with pytest.raises(AssertionError):
        dm.ddpm_schedule(0.02, 1e-4, 300)


def recorder(seen):
    """A stand-in UNet that records (x, t, mask) and predicts zeros."""
    return lambda x, c, t, mask: seen.append((x, t, mask)) or torch.zeros_like(x)


def test_ddpm_forward_is_eq4_and_algorithm_1(schedule):
    x_0, c, seen = torch.rand(6, 1, 28, 28), torch.arange(6), []
    torch.manual_seed(3)
    loss = dm.ddpm_forward(recorder(seen), schedule, x_0, c, 0.0, 20)
    torch.manual_seed(3)  # the same draws in the same order: t, eps
    t, eps = torch.randint(1, 21, (6,)), torch.randn_like(x_0)
    x_t, t_in, mask = seen[0]
    abar = schedule["alpha_bars"][t - 1].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x_0 + (1 - abar).sqrt() * eps)
    torch.testing.assert_close(t_in, t / 20)  # the UNet sees t / T
    assert loss.item() == pytest.approx((eps ** 2).mean().item()) and mask.eq(1).all()


def test_ddpm_forward_draws_t_in_1_to_T_and_drops_the_class_at_p_uncond(schedule):
    seen = []
    dm.ddpm_forward(recorder(seen), schedule, torch.zeros(20000, 1, 1, 1),
                    torch.zeros(20000, dtype=torch.long), 0.1, 20)
    _, t_in, mask = seen[0]
    assert set((t_in * 20).round().long().tolist()) == set(range(1, 21))  # both ends, no other
    assert set(mask.tolist()) == {0.0, 1.0} and abs(1 - mask.mean().item() - 0.1) < 0.01


def test_guided_eps_extremes_in_one_batched_call(unet):
    x, c, tt = torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 8]), torch.full((3,), 0.5)
    with torch.no_grad():
        eps_c, eps_u = unet(x, c, tt, torch.ones(3)), unet(x, c, tt, torch.zeros(3))
        for gamma, expect in ((0.0, eps_u), (1.0, eps_c), (5.0, eps_u + 5 * (eps_c - eps_u))):
            torch.testing.assert_close(dm.guided_eps(unet, x, c, 0.5, gamma), expect, atol=1e-4,
                                       rtol=1e-4)


def test_cached_is_the_specs_rule():
    kept = lambda T: [t for t in range(T, 0, -1) if dm.cached(t, T)]
    assert len(kept(300)) == 22 and kept(300)[:2] == [300, 280] and kept(300)[-8:-6] == [20, 7]
    assert kept(30) == [30, 20, 7, 6, 5, 4, 3, 2, 1] and kept(5) == [5, 4, 3, 2, 1]


def reference_sample(unet, c, s, T, gamma, seed):
    """Algorithm 2 written out, two UNet calls per step (mask 1, then mask 0)."""
    g = torch.Generator().manual_seed(seed)
    x, n = torch.randn((len(c), 1, 28, 28), generator=g), len(c)
    for t in range(T, 0, -1):
        g.manual_seed(seed + T - t + 1)
        z = torch.randn(x.shape, generator=g) if t > 1 else torch.zeros_like(x)
        tt = torch.full((n,), t / T)
        eps_c, eps_u = unet(x, c, tt, torch.ones(n)), unet(x, c, tt, torch.zeros(n))
        eps = eps_u + gamma * (eps_c - eps_u)
        a, abar, bt = s["alphas"][t - 1], s["alpha_bars"][t - 1], s["beta_tildes"][t - 1]
        x = 1 / a.sqrt() * (x - (1 - a) / (1 - abar).sqrt() * eps) + bt.sqrt() * z
    return x


@torch.no_grad()
def test_ddpm_sample_is_algorithm_2(unet, schedule):
    c = torch.tensor([1, 2, 3])
    for gamma in (0.0, 1.0, 5.0):
        x, _ = dm.ddpm_sample(unet, c, (28, 28), schedule, 20, gamma, seed=3)
        torch.testing.assert_close(x, reference_sample(unet, c, schedule, 20, gamma, 3), atol=1e-4,
                                   rtol=1e-4)


def test_ddpm_sample_seeds_caches_and_mode(schedule):
    net, c = dm.ConditionalUNet(1, 10, 4), torch.tensor([0, 1])
    x1, caches = dm.ddpm_sample(net, c, (28, 28), schedule, 20, 5.0, seed=7)
    assert torch.equal(x1, dm.ddpm_sample(net, c, (28, 28), schedule, 20, 5.0, seed=7)[0])
    assert not torch.allclose(x1, dm.ddpm_sample(net, c, (28, 28), schedule, 20, 5.0, seed=8)[0])
    assert net.training and len(caches) == 8  # 20, 7, ..., 1; the mode it found restored
    x_T = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(caches[0], x_T)
    x, _ = dm.ddpm_sample(net, c, (28, 28), schedule, 20, seed=2 ** 32 - 1)  # the largest seed
    assert x.isfinite().all()


def test_ddpm_sample_stopped_by_an_error_restores_the_mode(schedule, monkeypatch):
    net = dm.ConditionalUNet(1, 10, 4)
    monkeypatch.setattr(dm, "guided_eps", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dm.ddpm_sample(net, torch.tensor([1]), (28, 28), schedule, 20)
    assert net.training


class Oracle(torch.nn.Module):
    """The perfect eps for one known x_0: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    def __init__(self, x_0, schedule, num_ts):
        super().__init__()
        self.x_0, self.abars, self.num_ts = x_0, schedule["alpha_bars"], num_ts

    def forward(self, x, c, t, mask=None):
        abar = self.abars[(t * self.num_ts).round().long() - 1].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * self.x_0.repeat(2, 1, 1, 1)) / (1 - abar).sqrt()


def test_ddpm_and_strided_samplers_recover_x0_with_a_perfect_model(schedule):
    x_0, c = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    x, _ = dm.ddpm_sample(Oracle(x_0, schedule, 20), c, (28, 28), schedule, 20, 5.0, seed=1)
    torch.testing.assert_close(x, x_0, atol=1e-4, rtol=1e-4)  # the last step lands on x_0
    for steps in (1, 4, 5, 20):  # K divides T
        x, caches = dm.strided_sample(Oracle(x_0, schedule, 20), c, (28, 28), schedule, 20, 5.0,
                                      seed=1, steps=steps)
        torch.testing.assert_close(x, x_0, atol=1e-4, rtol=1e-4)
        assert len(caches) == sum(dm.cached(k, steps) for k in range(1, steps + 1))


# --------------------------------------------------------------------------- beyond the spec
def test_strided_sample_is_algorithm_2_on_every_kth_step(unet, schedule, capsys):
    seen = []
    net = recorder(seen)
    net.training, net.eval, net.train = False, lambda: None, lambda mode: None
    dm.strided_sample(net, torch.tensor([1]), (28, 28), schedule, 20, 1.0, seed=0, steps=4)
    assert [round(t[0].item() * 20) for _, t, _ in seen] == [20, 15, 10, 5]  # t_k / T, as trained
    args = dm.settle(dm.get_args(["--part", "2", "--num-ts", "20", "--sample-steps", "7",
                                  "--device", "cpu"]))
    with pytest.raises(SystemExit) as e:
        dm.build(args)
    assert e.value.code == 2 and "--sample-steps: 7 does not divide T" in capsys.readouterr().err
    c = torch.tensor([2, 9])
    full, _ = dm.ddpm_sample(unet, c, (28, 28), schedule, 20, 5.0, seed=4)
    x, _ = dm.strided_sample(unet, c, (28, 28), schedule, 20, 5.0, seed=4, steps=20)
    torch.testing.assert_close(x, full, atol=1e-4, rtol=1e-4)  # K = T: Algorithm 2 again


def test_flow_forward_is_its_formula_with_the_same_draws():
    x_1, c, seen = torch.rand(6, 1, 28, 28), torch.arange(6), []
    torch.manual_seed(5)
    loss = dm.flow_forward(recorder(seen), x_1, c, 0.0)
    torch.manual_seed(5)  # the same draws in the same order: t, x_0, the class mask
    t, x_0 = torch.rand(6, 1, 1, 1), torch.randn_like(x_1)
    x_t, t_in, mask = seen[0]
    torch.testing.assert_close(x_t, (1 - t) * x_0 + t * x_1)  # the straight path
    torch.testing.assert_close(t_in, t.flatten())
    assert loss.item() == pytest.approx(((x_1 - x_0) ** 2).mean().item()) and mask.eq(1).all()


class Velocity(torch.nn.Module):
    """The perfect velocity towards one known x_1 on straight paths: (x_1 - x_t) / (1 - t)."""
    def __init__(self, x_1):
        super().__init__()
        self.x_1 = x_1

    def forward(self, x, c, t, mask=None):
        return (self.x_1.repeat(2, 1, 1, 1) - x) / (1 - t).view(-1, 1, 1, 1)


def test_flow_sample_recovers_the_data_with_a_perfect_velocity():
    x_1, c = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
    x_0 = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(2))
    for steps in (1, 5, 50):
        x, caches = dm.flow_sample(Velocity(x_1), c, (28, 28), steps, 3.0, seed=2)
        torch.testing.assert_close(x, x_1, atol=1e-5, rtol=1e-5)  # Euler lands on x_1
        assert len(caches) == sum(dm.cached(k, steps) for k in range(1, steps + 1))
        assert torch.equal(caches[0], x_0)


# --------------------------------------------------------------------------- methods
class VPrediction(dm.DDPM):
    """A third method, here alone: v = sqrt(abar) eps - sqrt(1 - abar) x_0 (arXiv 2202.00512)."""
    defaults = dict(dm.DDPM.defaults, guidance_scale=2.0)

    def loss(self, net, x, c):
        t = torch.randint(1, self.args.num_ts + 1, (len(c),))
        abar = self.schedule["alpha_bars"][t - 1].view(-1, 1, 1, 1)
        eps = torch.randn_like(x)
        v = net(abar.sqrt() * x + (1 - abar).sqrt() * eps, c, t / self.args.num_ts)
        return torch.nn.functional.mse_loss(v, abar.sqrt() * eps - (1 - abar).sqrt() * x)

    def sample(self, net, c, gamma):
        eps = EpsOfV(net, self.schedule["alpha_bars"], self.args.num_ts)
        return dm.ddpm_sample(eps, c, (28, 28), self.schedule, self.args.num_ts, gamma,
                              self.args.seed)


class EpsOfV(torch.nn.Module):
    """eps = sqrt(abar) v + sqrt(1 - abar) x_t, for the spec's sampler."""
    def __init__(self, net, abars, num_ts):
        super().__init__()
        self.net, self.abars, self.num_ts = net, abars, num_ts

    def forward(self, x, c, t, mask=None):
        abar = self.abars[(t * self.num_ts).round().long() - 1].view(-1, 1, 1, 1)
        return abar.sqrt() * self.net(x, c, t, mask) + (1 - abar).sqrt() * x


def test_a_third_method_is_a_class_and_a_line(flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dm.METHODS, "v", VPrediction)  # the one line
    with pytest.raises(SystemExit):
        dm.get_args(["--help"])
    assert "{ddpm,flow,v}" in capsys.readouterr().out
    assert len(dm.main(flags(tmp_path, "--method", "v", "--epochs", "1", part=2))) == 4
    dm.main(flags(tmp_path, "--resume", "--epochs", "2", part=2))
    ckpt = load(tmp_path / "part2.pt")
    assert (ckpt["epoch"], ckpt["args"]["method"], ckpt["args"]["guidance_scale"]) == (2, "v", 2.0)
    assert dm.main(flags(tmp_path, "--sample-only", "--digits", "42", part=2))[0].endswith("42.png")


def test_the_unet_is_swapped_in_one_assignment(flags, tmp_path, monkeypatch):
    class Wider(dm.ConditionalUNet):
        def __init__(self, in_channels, num_classes, num_hiddens):
            super().__init__(in_channels, num_classes, 2 * num_hiddens)

    monkeypatch.setattr(dm, "ConditionalUNet", Wider)
    dm.main(flags(tmp_path, "--epochs", "1", part=2))
    assert load(tmp_path / "part2.pt")["model"]["head.weight"].shape == (1, 16, 3, 3)


def test_method_defaults_settle_by_part_and_method():
    settled = lambda *argv: vars(dm.settle(dm.get_args(["--device", "cpu", *argv])))
    a1, a2 = settled(), settled("--part", "2")
    assert [a1[k] for k in ("epochs", "batch_size", "lr", "hidden", "sigma")] == [5, 256, 1e-4, 128,
                                                                                 0.5]
    assert [a2[k] for k in ("epochs", "batch_size", "lr", "lr_decay", "num_ts", "p_uncond")] == [
        20, 128, 1e-3, 0.1, 300, 0.1]
    assert (a2["method"], a2["guidance_scale"], a2["sample_steps"], a2["seed"]) == ("ddpm", 5, None, 0)
    flow = settled("--part", "2", "--method", "flow", "--guidance-scale", "0")
    assert (flow["guidance_scale"], flow["sample_steps"]) == (0, 50)  # given, else flow's own
    assert a1["precision"] in ("fp32", "bf16") and dm.get_args(None).part == 1


# --------------------------------------------------------------------------- training
def test_load_mnist_reads_torchvision_files(mnist_dir):
    x, y = dm.load_mnist(mnist_dir, True, "cpu", limit=40)
    assert x.shape == (40, 1, 28, 28) and y.tolist()[:3] == [0, 1, 2] and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() == 1 and x[3, 0, 8, 4:24].min() == 1  # class 3 lights row 8


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "labels as images", "label 12",
                                    "fewer labels"])
def test_load_mnist_refuses_a_damaged_file_in_one_line(damage, tmp_path):
    root = write_mnist(tmp_path, labels=20 if damage == "fewer labels" else None)
    images, labels = (tmp_path / "MNIST" / "raw" / f"train-{k}-idx{n}-ubyte"
                      for k, n in (("images", 3), ("labels", 1)))
    new = {"truncated": images.read_bytes()[:1000], "empty": b"", "random": bytes(range(256)) * 40,
           "labels as images": labels.read_bytes()}.get(damage)
    if damage == "label 12":
        labels.write_bytes(labels.read_bytes()[:-1] + bytes([12]))
    elif new is not None:
        images.write_bytes(new)
    with pytest.raises(SystemExit) as e:
        dm.load_mnist(root, True, "cpu", limit=10)  # counts compared before --limit cuts them
    assert str(e.value).startswith(f"error: cannot load MNIST from {root}/MNIST/raw (")
    assert "a damaged file: delete it to download it again" in str(e.value)
    assert dm.load_mnist(root, False, "cpu")[0].shape == (20, 1, 28, 28)  # the test split is fine


def test_load_mnist_offline_says_what_to_do_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused
    with pytest.raises(SystemExit, match="offline, put train-images-idx3-ubyte.*--data-dir"):
        dm.load_mnist(str(tmp_path / "new" / "data"), True, "cpu")
    monkeypatch.setattr(torchvision.datasets, "MNIST", interrupt)  # Ctrl-C in a download
    with pytest.raises(KeyboardInterrupt):
        dm.load_mnist(str(tmp_path / "new"), True, "cpu")
    assert os.listdir(tmp_path) == []  # the folders a download made are gone again


def out_of_memory(*args, **kwargs):
    raise MemoryError


def test_load_mnist_lets_out_of_memory_through(mnist_dir, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "MNIST", out_of_memory)
    with pytest.raises(MemoryError):  # main's handler says out of memory, not a damaged file
        dm.load_mnist(mnist_dir, True, "cpu")


def test_settle_takes_a_runs_own_flags_from_its_checkpoint(capsys):
    saved = vars(dm.settle(dm.get_args(["--part", "2", "--hidden", "8", "--seed", "5",
                                        "--epochs", "3", "--device", "cpu"])))
    cli = dm.get_args(["--part", "2", "--resume", "--hidden", "99", "--device", "cpu"])
    args = dm.settle(cli, saved)
    assert (args.hidden, args.seed, args.epochs, args.resume) == (8, 5, 3, True)
    assert "the checkpoint has --hidden 8: using it, not 99" in capsys.readouterr().out
    assert cli.hidden == 99 and cli.epochs is None  # nothing rewrites what was parsed
    again = dm.settle(dm.get_args(["--part", "2", "--epochs", "9", "--guidance-scale", "1",
                                   "--device", "cpu"]), saved)
    assert (again.epochs, again.guidance_scale) == (9, 1)  # a command's own flags: given wins
    assert "has --" not in capsys.readouterr().out  # agreeing or not given: no word


def test_build_is_seeded_and_picks_the_layout_of_the_device(monkeypatch):
    args = dm.settle(dm.get_args(["--part", "2", "--hidden", "4", "--device", "cpu"]))
    a, b = dm.build(args), dm.build(args)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.model.head.weight.is_contiguous(memory_format=torch.channels_last)
    layouts = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: layouts.append(k) or self)
    part1 = dm.settle(dm.get_args(["--hidden", "4", "--device", "cpu", "--precision", "fp32"]))
    dm.build(argparse.Namespace(**{**vars(part1), "device": "mps"}))
    assert layouts == [{"memory_format": torch.contiguous_format}]  # MPS: BatchNorm's grads


def test_recalibrate_is_the_plain_mean_and_draws_no_random_numbers(monkeypatch):
    net, x, y = dm.ConditionalUNet(1, 10, 4), torch.rand(300, 1, 28, 28), torch.randint(0, 10, (300,))
    bn, means = net.down2[0][1], []
    bn.register_forward_hook(lambda m, inp, out: means.append(inp[0].mean((0, 2, 3))))
    method = argparse.Namespace(loss=lambda net, x, y: net(x, y, torch.rand(len(y))))
    params, rng = [p.clone() for p in net.parameters()], torch.get_rng_state()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # Kaggle's two GPUs: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.recalibrate(argparse.Namespace(model=net, method=method, autocast=torch.autocast(
            "cpu", enabled=False)), x, y, 64)
    assert len(means) == 5  # 300 / 64: every image once
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))  # not momentum 0.1's
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream unchanged
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))


def test_train_overfits_one_batch_and_prints_a_true_rate(flags, tmp_path, capsys):
    args = dm.settle(dm.get_args(flags(tmp_path, "--lr", "0.01", "--epochs", "40",
                                       "--batch-size", "1000")))
    x, y = dm.load_mnist(args.data_dir, True, "cpu", 16)
    losses = []
    for _ in dm.train(args, dm.build(args), x, y, 1, losses):
        pass
    assert losses[-1] < 0.5 * losses[0] and len(losses) == 40
    rates = [float(r) for r in re.findall(r"\| (\d+) img/s", capsys.readouterr().out)]
    assert rates and max(rates) < 1e5  # 16 images a step, not the batch size of 1000


def test_train_saves_the_rng_of_a_macs_gpu(flags, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    args = dm.settle(dm.get_args(flags(tmp_path, "--epochs", "1")))
    x, y = dm.load_mnist(args.data_dir, True, "cpu", 16)
    mps = argparse.Namespace(**{**vars(args), "device": "mps"})
    ckpt = next(dm.train(mps, dm.build(args), x, y, 1, []))
    assert ckpt["rng"]["mps"].tolist() == [7] and "cpu" in ckpt["rng"]


# --------------------------------------------------------------------------- pictures
def cells(k):
    """Pixels that k digits side by side take in a grid."""
    return (k * (28 + dm.PAD) + dm.PAD) * dm.SCALE


def test_grid_reports_non_finite_pixels_and_draws_them_grey(capsys):
    pixels = set(dm.grid(torch.full((3, 1, 28, 28), math.nan), 3, "nan").tobytes())
    assert "warning: 'nan' has pixels that are not finite" in capsys.readouterr().out
    assert 127 in pixels and 0 not in pixels  # grey, not black


@pytest.mark.parametrize("rows, title", [(["gamma=-1000000"], "t"), ((), "a title much wider "
                                                                         "than one digit")])
def test_grid_never_cuts_a_label(rows, title):
    img, width = dm.grid(torch.zeros(2, 1, 28, 28), 2, title, (), rows), ImageDraw.Draw(
        Image.new("L", (1, 1))).textlength
    assert img.width >= max([width(s) + 4 for s in rows], default=0) + cells(2)
    assert img.width >= width(title) + 4


@pytest.mark.parametrize("n", [1, 2, 1000])
def test_loss_plot_draws_a_line_across_the_box_with_a_scale(n, monkeypatch):
    losses = [1.0] * n if n < 3 else [1 / (1 + i) for i in range(n)]
    args = argparse.Namespace(part=2, hidden=4, lr=1e-3, batch_size=8)
    texts = []
    real = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: texts.append(
        text) or real(self, xy, text, *a, **k))
    img = dm.loss_plot(losses, args, max(1, n // 100))
    x0, y0, x1, y1 = dm.BOX
    dark = lambda x: any(img.getpixel((x, y)) < 100 for y in range(y0 + 2, y1 - 1))
    assert dark(x0 + 2) and dark(x1 - 2) and dark((x0 + x1) // 2)  # no step short of an edge
    lo, hi = (float(w) for w in re.search(r"from (\S+) \(bottom\) to (\S+) \(top\)",
                                          " ".join(texts)).groups())
    assert 0 < lo < hi and hi / lo > (1.25 if n < 3 else 20)  # a flat loss still has a scale


def test_save_writes_by_way_of_tmp_and_leaves_the_old_file_on_an_interrupt(tmp_path, monkeypatch):
    args = argparse.Namespace(out_dir=str(tmp_path))
    dm.save(args, {"a.pt": {"x": 1}})
    monkeypatch.setattr(dm.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dm.save(args, {"a.pt": {"x": 2}})
    monkeypatch.undo()
    assert torch.load(tmp_path / "a.pt") == {"x": 1} and os.listdir(tmp_path) == ["a.pt"]


def test_part1_pictures_of_a_run(trained):
    names = sorted(os.listdir(trained[1]))
    assert names == ["part1.pt", "part1_denoised_epoch01.png", "part1_loss.png",
                     "part1_noising.png", "part1_ood.png"]  # no lock, no .tmp
    noising = Image.open(trained[1] / "part1_noising.png")
    assert noising.width == cells(7) and noising.height > cells(4)  # 4 digits at 7 sigmas


def test_part2_pictures_of_a_run_show_the_digits_asked_for(trained):
    names = sorted(os.listdir(trained[2]))
    assert names == ["part2.pt", "part2_guidance.png", "part2_loss.png",
                     "part2_samples_epoch01.png", "part2_sampling.gif"]
    grid = Image.open(trained[2] / "part2_samples_epoch01.png")
    assert grid.width == cells(10) and grid.height > cells(4)  # a column per digit, 4 rows
    gif = Image.open(trained[2] / "part2_sampling.gif")
    assert gif.n_frames == 5 + 1  # x_5 ... x_1 by the spec's rule for T = 5, then the digits
    gif.seek(gif.n_frames - 1)
    assert gif.info["duration"] == 2500  # the digits held at the end


# --------------------------------------------------------------------------- command line
@pytest.mark.parametrize("device, capability, cpu_flags, method, auto", [
    ("cuda", (7, 5), "", "ddpm", "fp16"), ("cuda", (8, 0), "", "ddpm", "fp32"),  # T4; A100, H100
    ("cuda", (9, 0), "avx512_bf16", "flow", "fp32"), ("mps", None, "", "flow", "fp32"),
    ("cpu", None, "avx2 avx512_bf16", "flow", "bf16"), ("cpu", None, "amx_bf16", "flow", "bf16"),
    ("cpu", None, "avx2 avx512_bf16", "ddpm", "fp32"), ("cpu", None, "avx2", "flow", "fp32"),
    ("cpu", None, None, "flow", "fp32")])  # None: no /proc/cpuinfo
def test_default_precision_on_each_kind_of_machine(device, capability, cpu_flags, method, auto,
                                                   tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: capability)
    cpuinfo = tmp_path / "cpuinfo"
    if cpu_flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")
    monkeypatch.setattr(dm, "CPUINFO", str(cpuinfo))
    assert dm.default_precision(device, dm.METHODS[method]) == auto
    assert dm.default_precision(device, dm.Denoiser) == ("fp16" if auto == "fp16" else "fp32")
    with warnings.catch_warnings():  # the file read is closed: nothing for python -W error
        warnings.simplefilter("error")
        dm.default_precision("cpu", dm.Flow)


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--epochs", "1.5"], ["--sigma", "-1"], ["--sigma", "nan"], ["--part", "3"],
    ["--p-uncond", "1.5"], ["--lr", "nan"], ["--lr", "0"], ["--guidance-scale", "1e39"],
    ["--no-such-flag"], ["--method", "ema"], ["--precision", "tf32"], ["--device", "tpu"],
    ["--seed", "-1"], ["--seed", "4294967296"], ["--digits", "12a"], ["--digits", ""],
    ["--part", "2", "--digits", "٢٠٢٦"], ["--part", "2", "--digits", "1" * 41],
    ["--part", "1", "--digits", "7"]])
def test_get_args_refuses_a_bad_value_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        dm.get_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error: " in err


def test_get_args_parses_what_a_user_types(capsys, monkeypatch):
    assert dm.get_args(["--guidance-scale=-1e3"]).guidance_scale == -1000
    assert dm.get_args(["--seed", "4294967295"]).seed == 2 ** 32 - 1
    args = dm.get_args(["--out-dir", "~/ddpm", "--data-dir", "~/data", "--epochs", "3"])
    assert args.out_dir == os.path.expanduser("~/ddpm") and "~" not in args.data_dir
    assert (args.hidden, args.precision, args.seed) == (None, None, None)  # settle() fills them
    with pytest.raises(SystemExit):
        dm.get_args(["--epochs", "1.5"])
    assert "argument --epochs: '1.5' is not int in [1, inf]" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        dm.get_args(["--device", "cuda"])
    assert "invalid choice: 'cuda'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dm.get_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in out and "(default: 5; flow: 3)" in out and "{ddpm,flow}" in out


def test_fault_knows_a_fault_by_its_type_and_reads_the_checkpoint(trained):
    cli = argparse.Namespace(out_dir=str(trained[2]), part=2)
    where = f"{trained[2] / 'part2.pt'} holds epoch 1 of 1: "
    assert dm.fault(MemoryError(), cli) == (f"error: out of memory; {where}free some, then "
                                            "--resume continues; or start anew with a lower "
                                            "--batch-size or --hidden")
    assert dm.fault(OSError(28, "No space left on device"), cli).endswith("fix that, then --resume"
                                                                           " continues")
    assert dm.fault(KeyboardInterrupt(), cli) == f"interrupted; {where}--resume continues"
    line = dm.fault(FileExistsError(17, "File exists", "memory_notes"), cli)
    assert "out of memory" not in line  # a folder named for memory is not out of memory
    cli.out_dir = "nowhere"
    assert dm.fault(FloatingPointError("the loss diverged in epoch 1"), cli) == (
        "error: the loss diverged in epoch 1; no checkpoint saved: start anew with a lower --lr")


def test_one_line_faults_keeps_a_bugs_traceback_and_restores_the_signals():
    cli = argparse.Namespace(out_dir="nowhere", part=1)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="not enough memory"):  # no type says out of memory
        with dm.one_line_faults(cli):
            raise RuntimeError("not enough memory: a RuntimeError is a bug's too")
    with pytest.raises(SystemExit, match="^interrupted; no checkpoint saved: run again$"):
        with dm.one_line_faults(cli):
            os.kill(os.getpid(), signal.SIGTERM)  # what docker, Slurm and timeout send
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(SystemExit, match="^error: out of memory; no checkpoint saved"):
        with dm.one_line_faults(cli):
            raise torch.OutOfMemoryError("CUDA out of memory")


def hold_lock(path):
    """Another process holding a run's lock, as a run in progress does."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


@pytest.mark.skipif(os.name != "posix", reason="runs are locked where fcntl exists")
def test_locked_keeps_a_second_run_out_and_dies_with_its_process(flags, trained, tmp_path):
    holder = hold_lock(tmp_path / "part2.lock")
    try:
        line = exits(flags(tmp_path, "--epochs", "1", part=2))
        assert line.startswith(f"error: a run of Part 2 is writing into {tmp_path}: let it finish")
        assert os.listdir(tmp_path) == ["part2.lock"]
        dm.main(flags(tmp_path, "--epochs", "1"))  # Part 1 may
    finally:
        holder.kill()
        holder.wait()
    dm.main(flags(tmp_path, "--epochs", "1", part=2))  # the lock died with its process
    assert "part2.lock" not in os.listdir(tmp_path)


@pytest.mark.skipif(os.name != "posix", reason="runs are locked where fcntl exists")
def test_locked_refuses_the_lock_file_of_a_run_that_just_ended(flags, tmp_path, monkeypatch):
    """The race: a run opens the lock file, the run holding it removes it and ends, a third run
    makes a new one. The first must not go on holding the removed file's lock."""
    opened = open(tmp_path / "part1.lock", "ab", buffering=0)  # before the removal
    os.remove(tmp_path / "part1.lock")
    (tmp_path / "part1.lock").write_bytes(b"the third run's\n")
    monkeypatch.setattr(dm, "open", lambda *a, **k: opened, raising=False)
    assert "is writing into" in exits(flags(tmp_path, "--epochs", "1"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["part1.lock"]  # the third run's, kept


@pytest.mark.parametrize("where, why", [("taken", "File exists"), ("taken/below", "Not a directory"),
                                        ("", "No such file")])
def test_locked_refuses_an_unusable_out_dir_before_training(where, why, flags, tmp_path,
                                                            monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("not a folder")
    line = exits(flags(where))
    assert line.startswith("error: [Errno ") and why in line
    assert line.endswith("no checkpoint saved: fix that, then run again")
    assert (tmp_path / "taken").read_text() == "not a folder" and "| step" not in capsys.readouterr().out


def test_open_run_never_overwrites_nor_invents_a_run(flags, copied, tmp_path):
    run = copied(1)
    before = (run / "part1.pt").read_bytes()
    line = exits(flags(run, "--epochs", "1"))
    assert "part1.pt holds a run: --resume continues it" in line and "delete it" in line
    assert (run / "part1.pt").read_bytes() == before
    for flag in ("--resume", "--sample-only"):
        line = exits(flags(tmp_path / "typo", flag))
        assert line == f"error: no checkpoint at {tmp_path / 'typo' / 'part1.pt'}: check --part and --out-dir"
    assert not os.path.exists(tmp_path / "typo")


@pytest.mark.parametrize("ckpt", [b"not a checkpoint", "torn", "part1", "shapes", {"epoch": 1},
                                  [1, 2, 3], {"model": {}, "optimizer": {}, "epoch": 1,
                                              "args": {"part": 1}, "rng": {}, "losses": []}])
def test_open_run_refuses_a_foreign_checkpoint_in_one_line(ckpt, flags, copied, trained):
    run = copied(2)
    path = run / "part2.pt"
    whole = (trained[2] / "part2.pt").read_bytes()
    if ckpt == "torn":
        path.write_bytes(whole[:len(whole) // 2])
    elif ckpt == "part1":
        path.write_bytes((trained[1] / "part1.pt").read_bytes())
    elif ckpt == "shapes":
        c = load(path)
        c["model"] = {k: v[:1] if v.dim() else v for k, v in c["model"].items()}
        torch.save(c, path)
    elif isinstance(ckpt, bytes):
        path.write_bytes(ckpt)
    else:
        torch.save(ckpt, path)
    assert exits(flags(run, "--sample-only", part=2)).startswith(
        f"error: {path} is not a Part 2 checkpoint of this script (")


def test_open_run_says_out_of_memory_while_reading_a_good_checkpoint(flags, trained, monkeypatch):
    monkeypatch.setattr(dm.torch, "load", out_of_memory)
    line = exits(flags(trained[2], "--sample-only", part=2))
    assert line.startswith("error: out of memory; ") and "not a Part" not in line


def test_open_run_in_a_notebook_as_the_readme_says_then_main_again(flags, trained, tmp_path,
                                                                  monkeypatch):
    """The README's snippet for chosen digits, in the namespace of a pasted cell, then main()."""
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    ns = {"__name__": "__main__"}  # a pasted cell: no __file__, so nothing runs
    exec(open(os.path.join(HERE, "ddpm_mnist.py")).read(), ns)
    snippets = re.findall(r"```python\n(.*?)```", open(os.path.join(HERE, "README.md")).read(), re.S)
    assigned = {n.id for s in snippets for n in ast.walk(ast.parse(s)) if isinstance(n, ast.Name)
                and isinstance(n.ctx, ast.Store)}
    assert "run" in assigned and not assigned & {k for k, v in ns.items() if callable(v)}
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained[2], tmp_path / "out")  # the README's default --out-dir
    exec([s for s in snippets if "open_run(" in s][0], ns)
    assert ns["x_0"].shape == (16, 1, 28, 28) and os.path.exists("out/part2_digits_2026.png")
    assert ns["main"](flags(tmp_path / "again", "--epochs", "1"))  # main() still works
    with pytest.raises(SystemExit, match="no checkpoint at nowhere"):  # a wrong path: one line
        ns["open_run"](ns["get_args"](["--part", "2", "--sample-only", "--out-dir", "nowhere"]))


def test_main_takes_a_list_of_strings():
    for argv in (["--part", 2], "--part 2", ("--part", "2"), 0):
        assert exits(argv).startswith("error: main() takes a list of strings such as ['--part', ")


def test_main_run_as_percent_run_and_as_a_pasted_cell(flags, tmp_path, monkeypatch):
    shown = []
    display = types.SimpleNamespace(Image=lambda filename: filename, display=shown.append)
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(display=display))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    path = os.path.join(HERE, "ddpm_mnist.py")
    monkeypatch.setattr(sys, "argv", [path, *flags(tmp_path, "--epochs", "1")])  # %run FLAGS
    exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__", "__file__": path})
    assert load(tmp_path / "part1.pt")["epoch"] == 1 and len(shown) == 4  # the pictures, inline


def test_main_resumes_bit_for_bit_with_the_seed_of_the_run(flags, tmp_path):
    dm.main(flags(tmp_path / "full", "--epochs", "2", "--seed", "5", part=2))
    dm.main(flags(tmp_path / "split", "--epochs", "1", "--seed", "5", part=2))
    dm.main(flags(tmp_path / "split", "--epochs", "2", "--resume", part=2))  # no --seed given
    assert same_run(tmp_path / "full" / "part2.pt", tmp_path / "split" / "part2.pt")
    assert load(tmp_path / "split" / "part2.pt")["args"]["seed"] == 5


def test_main_resumes_a_checkpoint_from_another_device(flags, copied, monkeypatch, capsys):
    """A CPU checkpoint on a T4 (fused Adam, fp16 scaler) and a two-GPU one on one GPU."""
    run = copied(2)
    ckpt = load(run / "part2.pt")
    ckpt["rng"]["cuda"] = [torch.get_rng_state()[:16]] * 2  # Kaggle's two T4s
    torch.save(ckpt, run / "part2.pt")
    adam = torch.optim.Adam
    monkeypatch.setattr(dm.torch.optim, "Adam", lambda params, lr, fused: adam(params, lr=lr,
                                                                                 fused=True))
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dm.main(flags(run, "--resume", "--epochs", "2", "--precision", "fp16", part=2))
    assert [len(states) for states in restored] == [1]  # the one GPU here
    ckpt = load(run / "part2.pt")
    assert ckpt["epoch"] == 2 and ckpt["optimizer"]["param_groups"][0]["fused"] is True
    assert "trained in fp32" in capsys.readouterr().out


def test_main_restores_a_macs_rng(flags, copied, monkeypatch):
    run = copied(2)
    ckpt = load(run / "part2.pt")
    ckpt["rng"]["mps"] = torch.tensor([9], dtype=torch.uint8)
    torch.save(ckpt, run / "part2.pt")
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    dm.main(flags(run, "--sample-only", "--digits", "1", "--device", "cpu", part=2))
    assert [s.tolist() for s in restored] == [[9]]


def test_main_sample_only_and_digits_leave_the_run_as_it_was(flags, copied, tmp_path):
    run = copied(2)
    before = {f: (run / f).read_bytes() for f in os.listdir(run)}
    files = dm.main(flags(run, "--sample-only", "--digits", "2026", part=2))
    assert [os.path.basename(f) for f in files] == ["part2_digits_2026.png"]
    assert Image.open(files[0]).width == cells(4)  # a column per digit asked for
    assert {f: (run / f).read_bytes() for f in before} == before
    (tmp_path / "copy").mkdir()  # a copied checkpoint alone: no MNIST read
    shutil.copy(run / "part2.pt", tmp_path / "copy")
    dm.main(["--part", "2", "--sample-only", "--device", "cpu", "--out-dir", str(tmp_path / "copy"),
             "--data-dir", str(tmp_path / "no-data")])
    assert not os.path.exists(tmp_path / "no-data")
    assert (Image.open(run / "part2_loss.png").tobytes() ==
            Image.open(tmp_path / "copy" / "part2_loss.png").tobytes())  # same losses, same plot


def test_main_draws_pictures_lost_to_an_interrupt(flags, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 1's pictures: --resume draws them before training on; after the last
    epoch's, --resume and --sample-only draw the final ones."""
    real = dm.part2_pictures
    monkeypatch.setattr(dm, "part2_pictures", interrupt)
    assert exits(flags(tmp_path, "--epochs", "2", part=2)) == (
        f"interrupted; {tmp_path / 'part2.pt'} holds epoch 1 of 2: --resume continues")
    monkeypatch.setattr(dm, "part2_pictures", real)
    files = {os.path.basename(f) for f in dm.main(flags(tmp_path, "--resume", part=2))}
    assert {"part2_samples_epoch01.png", "part2_samples_epoch02.png"} <= files
    assert "the lr decaying over all" in capsys.readouterr().out
    (tmp_path / "part2_guidance.png").unlink()
    files = {os.path.basename(f) for f in dm.main(flags(tmp_path, "--resume", "--sample-only",
                                                         part=2))}
    assert "part2_guidance.png" in files and "decaying" not in capsys.readouterr().out


@pytest.mark.parametrize("where, calls, epoch", [
    ("load_mnist", 1, None), ("build", 1, None), ("recalibrate", 1, None), ("recalibrate", 2, 1),
    ("save", 3, 1)])
def test_main_interrupted_says_the_epoch_its_checkpoint_holds(where, calls, epoch, flags,
                                                              tmp_path, monkeypatch):
    real, seen = getattr(dm, where), []

    def nth(*args, **kwargs):
        seen.append(1)
        return interrupt() if len(seen) == calls else real(*args, **kwargs)

    monkeypatch.setattr(dm, where, nth)
    line = exits(flags(tmp_path / "new", "--epochs", "3"))
    if epoch is None:
        assert line == "interrupted; no checkpoint saved: run again"
        assert not os.path.exists(tmp_path / "new")  # a run that saved nothing leaves no folder
    else:
        assert line == f"interrupted; {tmp_path / 'new' / 'part1.pt'} holds epoch 1 of 3: " \
                       "--resume continues"
        assert [f for f in os.listdir(tmp_path / "new") if f.endswith((".tmp", ".lock"))] == []


def test_main_a_second_ctrl_c_while_the_checkpoint_is_read_is_one_line(flags, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(dm, "recalibrate", interrupt)
    monkeypatch.setattr(dm.torch, "load", interrupt)  # the handler's own read, interrupted too
    assert exits(flags(tmp_path, "--epochs", "1")) == "interrupted"


@pytest.mark.parametrize("blow_up", [math.nan, 1e6])
def test_main_stops_a_diverging_loss_and_keeps_the_last_good_epoch(blow_up, flags, tmp_path,
                                                                   monkeypatch):
    real, calls = dm.denoise_loss, []

    def diverge(unet, x, sigma):  # a step and a re-estimation pass an epoch: epoch 2 diverges
        calls.append(1)
        return real(unet, x, sigma) * (blow_up if len(calls) == 3 else 1)

    monkeypatch.setattr(dm, "denoise_loss", diverge)
    assert exits(flags(tmp_path, "--epochs", "3")) == (
        f"error: the loss diverged in epoch 2; {tmp_path / 'part1.pt'} holds epoch 1 of 3: start "
        "anew with a lower --lr")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a disk always full")
def test_main_on_a_full_disk_keeps_the_last_checkpoint(flags, copied):
    run = copied(2)
    before = (run / "part2.pt").read_bytes()
    os.symlink("/dev/full", run / "part2.pt.tmp")  # its writes fail with ENOSPC
    assert exits(flags(run, "--epochs", "2", "--resume", part=2)) == (
        f"error: [Errno 28] No space left on device; {run / 'part2.pt'} holds epoch 1 of 1: "
        "fix that, then --resume continues")
    assert (run / "part2.pt").read_bytes() == before and not os.path.lexists(run / "part2.pt.tmp")
    (run / "part2_sampling.gif").unlink()
    (run / "part2_sampling.gif").mkdir()  # a folder where a picture goes
    assert "Is a directory" in exits(flags(run, "--sample-only", part=2))


def test_main_an_fp16_run_resumes_bit_for_bit_and_samples_in_fp32(flags, tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "part2_pictures", lambda *args: {})  # emulated fp16 is slow here
    fp16 = ["--precision", "fp16", "--hidden", "4"]
    dm.main(flags(tmp_path / "full", "--epochs", "2", *fp16, part=2))
    dm.main(flags(tmp_path / "split", "--epochs", "1", *fp16, part=2))
    dm.main(flags(tmp_path / "split", "--epochs", "2", "--resume", *fp16, part=2))
    assert same_run(tmp_path / "full" / "part2.pt", tmp_path / "split" / "part2.pt")
    assert load(tmp_path / "full" / "part2.pt")["scaler"]["scale"] > 0
    monkeypatch.undo()
    dm.main(flags(tmp_path / "full", "--sample-only", "--digits", "3", part=2))  # fp32 samples


def test_main_trains_flow_resumes_and_samples(flags, tmp_path):
    flow = ["--method", "flow", "--sample-steps", "5"]
    dm.main(flags(tmp_path, "--epochs", "1", *flow, part=2))
    assert Image.open(tmp_path / "part2_sampling.gif").n_frames == 5 + 1  # every Euler step
    dm.main(flags(tmp_path, "--epochs", "2", "--resume", *flow, part=2))
    dm.main(flags(tmp_path / "full", "--epochs", "2", *flow, part=2))
    assert same_run(tmp_path / "part2.pt", tmp_path / "full" / "part2.pt")
    assert load(tmp_path / "part2.pt")["args"]["method"] == "flow"


def test_main_leaves_no_resource_warning_and_no_memory_cap(flags, tmp_path):
    if sys.platform == "linux":
        import resource
        before = resource.getrlimit(resource.RLIMIT_DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.main(flags(tmp_path, "--epochs", "1"))
    if sys.platform == "linux":
        assert resource.getrlimit(resource.RLIMIT_DATA) == before  # the kernel's as it was


def test_main_in_a_shell_two_runs_at_once_sigterm_and_a_bad_flag(flags, tmp_path):
    """Two processes into one new folder: one trains, the other is refused, the model is the
    first's. Beside them: a bad flag, and a run stopped by SIGTERM in its first epoch."""
    script = os.path.join(HERE, "ddpm_mnist.py")
    cmds = [[script, *flags(tmp_path / "new", "--epochs", "2", "--seed", s, part=2)] for s in "01"]
    cmds += [[script, "--p-uncond", "2"], [script, *flags(tmp_path / "term", "--limit", "64",
                                                          "--batch-size", "1", "--epochs", "3")]]
    runs = [subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ONE_THREAD) for cmd in cmds]
    for line in runs[3].stdout:  # its first progress line: training has begun
        if "| step" in line:
            runs[3].send_signal(signal.SIGTERM)
            break
    results = [(r.wait(timeout=300), r.stdout.read(), r.stderr.read()) for r in runs]
    assert sorted(code for code, _, _ in results[:2]) == [0, 1], results
    winner = [seed for seed, (code, _, _) in enumerate(results[:2]) if code == 0][0]
    loser = results[1 - winner][2]
    assert loser.count("\n") == 1 and ("holds a run" in loser or "is writing into" in loser)
    assert load(tmp_path / "new" / "part2.pt")["args"]["seed"] == winner
    code, _, err = results[2]
    assert code == 2 and err.count("\n") == 1 and "--p-uncond" in err
    code, _, err = results[3]  # stopped in epoch 1, or later: it says what is saved
    assert code == 1 and re.fullmatch(r"interrupted; (no checkpoint saved: run again|\S+part1.pt "
                                      r"holds epoch \d of 3: --resume continues)\n", err), err
    left = os.listdir(tmp_path / "term") if os.path.exists(tmp_path / "term") else []
    assert not [f for f in left if f.endswith((".tmp", ".lock"))] and (left or "no" in err)


def test_the_repository_ignores_what_runs_write():
    ignored = open(os.path.join(HERE, ".gitignore")).read().split()
    assert {"out/", "data/", "*.pt", "*.tmp", "*.lock", "__pycache__/"} <= set(ignored)
