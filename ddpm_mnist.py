"""ddpm_mnist.py: diffusion models from scratch on MNIST, in one file.

Part 1 trains a UNet to denoise a digit in one step. Part 2 trains a class-conditioned DDPM (arXiv
2006.11239) and samples digits with classifier-free guidance (arXiv 2207.12598): with the spec's
sampler, or on 50 of its 300 steps, 6x faster (--sample-steps 50). docs/measure.py scores a run.

    pip install -r requirements.txt
    python ddpm_mnist.py --part 1                 # one-step denoiser, 5 epochs
    python ddpm_mnist.py --part 2 --epochs 20     # class-conditioned DDPM with guidance

In a notebook, paste this file into a cell and run main(["--part", "2"]); pictures show inline. On
one NVIDIA H200, Part 1 takes 25 s (test MSE 0.008 at sigma 0.5; the noisy input's is 0.25) and Part
2 about 2 minutes (all 40 digits of the final grid of the class asked for). A Colab T4 trains in
fp16. On 2 CPU cores, try --hidden 32 --epochs 2 first (20 to 35 minutes).
"""

import argparse
import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid


# --------------------------------------------------------------------------- Part 1: the UNet
# The spec's operations, each a function that returns its layers (the spec's atomic_ops figure).
def Conv(cin: int, cout: int) -> nn.Sequential:  # (Din, H, W) -> (Dout, H, W)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.GELU())

def DownConv(cin: int, cout: int) -> nn.Sequential:  # (Din, H, W) -> (Dout, H/2, W/2)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.GELU())

def UpConv(cin: int, cout: int) -> nn.Sequential:  # (Din, H, W) -> (Dout, 2H, 2W)
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.GELU())

def Flatten() -> nn.Sequential:  # (D, 7, 7) -> (D, 1, 1)
    return nn.Sequential(nn.AvgPool2d(7), nn.GELU())

def Unflatten(c: int) -> nn.Sequential:  # (D, 1, 1) -> (D, 7, 7)
    return nn.Sequential(nn.ConvTranspose2d(c, c, 7, 7, 0), nn.BatchNorm2d(c), nn.GELU())

def ConvBlock(cin: int, cout: int) -> nn.Sequential:  # Conv, Conv: -> (Dout, H, W)
    return nn.Sequential(Conv(cin, cout), Conv(cout, cout))

def DownBlock(cin: int, cout: int) -> nn.Sequential:  # DownConv, ConvBlock: -> (Dout, H/2, W/2)
    return nn.Sequential(DownConv(cin, cout), ConvBlock(cout, cout))

def UpBlock(cin: int, cout: int) -> nn.Sequential:  # UpConv, ConvBlock: -> (Dout, 2H, 2W)
    return nn.Sequential(UpConv(cin, cout), ConvBlock(cout, cout))

class UnconditionalUNet(nn.Module):
    """Part 1's UNet: (N, 1, 28, 28) -> (N, 1, 28, 28); Concat is torch.cat along channels."""
    def __init__(self, in_channels: int = 1, num_hiddens: int = 128):
        super().__init__()
        D = num_hiddens
        self.conv_in = ConvBlock(in_channels, D)
        self.down1, self.down2 = DownBlock(D, D), DownBlock(D, 2 * D)
        self.flatten, self.unflatten = Flatten(), Unflatten(2 * D)
        self.up1, self.up2 = UpBlock(4 * D, D), UpBlock(2 * D, D)
        self.conv_out, self.head = ConvBlock(2 * D, D), nn.Conv2d(D, in_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor, film1=None, film2=None) -> torch.Tensor:
        """film = (scale, shift), each (N, F): Part 2 modulates u0 and u1 as scale * u + shift."""
        e0 = self.conv_in(x)  # (N, D, 28, 28)
        e1 = self.down1(e0)  # (N, D, 14, 14)
        e2 = self.down2(e1)  # (N, 2D, 7, 7)
        u0 = self.unflatten(self.flatten(e2))  # (N, 2D, 1, 1) -> (N, 2D, 7, 7)
        if film1 is not None:
            u0 = film1[0][:, :, None, None] * u0 + film1[1][:, :, None, None]  # (N, 2D, 7, 7)
        u1 = self.up1(torch.cat([e2, u0], 1))  # (N, 4D, 7, 7) -> (N, D, 14, 14)
        if film2 is not None:
            u1 = film2[0][:, :, None, None] * u1 + film2[1][:, :, None, None]  # (N, D, 14, 14)
        u2 = self.up2(torch.cat([e1, u1], 1))  # (N, 2D, 14, 14) -> (N, D, 28, 28)
        return self.head(self.conv_out(torch.cat([e0, u2], 1)))  # (N, 2D, ...) -> (N, 1, 28, 28)

def denoise_loss(unet: nn.Module, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Part 1's loss ||D(z) - x||^2 with z = x + sigma eps, eps ~ N(0, I) drawn fresh per batch."""
    return F.mse_loss(unet(x + sigma * torch.randn_like(x)), x)


# --------------------------------------------------------------------------- Part 2: DDPM and CFG
def FCBlock(fin: int, fout: int) -> nn.Sequential:  # (N, Fin) -> (N, Fout): Linear, GELU, Linear
    return nn.Sequential(nn.Linear(fin, fout), nn.GELU(), nn.Linear(fout, fout))

class ConditionalUNet(UnconditionalUNet):
    """Part 2's UNet eps_theta(x_t, t, c): t/T and a one-hot class c enter through four FCBlocks."""
    def __init__(self, in_channels: int = 1, num_classes: int = 10, num_hiddens: int = 128):
        super().__init__(in_channels, num_hiddens)
        D, self.num_classes = num_hiddens, num_classes
        self.fc1_t, self.fc1_c = FCBlock(1, 2 * D), FCBlock(num_classes, 2 * D)
        self.fc2_t, self.fc2_c = FCBlock(1, D), FCBlock(num_classes, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
        """x (N, 1, 28, 28); c (N,) labels; t (N,) in [0, 1]; mask (N,): 1 keeps c, 0 drops it."""
        c = F.one_hot(c, self.num_classes).to(x.dtype)  # (N, 10)
        if mask is not None:  # None keeps every class
            c = c * mask.to(x.dtype)[:, None]  # (N, 10): rows with mask 0 become the zero vector
        t = t.to(x.dtype)[:, None]  # (N, 1)
        return super().forward(x, (self.fc1_c(c), self.fc1_t(t)), (self.fc2_c(c), self.fc2_t(t)))

def ddpm_schedule(beta1: float, beta2: float, num_ts: int) -> dict:
    """Linear DDPM schedule; index i of every tensor holds timestep t = i + 1 (t = 1..T)."""
    assert 0 < beta1 < beta2 < 1, "need 0 < beta1 < beta2 < 1"
    betas = torch.linspace(beta1, beta2, num_ts, dtype=torch.float64)  # beta_t
    alphas = 1 - betas  # alpha_t = 1 - beta_t
    alpha_bars = torch.cumprod(alphas, 0)  # abar_t = prod_{s<=t} alpha_s
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])  # abar_0 = 1
    beta_tildes = (1 - abar_prev) / (1 - alpha_bars) * betas  # eq. 7; 0 at t = 1
    s = dict(betas=betas, alphas=alphas, alpha_bars=alpha_bars, beta_tildes=beta_tildes)
    return {k: v.float() for k, v in s.items()}

def ddpm_forward(unet: nn.Module, schedule: dict, x_0: torch.Tensor, c: torch.Tensor,
                 p_uncond: float, num_ts: int) -> torch.Tensor:
    """Algorithm 1: the loss ||eps - eps_theta(x_t, t/T, c)||^2 of x_0 (N, 1, 28, 28), c (N,)."""
    t = torch.randint(1, num_ts + 1, (len(c),), device=c.device)  # t ~ U{1, ..., T}
    eps = torch.randn_like(x_0)  # eps ~ N(0, I)
    abar = schedule["alpha_bars"][t - 1].view(-1, 1, 1, 1)  # (N, 1, 1, 1): over the pixels
    x_t = abar.sqrt() * x_0 + (1 - abar).sqrt() * eps  # eq. 4
    mask = (torch.rand(len(c), device=c.device) >= p_uncond).float()  # (N,): 0 drops the class
    return F.mse_loss(unet(x_t, c, t / num_ts, mask), eps)

def guided_eps(unet: nn.Module, x_t: torch.Tensor, c: torch.Tensor, t: float, gamma: float):
    """CFG: eps_u + gamma (eps_c - eps_u) at t in [0, 1], both from one UNet call on 2N samples."""
    n, dev = len(c), c.device
    mask = torch.cat([torch.ones(n, device=dev), torch.zeros(n, device=dev)])  # (2N,): c, then none
    torch.compiler.cudagraph_mark_step_begin()  # --compile: a new call's CUDA graphs
    eps = unet(torch.cat([x_t, x_t]), torch.cat([c, c]), torch.full((2 * n,), t, device=dev), mask)
    eps_c, eps_u = eps.chunk(2)  # (N, 1, H, W) each
    return eps_u + gamma * (eps_c - eps_u)

def cached(t: int, num_ts: int) -> bool:
    """The spec's rule for the x_t that a sampler keeps: 22 of T = 300, 9 of T = 30."""
    return t % 20 == 0 or t == num_ts or t < 8

@contextlib.contextmanager
def sampling(unet: nn.Module, c: torch.Tensor, img_wh: tuple, seed: int):
    """A sampler's frame: eval mode, no gradients; yields a seeded generator and x_T ~ N(0, I)."""
    was_training, g = unet.training, torch.Generator(c.device).manual_seed(seed)
    unet.eval()
    with torch.no_grad():
        yield g, torch.randn((len(c), 1, *img_wh), generator=g, device=c.device)  # (N, 1, H, W)
    unet.train(was_training)

def ddpm_sample(unet: nn.Module, c: torch.Tensor, img_wh: tuple, schedule: dict, num_ts: int,
                guidance_scale: float = 5.0, seed: int = 0):
    """Algorithm 2 with guidance: x_0 (N, 1, H, W) for labels c (N,) and caches, the x_t kept."""
    s, caches = {k: v.tolist() for k, v in schedule.items()}, []  # floats: no device syncs
    with sampling(unet, c, img_wh, seed) as (g, x_t):
        for t in range(num_ts, 0, -1):
            if cached(t, num_ts):
                caches.append(x_t)
            g.manual_seed(seed + num_ts - t + 1)  # the seed shifted by 1 at each step
            z = torch.randn(x_t.shape, generator=g, device=c.device) if t > 1 else 0
            eps = guided_eps(unet, x_t, c, t / num_ts, guidance_scale)
            a, abar = s["alphas"][t - 1], s["alpha_bars"][t - 1]
            mean = (x_t - (1 - a) / math.sqrt(1 - abar) * eps) / math.sqrt(a)
            x_t = mean + math.sqrt(s["beta_tildes"][t - 1]) * z  # sigma_t = sqrt(beta_tilde_t)
    return x_t, caches


# --------------------------------------------------------------------------- beyond the spec
def strided_sample(unet: nn.Module, c: torch.Tensor, img_wh: tuple, schedule: dict, num_ts: int,
                   guidance_scale: float = 5.0, seed: int = 0, steps: int = 50):
    """Algorithm 2 on `steps` of the T steps: x_t' ~ q(x_t' | x_t, x_0), DDIM eta 1 (2010.02502)."""
    abars, caches = schedule["alpha_bars"].tolist(), []
    ts = sorted({round(v) for v in torch.linspace(num_ts, 1, steps).tolist()}, reverse=True)  # T..1
    with sampling(unet, c, img_wh, seed) as (g, x_t):
        for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [0])):
            if cached(len(ts) - i, len(ts)):  # the spec's rule on the steps left
                caches.append(x_t)
            g.manual_seed(seed + i + 1)  # as in ddpm_sample: the seed shifted by 1 at each step
            z = torch.randn(x_t.shape, generator=g, device=c.device) if t_prev > 0 else 0
            abar, abar_prev = abars[t - 1], abars[t_prev - 1] if t_prev > 0 else 1.0  # abar_0 = 1
            eps = guided_eps(unet, x_t, c, t / num_ts, guidance_scale)
            x_0 = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)  # eq. 15
            var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)  # beta_tilde, strided
            x_t = (math.sqrt(abar_prev) * x_0 + math.sqrt(max(1 - abar_prev - var, 0)) * eps
                   + math.sqrt(var) * z)
    return x_t, caches

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}  # --precision: fp32, tf32 need none

def sample(unet: nn.Module, c: torch.Tensor, schedule: dict, args, gamma: float):
    """Samples and caches of --sample-steps K: K < T strided, else the spec's ddpm_sample."""
    K, T = args.sample_steps or args.num_ts, args.num_ts
    with torch.autocast(args.device, AUTOCAST.get(args.precision), args.precision in AUTOCAST):
        if K < T:
            x, caches = strided_sample(unet, c, (28, 28), schedule, T, gamma, args.seed, K)
        else:
            x, caches = ddpm_sample(unet, c, (28, 28), schedule, T, gamma, args.seed)
    if bad := int((~x.isfinite()).flatten(1).any(1).sum()):  # (N, 784) -> (N,): NaN or inf
        print(f"warning: {bad} of {len(x)} samples at gamma {gamma:g} are not finite")
    return x, caches


# --------------------------------------------------------------------------- training
def load_mnist(root: str, train: bool, device: str, limit=None) -> tuple:
    """One MNIST split as device tensors: images (N, 1, 28, 28) in [0, 1] and labels (N,)."""
    raw = os.path.join(root, "MNIST", "raw")
    files = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    present = lambda: all(os.path.isfile(os.path.join(raw, f)) for f in files)
    new = os.path.abspath(raw)  # the highest folder that a download makes
    while not os.path.isdir(os.path.dirname(new)):
        new = os.path.dirname(new)
    made = not os.path.isdir(new)
    with contextlib.suppress(Exception):  # no internet or a proxy: present() stays False
        if not present():
            torchvision.datasets.MNIST(root, download=True)
    if not present():
        if made:  # a wrong --data-dir leaves no folder behind
            shutil.rmtree(new, ignore_errors=True)
        sys.exit(f"error: MNIST is not in {raw} and could not be downloaded. Put "
                 f"{', '.join(files)} there, or pass --data-dir.")
    def read(kind: str, shape: tuple) -> torch.Tensor:  # uint8 (N, *shape) by torchvision's reader
        path = os.path.join(raw, f"{'train' if train else 't10k'}-{kind}-ubyte")
        with contextlib.suppress(Exception):  # empty, truncated, random bytes: many kinds of errors
            v = torchvision.datasets.mnist.read_sn3_pascalvincent_tensor(path)
            if v.dtype == torch.uint8 and v.shape[1:] == shape and len(v) > 0:
                if shape != () or v.max() <= 9:  # labels are digits
                    return v
        sys.exit(f"error: {path} is not an MNIST {kind[:6]} file (empty, truncated or another "
                 "file): delete it to download it again, or put the right file there")
    x, y = read("images-idx3", (28, 28)), read("labels-idx1", ())  # (N, 28, 28), (N,)
    if len(x) != len(y):
        sys.exit(f"error: {raw} holds {len(x)} images but {len(y)} labels of one split: "
                 "put the four files of one MNIST copy there")
    x, y = x[:limit], y[:limit].long()
    return (x.unsqueeze(1).float() / 255).to(device), y.to(device)  # (N, 1, 28, 28)

def build(args) -> tuple:
    """The part's model, the callable that trains it, loss_fn(net, x, y) and the DDPM schedule."""
    D = args.hidden
    model = ConditionalUNet(1, 10, D) if args.part == 2 else UnconditionalUNet(1, D)
    schedule = {k: v.to(args.device) for k, v in ddpm_schedule(1e-4, 0.02, args.num_ts).items()}
    if args.part == 1:
        loss_fn = lambda net, x, y: denoise_loss(net, x, args.sigma)
    else:
        loss_fn = lambda net, x, y: ddpm_forward(net, schedule, x, y, args.p_uncond, args.num_ts)
    amp = torch.autocast(args.device, AUTOCAST.get(args.precision), args.precision in AUTOCAST)
    model = model.to(args.device, memory_format=torch.channels_last)  # faster wherever measured
    fast = torch.compile(model, mode="reduce-overhead") if args.compile else model
    return model, fast, amp(loss_fn), schedule  # the loss under --precision's autocast

RUN_FLAGS = ("hidden", "num_ts", "sigma", "p_uncond", "batch_size", "lr", "lr_decay", "limit")

def restore(args, path: str) -> tuple:
    """build() the model of the checkpoint at path, with its weights; any problem is one line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        sys.exit(f"error: no checkpoint at {path}")
    except Exception as e:  # a truncated or foreign file raises many kinds of errors
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__})")
    kinds = dict(model=dict, optimizer=dict, epoch=int, args=dict, rng=dict, losses=list)
    ok = isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), t) for k, t in kinds.items())
    ok = ok and "param_groups" in ckpt["optimizer"] and torch.is_tensor(ckpt["rng"].get("cpu"))
    if not (ok and ckpt["args"].get("part") == args.part and type(ckpt["args"].get("hidden")) is int
            and ckpt["args"].get("method", "ddpm") == "ddpm"):  # --method flow's is gone
        sys.exit(f"error: {path} is not a Part {args.part} checkpoint of this script")
    for k in RUN_FLAGS:  # the run is the checkpoint's, whatever the flags say
        v = ckpt["args"].get(k, vars(args)[k])
        if v != vars(args)[k]:
            given = "all" if vars(args)[k] is None else vars(args)[k]  # --limit's default: all
            print(f"{path} has --{k.replace('_', '-')} {v}: using it, not {given}")
            setattr(args, k, v)
    built = build(args)
    try:
        built[0].load_state_dict(ckpt["model"])
    except RuntimeError:
        sys.exit(f"error: {path} holds weights of another architecture than this model")
    return built, ckpt

def train_step(net, opt, scaler, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step; returns the loss without waiting for the device."""
    torch.compiler.cudagraph_mark_step_begin()  # --compile: a new step's CUDA graphs
    loss = loss_fn(net, x, y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # fp16: the loss scaled against underflow; else as it is
    scaler.step(opt)
    scaler.update()
    return loss.detach()

def recalibrate(net: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """BatchNorm's running statistics: the plain mean of 100 training batches (docs/results.md)."""
    with torch.no_grad(), torch.random.fork_rng([x.device] if x.is_cuda else []):  # no RNG drawn
        for m in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average, not momentum 0.1's last few batches
        for idx in torch.randperm(len(x), device=x.device)[:100 * batch_size].split(batch_size):
            loss_fn(net, x[idx], y[idx])  # a forward pass in train mode: the batch's statistics

def train(args, built: tuple, data: tuple, ckpt, ckpt_path: str, on_epoch_end) -> None:
    """The loop both parts share, resumed from ckpt if given: a checkpoint, then on_epoch_end()."""
    (model, fast, loss_fn, _), (train_x, train_y) = built, data
    n = len(train_x)
    steps = math.ceil(n / args.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=train_x.is_cuda)
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")
    start, losses = (ckpt["epoch"] + 1, ckpt["losses"]) if ckpt else (1, [])
    if ckpt is not None:  # the weights are loaded already
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # an fp16 run's loss scale
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if ckpt["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        end = "" if start <= args.epochs else "; the run is finished (a larger --epochs trains on)"
        print(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}{end}")
    notice = args.device != "cuda"  # once, at the first progress line: a long run on a slow device
    for epoch in range(start, args.epochs + 1):
        fast.train()
        for group in opt.param_groups:  # exponential decay: about lr_decay * lr at the last epoch
            group["lr"] = args.lr * args.lr_decay ** ((epoch - 1) / args.epochs)
        epoch_losses = []
        t_epoch = t_print = time.time()
        for i, idx in enumerate(torch.randperm(n, device=train_x.device).split(args.batch_size)):
            epoch_losses.append(train_step(fast, opt, scaler, loss_fn, train_x[idx], train_y[idx]))
            if time.time() - t_print > 5 or i + 1 == steps:
                if not (torch.stack(epoch_losses) < 1e3).all():  # NaN, inf or blown up: stop
                    kept = f"{ckpt_path} keeps epoch {epoch - 1}" if epoch > 1 else "nothing saved"
                    sys.exit(f"error: the loss diverged in epoch {epoch}; {kept}; lower --lr")
                t_print = time.time()
                done = min((i + 1) * args.batch_size, n)
                rate = done / (t_print - t_epoch)  # images per second in this epoch
                eta = ((args.epochs - epoch + 1) * n - done) / rate / 60  # minutes
                print(f"part {args.part} | epoch {epoch}/{args.epochs} | step {i + 1}/{steps} | "
                      f"loss {epoch_losses[-1].item():.4f} | {rate:.0f} img/s | ETA {eta:.1f} min")
                if notice and eta > 60:
                    print(f"note: about {eta / 60:.1f} h on the {args.device}: try --hidden 32 "
                          "--epochs 2 first (20 to 35 minutes on 2 CPU cores)")
                notice = False
        recalibrate(model, loss_fn, train_x, train_y, args.batch_size)  # for checkpoint, pictures
        losses += torch.stack(epoch_losses).float().tolist()
        rng = dict(cpu=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        try:  # atomic: an interrupted or failed save keeps the old file
            torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                            losses=losses, args=vars(args), rng=rng, scaler=scaler.state_dict()),
                       ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
        except (OSError, RuntimeError) as e:  # a full disk, a lost mount
            sys.exit(f"error: cannot save {ckpt_path} ({e}); the file there keeps the last epoch")
        on_epoch_end(epoch, losses)  # the pictures: an interrupt there loses no training


# --------------------------------------------------------------------------- pictures
SCALE, PAD = 3, 2  # each 28 px digit drawn 3x larger, 2 px gutters between digits
SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]  # the noise levels of Part 1's pictures
BOX = (70, 36, 700, 370)  # the loss plot's axes: left, top, right, bottom in 720 x 420 pixels

def grid(x: torch.Tensor, nrow: int, title: str, cols=(), rows=(), scale: int = SCALE):
    """Tile images (N, 1, 28, 28) in [0, 1] into rows of nrow, upscaled, with a title and labels."""
    x = x.float().nan_to_num(0.5).clamp(0, 1).cpu()  # a NaN pixel grey, +-inf white or black
    img = to_pil_image(make_grid(x, nrow, PAD, pad_value=0.5))
    img = img.convert("L").resize((img.width * scale, img.height * scale), Image.NEAREST)
    left, top = 64 if any(rows) else 0, 16 + (14 if any(cols) else 0)  # room for the labels
    cell = (28 + PAD) * scale
    canvas = Image.new("L", (img.width + left, img.height + top), 255)
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=0)
    for j, s in enumerate(cols):
        draw.text((left + PAD * scale + j * cell + 4, top - 13), s, fill=0)
    for i, s in enumerate(rows):
        draw.text((4, top + PAD * scale + i * cell + cell // 2 - 8), s, fill=0)
    return canvas

def loss_plot(losses: list, title: str, steps_per_epoch: int) -> Image.Image:
    """The loss per step on a log scale, a centred moving average over 2% of the run, with axes."""
    n = len(losses)
    k = max(1, n // 100)  # the average spans k steps on each side
    logs = [math.log10(sum(losses[max(0, i - k):i + k + 1]) / len(losses[max(0, i - k):i + k + 1]))
            for i in range(n)]
    lo, hi = min(logs), max(logs) + 1e-9
    x0, y0, x1, y1 = BOX
    xy = lambda i, v: (x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * (hi - v) / (hi - lo))  # step i
    img = Image.new("RGB", (720, 420), "white")
    epochs = math.ceil(n / steps_per_epoch)
    d = ImageDraw.Draw(img)
    for e in range(0, epochs + 1, max(1, epochs // 10)):  # x axis: epochs
        x = xy(e * steps_per_epoch, lo)[0]
        d.line([(x, y1), (x, y1 + 4)], fill="black")
        d.text((x - 3, y1 + 7), str(e), fill="black")
    for j in range(6):  # y axis: six loss values, evenly spaced on the log scale
        y = xy(0, lo + (hi - lo) * j / 5)[1]
        d.line([(x0 - 4, y), (x1, y)], fill=(225, 225, 225))
        d.text((4, y - 6), f"{10 ** (lo + (hi - lo) * j / 5):.3g}", fill="black")
    d.rectangle(BOX, outline="black")
    d.line([xy(i, v) for i, v in enumerate(logs)], fill=(20, 60, 160), width=2)
    d.text((x0, 10), title, fill="black")
    d.text(((720 - x0) // 2, 400), f"epoch ({steps_per_epoch} steps each)", fill="black")
    d.text((4, y0 - 18), "loss (log)", fill="black")
    return img

def save(out_dir: str, outputs: dict, show: bool = False) -> list:
    """Write {name: picture or frames (a GIF)}; show: inline in a notebook kernel."""
    for name, obj in outputs.items():
        path = os.path.join(out_dir, name)
        if isinstance(obj, list):  # each frame 60 ms, slowing to 240 ms, the last held 2.5 s
            ms = [60 + 180 * i // max(len(obj) - 2, 1) for i in range(len(obj) - 1)] + [2500]
            obj[0].save(path, save_all=True, append_images=obj[1:], loop=0, duration=ms)
        else:
            obj.save(path)
        if show and "ipykernel" in sys.modules:
            from IPython.display import Image as Picture, display
            display(Picture(filename=path))
    return [os.path.join(out_dir, name) for name in outputs]

@torch.no_grad()
def part1_pictures(net, test_x: torch.Tensor, args, epoch: int, final: bool) -> dict:
    """Part 1's pictures of the epoch; after the last, its test MSE at --sigma."""
    net.eval()
    x = test_x[:10]  # (10, 1, 28, 28)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed)).to(x.device)
    z = x + args.sigma * eps  # the same noise at every sigma
    noisy = torch.stack([x[:8] + s * eps[:8] for s in SIGMAS], 1)  # (8, 7, 1, 28, 28)
    title = f"Part 1 after epoch {epoch}: test digits, sigma {args.sigma}"
    out = {f"part1_denoised_epoch{epoch:02d}.png": grid(torch.cat([x, z, net(z)]), 10, title, (),
                                                        ["clean", "noisy", "denoised"])}
    if not final:
        return out
    labels = [f"sigma={s}" for s in SIGMAS]
    out["part1_noising.png"] = grid(noisy.flatten(0, 1), 7, "Part 1: z = x + sigma * eps", labels)
    pairs = torch.stack([noisy[:4], net(noisy[:4].flatten(0, 1)).view(4, 7, 1, 28, 28)], 2)
    labels = [f"sigma={s}" if k == 0 else "denoised" for s in SIGMAS for k in (0, 1)]
    out["part1_ood.png"] = grid(pairs.flatten(0, 2), 14, f"Part 1, trained at sigma {args.sigma}",
                                labels)  # pairs: (4, 7, 2, 1, 28, 28) -> (56, 1, 28, 28)
    g, mse = torch.Generator().manual_seed(args.seed), [0.0, 0.0]  # denoised, noisy input
    for x in test_x.split(1000):
        z = x + args.sigma * torch.randn(x.shape, generator=g).to(x.device)
        mse[0] += F.mse_loss(net(z), x, reduction="sum").item() / test_x.numel()
        mse[1] += F.mse_loss(z, x, reduction="sum").item() / test_x.numel()
    print(f"test MSE at sigma {args.sigma:g}: denoised {mse[0]:.4f}, noisy input {mse[1]:.4f}")
    return out

def part2_pictures(net, schedule: dict, args, name: str, what: str, final: bool,
                   digits: str = "0123456789") -> dict:
    """part2_{name}.png: 4 samples of each digit, a column each; final: the sweep and the GIF."""
    c = torch.tensor([int(d) for d in digits], device=next(net.parameters()).device).repeat(4)
    x, caches = sample(net, c, schedule, args, args.guidance_scale)  # c: (4K,)
    title = f"Part 2 {what}, gamma {args.guidance_scale:g}"
    out = {f"part2_{name}.png": grid(x, len(digits), title, digits)}
    if final:
        xs = torch.cat([sample(net, c[:20], schedule, args, g)[0] for g in args.gammas])  # (20G,..)
        labels = [f"gamma={g:g}" if r == 0 else "" for g in args.gammas for r in (0, 1)]
        out["part2_guidance.png"] = grid(xs, 10, "Part 2: CFG scale, same seed", digits, labels)
        out["part2_sampling.gif"] = [grid(f[:20], 10, title, digits, scale=2).quantize(16)
                                     for f in caches + [x]]  # 16 grey levels: a small file
    return out


# --------------------------------------------------------------------------- command line
DEFAULTS = {1: dict(epochs=5, batch_size=256, lr=1e-4, lr_decay=1.0),  # per part: the spec's
            2: dict(epochs=20, batch_size=128, lr=1e-3, lr_decay=0.1)}  # measured, docs/results.md

def default_precision(device: str, capability=None) -> str:
    """--precision auto: fp16 below CUDA capability 8.0 (T4, V100), tf32 from 8.0, else fp32."""
    if device != "cuda":
        return "fp32"
    return "fp16" if (capability or torch.cuda.get_device_capability())[0] < 8 else "tf32"

def checked(convert, ok, what: str):
    """An argparse type= function: convert the text, then refuse the value if ok(value) is False."""
    def parse(text: str):
        with contextlib.suppress(ValueError):
            if ok(v := convert(text)):
                return v
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return parse

count = checked(int, lambda v: v >= 1, "an integer >= 1")
between = lambda lo, hi: checked(float, lambda v: lo <= v <= hi, f"in [{lo:g}, {hi:g}]")
numbers = checked(lambda s: [float(v) for v in s.split(",")],
                  lambda v: all(abs(g) <= 1e6 for g in v), "numbers in [-1e6, 1e6] such as 0,1,5")
digits = checked(str, lambda s: s.isascii() and s.isdigit() and len(s) <= 40, "1 to 40 digits")
seed = checked(int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32 - 1]")

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

def get_args(argv=None) -> argparse.Namespace:
    """Parse flags: argv=None reads sys.argv (never a kernel's), a list works in a notebook."""
    p = ArgumentParser(prog="ddpm_mnist.py", description="DDPM and classifier-free guidance, MNIST")
    p._negative_number_matcher = re.compile(r"-\.?\d")  # --gammas -1,2 is a value, not a flag
    g = p.add_argument_group("run")
    devices = [d for d, ok in [("cuda", torch.cuda.is_available()),
                               ("mps", torch.backends.mps.is_available()), ("cpu", True)] if ok]

    def add(flag: str, help: str, default=None, **kw):  # the help states the default
        shown = "" if default is None or "default:" in help else f" (default: {default})"
        g.add_argument(flag, default=default, help=help + shown, **kw)

    add("--part", "1: one-step denoiser, 2: DDPM", 1, type=int, choices=[1, 2])
    add("--epochs", "training epochs (default: 5 or 20 by part)", type=count, metavar="N")
    add("--batch-size", "batch size (default: 256 or 128 by part)", type=count, metavar="N")
    add("--lr", "Adam's learning rate (default: 1e-4 or 1e-3 by part)", type=between(1e-12, 1e3))
    add("--lr-decay", "epoch e of E trains at lr * F^((e-1)/E) (default: 1 or 0.1 by part)",
        type=between(1e-12, 1), metavar="F")
    add("--hidden", "UNet width D", 128, type=count, metavar="D")
    add("--seed", "random seed, 0 to 2^32 - 1", 0, type=seed, metavar="S")
    add("--device", "the first available of cuda, mps, cpu", devices[0], choices=devices)
    add("--precision", "auto: fp16 on CUDA GPUs before compute capability 8.0 (T4, V100), tf32 "
        "on newer ones, else fp32", "auto", choices=["auto", "fp32", "tf32", "fp16", "bf16"])
    add("--data-dir", "torchvision's MNIST root", "data", metavar="DIR")
    add("--out-dir", "where a run writes; its checkpoint needs --resume", "out", metavar="DIR")
    add("--limit", "train on the first N images (default: all)", type=count, metavar="N")
    add("--resume", "continue from OUT_DIR/partN.pt", action="store_true")
    add("--sample-only", "the final pictures of OUT_DIR/partN.pt", action="store_true")
    add("--compile", "torch.compile with CUDA graphs (faster on CUDA)", action="store_true")
    g = p.add_argument_group("part 1")
    add("--sigma", "training noise level", 0.5, type=between(0, 1e3))
    g = p.add_argument_group("part 2")
    add("--num-ts", "diffusion steps T", 300, type=count, metavar="T")
    add("--p-uncond", "class dropout probability", 0.1, type=between(0, 1), metavar="P")
    add("--digits", "draw 4 samples of each of these digits, such as 2026", type=digits)
    add("--guidance-scale", "CFG gamma of the grids", 5.0, type=between(-1e6, 1e6), metavar="G")
    add("--gammas", "gammas of the final sweep picture", "0,1,3,5,10", type=numbers, metavar="G,G")
    add("--sample-steps", "sample on K of the T steps (default: T)", type=count, metavar="K")
    argv = [] if argv is None and "ipykernel" in sys.modules else argv
    p.set_defaults(**DEFAULTS[p.parse_args(argv).part])
    args = p.parse_args(argv)  # flags given win over these per-part defaults
    if args.digits and args.part == 1:
        p.error("--digits needs --part 2")
    args.precision = default_precision(args.device) if args.precision == "auto" else args.precision
    return args

def main(argv=None) -> list:
    """Run one part with the given flags (a list, as on the command line); return the files."""
    args = get_args(argv)
    tf32 = args.precision == "tf32"  # fp32 matmuls and convolutions on tensor cores
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(args.seed)
    ckpt_path = os.path.join(args.out_dir, f"part{args.part}.pt")
    found = os.path.exists(ckpt_path)
    if found and not (args.resume or args.sample_only):
        sys.exit(f"error: {ckpt_path} holds a run: --resume continues it; to start over, delete it "
                 "or choose another --out-dir")
    if args.resume and not found:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")
    built, ckpt = restore(args, ckpt_path) if found or args.sample_only else (build(args), None)
    fast, schedule = built[1], built[3]
    model = f"D={args.hidden}" + (f" T={args.num_ts}" if args.part == 2 else "")
    run = f"epochs {args.epochs}, batch {args.batch_size}, lr {args.lr:g}"
    print(f"part {args.part} on {args.device}, {args.precision} | {model} | "
          + ("sampling" if args.sample_only else run))
    test = load_mnist(args.data_dir, False, args.device)
    data = None if args.sample_only else load_mnist(args.data_dir, True, args.device, args.limit)
    try:  # --out-dir: created if missing and written to once, before any training
        os.makedirs(args.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir, buffering=0).write(b"a test")  # then deleted
    except OSError as e:
        sys.exit(f"error: cannot write to --out-dir {args.out_dir!r}: {e.strerror or e}")
    title = f"Part {args.part} loss, D={args.hidden}, batch {args.batch_size}, lr {args.lr:g}"
    t0 = time.time()
    files = []

    def pictures(epoch: int, final: bool) -> list:  # the part's pictures, inline when final
        out = (part1_pictures(fast, test[0], args, epoch, final) if args.part == 1 else
               part2_pictures(fast, schedule, args, f"samples_epoch{epoch:02d}",
                              f"after epoch {epoch}", final))
        return save(args.out_dir, out, show=final)

    def on_epoch_end(epoch: int, losses: list) -> None:
        plot = loss_plot(losses, title, math.ceil(len(data[0]) / args.batch_size))
        files.extend(save(args.out_dir, {f"part{args.part}_loss.png": plot}))
        if epoch in (1, 5, 10, 15, 20, args.epochs):
            files.extend(pictures(epoch, epoch == args.epochs))

    try:
        if not args.sample_only:
            train(args, built, data, ckpt, ckpt_path, on_epoch_end)
        elif not args.digits:
            files += pictures(ckpt["epoch"], True)
        if args.digits:
            out = part2_pictures(fast, schedule, args, f"digits_{args.digits}", args.digits, False,
                                 args.digits)
            files += save(args.out_dir, out, show=True)
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {ckpt_path} holds every finished epoch; --resume continues, "
                 "--sample-only redraws the final pictures" if os.path.exists(ckpt_path) else
                 "interrupted in the first epoch: nothing saved")
    names = ", ".join(sorted({os.path.basename(f) for f in files})) or "nothing new"
    print(f"done in {time.time() - t0:.1f} s; wrote under {args.out_dir}: {names}")
    return sorted(set(files))


if __name__ == "__main__" and "ipykernel" not in sys.modules:
    main()
