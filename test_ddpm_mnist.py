"""Tests of ddpm_mnist.py, in the order of its sections. Run: python -m pytest -q (CPU, no network).

Fixtures build what many tests share: MNIST-format files, a small UNet, the schedule, and a tiny
trained run of each part, trained once and copied where a test changes it.
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
close = torch.testing.assert_close


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def write_mnist(root, labels=None):
    """MNIST's four files, 64 training and 20 test digits: class k lights rows 2 + 2k and 3 + 2k
    over faint noise (written in the idx format: 0, 0, 8, dimensions, sizes, bytes)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 64), ("t10k", 20)):
        y, x = torch.arange(n) % 10, torch.zeros(n, 28, 28, dtype=torch.uint8)
        for i in range(n):
            x[i, 2 + 2 * y[i]:4 + 2 * y[i], 4:24] = 255
        for name, data in (("images-idx3", x), ("labels-idx1", y[:labels].byte())):
            head = bytes([0, 0, 8, data.dim()]) + b"".join(n.to_bytes(4, "big") for n in data.shape)
            (raw / f"{split}-{name}-ubyte").write_bytes(head + bytes(data.flatten().tolist()))
    return str(root)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def flags(mnist_dir):
    """A tiny run's flags in fp32 (auto picks bf16 where a CPU has it), one step an epoch: Part 1,
    or Part 2 with 5 diffusion steps."""
    def make(out, *extra, part=1):
        base = ["--hidden", "4", "--batch-size", "32", "--limit", "32", "--data-dir", mnist_dir,
                "--out-dir", str(out), "--device", "cpu", "--precision", "fp32"]
        return base + (["--part", "2", "--num-ts", "5"] if part == 2 else []) + list(extra)
    return make


def settled(*argv):
    return dm.settle(dm.get_args(["--device", "cpu", *argv]), {})


def exits(argv):
    """main(argv)'s one line, from the SystemExit it raises."""
    with pytest.raises(SystemExit) as e:
        dm.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def out_of_memory(*args, **kwargs):
    raise MemoryError


def load(path):
    return torch.load(path, weights_only=True)


def tensors(path):
    """A checkpoint's losses, weights, buffers and optimizer state."""
    c = load(path)
    return [torch.tensor(c["losses"]), *c["model"].values(),
            *[v for state in c["optimizer"]["state"].values() for v in state.values()]]


def same_run(a, b):
    return all(map(torch.equal, tensors(a), tensors(b)))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, flags):
    """One tiny run of each part, 1 epoch, trained once: {1: folder, 2: folder}."""
    runs = {part: tmp_path_factory.mktemp(f"part{part}") for part in (1, 2)}
    for part, out in runs.items():
        dm.main(flags(out, "--epochs", "1", part=part))
    return runs


@pytest.fixture
def copied(trained, tmp_path):
    """copied(part): a copy of a trained run, to change."""
    return lambda part: shutil.copytree(trained[part], tmp_path / f"run{part}")


@pytest.fixture
def unet():
    return dm.ConditionalUNet(1, 10, 4).eval()


@pytest.fixture
def schedule():
    return dm.ddpm_schedule(1e-4, 0.02, 20)


# --------------------------------------------------------------------------- Part 1: the UNet
def test_ops_are_the_specs_layers():
    for op, hw, hw_out in (("ConvBlock", 14, 14), ("DownBlock", 14, 7), ("UpBlock", 7, 14)):
        assert getattr(dm, op)(3, 5)(torch.randn(2, 3, hw, hw)).shape == (2, 5, hw_out, hw_out)
    assert [type(m) for m in dm.Conv(3, 5)] == [torch.nn.Conv2d, torch.nn.BatchNorm2d,
                                                torch.nn.GELU]
    assert dm.Flatten()(torch.randn(2, 6, 7, 7)).shape == (2, 6, 1, 1)
    assert dm.Unflatten(6)(torch.randn(2, 6, 1, 1)).shape == (2, 6, 7, 7)
    assert dm.UnconditionalUNet(1, 4)(torch.randn(3, 1, 28, 28)).shape == (3, 1, 28, 28)


def test_denoise_loss_is_mse_to_the_clean_image():
    x, seen = torch.rand(4, 1, 28, 28), []
    torch.manual_seed(1)
    loss = dm.denoise_loss(lambda z: seen.append(z) or torch.zeros_like(z), x, 0.5)
    torch.manual_seed(1)
    close(seen[0], x + 0.5 * torch.randn_like(x))  # z = x + sigma eps, eps drawn here
    assert loss.item() == pytest.approx((x ** 2).mean().item())


# --------------------------------------------------------------------------- Part 2: DDPM and CFG
@torch.no_grad()
def test_conditional_unet_mask_convention(unet):
    x, t, c, zero = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 7]), torch.zeros(2)
    dropped = unet(x, c, t, zero)  # mask 0: the class is the zero vector, whichever it was
    close(dropped, unet(x, c.flip(0), t, zero))
    close(unet(x, c, t), unet(x, c, t, zero + 1))  # mask None keeps every class
    mixed = unet(x, c, t, torch.tensor([1.0, 0.0]))
    close(mixed, torch.stack([unet(x, c, t)[0], dropped[1]]))
    assert not torch.allclose(mixed, dropped)


def test_conditional_unet_is_u0_c1_times_u0_plus_t1(unet):
    """With c1 = c2 = 1 and t1 = t2 = 0 the conditioning changes nothing."""
    x, one, zero = torch.randn(2, 1, 28, 28), torch.ones(2, 8, 1, 1), torch.zeros(2, 8, 1, 1)
    with torch.no_grad():
        same = dm.UnconditionalUNet.forward(unet, x, one, zero, one[:, :4], zero[:, :4])
        close(same, dm.UnconditionalUNet.forward(unet, x))
        assert not torch.allclose(same, dm.UnconditionalUNet.forward(unet, x, one, one, one[:, :4],
                                                                     zero[:, :4]))


def test_ddpm_schedule_closed_forms():
    s = dm.ddpm_schedule(1e-4, 0.02, 300)
    betas, abar, t = s["betas"], s["alpha_bars"], 150  # index t - 1 holds timestep t
    assert betas.shape == (300,) and betas[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    close(s["alphas"], 1 - betas)
    close(abar[9], torch.prod(1 - betas[:10]))
    assert torch.all(abar[1:] < abar[:-1]) and torch.all((abar > 0) & (abar < 1))
    close(s["beta_tildes"][t - 1], (1 - abar[t - 2]) / (1 - abar[t - 1]) * betas[t - 1])
    assert s["beta_tildes"][0] == 0 and torch.all(s["beta_tildes"] <= betas)
    with pytest.raises(AssertionError):
        dm.ddpm_schedule(0.02, 1e-4, 300)


def recorder(seen):
    """A stand-in UNet that records (x, t, mask) and predicts zeros."""
    return lambda x, c, t, mask: seen.append((x, t, mask)) or torch.zeros_like(x)


def test_ddpm_forward_is_eq4_and_algorithm_1(schedule):
    x_0, seen = torch.rand(6, 1, 28, 28), []
    torch.manual_seed(1)
    loss = dm.ddpm_forward(recorder(seen), schedule, x_0, torch.arange(6), 0.0, 20)
    torch.manual_seed(1)  # the same draws in the same order: t, eps
    t, eps = torch.randint(1, 21, (6,)), torch.randn_like(x_0)
    abar = schedule["alpha_bars"][t - 1].view(-1, 1, 1, 1)
    close(seen[0][0], abar.sqrt() * x_0 + (1 - abar).sqrt() * eps)
    close(seen[0][1], t / 20)  # the UNet sees t / T
    assert loss.item() == pytest.approx((eps ** 2).mean().item()) and seen[0][2].eq(1).all()


def test_ddpm_forward_draws_t_in_1_to_T_and_drops_the_class_at_p_uncond(schedule):
    seen = []
    dm.ddpm_forward(recorder(seen), schedule, torch.zeros(20000, 1, 1, 1),
                    torch.zeros(20000, dtype=torch.long), 0.1, 20)
    _, t_in, mask = seen[0]
    assert set((t_in * 20).round().long().tolist()) == set(range(1, 21))  # both ends, no other
    assert set(mask.tolist()) == {0.0, 1.0} and abs(1 - mask.mean().item() - 0.1) < 0.01


@torch.no_grad()
def test_guided_eps_extremes_in_one_batched_call(unet):
    x, c, tt = torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 8]), torch.full((3,), 0.5)
    eps_c, eps_u = unet(x, c, tt, torch.ones(3)), unet(x, c, tt, torch.zeros(3))
    for gamma, expect in ((0.0, eps_u), (1.0, eps_c), (5.0, eps_u + 5 * (eps_c - eps_u))):
        close(dm.guided_eps(unet, x, c, 0.5, gamma), expect, atol=1e-4, rtol=1e-4)


def test_cached_is_the_specs_rule():
    kept = [t for t in range(300, 0, -1) if dm.cached(t, 300)]
    assert kept == [*range(300, 0, -20), *range(7, 0, -1)] and len(kept) == 22


def reference_sample(unet, c, s, T, gamma, seed):
    """Algorithm 2 written out, two UNet calls a step (mask 1, then mask 0)."""
    g = torch.Generator().manual_seed(seed)
    x, n = torch.randn((len(c), 1, 28, 28), generator=g), len(c)
    for t in range(T, 0, -1):
        z = torch.randn(x.shape, generator=g.manual_seed(seed + T - t + 1)) * (t > 1)
        tt = torch.full((n,), t / T)
        eps_c, eps_u = unet(x, c, tt, torch.ones(n)), unet(x, c, tt, torch.zeros(n))
        eps = eps_u + gamma * (eps_c - eps_u)
        a, abar, bt = s["alphas"][t - 1], s["alpha_bars"][t - 1], s["beta_tildes"][t - 1]
        x = 1 / a.sqrt() * (x - (1 - a) / (1 - abar).sqrt() * eps) + bt.sqrt() * z
    return x


@torch.no_grad()
def test_ddpm_sample_is_algorithm_2(unet, schedule):
    c = torch.tensor([1, 2, 3])
    for gamma in (0.0, 5.0):
        x, _ = dm.ddpm_sample(unet, c, (28, 28), schedule, 20, gamma, seed=3)
        close(x, reference_sample(unet, c, schedule, 20, gamma, 3), atol=1e-4, rtol=1e-4)


def test_ddpm_sample_seeds_caches_and_mode(schedule, monkeypatch):
    net, c = dm.ConditionalUNet(1, 10, 4), torch.tensor([0, 1])
    sample = lambda seed: dm.ddpm_sample(net, c, (28, 28), schedule, 20, 5.0, seed)
    x, caches = sample(7)
    assert torch.equal(x, sample(7)[0]) and not torch.allclose(x, sample(8)[0])
    assert net.training and len(caches) == 8  # x_20, x_7 ... x_1; the mode it found restored
    close(caches[0], torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(7)))
    monkeypatch.setattr(dm, "guided_eps", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sample(0)
    assert net.training  # also after an error


class Oracle(torch.nn.Module):
    """The perfect eps for one known x_0: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    def __init__(self, x_0, schedule):
        super().__init__()
        self.x_0, self.abars = x_0, schedule["alpha_bars"]

    def forward(self, x, c, t, mask=None):
        abar = self.abars[(t * 20).round().long() - 1].view(-1, 1, 1, 1)  # T = 20
        return (x - abar.sqrt() * self.x_0.repeat(2, 1, 1, 1)) / (1 - abar).sqrt()


def test_ddpm_and_strided_samplers_recover_x0_with_a_perfect_model(schedule):
    x_0, c = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    x, _ = dm.ddpm_sample(Oracle(x_0, schedule), c, (28, 28), schedule, 20, 5.0, seed=1)
    close(x, x_0, atol=1e-4, rtol=1e-4)  # the last step lands on x_0
    for steps in (1, 4, 20):
        x, caches = dm.strided_sample(Oracle(x_0, schedule), c, (28, 28), schedule, 20, 5.0, 1,
                                      steps)
        close(x, x_0, atol=1e-4, rtol=1e-4)
        assert len(caches) == sum(dm.cached(k, steps) for k in range(1, steps + 1))


# --------------------------------------------------------------------------- beyond the spec
def test_strided_sample_is_algorithm_2_at_K_equal_T_and_K_divides_T(unet, schedule, capsys):
    c = torch.tensor([2, 9])  # (the perfect model above sees each t_k / T as it was trained)
    close(dm.strided_sample(unet, c, (28, 28), schedule, 20, 5.0, 4, 20)[0],
          dm.ddpm_sample(unet, c, (28, 28), schedule, 20, 5.0, 4)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit) as e:  # K = T above: Algorithm 2 again; K must divide T
        dm.build(settled("--part", "2", "--num-ts", "20", "--sample-steps", "7"))
    assert e.value.code == 2 and "--sample-steps: 7 does not divide T" in capsys.readouterr().err


def test_flow_forward_is_its_formula_with_the_same_draws():
    x_1, seen = torch.rand(6, 1, 28, 28), []
    torch.manual_seed(1)
    loss = dm.flow_forward(recorder(seen), x_1, torch.arange(6), 0.0)
    torch.manual_seed(1)  # the same draws in the same order: t, x_0, the class mask
    t, x_0 = torch.rand(6, 1, 1, 1), torch.randn_like(x_1)
    close(seen[0][0], (1 - t) * x_0 + t * x_1)  # the straight path
    close(seen[0][1], t.flatten())
    assert loss.item() == pytest.approx(((x_1 - x_0) ** 2).mean().item()) and seen[0][2].eq(1).all()


class Velocity(torch.nn.Module):
    """The perfect velocity towards one known x_1 on straight paths: (x_1 - x_t) / (1 - t)."""
    def __init__(self, x_1):
        super().__init__()
        self.x_1 = x_1

    def forward(self, x, c, t, mask=None):
        return (self.x_1.repeat(2, 1, 1, 1) - x) / (1 - t).view(-1, 1, 1, 1)


def test_flow_sample_recovers_the_data_with_a_perfect_velocity():
    x_1, c = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
    for steps in (1, 5, 50):
        x, caches = dm.flow_sample(Velocity(x_1), c, (28, 28), steps, 3.0, seed=2)
        close(x, x_1, atol=1e-5, rtol=1e-5)  # Euler lands on x_1
        assert len(caches) == sum(dm.cached(k, steps) for k in range(1, steps + 1))
        close(caches[0], torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(2)))


# --------------------------------------------------------------------------- methods
class VPrediction(dm.DDPM):
    """A third method, here alone: the UNet predicts v = sqrt(abar) eps - sqrt(1 - abar) x_0
    (arXiv 2202.00512), read by the spec's functions as eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    defaults = dict(dm.DDPM.defaults, guidance_scale=2.0)

    def loss(self, net, x, c):
        return super().loss(EpsOfV(net, self.schedule), x, c)

    def sample(self, net, c, gamma):
        return super().sample(EpsOfV(net, self.schedule), c, gamma)


class EpsOfV(torch.nn.Module):
    def __init__(self, net, schedule):
        super().__init__()
        self.net, self.abars = net, schedule["alpha_bars"]

    def forward(self, x, c, t, mask=None):
        abar = self.abars[(t * len(self.abars)).round().long() - 1].view(-1, 1, 1, 1)
        return abar.sqrt() * self.net(x, c, t, mask) + (1 - abar).sqrt() * x


def test_a_third_method_is_a_class_and_a_line(flags, tmp_path, monkeypatch):
    monkeypatch.setitem(dm.METHODS, "v", VPrediction)  # the one line: --method v
    assert len(dm.main(flags(tmp_path, "--method", "v", "--epochs", "1", part=2))) == 4
    with monkeypatch.context() as m:
        m.setattr(dm, "part2_pictures", lambda *args: {})  # drawn above: faster
        dm.main(flags(tmp_path, "--resume", "--epochs", "2", part=2))
    ckpt = load(tmp_path / "part2.pt")
    assert (ckpt["epoch"], ckpt["args"]["method"], ckpt["args"]["guidance_scale"]) == (2, "v", 2.0)
    assert dm.main(flags(tmp_path, "--sample-only", "--digits", "42", part=2))[0].endswith("42.png")
    monkeypatch.delitem(dm.METHODS, "v")  # a process that lacks it: one line
    assert "--method v is not in METHODS" in exits(flags(tmp_path, "--sample-only", part=2))


def test_the_unet_is_swapped_in_one_assignment(flags, tmp_path, monkeypatch):
    class Wider(dm.ConditionalUNet):
        def __init__(self, in_channels, num_classes, num_hiddens):
            super().__init__(in_channels, num_classes, 2 * num_hiddens)

    monkeypatch.setattr(dm, "ConditionalUNet", Wider)
    monkeypatch.setattr(dm, "part2_pictures", lambda *args: {})
    dm.main(flags(tmp_path, "--epochs", "1", part=2))
    assert load(tmp_path / "part2.pt")["model"]["head.weight"].shape == (1, 8, 3, 3)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("damage", ["truncated", "label 12", "fewer labels"])
def test_load_mnist_refuses_a_damaged_file_in_one_line(damage, tmp_path):
    root = write_mnist(tmp_path, labels=20 if damage == "fewer labels" else None)
    images, labels = (tmp_path / "MNIST" / "raw" / f"train-{k}-ubyte" for k in ("images-idx3",
                                                                                "labels-idx1"))
    new = {"truncated": images.read_bytes()[:1000],
           "label 12": labels.read_bytes()[:-1] + bytes([12])}.get(damage)
    if new is not None:
        (labels if damage == "label 12" else images).write_bytes(new)
    with pytest.raises(SystemExit) as e:
        dm.load_mnist(root, True, "cpu", limit=10)  # counts compared before --limit cuts them
    assert str(e.value).startswith(f"error: cannot load MNIST from {root}/MNIST/raw (")
    assert str(e.value).endswith("a damaged file: delete it to download it again")
    x, y = dm.load_mnist(root, False, "cpu")  # the test split is fine
    assert x.shape == (20, 1, 28, 28) and 0 <= x.min() and x.max() == 1 and y[3] == 3


def test_load_mnist_offline_says_what_to_do_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused
    with pytest.raises(SystemExit, match="offline, put train-images-idx3-ubyte.*--data-dir"):
        dm.load_mnist(str(tmp_path / "new" / "data"), True, "cpu")
    for fault, what in ((interrupt, KeyboardInterrupt), (out_of_memory, MemoryError)):
        monkeypatch.setattr(torchvision.datasets, "MNIST", fault)  # Ctrl-C in a download, or
        with pytest.raises(what):  # out of memory, which main's handler says, not a damaged file
            dm.load_mnist(str(tmp_path / "new"), True, "cpu")
    assert os.listdir(tmp_path) == []  # the folders a download made are gone again


def test_settle_each_flag_once_by_part_method_and_checkpoint(capsys):
    a1, a2 = settled(), settled("--part", "2")
    assert (a1.epochs, a1.batch_size, a1.lr, a1.hidden, a1.sigma, a1.seed) == (5, 256, 1e-4, 128,
                                                                               0.5, 0)
    assert (a2.epochs, a2.lr, a2.lr_decay, a2.num_ts, a2.guidance_scale) == (20, 1e-3, 0.1, 300, 5)
    flow = settled("--part", "2", "--method", "flow", "--guidance-scale", "0")
    assert (flow.guidance_scale, flow.sample_steps) == (0, 50)  # given, else flow's own
    saved = vars(settled("--part", "2", "--hidden", "8", "--seed", "5", "--epochs", "3",
                         "--precision", "fp16"))
    cli = dm.get_args(["--part", "2", "--resume", "--hidden", "99", "--guidance-scale", "1",
                       "--precision", "fp32"])
    args = dm.settle(cli, saved)
    assert (args.hidden, args.seed, args.epochs, args.guidance_scale, args.precision) == (
        8, 5, 3, 1, "fp32")  # the run's own flags; the command's precision and sampling
    assert capsys.readouterr().out == "the checkpoint has --hidden 8: using it, not 99\n"
    assert cli.hidden == 99 and cli.epochs is None  # nothing rewrites what was parsed


def test_build_lays_out_memory_for_the_device(monkeypatch):
    assert dm.build(settled("--hidden", "4")).model.head.weight.is_contiguous(
        memory_format=torch.channels_last)
    layouts = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: layouts.append(k) or self)
    dm.build(argparse.Namespace(**{**vars(settled("--precision", "fp32")), "device": "mps"}))
    assert layouts == [{"memory_format": torch.contiguous_format}]  # MPS: BatchNorm's gradients


def test_recalibrate_is_the_plain_mean_and_draws_no_random_numbers(monkeypatch):
    run = dm.build(settled("--part", "2", "--num-ts", "5", "--hidden", "4", "--precision", "fp32"))
    net, x, y = run.model, torch.rand(300, 1, 28, 28), torch.arange(300) % 10
    means, params, rng = [], [p.clone() for p in net.parameters()], torch.get_rng_state()
    net.down2[0][1].register_forward_hook(lambda m, i, out: means.append(i[0].mean((0, 2, 3))))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # Kaggle's two GPUs: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.recalibrate(run, x, y, 64)
    assert len(means) == 5  # 300 / 64: every image once
    close(net.down2[0][1].running_mean, torch.stack(means).mean(0))  # not momentum 0.1's
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream unchanged
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))


def test_train_overfits_a_batch_prints_a_true_rate_and_saves_a_macs_rng(flags, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    args = dm.settle(dm.get_args(flags(tmp_path, "--lr", "0.01", "--epochs", "20",
                                       "--batch-size", "1000", "--limit", "16")), {})
    losses, run = [], dm.build(args)
    x, y = dm.load_mnist(args.data_dir, True, "cpu", 16)
    for ckpt in dm.train(args, run, x, y, 1, losses):
        pass
    assert losses[-1] < 0.5 * losses[0] and len(losses) == 20
    rates = re.findall(r"\| (\d+) img/s", capsys.readouterr().out)
    assert max(map(float, rates)) < 1e5  # 16 images a step, not the batch size of 1000
    mps = argparse.Namespace(**{**vars(args), "device": "mps"})
    assert next(dm.train(mps, run, x, y, 1, []))["rng"]["mps"].tolist() == [7]


# --------------------------------------------------------------------------- pictures
def cells(k):
    """Pixels that k digits side by side take in a grid."""
    return (k * (28 + dm.PAD) + dm.PAD) * dm.SCALE


def test_grid_draws_non_finite_pixels_grey_and_never_cuts_a_label(capsys):
    pixels = set(dm.grid(torch.full((3, 1, 28, 28), math.nan), 3, "nan").tobytes())
    assert "warning: 'nan' has pixels that are not finite" in capsys.readouterr().out
    assert 127 in pixels and 0 not in pixels  # grey, not black
    width = ImageDraw.Draw(Image.new("L", (1, 1))).textlength
    label, title = "gamma=-1000000", "a title much wider than two digits"
    assert dm.grid(torch.zeros(2, 1, 28, 28), 2, "t", (), [label]).width >= width(label) + cells(2)
    assert dm.grid(torch.zeros(2, 1, 28, 28), 2, title).width >= width(title) + 4


@pytest.mark.parametrize("n", [1, 2, 1000])
def test_loss_plot_draws_a_line_across_the_box(n):
    losses = [1.0] * n if n < 3 else [1 / (1 + i) for i in range(n)]
    img = dm.loss_plot(losses, argparse.Namespace(part=2, hidden=4, lr=1e-3, batch_size=8), 1)
    x0, y0, x1, y1 = dm.BOX
    line = [[y for y in range(y0 + 2, y1 - 1) if img.getpixel((x, y)) < 100]
            for x in (x0 + 2, (x0 + x1) // 2, x1 - 2)]  # no step short of an edge
    assert all(line) and (n > 2 or abs(line[1][0] - (y0 + y1) / 2) < 3)  # flat: halfway up


def test_part1_and_part2_pictures_of_a_run(trained):
    assert len(os.listdir(trained[1])) == 5 and len(os.listdir(trained[2])) == 5  # no lock, .tmp
    assert Image.open(trained[1] / "part1_noising.png").width == cells(7)  # at 7 sigmas
    assert Image.open(trained[2] / "part2_samples_epoch01.png").width == cells(10)  # a column each
    gif = Image.open(trained[2] / "part2_sampling.gif")
    assert gif.n_frames == 5 + 1  # x_5 ... x_1 by the spec's rule for T = 5, then the digits
    gif.seek(5)
    assert gif.info["duration"] == 2500  # the digits held at the end


# --------------------------------------------------------------------------- command line
@pytest.mark.parametrize("device, capability, cpu, auto", [
    ("cuda", (7, 5), "", "fp16"), ("cuda", (8, 0), "avx512_bf16", "fp32"), ("mps", 0, "", "fp32"),
    ("cpu", 0, "avx2 avx512_bf16", "bf16"), ("cpu", 0, "amx_bf16", "bf16"),
    ("cpu", 0, "avx2", "fp32"),
    ("cpu", 0, None, "fp32")])  # T4; A100 and H100; a Mac; CPUs; no /proc/cpuinfo
def test_default_precision_on_each_kind_of_machine(device, capability, cpu, auto, tmp_path,
                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: capability)
    cpuinfo = tmp_path / "cpuinfo"
    if cpu is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {cpu}\n")
    with warnings.catch_warnings():  # the file read is closed: nothing for python -W error
        warnings.simplefilter("error")
        assert dm.default_precision(device, dm.Flow, cpuinfo) == auto
    assert dm.default_precision(device, dm.DDPM, cpuinfo) == dm.default_precision(
        device, dm.Denoiser, cpuinfo) == ("fp16" if auto == "fp16" else "fp32")  # DDPM: worse


@pytest.mark.parametrize("argv", [
    "--epochs 0", "--epochs 1.5", "--sigma -1", "--part 3", "--p-uncond 1.5", "--lr nan",
    "--guidance-scale 1e39", "--no-such-flag", "--method ema", "--precision tf32", "--device tpu",
    "--seed -1", "--seed 4294967296", "--digits 12a",
    "--part 2 --digits ٢٠٢٦", "--part 2 --digits " + "1" * 41, "--part 1 --digits 7"])
def test_get_args_refuses_a_bad_value_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        dm.get_args(argv.split())
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error: " in err


def test_get_args_parses_what_a_user_types(capsys, monkeypatch):
    assert dm.get_args(["--guidance-scale=-1e3", "--seed", "4294967295"]).seed == 4294967295
    args = dm.get_args(["--out-dir", "~/ddpm", "--data-dir", "~/data"])
    assert args.out_dir == os.path.expanduser("~/ddpm") and "~" not in args.data_dir
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["--epochs", "1.5"], ["--device", "cuda"], ["--help"]):
        with pytest.raises(SystemExit):
            dm.get_args(argv)
    out, err = (" ".join(text.split()) for text in capsys.readouterr())
    assert "argument --epochs: '1.5' is not int in [1, inf]" in err and "'cuda'" in err
    assert "(default: 128)" in out and "{ddpm,flow}" in out


def test_fault_knows_a_fault_by_its_type_and_reads_the_checkpoint(trained):
    cli = argparse.Namespace(out_dir=str(trained[2]), part=2)
    where = f"{trained[2] / 'part2.pt'} holds epoch 1 of 1: "
    assert dm.fault(MemoryError(), cli).startswith(f"error: out of memory; {where}free some")
    assert dm.fault(KeyboardInterrupt(), cli) == f"interrupted; {where}--resume continues"
    line = dm.fault(FileExistsError(17, "File exists", "memory_notes"), cli)
    assert line.endswith(f"{where}fix that, then --resume continues")  # not out of memory
    cli.out_dir = "nowhere"
    assert dm.fault(FloatingPointError("the loss diverged"), cli) == (
        "error: the loss diverged; no checkpoint saved: start anew with a lower --lr")


def test_one_line_faults_keeps_a_bugs_traceback_and_restores_the_signals():
    cli, before = argparse.Namespace(out_dir="nowhere", part=1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError):  # no type says out of memory here: a bug's traceback
        with dm.one_line_faults(cli):
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
    with pytest.raises(SystemExit, match="^interrupted; no checkpoint saved: run again$"):
        with dm.one_line_faults(cli):
            os.kill(os.getpid(), signal.SIGTERM)  # what docker, Slurm and timeout send
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(SystemExit, match="^error: out of memory; no checkpoint saved"):
        with dm.one_line_faults(cli):
            raise torch.OutOfMemoryError("CUDA out of memory")


@pytest.mark.skipif(os.name != "posix", reason="runs are locked where fcntl exists")
def test_locked_keeps_a_second_run_out_and_dies_with_its_process(flags, tmp_path):
    code = "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.flock(f, 2); print(); input()"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "part2.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    holder.stdout.readline()  # it holds the lock, as a run in progress does
    line = exits(flags(tmp_path, "--epochs", "1", part=2))
    assert line == f"error: a run of Part 2 is writing into {tmp_path}: let it finish"
    assert os.listdir(tmp_path) == ["part2.lock"]
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
    assert os.listdir(tmp_path) == ["part1.lock"]  # the third run's, kept


def test_locked_refuses_an_unusable_out_dir_before_training(flags, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert exits(flags(tmp_path / "taken")) == (
        f"error: [Errno 17] File exists: '{tmp_path}/taken'; no checkpoint saved: fix that, then "
        "run again")
    assert (tmp_path / "taken").read_text() == "not a folder"
    assert "| step" not in capsys.readouterr().out


def test_open_run_never_overwrites_nor_invents_a_run(flags, copied, tmp_path):
    run = copied(1)
    before = (run / "part1.pt").read_bytes()
    line = exits(flags(run, "--epochs", "1"))
    assert line.startswith(f"error: {run / 'part1.pt'} holds a run: --resume continues it; to "
                           "start anew, delete it") and (run / "part1.pt").read_bytes() == before
    for flag in ("--resume", "--sample-only"):
        assert exits(flags(tmp_path / "typo", flag)) == (
            f"error: no checkpoint at {tmp_path / 'typo' / 'part1.pt'}: check --part and --out-dir")
    assert not os.path.exists(tmp_path / "typo")


@pytest.mark.parametrize("ckpt", ["torn", "part1", "shapes", "rng", {
    "model": {}, "optimizer": {}, "epoch": 1, "args": {"part": 1}, "rng": {}, "losses": []}])
def test_open_run_refuses_a_foreign_checkpoint_in_one_line(ckpt, flags, copied, trained):
    path = copied(2) / "part2.pt"
    if ckpt in ("torn", "part1", "shapes", "rng"):
        whole, rng = load(path), load(path)
        whole["model"] = {k: v[:1] if v.dim() else v for k, v in whole["model"].items()}
        del rng["rng"]["cuda"]  # damaged inside
        ckpt = {"torn": path.read_bytes()[:3000], "part1": (trained[1] / "part1.pt").read_bytes(),
                "shapes": whole, "rng": rng}[ckpt]
    if isinstance(ckpt, bytes):
        path.write_bytes(ckpt)
    else:
        torch.save(ckpt, path)
    assert exits(flags(path.parent, "--sample-only", part=2)).startswith(
        f"error: {path} is not a Part 2 checkpoint of this script (")


def test_open_run_says_out_of_memory_while_reading_a_good_checkpoint(flags, trained, monkeypatch):
    monkeypatch.setattr(dm.torch, "load", out_of_memory)
    assert exits(flags(trained[2], "--sample-only", part=2)).startswith("error: out of memory; ")


def test_open_run_in_a_notebook_as_the_readme_says_then_main_again(flags, trained, tmp_path,
                                                                  monkeypatch):
    """The README's snippet for chosen digits, in the namespace of a pasted cell, then main()."""
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    ns = {"__name__": "__main__"}  # a pasted cell: no __file__, so nothing runs
    exec(open(os.path.join(HERE, "ddpm_mnist.py")).read(), ns)
    snippets = re.findall(r"```python\n(.*?)```", open(os.path.join(HERE, "README.md")).read(),
                          re.S)
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


def test_main_takes_a_list_of_strings_and_runs_as_percent_run(flags, tmp_path, monkeypatch):
    for argv in (["--part", 2], "--part 2", ("--part", "2")):
        assert exits(argv).startswith("error: main() takes a list of strings such as ['--part', ")
    shown = []
    display = types.SimpleNamespace(Image=lambda filename: filename, display=shown.append)
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(display=display))
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    path = os.path.join(HERE, "ddpm_mnist.py")
    monkeypatch.setattr(sys, "argv", [path, *flags(tmp_path, "--epochs", "1")])  # %run FLAGS
    exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__", "__file__": path})
    assert load(tmp_path / "part1.pt")["epoch"] == 1 and len(shown) == 4  # the pictures, inline


@pytest.mark.parametrize("part, train, resume", [
    (2, ["--seed", "5"], []),
    (2, ["--method", "flow", "--sample-steps", "5"], ["--sample-steps", "5"]),
    (1, ["--precision", "fp16", "--hidden", "4"], ["--precision", "fp16"])])  # fp16: loss scaling
def test_main_resumes_bit_for_bit_with_the_runs_own_flags(part, train, resume, flags, tmp_path,
                                                          monkeypatch):
    dm.main(flags(tmp_path / "full", "--epochs", "2", *train, part=part))
    monkeypatch.setattr(dm, "part2_pictures", lambda *args: {})  # drawn once above: faster
    dm.main(flags(tmp_path / "split", "--epochs", "1", *train, part=part))
    dm.main(flags(tmp_path / "split", "--epochs", "2", "--resume", *resume, part=part))
    full, split = (tmp_path / run / f"part{part}.pt" for run in ("full", "split"))
    assert same_run(full, split) and load(full)["scaler"] == load(split)["scaler"]
    assert load(split)["args"]["seed"] == load(full)["args"]["seed"]


def test_main_resumes_a_checkpoint_of_another_device(flags, copied, monkeypatch, capsys):
    """A CPU checkpoint on a T4 (fused Adam, an fp16 scaler), from two GPUs on one, from a Mac."""
    run = copied(2)
    ckpt = load(run / "part2.pt")
    ckpt["rng"]["cuda"] = [torch.get_rng_state()[:16]] * 2  # Kaggle's two T4s
    ckpt["rng"]["mps"] = torch.tensor([9], dtype=torch.uint8)
    torch.save(ckpt, run / "part2.pt")
    adam, restored = torch.optim.Adam, []
    monkeypatch.setattr(dm.torch.optim, "Adam", lambda ps, lr, fused: adam(ps, lr=lr, fused=True))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    monkeypatch.setattr(dm, "part2_pictures", lambda *args: {})  # emulated fp16 is slow here
    dm.main(flags(run, "--resume", "--epochs", "2", "--precision", "fp16", part=2))
    assert len(restored[0]) == 1 and restored[1].tolist() == [9]  # the one GPU here; the Mac's
    ckpt = load(run / "part2.pt")
    assert ckpt["epoch"] == 2 and ckpt["optimizer"]["param_groups"][0]["fused"] is True
    assert "trained in fp32" in capsys.readouterr().out


def test_main_sample_only_and_digits_leave_the_run_as_it_was(flags, copied, tmp_path):
    run = copied(2)
    before = {f: (run / f).read_bytes() for f in os.listdir(run)}
    files = dm.main(flags(run, "--sample-only", "--digits", "2026", "--sample-steps", "1", part=2))
    assert [os.path.basename(f) for f in files] == ["part2_digits_2026.png"]
    assert Image.open(files[0]).width == cells(4)  # a column per digit asked for
    assert {f: (run / f).read_bytes() for f in before} == before
    os.mkdir(tmp_path / "copy")  # a copied checkpoint alone: no MNIST read
    shutil.copy(run / "part2.pt", tmp_path / "copy")
    dm.main(flags(tmp_path / "copy", "--sample-only", "--data-dir", "no-data", part=2))
    assert not os.path.exists("no-data") and (run / "part2_loss.png").read_bytes() == (
        tmp_path / "copy" / "part2_loss.png").read_bytes()  # the same losses


def test_main_draws_pictures_lost_to_an_interrupt(flags, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 1's pictures: --resume draws them before it trains on; after the last
    epoch's, --resume --sample-only draws the final ones."""
    real = dm.part2_pictures
    monkeypatch.setattr(dm, "part2_pictures", interrupt)
    assert exits(flags(tmp_path, "--epochs", "2", part=2)) == (
        f"interrupted; {tmp_path / 'part2.pt'} holds epoch 1 of 2: --resume continues")
    monkeypatch.setattr(dm, "part2_pictures", real)
    files = dm.main(flags(tmp_path, "--resume", part=2))
    assert str(tmp_path / "part2_samples_epoch01.png") in files and len(files) == 5
    assert "resumed after epoch 1, trained in fp32" in capsys.readouterr().out
    os.remove(tmp_path / "part2_guidance.png")
    dm.main(flags(tmp_path, "--resume", "--sample-only", part=2))
    assert os.path.exists(tmp_path / "part2_guidance.png")
    assert "resumed" not in capsys.readouterr().out


@pytest.mark.parametrize("where, calls, epoch", [
    ("load_mnist", 1, None), ("recalibrate", 1, None), ("recalibrate", 2, 1),
    ("save", 3, 1)])
def test_main_interrupted_says_the_epoch_its_checkpoint_holds(where, calls, epoch, flags,
                                                              tmp_path, monkeypatch):
    real, seen = getattr(dm, where), []

    def nth(*args, **kwargs):  # SIGTERM, as kill, docker and Slurm send it, at the nth call
        seen.append(1)
        return os.kill(os.getpid(), signal.SIGTERM) if len(seen) == calls else real(*args, **kwargs)

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
    os.remove(run / "part2_sampling.gif")
    os.mkdir(run / "part2_sampling.gif")  # a folder where a picture goes
    assert "Is a directory" in exits(flags(run, "--sample-only", part=2))


def test_main_leaves_the_memory_limit_as_it_was(flags, tmp_path):
    resource = pytest.importorskip("resource")
    before = resource.getrlimit(resource.RLIMIT_DATA)  # a notebook kernel's, say
    dm.main(flags(tmp_path, "--epochs", "1"))
    assert resource.getrlimit(resource.RLIMIT_DATA) == before


def test_main_in_a_shell_two_runs_at_once(flags, tmp_path):
    """Two processes into one new folder: one trains, the other is refused, the model is the
    first's."""
    script = os.path.join(HERE, "ddpm_mnist.py")
    runs = [subprocess.Popen([sys.executable, script, *flags(tmp_path / "new", "--epochs", "2",
                                                             "--seed", s, part=2)],
                             stdout=subprocess.PIPE, text=True, stderr=subprocess.PIPE,
                             env=dict(os.environ, OMP_NUM_THREADS="1")) for s in "01"]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    assert sorted(code for code, _ in results[:2]) == [0, 1], results
    winner = [code for code, _ in results[:2]].index(0)
    loser = results[1 - winner][1]
    assert loser.count("\n") == 1 and ("is writing into" in loser or "holds a run" in loser)
    assert load(tmp_path / "new" / "part2.pt")["args"]["seed"] == winner
