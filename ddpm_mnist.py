"""ddpm_mnist.py: diffusion models from scratch on MNIST, in one file.

Part 1 trains a UNet to denoise a digit in one step. Part 2 trains a class-conditioned DDPM (arXiv
2006.11239) and samples digits with classifier-free guidance (arXiv 2207.12598). Beyond the spec,
behind flags: a 6x faster sampler, rectified flow, and --eval, a number for sample quality.

    pip install -r requirements.txt
    python ddpm_mnist.py --part 1                 # one-step denoiser, 5 epochs
    python ddpm_mnist.py --part 2 --epochs 20     # class-conditioned DDPM with guidance

In a notebook, paste this file into a cell and run main(["--part", "2"]); pictures show inline. On
one NVIDIA H200, Part 1 takes 25 s (test MSE 0.008 at sigma 0.5; the noisy input's is 0.25) and Part
2 about 2 minutes (all 40 digits of the final grid of the class asked for). On 2 CPU cores, try
--hidden 32 --epochs 2 first (about 20 minutes).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid


# --------------------------------------------------------------------------- Part 1: the UNet
# The spec's operations, each a function that returns its layers (figures/atomic_ops_new.png).
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
        self.conv_in, self.down1 = ConvBlock(in_channels, D), DownBlock(D, D)
        self.down2, self.flatten, self.unflatten = DownBlock(D, 2 * D), Flatten(), Unflatten(2 * D)
        self.up1, self.up2 = UpBlock(4 * D, D), UpBlock(2 * D, D)
        self.conv_out, self.head = ConvBlock(2 * D, D), nn.Conv2d(D, in_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor, film1=None, film2=None) -> torch.Tensor:
        """film = (scale, shift), each (N, F): Part 2 modulates u0 and u1 as scale * u + shift."""
        e0 = self.conv_in(x)  # (N, D, 28, 28)
        e1 = self.down1(e0)  # (N, D, 14, 14)
        e2 = self.down2(e1)  # (N, 2D, 7, 7)
        u0 = self.unflatten(self.flatten(e2))  # (N, 2D, 1, 1) -> (N, 2D, 7, 7)
        if film1 is not None:
            u0 = film1[0][:, :, None, None] * u0 + film1[1][:, :, None, None]  # (N, 2D, 1, 1)
        u1 = self.up1(torch.cat([e2, u0], 1))  # (N, 4D, 7, 7) -> (N, D, 14, 14)
        if film2 is not None:
            u1 = film2[0][:, :, None, None] * u1 + film2[1][:, :, None, None]  # (N, D, 1, 1)
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
    """Algorithm 2 over `steps` of the T timesteps: each step draws x_t' from the posterior
    q(x_t' | x_t, x_0) (DDIM with eta 1, arXiv 2010.02502 eq. 12); steps = T is ddpm_sample."""
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

def flow_forward(unet: nn.Module, x_1: torch.Tensor, c: torch.Tensor, p_uncond: float):
    """Rectified flow (arXiv 2209.03003): ||(x_1 - x_0) - v_theta(x_t, t, c)||^2, t ~ U[0, 1]."""
    t = torch.rand(len(c), device=c.device)  # (N,)
    x_0 = torch.randn_like(x_1)
    t4 = t.view(-1, 1, 1, 1)  # (N, 1, 1, 1): over the pixels
    x_t = (1 - t4) * x_0 + t4 * x_1  # straight from noise x_0 (t = 0) to data x_1 (t = 1)
    mask = (torch.rand(len(c), device=c.device) >= p_uncond).float()  # (N,): 0 drops the class
    return F.mse_loss(unet(x_t, c, t, mask), x_1 - x_0)

def flow_sample(unet: nn.Module, c: torch.Tensor, img_wh: tuple, steps: int,
                guidance_scale: float = 5.0, seed: int = 0):
    """K Euler steps x <- x + v / K along the guided velocity from noise (t = 0) to data (t = 1)."""
    caches = []
    with sampling(unet, c, img_wh, seed) as (_, x):
        for i in range(steps):
            if cached(steps - i, steps):  # the spec's rule on the steps left
                caches.append(x)
            x = x + guided_eps(unet, x, c, i / steps, guidance_scale) / steps
    return x, caches

def sample(unet: nn.Module, c: torch.Tensor, schedule: dict, args, gamma: float):
    """Samples and caches of --method and --sample-steps K (ddpm: K = T is the spec's sampler)."""
    K, T = args.sample_steps or args.num_ts, args.num_ts
    if args.method == "flow":
        return flow_sample(unet, c, (28, 28), K, gamma, args.seed)
    if K < T:
        return strided_sample(unet, c, (28, 28), schedule, T, gamma, args.seed, K)
    return ddpm_sample(unet, c, (28, 28), schedule, T, gamma, args.seed)


# --------------------------------------------------------------------------- training
def load_mnist(root: str, train: bool, device: torch.device, limit=None) -> tuple:
    """One MNIST split as device tensors: images (N, 1, 28, 28) in [0, 1] and labels (N,)."""
    try:
        ds = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:  # no internet, a proxy, a half-written file: all end here
        sys.exit(f"error: MNIST is not in {root}/MNIST/raw and could not be downloaded "
                 f"({type(e).__name__}). Put train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                 "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte there, or pass --data-dir.")
    x, y = ds.data[:limit], ds.targets[:limit]  # (N, 28, 28) uint8, (N,) int64
    return (x.unsqueeze(1).float() / 255).to(device), y.to(device)  # (N, 1, 28, 28)

def build(args, device: torch.device) -> tuple:
    """The part's model, the callable that trains it, loss_fn(net, x, y) and the DDPM schedule."""
    D = args.hidden
    model = ConditionalUNet(1, 10, D) if args.part == 2 else UnconditionalUNet(1, D)
    schedule = {k: v.to(device) for k, v in ddpm_schedule(1e-4, 0.02, args.num_ts).items()}
    if args.part == 1:
        loss_fn = lambda net, x, y: denoise_loss(net, x, args.sigma)
    elif args.method == "flow":
        loss_fn = lambda net, x, y: flow_forward(net, x, y, args.p_uncond)
    else:
        loss_fn = lambda net, x, y: ddpm_forward(net, schedule, x, y, args.p_uncond, args.num_ts)
    model = model.to(device, memory_format=torch.channels_last)  # faster wherever measured
    fast = torch.compile(model, mode="reduce-overhead") if args.compile else model
    return model, fast, loss_fn, schedule

def load_checkpoint(path: str, part: int) -> dict:
    """Read a checkpoint with weights_only=True; any problem is a one-line error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        sys.exit(f"error: no checkpoint at {path}")
    except Exception as e:  # a truncated or foreign file raises many kinds of errors
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("args", {}).get("part") != part:
        sys.exit(f"error: {path} is not a Part {part} checkpoint of this script")
    return ckpt

def train_step(net, opt, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step; returns the loss without waiting for the device."""
    torch.compiler.cudagraph_mark_step_begin()  # --compile: a new step's CUDA graphs
    loss = loss_fn(net, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
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
    """The loop both parts share, resumed from ckpt if given: on_epoch_end(), then a checkpoint."""
    (model, fast, loss_fn, _), (train_x, train_y) = built, data
    n, steps, start, losses = len(train_x), math.ceil(len(train_x) / args.batch_size), 1, []
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=train_x.is_cuda)
    if ckpt is not None:  # the weights are loaded already
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start, losses = ckpt["epoch"] + 1, ckpt["losses"]
        print(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}")
    for epoch in range(start, args.epochs + 1):
        fast.train()
        for group in opt.param_groups:  # exponential decay: about lr_decay * lr at the last epoch
            group["lr"] = args.lr * args.lr_decay ** ((epoch - 1) / args.epochs)
        epoch_losses, t_epoch, t_print = [], time.time(), time.time()
        for i, idx in enumerate(torch.randperm(n, device=train_x.device).split(args.batch_size)):
            epoch_losses.append(train_step(fast, opt, loss_fn, train_x[idx], train_y[idx]))
            if time.time() - t_print > 5 or i + 1 == steps:
                done, t_print = min((i + 1) * args.batch_size, n), time.time()
                rate = done / (t_print - t_epoch)  # images per second in this epoch
                eta = ((args.epochs - epoch + 1) * n - done) / rate / 60
                print(f"part {args.part} | epoch {epoch}/{args.epochs} | step {i + 1}/{steps} | "
                      f"loss {epoch_losses[-1].item():.4f} | {rate:.0f} img/s | ETA {eta:.1f} min")
        recalibrate(model, loss_fn, train_x, train_y, args.batch_size)  # for pictures, checkpoint
        losses += torch.stack(epoch_losses).float().tolist()
        on_epoch_end(epoch, losses)  # an interrupt here
        rng = {"cpu": torch.get_rng_state(),  # leaves no checkpoint: --resume repeats this epoch
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                        args=vars(args), rng=rng, losses=losses), ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: an interrupted save keeps the old file


# --------------------------------------------------------------------------- pictures and eval
SCALE, PAD = 3, 2  # each 28 px digit drawn 3x larger, 2 px gutters between digits
SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]  # the noise levels of Part 1's pictures

def grid(x: torch.Tensor, nrow: int, title: str, cols=(), rows=(), scale: int = SCALE):
    """Tile images (N, 1, 28, 28) in [0, 1] into rows of nrow, upscaled, with a title and labels."""
    img = to_pil_image(make_grid(x.float().clamp(0, 1).cpu(), nrow, PAD, pad_value=0.5))
    img = img.convert("L").resize((img.width * scale, img.height * scale), Image.NEAREST)
    left, top, cell = 64 if any(rows) else 0, 16 + (14 if any(cols) else 0), (28 + PAD) * scale
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
    W, H, L, T, B, n, k = 720, 420, 70, 36, 50, len(losses), max(1, len(losses) // 100)
    logs = [math.log10(sum(losses[max(0, i - k):i + k + 1]) / len(losses[max(0, i - k):i + k + 1]))
            for i in range(n)]
    lo, hi = min(logs), max(logs) + 1e-9
    xy = lambda i, v: (L + (W - L - 20) * i / n, T + (H - T - B) * (hi - v) / (hi - lo))  # step i
    img, epochs = Image.new("RGB", (W, H), "white"), math.ceil(n / steps_per_epoch)
    d = ImageDraw.Draw(img)
    for e in range(0, epochs + 1, max(1, epochs // 10)):  # x axis: epochs
        x = xy(e * steps_per_epoch, lo)[0]
        d.line([(x, H - B), (x, H - B + 4)], fill="black")
        d.text((x - 3, H - B + 7), str(e), fill="black")
    for j in range(6):  # y axis: six loss values, evenly spaced on the log scale
        y = xy(0, lo + (hi - lo) * j / 5)[1]
        d.line([(L - 4, y), (W - 20, y)], fill=(225, 225, 225))
        d.text((4, y - 6), f"{10 ** (lo + (hi - lo) * j / 5):.3g}", fill="black")
    d.rectangle([L, T, W - 20, H - B], outline="black")
    d.line([xy(i, v) for i, v in enumerate(logs)], fill=(20, 60, 160), width=2)
    d.text((L, 10), title, fill="black")
    d.text(((W - L) // 2, H - 20), f"epoch ({steps_per_epoch} steps each)", fill="black")
    d.text((4, T - 18), "loss (log)", fill="black")
    return img

def save(out_dir: str, outputs: dict, show: bool = False) -> list:
    """Write {name: picture, frames (a GIF) or dict (JSON)}; show: inline in a notebook kernel."""
    for name, obj in outputs.items():
        path = os.path.join(out_dir, name)
        if isinstance(obj, dict):
            with open(path, "w") as f:
                json.dump(obj, f, indent=1)
        elif isinstance(obj, list):  # each frame 60 ms, slowing to 240 ms, the last held 2.5 s
            ms = [60 + 180 * i // max(len(obj) - 2, 1) for i in range(len(obj) - 1)] + [2500]
            obj[0].save(path, save_all=True, append_images=obj[1:], loop=0, duration=ms)
        else:
            obj.save(path)
        if show and "ipykernel" in sys.modules and not isinstance(obj, dict):
            from IPython.display import Image as Picture, display
            display(Picture(filename=path))
    return [os.path.join(out_dir, name) for name in outputs]

@torch.no_grad()
def part1_pictures(net, test_x: torch.Tensor, args, epoch: int, final: bool) -> dict:
    """Part 1's pictures of the epoch; after the last, its test MSE at --sigma (--eval: SIGMAS)."""
    x, net, g = test_x[:10], net.eval(), torch.Generator().manual_seed(args.seed)  # (10, 1, 28, 28)
    eps = torch.randn(x.shape, generator=g).to(x.device)  # the same noise at every sigma
    z, noisy = x + args.sigma * eps, torch.stack([x[:8] + s * eps[:8] for s in SIGMAS], 1)  # 8,7,..
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
    for sigma in SIGMAS if args.eval else [args.sigma]:
        g, mse = torch.Generator().manual_seed(args.seed), torch.zeros(2)  # denoised, noisy input
        for x in test_x.split(1000):
            z = x + sigma * torch.randn(x.shape, generator=g).to(x.device)
            mse[0] += F.mse_loss(net(z), x, reduction="sum").item() / test_x.numel()
            mse[1] += F.mse_loss(z, x, reduction="sum").item() / test_x.numel()
        print(f"test MSE at sigma {sigma:g}: denoised {mse[0]:.4f}, noisy input {mse[1]:.4f}; "
              f"denoised PSNR {-10 * mse[0].log10():.2f} dB")  # peak 1
    return out

def part2_pictures(net, schedule: dict, args, epoch: int, final: bool) -> dict:
    """The 4 x 10 grid; after the last epoch also the guidance sweep and the sampling GIF."""
    c, digits = torch.arange(10, device=next(net.parameters()).device).repeat(4), "0123456789"
    x, caches = sample(net, c, schedule, args, args.guidance_scale)  # c: (40,)
    title = f"Part 2 {args.method} after epoch {epoch}, gamma {args.guidance_scale:g}"
    out = {f"part2_samples_epoch{epoch:02d}.png": grid(x, 10, title, digits)}
    if final:
        xs = torch.cat([sample(net, c[:20], schedule, args, g)[0] for g in args.gammas])  # (20G,..)
        labels = [f"gamma={g:g}" if r == 0 else "" for g in args.gammas for r in (0, 1)]
        out["part2_guidance.png"] = grid(xs, 10, "Part 2: CFG scale, same seed", digits, labels)
        out["part2_sampling.gif"] = [grid(f[:20], 10, title, digits, scale=2).quantize(16)
                                     for f in caches + [x]]  # 16 grey levels: a small file
    return out

def get_classifier(args, test: tuple) -> nn.Sequential:
    """The judge of --eval: a CNN trained once (3 epochs, seed 0), kept as OUT_DIR/classifier.pt."""
    path, device = os.path.join(args.out_dir, "classifier.pt"), test[0].device
    torch.manual_seed(0)
    conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU()]
    clf = nn.Sequential(*conv(1, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), *conv(64, 64),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128),
                        nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))
    clf = clf.to(device)  # clf[:-2]: the (N, 128) features
    try:
        clf.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return clf.eval().requires_grad_(False)
    except Exception as e:  # none yet, or a truncated or foreign file: train one
        print(f"eval classifier: no usable {path} ({type(e).__name__}), training one")
    train_x, train_y = load_mnist(args.data_dir, True, device)
    opt, g = torch.optim.Adam(clf.parameters()), torch.Generator(device).manual_seed(0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, 3 * math.ceil(len(train_x) / 128))
    shift = lambda x: torch.roll(x, torch.randint(-2, 3, (2,), generator=g, device=device).tolist(),
                                 (2, 3))  # the batch moved by up to 2 px down and right
    for _ in range(3):
        for idx in torch.randperm(len(train_x), generator=g, device=device).split(128):
            train_step(clf, opt, lambda net, x, y: F.cross_entropy(net(shift(x)), y), train_x[idx],
                       train_y[idx])
            lr.step()
    torch.save(clf.state_dict(), path)
    return clf.eval().requires_grad_(False)

def judge(clf: nn.Sequential, x: torch.Tensor) -> tuple:
    """The classifier's features clf[:-2] (N, 128) and logits (N, 10) of images (N, 1, 28, 28)."""
    f = torch.cat([clf[:-2](b) for b in x.clamp(0, 1).split(1000)])
    return f, clf[-1](f)

def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) of feature sets (N1, F), (N2, F)."""
    f1, f2 = f1.double().cpu(), f2.double().cpu()
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)  # (F, F)
    root = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()  # tr (S1 S2)^1/2
    return (((f1.mean(0) - f2.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * root).item()

def evaluate_part2(net, schedule: dict, args, test: tuple) -> dict:
    """--eval N: the judge on N samples per digit at each of --gammas, and on N real ones each."""
    (test_x, test_y), clf = test, get_classifier(args, test)
    ref, logits = judge(clf, test_x)  # ref: (10000, 128), the test set's features
    clf_acc, rows = (logits.argmax(1) == test_y).float().mean().item(), {}
    real = torch.cat([torch.nonzero(test_y == d)[:args.eval, 0] for d in range(10)])  # N per digit
    c = torch.arange(10, device=test_x.device).repeat(args.eval)  # (10 N,)
    print(f"judge's test accuracy {clf_acc:.2%}\n{'samples':>12} | accuracy | frechet | per digit")
    for name in ["real"] + [f"gamma={g:g}" for g in args.gammas]:
        x, y = (test_x[real], test_y[real]) if name == "real" else (
            sample(net, c, schedule, args, float(name[6:]))[0], c)
        f, logits = judge(clf, x)  # (N, 128), (N, 10)
        hit = (logits.argmax(1) == y).float()  # (N,): 1 where the judge reads the class asked for
        rows[name] = r = dict(accuracy=hit.mean().item(), frechet=frechet_distance(f, ref),
                              per_digit=[hit[y == d].mean().item() for d in range(10)])
        print(f"{name:>12} | {r['accuracy']:8.1%} | {r['frechet']:7.2f} |",
              " ".join(f"{v:.0%}" for v in r["per_digit"]), flush=True)
    return {"part2_eval.json": dict(n_per_digit=args.eval, classifier_accuracy=clf_acc, rows=rows,
                                    args=vars(args))}


# --------------------------------------------------------------------------- command line
DEFAULTS = {1: dict(epochs=5, batch_size=256, lr=1e-4, lr_decay=1.0),  # per part: the spec's
            2: dict(epochs=20, batch_size=128, lr=1e-3, lr_decay=0.1)}  # measured, docs/results.md

def checked(convert, ok, what: str):
    """An argparse type= function: convert the text, then refuse the value if ok(value) is False."""
    def parse(text: str):
        if not ok(v := convert(text)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v
    return parse

count = checked(int, lambda v: v >= 1, "an integer >= 1")
number = checked(float, math.isfinite, "a finite number")
between = lambda lo, hi: checked(float, lambda v: lo <= v <= hi, f"in [{lo:g}, {hi:g}]")

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

def get_args(argv=None) -> argparse.Namespace:
    """Parse flags: argv=None reads sys.argv (never a kernel's), a list works in a notebook."""
    p = ArgumentParser(prog="ddpm_mnist.py", description="DDPM and classifier-free guidance, MNIST")
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
    add("--lr-decay", "lr decays exponentially to F * lr (default: 1 or 0.1 by part)", metavar="F",
        type=between(1e-12, 1))
    add("--hidden", "UNet width D", 128, type=count, metavar="D")
    add("--seed", "random seed", 0, type=int)
    add("--device", "the first available of cuda, mps, cpu", devices[0], choices=devices)
    add("--data-dir", "torchvision's MNIST root", "data", metavar="DIR")
    add("--out-dir", "where a run writes", "out", metavar="DIR",
        type=checked(str, lambda d: not os.path.isfile(d), "a folder, but a file"))
    add("--limit", "train on the first N images (default: all)", type=count, metavar="N")
    add("--resume", "continue from OUT_DIR/partN.pt", False, action="store_true")
    add("--compile", "torch.compile with CUDA graphs (faster on CUDA)", False, action="store_true")
    add("--benchmark", "time 20 training steps, then exit", False, action="store_true")
    g = p.add_argument_group("part 1")
    add("--sigma", "training noise level", 0.5, type=between(0, 1e3))
    g = p.add_argument_group("part 2")
    add("--method", "ddpm (the spec), flow: rectified flow", "ddpm", choices=["ddpm", "flow"])
    add("--num-ts", "diffusion steps T", 300, type=count, metavar="T")
    add("--p-uncond", "class dropout probability", 0.1, type=between(0, 1), metavar="P")
    add("--sample-only", "the final pictures of OUT_DIR/partN.pt", False, action="store_true")
    add("--guidance-scale", "CFG gamma of the grids", 5.0, type=number, metavar="G")
    add("--gammas", "gammas of the final sweep and --eval", [0.0, 1.0, 3.0, 5.0, 10.0],
        type=lambda s: [number(v) for v in s.split(",")], metavar="G,G")
    add("--sample-steps", "ddpm: K < T is the strided sampler, K >= T the spec's; flow: K Euler "
        "steps (default: T)", type=count, metavar="K")
    add("--eval", "score the final model: Part 1 PSNR per sigma, Part 2 a classifier on N samples "
        "per digit (default: off; N 20)", type=count, nargs="?", const=20)
    argv = [] if argv is None and "ipykernel" in sys.modules else argv
    p.set_defaults(**DEFAULTS[p.parse_args(argv).part])
    return p.parse_args(argv)  # flags given win over these per-part defaults

def main(argv=None) -> list:
    """Run one part with the given flags (a list, as on the command line); return the files."""
    args = get_args(argv)
    device, ckpt_path, ckpt = torch.device(args.device), f"{args.out_dir}/part{args.part}.pt", None
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    if not args.benchmark and (args.sample_only or (args.resume and os.path.exists(ckpt_path))):
        ckpt = load_checkpoint(ckpt_path, args.part)  # the model and schedule come from the file
        for k in ("hidden", "num_ts", "method"):
            setattr(args, k, ckpt["args"].get(k, getattr(args, k)))
    elif args.resume:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")
    print(f"part {args.part} on {device} | D={args.hidden} epochs={args.epochs} batch="
          f"{args.batch_size} lr={args.lr:g} {args.method}")
    built = model, fast, loss_fn, schedule = build(args, device)
    if args.benchmark:  # time 20 training steps on random data, after 3 warm-up steps
        x = torch.rand(args.batch_size, 1, 28, 28, device=device)
        opt, y = torch.optim.Adam(model.parameters(), lr=args.lr), (10 * x[:, 0, 0, 0]).long()
        steps = lambda k: [train_step(fast, opt, loss_fn, x, y) for _ in range(k)][-1].item()
        steps(3)  # warm-up: kernels chosen, --compile compiles; .item() waits for the device
        t0, _ = time.time(), steps(20)
        rate = 20 * args.batch_size / (time.time() - t0)
        print(f"train_img_per_s={rate:.1f}")
        print(f"projected_{args.epochs}_epoch_s={args.epochs * 60000 / rate:.0f}")
        return []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            sys.exit(f"error: {ckpt_path} holds weights of another architecture than this model")
    os.makedirs(args.out_dir, exist_ok=True)
    test, files, t0 = load_mnist(args.data_dir, False, device), [], time.time()
    data = None if args.sample_only else load_mnist(args.data_dir, True, device, args.limit)
    title = f"Part {args.part} loss, D={args.hidden}, batch {args.batch_size}, lr {args.lr:g}"

    def pictures(epoch: int, final: bool) -> list:  # the part's pictures, inline when final
        out = (part1_pictures(fast, test[0], args, epoch, final) if args.part == 1 else
               part2_pictures(fast, schedule, args, epoch, final))
        return save(args.out_dir, out, show=final)

    def on_epoch_end(epoch: int, losses: list) -> None:
        plot = loss_plot(losses, title, math.ceil(len(data[0]) / args.batch_size))
        files.extend(save(args.out_dir, {f"part{args.part}_loss.png": plot}))
        if epoch in (1, 5, 10, 15, 20, args.epochs):
            files.extend(pictures(epoch, epoch == args.epochs))

    try:
        if args.sample_only:
            files += pictures(ckpt["epoch"], True)
        else:
            train(args, built, data, ckpt, ckpt_path, on_epoch_end)
        if args.part == 2 and args.eval:
            files += save(args.out_dir, evaluate_part2(fast, schedule, args, test))
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {ckpt_path} holds the last finished epoch; --resume continues")
    files = sorted(set(files))
    print(f"done in {time.time() - t0:.1f} s; wrote {len(files)} files under {args.out_dir}: "
          + ", ".join(os.path.basename(f) for f in files))
    return files


if __name__ == "__main__" and "ipykernel" not in sys.modules:
    main()
