"""ddpm_mnist.py: diffusion models from scratch on MNIST, in one file.

Part 1 trains a UNet to denoise a digit in one step. Part 2 trains a class-conditioned DDPM (arXiv
2006.11239) and samples digits with classifier-free guidance (arXiv 2207.12598), with the spec's
sampler or on 50 of its 300 steps (--sample-steps 50); --method flow trains rectified flow instead.

    python ddpm_mnist.py --part 1                 # one-step denoiser, 5 epochs
    python ddpm_mnist.py --part 2 --epochs 20     # class-conditioned DDPM with guidance

On one NVIDIA H200 Part 1 takes 25 s (test MSE 0.008 at sigma 0.5) and Part 2 2 minutes (each digit
of the final grid of its column's class); on 2 CPU cores try --part 2 --hidden 32 --epochs 2 first.
"""

import argparse
import contextlib
import functools
import io
import math
import os
import pathlib
import re
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageOps
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
# --------------------------------------------------------------------------- Part 1: the UNet
def BN_GELU(layer):  # a convolution, then BatchNorm2d and GELU
    return nn.Sequential(layer, nn.BatchNorm2d(layer.out_channels), nn.GELU())
# The spec's operations (atomic_ops figure) make their layers; shapes per image or vector.
Conv = lambda cin, cout: BN_GELU(nn.Conv2d(cin, cout, 3, 1, 1))  # (Din, H, W) -> (Dout, H, W)
DownConv = lambda cin, cout: BN_GELU(nn.Conv2d(cin, cout, 3, 2, 1))  # -> (Dout, H/2, W/2)
UpConv = lambda cin, cout: BN_GELU(nn.ConvTranspose2d(cin, cout, 4, 2, 1))  # -> (Dout, 2H, 2W)
Flatten = lambda: nn.Sequential(nn.AvgPool2d(7), nn.GELU())  # (D, 7, 7) -> (D, 1, 1)
Unflatten = lambda c: BN_GELU(nn.ConvTranspose2d(c, c, 7, 7, 0))  # (D, 1, 1) -> (D, 7, 7)
ConvBlock = lambda cin, cout: nn.Sequential(Conv(cin, cout), Conv(cout, cout))  # as Conv
DownBlock = lambda cin, cout: nn.Sequential(DownConv(cin, cout), ConvBlock(cout, cout))  # Down
UpBlock = lambda cin, cout: nn.Sequential(UpConv(cin, cout), ConvBlock(cout, cout))  # as UpConv
FCBlock = lambda fin, fout: nn.Sequential(nn.Linear(fin, fout), nn.GELU(), nn.Linear(fout, fout))
class UnconditionalUNet(nn.Module):
    """Part 1's UNet: (N, 1, 28, 28) -> (N, 1, 28, 28); Concat is torch.cat along channels."""
    def __init__(self, in_channels=1, num_hiddens=128):
        super().__init__()
        D = num_hiddens
        self.conv_in = ConvBlock(in_channels, D)
        self.down1, self.down2 = DownBlock(D, D), DownBlock(D, 2 * D)
        self.flatten, self.unflatten = Flatten(), Unflatten(2 * D)
        self.up1, self.up2 = UpBlock(4 * D, D), UpBlock(2 * D, D)
        self.conv_out = ConvBlock(2 * D, D)
        self.head = nn.Conv2d(D, in_channels, 3, 1, 1)  # a plain conv: no BatchNorm, no GELU
    def forward(self, x, c1=None, t1=None, c2=None, t2=None):
        """Part 2 passes c1, t1 (N, 2D, 1, 1) and c2, t2 (N, D, 1, 1); Part 1 none."""
        e0 = self.conv_in(x)  # (N, D, 28, 28)
        e1 = self.down1(e0)  # (N, D, 14, 14)
        e2 = self.down2(e1)  # (N, 2D, 7, 7)
        u0 = self.unflatten(self.flatten(e2))  # (N, 2D, 1, 1) -> (N, 2D, 7, 7)
        if c1 is not None:  # Part 2's conditioning, broadcast over H and W
            u0 = c1 * u0 + t1
        u1 = self.up1(torch.cat([e2, u0], 1))  # (N, 4D, 7, 7) -> (N, D, 14, 14)
        if c2 is not None:
            u1 = c2 * u1 + t2
        u2 = self.up2(torch.cat([e1, u1], 1))  # (N, 2D, 14, 14) -> (N, D, 28, 28)
        return self.head(self.conv_out(torch.cat([e0, u2], 1)))  # (N, 2D, ...) -> (N, 1, 28, 28)
def denoise_loss(unet, x, sigma):
    """Part 1's loss ||D(z) - x||^2 with z = x + sigma eps, eps ~ N(0, I) drawn fresh per batch."""
    return F.mse_loss(unet(x + sigma * torch.randn_like(x)), x)
# --------------------------------------------------------------------------- Part 2: DDPM and CFG
class ConditionalUNet(UnconditionalUNet):
    """Part 2's UNet eps_theta(x_t, t, c): t/T and a one-hot class c enter through four FCBlocks."""
    def __init__(self, in_channels=1, num_classes=10, num_hiddens=128):
        super().__init__(in_channels, num_hiddens)
        D = num_hiddens
        self.num_classes = num_classes
        self.fc1_t, self.fc1_c = FCBlock(1, 2 * D), FCBlock(num_classes, 2 * D)
        self.fc2_t, self.fc2_c = FCBlock(1, D), FCBlock(num_classes, D)
    def forward(self, x, c, t, mask=None):
        """x (N, 1, 28, 28); c (N,) labels; t (N,) in [0, 1]; mask (N,): 1 keeps c, 0 drops it."""
        c = F.one_hot(c, self.num_classes).to(x.dtype)  # (N, 10)
        if mask is not None:  # None keeps every class
            c = c * mask.to(x.dtype)[:, None]  # (N, 10): rows with mask 0 become the zero vector
        t = t.to(x.dtype)[:, None]  # (N, 1)
        fcs = [self.fc1_c(c), self.fc1_t(t), self.fc2_c(c), self.fc2_t(t)]  # (N, F) each
        c1, t1, c2, t2 = [v[:, :, None, None] for v in fcs]  # (N, F, 1, 1): over H and W
        return super().forward(x, c1, t1, c2, t2)  # u0 = c1 * u0 + t1, u1 = c2 * u1 + t2
def ddpm_schedule(beta1, beta2, num_ts):
    """Linear DDPM schedule; index i of every tensor holds timestep t = i + 1 (t = 1..T)."""
    assert 0 < beta1 < beta2 < 1, "need 0 < beta1 < beta2 < 1"
    betas = torch.linspace(beta1, beta2, num_ts, dtype=torch.float64)  # beta_t
    alphas = 1 - betas  # alpha_t = 1 - beta_t
    alpha_bars = torch.cumprod(alphas, 0)  # abar_t = prod_{s<=t} alpha_s
    abar_prev = F.pad(alpha_bars[:-1], (1, 0), value=1.0)  # abar_{t-1}, with abar_0 = 1
    beta_tildes = (1 - abar_prev) / (1 - alpha_bars) * betas  # eq. 7; 0 at t = 1
    s = dict(betas=betas, alphas=alphas, alpha_bars=alpha_bars, beta_tildes=beta_tildes)
    return {k: v.float() for k, v in s.items()}
def ddpm_forward(unet, schedule, x_0, c, p_uncond, num_ts):
    """Algorithm 1: the loss ||eps - eps_theta(x_t, t/T, c)||^2 of x_0 (N, 1, 28, 28), c (N,)."""
    t = torch.randint(1, num_ts + 1, (len(c),), device=c.device)  # t ~ U{1, ..., T}
    eps = torch.randn_like(x_0)  # eps ~ N(0, I)
    abar = schedule["alpha_bars"][t - 1].view(-1, 1, 1, 1)  # (N, 1, 1, 1): over the pixels
    x_t = abar.sqrt() * x_0 + (1 - abar).sqrt() * eps  # eq. 4
    mask = (torch.rand(len(c), device=c.device) >= p_uncond).float()  # (N,): 0 drops the class
    return F.mse_loss(unet(x_t, c, t / num_ts, mask), eps)
def guided_eps(unet, x_t, c, t, gamma):
    """CFG: eps_u + gamma (eps_c - eps_u) at t in [0, 1], both from one UNet call on 2N samples."""
    n, dev = len(c), c.device
    mask = torch.arange(2 * n, device=dev) < n  # (2N,): 1 keeps c for the first N, 0 drops it
    eps = unet(torch.cat([x_t, x_t]), c.repeat(2), x_t.new_full((2 * n,), t), mask)  # 2N each
    eps_c, eps_u = eps.chunk(2)  # (N, 1, H, W) each
    return eps_u + gamma * (eps_c - eps_u)
def cached(t, num_ts):  # the spec's rule for the x_t kept: 22 of T = 300
    return t % 20 == 0 or t == num_ts or t < 8
@contextlib.contextmanager
def sampling(unet, c, img_wh, seed):
    """A sampler's frame: eval mode, no gradients; noise(k) ~ N(0, I) from the seed shifted by k."""
    was_training = unet.training
    g = torch.Generator(c.device)
    def noise(k):  # (N, 1, H, W)
        return torch.randn((len(c), 1, *img_wh), generator=g.manual_seed(seed + k), device=c.device)
    unet.eval()
    try:
        with torch.no_grad():
            yield noise
    finally:
        unet.train(was_training)  # also when an error stops the sampler
def ddpm_sample(unet, c, img_wh, schedule, num_ts, guidance_scale=5.0, seed=0):
    """Algorithm 2 with guidance: x_0 (N, 1, H, W) for labels c (N,) and caches, the x_t kept."""
    s = {k: v.tolist() for k, v in schedule.items()}  # floats: no device syncs
    caches = []
    with sampling(unet, c, img_wh, seed) as noise:
        x_t = noise(0)  # x_T ~ N(0, I)
        for t in range(num_ts, 0, -1):
            if cached(t, num_ts):
                caches.append(x_t)
            z = noise(num_ts - t + 1) if t > 1 else 0  # z ~ N(0, I): the seed shifted by 1 a step
            eps = guided_eps(unet, x_t, c, t / num_ts, guidance_scale)
            a, abar = s["alphas"][t - 1], s["alpha_bars"][t - 1]
            mean = (x_t - (1 - a) / math.sqrt(1 - abar) * eps) / math.sqrt(a)
            x_t = mean + math.sqrt(s["beta_tildes"][t - 1]) * z  # sigma_t = sqrt(beta_tilde_t)
    return x_t, caches
# --------------------------------------------------------------------------- beyond the spec
def strided_sample(unet, c, img_wh, schedule, num_ts, guidance_scale=5.0, seed=0, steps=50):
    """Algorithm 2 on every (T/K)-th step, t_k = k T/K (K must divide T): ddpm_sample with alpha_k =
    abar_{t_k} / abar_{t_{k-1}}, the DDPM posterior over each stride (DDIM, eta 1, 2010.02502)."""
    abar = schedule["alpha_bars"][num_ts // steps - 1::num_ts // steps]  # (K,): abar_{t_k}
    abar_prev = F.pad(abar[:-1], (1, 0), value=1.0)  # abar_{t_{k-1}}, with abar_0 = 1
    alphas = abar / abar_prev
    beta_tildes = (1 - abar_prev) / (1 - abar) * (1 - alphas)  # eq. 7 over the stride
    s = dict(alphas=alphas, alpha_bars=abar, beta_tildes=beta_tildes)
    return ddpm_sample(unet, c, img_wh, s, steps, guidance_scale, seed)
def flow_forward(unet, x_1, c, p_uncond):
    """Rectified flow (arXiv 2209.03003, 2210.02747): ||(x_1 - x_0) - v(x_t, t, c)||^2 on the
    straight path x_t = (1 - t) x_0 + t x_1 from noise x_0 to data x_1, t ~ U[0, 1]."""
    t = torch.rand(len(c), 1, 1, 1, device=c.device)  # (N, 1, 1, 1): over the pixels
    x_0 = torch.randn_like(x_1)  # x_0 ~ N(0, I)
    mask = (torch.rand(len(c), device=c.device) >= p_uncond).float()  # (N,): 0 drops the class
    return F.mse_loss(unet((1 - t) * x_0 + t * x_1, c, t.flatten(), mask), x_1 - x_0)  # t: (N,)
def flow_sample(unet, c, img_wh, steps, guidance_scale=3.0, seed=0):
    """K Euler steps x <- x + v / K from noise (t = 0) to data (t = 1), v guided as eps is."""
    caches = []
    with sampling(unet, c, img_wh, seed) as noise:
        x = noise(0)
        for i in range(steps):
            if cached(steps - i, steps):  # the spec's rule, on the steps left
                caches.append(x)
            x = x + guided_eps(unet, x, c, i / steps, guidance_scale) / steps
    return x, caches
# --------------------------------------------------------------------------- methods
# A method is one object (minRF's design); a third subclasses one and takes its line in METHODS.
class Denoiser:
    """Part 1: the one-step denoiser at noise level --sigma; the spec's defaults."""
    defaults = dict(epochs=5, batch_size=256, lr=1e-4)
    bf16_on_cpu = False  # auto's choice on CPUs that multiply bf16 natively: docs/results.md
    def __init__(self, args):
        self.args = args
    def loss(self, net, x, c):
        return denoise_loss(net, x, self.args.sigma)
class DDPM(Denoiser):  # a denoiser of every noise level
    """Part 2, the spec: eps on the linear schedule, sampled on all T steps or on K of them."""
    defaults = dict(epochs=20, batch_size=128, lr=1e-3, lr_decay=0.1, guidance_scale=5.0,
                    sample_steps=None)  # the lr and its decay were measured: docs/results.md
    def __init__(self, args):
        super().__init__(args)
        if args.sample_steps and args.num_ts % args.sample_steps:  # t_k = k T / K, as trained
            usage_error(f"argument --sample-steps: {args.sample_steps} does not divide T")
        s = ddpm_schedule(1e-4, 0.02, args.num_ts)  # the spec's betas
        self.schedule = {k: v.to(args.device) for k, v in s.items()}
    def loss(self, net, x, c):
        return ddpm_forward(net, self.schedule, x, c, self.args.p_uncond, self.args.num_ts)
    def sample(self, net, c, gamma):
        T, K, seed = self.args.num_ts, self.args.sample_steps, self.args.seed
        if K is None or K == T:  # Algorithm 2
            return ddpm_sample(net, c, (28, 28), self.schedule, T, gamma, seed)
        return strided_sample(net, c, (28, 28), self.schedule, T, gamma, seed, K)
class Flow(Denoiser):
    """Rectified flow: the same UNet learns a velocity, sampled by K Euler steps."""
    defaults = dict(DDPM.defaults, guidance_scale=3.0, sample_steps=50)
    bf16_on_cpu = True  # it scored as in fp32 and trained 1.65x faster: docs/results.md
    def loss(self, net, x, c):
        return flow_forward(net, x, c, self.args.p_uncond)
    def sample(self, net, c, gamma):
        return flow_sample(net, c, (28, 28), self.args.sample_steps, gamma, self.args.seed)
METHODS = {"ddpm": DDPM, "flow": Flow}  # Part 2's --method; Part 1's is the Denoiser
# --------------------------------------------------------------------------- training
def load_mnist(root, train, device, limit=None):
    """One MNIST split as device tensors: images (N, 1, 28, 28) in [0, 1] and labels (N,)."""
    new = new_dirs(os.path.join(root, "MNIST", "raw"))  # what a download would make
    try:  # torchvision downloads what is missing, then reads and checks the files
        mnist = torchvision.datasets.MNIST(root, train, download=True)
        x, y = mnist.data, mnist.targets  # (N, 28, 28) uint8, (N,) int64
        if len(x) != len(y) or y.max() > 9:
            raise ValueError("images and labels do not match")
    except Exception as e:  # no internet, or files that are not MNIST's: many kinds of errors
        if isinstance(e, MEMORY):
            raise
        sys.exit(f"error: cannot load MNIST from {root}/MNIST/raw ({type(e).__name__}): offline, "
                 "put train-images-idx3-ubyte, train-labels-idx1-ubyte and the two t10k- files "
                 "there, or pass --data-dir; a damaged file: delete it to download it again")
    finally:
        remove_empty(new)  # a failed or interrupted download leaves no empty folders
    return (x[:limit, None].float() / 255).to(device), y[:limit].to(device)  # (N, 1, 28, 28)
PER_COMMAND = ("part", "epochs", "device", "precision", "data_dir", "out_dir", "resume",
               "sample_only", "digits", "guidance_scale", "sample_steps")  # the rest: a run's
COMMON = dict(hidden=128, sigma=0.5, num_ts=300, p_uncond=0.1, limit=60000, seed=0, lr_decay=1.0,
              method="ddpm", precision="auto")  # the spec's, or measured: docs/results.md
def settle(cli, saved):
    """Each flag's value: a run's own from its checkpoint, the command line, then defaults."""
    given = {k: v for k, v in vars(cli).items() if v is not None}
    own = {k: v for k, v in saved.items() if k in vars(cli) and k not in PER_COMMAND}
    for k in own.keys() & given.keys():
        if own[k] != given[k]:
            print(f"the checkpoint has --{k.replace('_', '-')} {own[k]}: using it, not {given[k]}")
    name = {**COMMON, **given, **own}["method"]  # a checkpoint's may not be registered here
    if cli.part == 2 and name not in METHODS:
        sys.exit(f"error: --method {name} is not in METHODS: register its class, then run again")
    method = Denoiser if cli.part == 1 else METHODS[name]
    epochs = {"epochs": saved["epochs"]} if "epochs" in saved else {}
    flags = {**vars(cli), **COMMON, **method.defaults, **epochs, **given, **own}
    if flags["precision"] == "auto":
        flags["precision"] = default_precision(flags["device"], method)
    return argparse.Namespace(**flags)
AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # --precision
def build(args):
    """The run of the settled flags: model, method, optimizer, loss scaler, autocast."""
    torch.manual_seed(args.seed)
    D = args.hidden
    model = UnconditionalUNet(1, D) if args.part == 1 else ConditionalUNet(1, 10, D)
    layout = torch.contiguous_format if args.device == "mps" else torch.channels_last
    model = model.to(args.device, memory_format=layout)  # channels_last: faster where measured
    return argparse.Namespace(
        model=model, method=(Denoiser if args.part == 1 else METHODS[args.method])(args),
        optimizer=torch.optim.Adam(model.parameters(), lr=args.lr, fused=args.device == "cuda"),
        scaler=torch.amp.GradScaler(args.device, enabled=args.precision == "fp16"),
        autocast=torch.autocast(args.device, dtype=AUTOCAST[args.precision],
                                enabled=args.precision != "fp32"))
STATES = ("model", "optimizer", "scaler")  # what a checkpoint holds of a run, with its flags
def recalibrate(run, x, y, batch_size):
    """BatchNorm's running statistics: the plain mean of 100 training batches (docs/results.md)."""
    gpu = [x.device] if x.is_cuda else []  # its generator and the CPU's are left as they were
    with torch.no_grad(), torch.random.fork_rng(devices=gpu), run.autocast:
        for m in run.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average, not momentum 0.1's last few batches
        for idx in torch.randperm(len(x), device=x.device)[:100 * batch_size].split(batch_size):
            run.method.loss(run.model, x[idx], y[idx])  # a forward pass in train mode
def train(args, run, x, y, start, losses):
    """The loop both parts share, from epoch start on; yields each epoch's checkpoint."""
    steps = math.ceil(len(x) / args.batch_size)
    for epoch in range(start, args.epochs + 1):
        run.model.train()
        for group in run.optimizer.param_groups:  # exponential decay over the epochs of the run
            group["lr"] = args.lr * args.lr_decay ** ((epoch - 1) / args.epochs)
        epoch_losses = []
        t_epoch = t_print = time.time()
        for i, idx in enumerate(torch.randperm(len(x), device=x.device).split(args.batch_size)):
            with run.autocast:  # the forward pass in --precision; backward follows it
                loss = run.method.loss(run.model, x[idx], y[idx])
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()  # fp16: the loss scaled against underflow
            run.scaler.step(run.optimizer)
            run.scaler.update()
            epoch_losses.append(loss.detach())  # no waiting for the device
            if time.time() - t_print > 5 or i + 1 == steps:
                if not (torch.stack(epoch_losses) < 1e3).all():  # NaN, inf or blown up: stop
                    raise FloatingPointError(f"the loss diverged in epoch {epoch}")
                t_print = time.time()
                seen = min((i + 1) * args.batch_size, len(x))  # images of this epoch
                rate = seen / (t_print - t_epoch)  # images per second
                eta = ((args.epochs - epoch + 1) * len(x) - seen) / rate / 60  # in minutes
                print(f"part {args.part} | epoch {epoch}/{args.epochs} | step {i + 1}/{steps} | "
                      f"loss {epoch_losses[-1].item():.4f} | {rate:.0f} img/s | ETA {eta:.1f} min")
        recalibrate(run, x, y, args.batch_size)  # for the checkpoint and the pictures
        losses += torch.stack(epoch_losses).tolist()  # float32 losses, also under autocast
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all())  # every GPU's
        if args.device == "mps":
            rng["mps"] = torch.mps.get_rng_state()
        yield dict(epoch=epoch, losses=losses, args=vars(args), rng=rng,
                   **{k: vars(run)[k].state_dict() for k in STATES})
# --------------------------------------------------------------------------- pictures
SCALE, PAD = 3, 2  # each 28 px digit drawn 3x larger, 2 px gutters between digits
SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]  # the noise levels of Part 1's pictures
GAMMAS = [0, 1, 3, 5, 10]  # the guidance scales of Part 2's sweep
PLOT = (720, 420)  # the loss plot's size in pixels
BOX = (70, 36, 700, 370)  # its axes: left, top, right, bottom
def grid(x, nrow, title, cols=(), rows=(), scale=SCALE):
    """Tile images (N, 1, 28, 28) in [0, 1] into rows of nrow, upscaled, with a title and labels."""
    if not x.isfinite().all():  # NaN or inf: a model gone wrong
        print(f"warning: {title!r} has pixels that are not finite: NaN drawn grey, inf white")
    x = F.interpolate(x.nan_to_num(0.5).clamp(0, 1).cpu(), scale_factor=scale)  # NaN grey; nearest
    img = to_pil_image(make_grid(x, nrow, PAD * scale, pad_value=0.5)[0])  # grey, (H, W)
    width = ImageDraw.Draw(img).textlength  # a text's width in pixels
    left = int(max([width(s) + 8 for s in rows], default=0))  # room for the row labels
    top = 30 if cols else 16  # room for the title and the column labels
    right = max(int(width(title)) + 8 - left - img.width, 0)  # room for the title
    canvas = ImageOps.expand(img, (left, top, right, 0), 255)  # white margins
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, 0)
    cell = (28 + PAD) * scale
    for j, s in enumerate(cols):  # over each column, under the title
        draw.text((left + j * cell + 10, top - 13), s, 0)
    for i, s in enumerate(rows):  # left of each row, halfway down
        draw.text((4, top + i * cell + cell // 2), s, 0)
    return canvas
def loss_plot(losses, args, epochs):
    """The loss per step, a centred moving average over 2% of the run, on a log scale in BOX."""
    k = len(losses) // 100 + 1  # the average spans k steps on each side
    avg = F.avg_pool1d(torch.tensor([losses[:1] + losses]), 2 * k + 1, 1, k,
                       count_include_pad=False)  # (1, n + 1): the first loss also at step 0
    y = avg[0].log10()
    lo = y.min().item() - 0.05  # a margin of 0.05 decades: a flat loss still has a scale
    hi = y.max().item() + 0.05
    left, top, right, bottom = BOX
    height = bottom - (bottom - top) * (y - lo) / (hi - lo)  # (n + 1,): lo at the bottom
    px = torch.stack([torch.linspace(left, right, len(y)), height], 1)  # (n + 1, 2): x, y
    img = Image.new("L", PLOT, 255)
    d = ImageDraw.Draw(img)
    d.rectangle(BOX, outline=160)
    d.line(px.flatten().tolist(), 0, 2)  # (2 (n + 1),): x, y, x, y, ...
    d.text((left, 10), f"Part {args.part} loss, D={args.hidden}, lr {args.lr:g}; log scale from "
                       f"{10 ** lo:.3g} (bottom) to {10 ** hi:.3g} (top)", 0)
    d.text((left, bottom + 10), f"epochs 0 to {epochs}, left to right ({len(losses) // epochs} "
                                f"steps of {args.batch_size} each)", 0)
    return img
def save(args, files, show=False):
    """Write {name: checkpoint, picture or GIF frames} by way of name.tmp; show: in a notebook."""
    for name, obj in files.items():
        path = os.path.join(args.out_dir, name)
        data = io.BytesIO()  # written by Python: a full disk is an OSError, not torch's own
        if name.endswith(".pt"):
            torch.save(obj, data)
        else:  # a GIF's frames 100 ms each, the last held 2.5 s
            frames = obj if isinstance(obj, list) else [obj]
            frames[0].save(data, name[-3:], save_all=True, append_images=frames[1:], loop=0,
                           duration=[100] * (len(frames) - 1) + [2500])
        try:
            pathlib.Path(path + ".tmp").write_bytes(data.getvalue())
            os.replace(path + ".tmp", path)
        finally:
            pathlib.Path(path + ".tmp").unlink(missing_ok=True)
        if show and "ipykernel" in sys.modules:
            import IPython.display
            IPython.display.display(IPython.display.Image(filename=path))
    return [os.path.join(args.out_dir, name) for name in files]
@torch.no_grad()
def part1_pictures(run, args, epoch, final):
    """Part 1's test digits clean, noisy, denoised; after the last epoch, at every sigma too."""
    net = run.model.eval()
    x = load_mnist(args.data_dir, False, args.device)[0][:10]  # (10, 1, 28, 28)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed)).to(x.device)
    z = x + args.sigma * eps
    title = f"Part 1 after epoch {epoch}: test digits, sigma {args.sigma}"
    out = {f"part1_denoised_epoch{epoch:02d}.png": grid(torch.cat([x, z, net(z)]), 10, title, (),
                                                        ["clean", "noisy", "denoised"])}
    if final:  # the same noise at every sigma
        noisy = torch.stack([x[:4] + s * eps[:4] for s in SIGMAS], 1)  # (4, 7, 1, 28, 28)
        labels = [f"sigma={s}" for s in SIGMAS]  # flatten(0, 1) below: (28, 1, 28, 28)
        out["part1_noising.png"] = grid(noisy.flatten(0, 1), 7, "Part 1: z = x + sigma eps", labels)
        ood = torch.stack([noisy, net(noisy.flatten(0, 1)).view_as(noisy)], 1)  # (4, 2, 7, ...)
        title = f"Part 1 out of distribution: the denoiser trained at sigma {args.sigma}"
        out["part1_ood.png"] = grid(ood.flatten(0, 2), 7, title, labels, ["noisy", "denoised"] * 4)
    return out
def part2_pictures(run, args, epoch, final, digits="0123456789"):
    """4 samples of each digit, a column each; final: the guidance sweep and the GIF too."""
    name = f"samples_epoch{epoch:02d}" if epoch else f"digits_{digits}"  # epoch None: --digits
    c = torch.tensor(list(map(int, digits)), device=args.device).repeat(4)  # (4K,)
    with run.autocast:  # sampling in --precision too
        x, caches = run.method.sample(run.model, c, args.guidance_scale)
        if final:
            xs = torch.cat([run.method.sample(run.model, c[:20], g)[0] for g in GAMMAS])
    title = f"Part 2 {name}, gamma {args.guidance_scale:g}"
    out = {f"part2_{name}.png": grid(x, len(digits), title, digits)}
    if final:  # xs: (20 G, 1, H, W), 2 rows of each gamma
        labels = [s for g in GAMMAS for s in (f"gamma={g}", "")]  # 2 rows each
        out["part2_guidance.png"] = grid(xs, 10, "Part 2: CFG scale, same seed", digits, labels)
        out["part2_sampling.gif"] = [grid(f[:20], 10, title, digits, scale=2).quantize(16)
                                     for f in caches + [x]]  # 16 grey levels: a small file
    return out
# --------------------------------------------------------------------------- command line
def default_precision(device, method, cpuinfo="/proc/cpuinfo"):
    """--precision auto: fp16 on GPUs before 8.0, bf16 where a method keeps its quality, fp32."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        return "fp16"
    flags = pathlib.Path(cpuinfo).read_text() if os.path.exists(cpuinfo) else ""  # Linux has it
    native = re.search("avx512_bf16|amx_bf16", flags) is not None
    return "bf16" if device == "cpu" and method.bf16_on_cpu and native else "fp32"
def usage_error(message, prog="ddpm_mnist.py"):  # a bad value: one line, exit status 2
    sys.stderr.write(f"{prog}: error: {message} (see --help)\n")
    raise SystemExit(2)
def number(kind, lo, hi=math.inf):  # an argparse type=: an int or a float in [lo, hi]
    def parse(text):
        with contextlib.suppress(ValueError):
            if lo <= (v := kind(text)) <= hi:
                return v
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__} in [{lo}, {hi}]")
    return parse
def get_args(argv=None, prog="ddpm_mnist.py"):
    """Flags as on the command line, a list (None: none, never a kernel's argv); unset: None."""
    p = argparse.ArgumentParser(prog, description="DDPM and classifier-free guidance on MNIST")
    devices = [d for d in ("cuda", "mps") if getattr(torch, d).is_available()] + ["cpu"]
    count = number(int, 1)
    def add(flag, help, **kw):  # each help states the default
        g.add_argument(flag, help=help, **kw)
    p.error = functools.partial(usage_error, prog=prog)
    g = p.add_argument_group("run")
    add("--part", "1: one-step denoiser, 2: DDPM (default: 1)", default=1, type=int, choices=[1, 2])
    add("--epochs", "training epochs (default: 5 or 20 by part)", type=count)
    add("--batch-size", "batch size (default: 256 or 128 by part)", type=count)
    add("--lr", "Adam's lr (default: 1e-4 or 1e-3 by part)", type=number(float, 1e-12, 1e3))
    add("--hidden", "UNet width D (default: 128)", type=count)
    add("--seed", "random seed, kept with the run (default: 0)", type=number(int, 0, 2 ** 32 - 1))
    add("--device", f"of those here (default: {devices[0]})", default=devices[0], choices=devices)
    add("--precision", "auto: fp16 on GPUs before Ampere, bf16 for flow on CPUs with native bf16, "
        "else fp32 (default: auto)", choices=["auto", *AUTOCAST])
    add("--data-dir", "MNIST's root (default: data)", default="data", type=os.path.expanduser)
    add("--out-dir", "where a run writes (default: out)", default="out", type=os.path.expanduser)
    add("--limit", "train on the first N images (default: 60000, all)", type=count)
    add("--resume", "continue OUT_DIR/partN.pt, or draw its pictures", action="store_true")
    add("--sample-only", "draw the final pictures of OUT_DIR/partN.pt", action="store_true")
    g = p.add_argument_group("part 1")
    add("--sigma", "training noise level (default: 0.5)", type=number(float, 0, 1e3))
    g = p.add_argument_group("part 2")
    add("--num-ts", "diffusion steps T (default: 300)", type=count)
    add("--p-uncond", "class dropout probability (default: 0.1)", type=number(float, 0, 1))
    add("--method", f"one of METHODS: {', '.join(METHODS)} (default: ddpm)", choices=METHODS)
    add("--digits", "draw 4 samples of each of these digits, such as 2026")
    add("--guidance-scale", "CFG gamma (default: 5; flow: 3)", type=number(float, -1e6, 1e6))
    add("--sample-steps", "K of the T steps, K divides T (default: T; flow: 50)", type=count)
    args = p.parse_args([] if argv is None else argv)
    if args.digits is not None and (args.part == 1 or not re.fullmatch("[0-9]{1,40}", args.digits)):
        p.error(f"argument --digits: {args.digits!r} is not 1 to 40 digits, or not --part 2")
    return args
def new_dirs(path):  # the folders that os.makedirs(path) would make, deepest first
    path = os.path.abspath(path)
    return [] if os.path.exists(path) else [path] + new_dirs(os.path.dirname(path))
def remove_empty(folders):
    for folder in folders:  # deepest first; a folder that holds anything stays
        with contextlib.suppress(OSError):
            os.rmdir(folder)
MEMORY = (MemoryError, torch.OutOfMemoryError)  # out of memory, known by its types
FAULTS = (*MEMORY, OSError, FloatingPointError, KeyboardInterrupt)  # what the world throws
SIGNALS = [getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]  # as Ctrl-C
def fault(e, cli):
    """The one line for a fault: what happened, what the checkpoint holds, what to do next."""
    path = os.path.join(cli.out_dir, f"part{cli.part}.pt")
    saved, again = "no checkpoint saved: ", "run again"
    with contextlib.suppress(Exception):  # mmap: little memory, which may be what ran out
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = f"{path} holds epoch {ckpt['epoch']} of {ckpt['args']['epochs']}: "
        again = "--resume continues"
    if isinstance(e, MEMORY):  # with more memory free, or a smaller run
        return (f"error: out of memory; {saved}free some, then {again}; or start anew with a lower "
                "--batch-size or --hidden")
    if isinstance(e, FloatingPointError):  # and diverge again
        return f"error: {e}; {saved}start anew with a lower --lr"
    if isinstance(e, OSError):
        return f"error: {e}; {saved}fix that, then {again}"
    return f"interrupted; {saved}{again}"
@contextlib.contextmanager
def one_line_faults(cli):
    """Each of FAULTS (SIGTERM, SIGHUP too) ends a command with fault()'s line; a bug does not."""
    handlers = {s: signal.signal(s, signal.default_int_handler) for s in SIGNALS}  # as Ctrl-C
    try:
        yield
    except FAULTS as e:
        e.__traceback__ = None  # its frames' tensors freed: reading the checkpoint needs memory
        line = "interrupted"  # if Ctrl-C comes again while the checkpoint is read
        with contextlib.suppress(KeyboardInterrupt):
            line = fault(e, cli)
        sys.exit(line)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
@contextlib.contextmanager
def locked(cli):
    """--out-dir for this process alone, made if missing, removed if the run saved nothing."""
    made = new_dirs(cli.out_dir)
    os.makedirs(cli.out_dir, exist_ok=True)
    path = os.path.join(cli.out_dir, f"part{cli.part}.lock")
    lock = open(path, "ab", buffering=0)
    try:
        if os.name == "posix":  # Windows has no such lock
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if held
        if not os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):  # a lock file removed
            raise BlockingIOError  # by a run that has just ended, and made anew by another
    except (BlockingIOError, FileNotFoundError):
        lock.close()
        sys.exit(f"error: a run of Part {cli.part} is writing into {cli.out_dir}: let it finish")
    try:
        lock.write(b"a run is writing here\n")  # a folder that cannot be written fails here
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while locked: no other run can hold the file removed
        lock.close()
        remove_empty(made)
def not_a_checkpoint(path, part, e):
    sys.exit(f"error: {path} is not a Part {part} checkpoint of this script ({type(e).__name__})")
def open_run(cli):
    """(args, run, checkpoint) of a new run, or of the one in --out-dir to resume or sample."""
    path = os.path.join(cli.out_dir, f"part{cli.part}.pt")
    found = os.path.exists(path)
    if found and not (cli.resume or cli.sample_only):  # never overwrite a run
        sys.exit(f"error: {path} holds a run: --resume continues it; to start anew, delete it "
                 "or choose another --out-dir")
    if not found and (cli.resume or cli.sample_only):  # nor invent one
        sys.exit(f"error: no checkpoint at {path}: check --part and --out-dir")
    if not found:
        args = settle(cli, {})
        return args, build(args), dict(epoch=0, losses=[])
    try:  # torch.load checks the file: a torn or foreign one raises
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if {"epoch", "losses", "args", "rng", *STATES} - ckpt.keys():
            raise KeyError("not all that this script saves")
        args = settle(cli, ckpt["args"])  # a run's flags, read from the file
    except Exception as e:
        if isinstance(e, MEMORY) or isinstance(e, OSError) and e.filename:  # not the file's fault
            raise
        not_a_checkpoint(path, cli.part, e)
    run = build(args)
    ours = {k: run.optimizer.defaults[k] for k in ("fused", "foreach")}  # as this device wants
    try:  # load_state_dict checks names and shapes: a foreign checkpoint raises
        ckpt["optimizer"]["param_groups"] = [g | ours for g in ckpt["optimizer"]["param_groups"]]
        for k in STATES:  # an fp32 run's loss scale is empty: an fp16 scaler keeps its own
            if ckpt[k] or k != "scaler":
                vars(run)[k].load_state_dict(ckpt[k])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"][:torch.cuda.device_count()])  # present
        if "mps" in ckpt["rng"] and torch.backends.mps.is_available():
            torch.mps.set_rng_state(ckpt["rng"]["mps"])
    except (KeyError, ValueError, RuntimeError) as e:
        not_a_checkpoint(path, cli.part, e)
    return args, run, ckpt
def train_and_draw(cli):
    """Train, resume or draw the final pictures in a locked --out-dir; returns the files written."""
    args, run, ckpt = open_run(cli)
    start, losses = ckpt["epoch"] + 1, ckpt["losses"]
    print(f"part {args.part} on {args.device}, {args.precision} | D={args.hidden}, epochs "
          f"{args.epochs}, batch {args.batch_size}, lr {args.lr:g}")
    if args.resume and not args.sample_only:  # the command line's precision may not be the run's
        print(f"resumed after epoch {start - 1}, trained in {ckpt['args']['precision']}")
    t0 = time.time()
    files = []
    def pictures(epoch, final):  # the loss plot, then the epoch's pictures
        out = {f"part{args.part}_loss.png": loss_plot(losses, args, epoch)}
        if epoch in (1, 5, 10, 15, 20) or final:
            draw = part1_pictures if args.part == 1 else part2_pictures
            out.update(draw(run, args, epoch, final))
        return out
    if args.sample_only or start > args.epochs:  # trained: the final pictures again
        if not (args.sample_only and args.digits):
            files += save(args, pictures(start - 1, True), show=True)
    else:
        if start > 1:  # an interrupt may have cut the pictures of the epoch saved last
            files += save(args, pictures(start - 1, False))
        x, y = load_mnist(args.data_dir, True, args.device, args.limit)
        for ckpt in train(args, run, x, y, start, losses):
            final = ckpt["epoch"] == args.epochs
            save(args, {f"part{args.part}.pt": ckpt})  # before the pictures
            files += save(args, pictures(ckpt["epoch"], final), show=final)
    if args.digits:
        files += save(args, part2_pictures(run, args, None, False, args.digits), show=True)
    print(f"done in {time.time() - t0:.1f} s; pictures in {args.out_dir}: {len(set(files))}")
    return sorted(set(files))
def main(argv=None):
    """Run flags given as on the command line, a list of strings; returns the pictures written."""
    if argv is not None and not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        sys.exit(f"error: main() takes a list of strings such as ['--part', '2'], not {argv!r}")
    cli = get_args(argv)
    with one_line_faults(cli), locked(cli):
        return train_and_draw(cli)

if __name__ == "__main__" and "__file__" in globals():  # a shell or %run; not a pasted cell
    main(sys.argv[1:])