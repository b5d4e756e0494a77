"""ddpm_mnist.py: diffusion models from scratch on MNIST, in one file.

Part 1 trains a UNet to denoise digits in a single step (z = x + sigma * eps -> x).
Part 2 trains a class-conditioned DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239) whose
UNet predicts the noise eps from (x_t, t, c), and samples digits of a chosen class with
classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).

    pip install -r requirements.txt
    python ddpm_mnist.py --part 1                 # single-step denoiser, 5 epochs
    python ddpm_mnist.py --part 2 --epochs 20     # class-conditioned DDPM with guidance

Beyond the spec, each behind a flag: rectified flow (--method flow), a residual UNet (--arch res),
an EMA of the weights (--ema), data in [-1, 1] (--pm1), clipped x0 while sampling (--clip-x0), a
quality number (--eval: a small MNIST classifier's accuracy and a Frechet distance in its feature
space), and --preset best (constant lr + EMA + x0 clipping), the combination with the lowest Frechet
distance at a small budget (README).

In a notebook, paste this file into a cell, then call main(["--part", "2"]).
Everything a run writes (PNG grids, loss curves, a GIF, checkpoints) goes under --out-dir.
MNIST is downloaded into --data-dir when missing.

Time and result with the defaults on one NVIDIA H200: Part 1 in about 25 s (test MSE 0.008 at
sigma 0.5, against 0.25 for the noisy input), Part 2 in about 2 minutes (all 40 digits of the
final grid of the requested class). A CPU is far slower: try --hidden 32 --epochs 2 first.
README.md has the measured figures and pictures.
"""

import argparse
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

# --------------------------------------------------------------------------- flags
SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]  # noise levels of Part 1's pictures
DEFAULTS = {  # part-specific defaults, used when a flag is not given
    1: dict(epochs=5, batch_size=256, lr=1e-4, lr_decay=1.0),
    2: dict(epochs=20, batch_size=128, lr=1e-3, lr_decay=0.1),  # chosen by measured comparisons, see README
}
EMA_DECAY = 0.995  # --ema without a value: an average over about the last 200 steps (measured, README)
PRESETS = {"spec": {}, "best": dict(lr_decay=1.0, ema=EMA_DECAY, clip_x0=True)}  # the lowest Frechet distance, README


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def floats(text: str) -> list:
    """'0,1,3' -> [0.0, 1.0, 3.0]."""
    return [float(v) for v in text.split(",")]


def get_args(argv=None) -> argparse.Namespace:
    """Parse flags; argv=None reads sys.argv, a list makes main() callable from a notebook."""
    p = ArgumentParser(prog="ddpm_mnist.py", description="DDPM and classifier-free guidance on MNIST.")
    g = p.add_argument_group("run")
    g.add_argument("--part", type=int, default=1, choices=[1, 2], help="1: one-step denoiser, 2: DDPM (default: 1)")
    best = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in PRESETS["best"].items())
    g.add_argument("--preset", choices=list(PRESETS), default="spec", help=f"spec: the course's model; best: {best}, "
                   "the combination that measured best (README); flags given still win (default: spec)")
    g.add_argument("--epochs", type=int, metavar="N", help="training epochs (default: 5 for part 1, 20 for part 2)")
    g.add_argument("--batch-size", type=int, metavar="N", help="batch size (default: 256 for part 1, 128 for part 2)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-4 for part 1, 1e-3 for part 2)")
    g.add_argument("--lr-decay", type=float, metavar="F", help="the lr decays exponentially to F times --lr "
                   "over the run (default: 1, a constant lr, for part 1; 0.1 for part 2)")
    g.add_argument("--hidden", type=int, default=128, metavar="D", help="UNet width D (default: 128)")
    g.add_argument("--arch", choices=["spec", "res"], default="spec", help="spec: the course's UNet; res: the same "
                   "weights with a residual connection around each ConvBlock (default: spec)")
    g.add_argument("--ema", type=float, nargs="?", const=EMA_DECAY, metavar="DECAY", help="keep an exponential "
                   f"moving average of the weights, used for pictures (default: off; DECAY {EMA_DECAY} if not given)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    g.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: auto: cuda, then mps, then cpu)")
    g.add_argument("--data-dir", default="data", metavar="DIR", help="root of torchvision's MNIST (default: data)")
    g.add_argument("--out-dir", default="out", metavar="DIR", help="where pictures and checkpoints go (default: out)")
    g.add_argument("--limit", type=int, metavar="N", help="train on the first N training images (default: all)")
    g.add_argument("--eval", type=int, nargs="?", const=20, metavar="N", help="score the final model: Part 1 PSNR "
                   "per sigma; Part 2 a small classifier's verdict on N samples per digit (default: off; N 20)")
    g = p.add_argument_group("part 1")
    g.add_argument("--sigma", type=float, default=0.5, help="training noise level (default: 0.5)")
    g = p.add_argument_group("part 2")
    g.add_argument("--method", choices=["ddpm", "flow"], default="ddpm", help="ddpm: predict eps (the spec); flow: "
                   "rectified flow, predict the velocity (default: ddpm)")
    g.add_argument("--num-ts", type=int, default=300, metavar="T", help="diffusion steps T (default: 300)")
    g.add_argument("--beta1", type=float, default=1e-4, help="first beta of the linear schedule (default: 1e-4)")
    g.add_argument("--beta2", type=float, default=0.02, help="last beta of the linear schedule (default: 0.02)")
    g.add_argument("--p-uncond", type=float, default=0.1, metavar="P", help="class dropout probability (default: 0.1)")
    g.add_argument("--pm1", action="store_true", help="diffuse the data scaled to [-1, 1]; pictures stay in [0, 1] "
                   "(default: off, data in [0, 1] as in the spec)")
    g = p.add_argument_group("checkpoints and sampling")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint (default: off)")
    g.add_argument("--checkpoint", metavar="FILE", help="checkpoint file (default: OUT_DIR/partN.pt)")
    g.add_argument("--sample-only", action="store_true", help="write the final pictures from the checkpoint "
                   "without training (default: off)")
    g.add_argument("--guidance-scale", type=float, default=5.0, metavar="G", help="CFG scale gamma (default: 5)")
    g.add_argument("--gammas", type=floats, default=[0.0, 1.0, 3.0, 5.0, 10.0], metavar="G,G",
                   help="guidance scales of the final sweep picture and of --eval (default: 0,1,3,5,10)")
    g.add_argument("--sample-steps", type=int, metavar="K", help="sampling steps: for ddpm K = T is the spec's "
                   "ancestral sampler, K < T the strided deterministic one; for flow K Euler steps (default: T)")
    g.add_argument("--clip-x0", action="store_true", help="clip the predicted clean image to the data range at "
                   "each sampling step (default: off)")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", action="store_true", help="bf16 autocast; slower for this small UNet on an H200 and "
                   "on CPUs without AMX, see README (default: off)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default: on)")
    g.add_argument("--compile", nargs="?", const="default", metavar="MODE", help="torch.compile the UNet; MODE is "
                   "default, reduce-overhead (CUDA graphs) or max-autotune (default: off)")
    g.add_argument("--benchmark", action="store_true", help="time training and sampling on random data, print "
                   "name=value lines and the projected run time, then exit (default: off)")
    g.add_argument("--bench-steps", type=int, default=20, metavar="N", help="steps the benchmark times (default: 20)")
    argv = [] if argv is None and "ipykernel" in sys.modules else argv
    args = p.parse_args(argv)
    p.set_defaults(**{**DEFAULTS[args.part], **PRESETS[args.preset]})  # flags on the command line still win
    args = p.parse_args(argv)
    checks = [(args.epochs < 1, "--epochs must be >= 1"), (args.batch_size < 1, "--batch-size must be >= 1"),
              (args.lr <= 0, "--lr must be > 0"), (not 0 < args.lr_decay <= 1, "--lr-decay must be in (0, 1]"),
              (args.hidden < 1, "--hidden must be >= 1"), (args.limit is not None and args.limit < 1,
                                                             "--limit must be >= 1"),
              (args.ema is not None and not 0 <= args.ema < 1, "--ema must be in [0, 1)"),
              (args.eval is not None and args.eval < 1, "--eval must be >= 1"),
              (args.sigma < 0, "--sigma must be >= 0"), (args.num_ts < 1, "--num-ts must be >= 1"),
              (not 0 < args.beta1 < args.beta2 < 1, "need 0 < --beta1 < --beta2 < 1"),
              (not 0 <= args.p_uncond <= 1, "--p-uncond must be in [0, 1]"),
              (args.sample_steps is not None and args.sample_steps < 1, "--sample-steps must be >= 1"),
              (args.method == "ddpm" and (args.sample_steps or 0) > args.num_ts, "need --sample-steps <= --num-ts"),
              (args.compile not in (None, "default", "reduce-overhead", "max-autotune"), "unknown --compile mode"),
              (args.bench_steps < 1, "--bench-steps must be >= 1")]
    for bad, msg in checks:
        if bad:
            p.error(msg)
    return args


# --------------------------------------------------------------------------- utilities
SCALE, PAD = 3, 2  # pictures: each 28 px digit drawn 3x larger, 2 px gutters between digits


def get_device(name: str) -> torch.device:
    """Resolve --device; 'auto' picks cuda, then mps, then cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but PyTorch sees no CUDA GPU here (try --device auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        sys.exit("error: --device mps, but MPS is not available here (try --device auto)")
    return torch.device(name)


def grid_image(x: torch.Tensor, nrow: int, title: str = "", col_labels=(), row_labels=(), scale: int = SCALE):
    """Tile images (N, 1, 28, 28) in [0, 1] into rows of nrow, upscaled, with thin gutters and labels."""
    grid = make_grid(x.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=PAD, pad_value=0.5)  # (3, H, W)
    img = to_pil_image(grid).convert("L")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    left = 64 if any(row_labels) else 0
    top = (16 if title else 0) + (14 if any(col_labels) else 0)
    canvas = Image.new("L", (img.width + left, img.height + top), 255)
    canvas.paste(img, (left, top))
    draw, cell = ImageDraw.Draw(canvas), (28 + PAD) * scale
    draw.text((4, 2), title, fill=0)
    for j, s in enumerate(col_labels):
        draw.text((left + PAD * scale + j * cell + 4, top - 13), s, fill=0)
    for i, s in enumerate(row_labels):
        draw.text((4, top + PAD * scale + i * cell + cell // 2 - 8), s, fill=0)
    return canvas


def save_grid(path: str, *args, **kwargs) -> None:
    """grid_image(...) saved as PNG."""
    grid_image(*args, **kwargs).save(path)


def nice_ticks(hi: int, n: int = 6) -> list:
    """Whole tick values in [1, hi], 1, 2 or 5 times a power of ten apart, about n of them."""
    raw = max(hi / n, 1)
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [1] + [k * step for k in range(1, hi // step + 1) if k * step > 1]


def save_loss_plot(path: str, losses: list, title: str, steps_per_epoch: int) -> None:
    """Draw the per-step loss (log scale, raw points and a moving average) with labelled axes."""
    W, H, L, R, T, B = 720, 420, 70, 20, 36, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    n = len(losses)
    logs = [math.log10(max(v, 1e-12)) for v in losses]
    y0, y1 = math.floor(min(logs) * 4) / 4, math.ceil(max(logs) * 4) / 4 + 1e-9
    px = lambda i: L + (W - L - R) * i / max(n - 1, 1)
    py = lambda lv: T + (H - T - B) * (y1 - lv) / (y1 - y0)
    for v in nice_ticks(n):  # x axis: optimizer steps
        d.line([(px(v - 1), H - B), (px(v - 1), H - B + 4)], fill="black")
        d.text((px(v - 1) - 10, H - B + 7), str(v), fill="black")
    decades = range(math.floor(y0), math.ceil(y1) + 1)  # y axis: 1, 2, 5 per decade
    for lv in [math.log10(m) + e for e in decades for m in (1, 2, 5)]:
        if y0 <= lv <= y1:
            d.line([(L - 4, py(lv)), (W - R, py(lv))], fill=(225, 225, 225))
            d.text((4, py(lv) - 6), f"{10 ** lv:.3g}", fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.point([(px(i), py(v)) for i, v in enumerate(logs)], fill=(150, 180, 230))
    k = max(1, n // 100)  # centred moving average over about 2% of the run (no lag)
    smooth = [sum(logs[max(0, i - k):i + k + 1]) / len(logs[max(0, i - k):i + k + 1]) for i in range(n)]
    d.line([(px(i), py(v)) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    d.text((L, 10), title, fill="black")
    d.text(((W - L) // 2, H - 20), f"step ({steps_per_epoch} per epoch)", fill="black")
    d.text((4, T - 18), "loss (log)", fill="black")
    img.save(path)


def save_checkpoint(path: str, **state) -> None:
    """Write atomically: a temporary file, then rename, so an interrupted save leaves the old file."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def load_weights(model: nn.Module, state: dict, path: str) -> None:
    """load_state_dict with a one-line error for a checkpoint of another architecture."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        sys.exit(f"error: {path} holds weights of another architecture than this model")


def rng_state() -> dict:
    """The global RNG states (CPU and CUDA) that training draws from."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- data
MNIST_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


def load_mnist(root: str, train: bool, device: torch.device, limit=None):
    """One MNIST split as device tensors: images (N, 1, 28, 28) in [0, 1] and labels (N,)."""
    try:
        ds = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:  # no internet, a proxy, a half-written file: all end here
        sys.exit(f"error: MNIST is not under {os.path.join(root, 'MNIST', 'raw')} and could not be downloaded "
                 f"({type(e).__name__}). Put the four files {MNIST_FILES} (unzipped) in that folder, "
                 f"or pass --data-dir DIR whose MNIST/raw/ holds them.")
    x, y = ds.data[:limit], ds.targets[:limit]  # (N, 28, 28) uint8, (N,) int64
    return (x.unsqueeze(1).float() / 255).to(device), y.to(device)  # (N, 1, 28, 28)


def batches(n: int, batch_size: int, device: torch.device):
    """Shuffled index batches over range(n), drawn from the global RNG; the last may be short."""
    perm = torch.randperm(n, device=device)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------- model
class Conv(nn.Sequential):  # (Din, H, W) -> (Dout, H, W)
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.GELU())


class DownConv(nn.Sequential):  # (Din, H, W) -> (Dout, H/2, W/2)
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.GELU())


class UpConv(nn.Sequential):  # (Din, H, W) -> (Dout, 2H, 2W)
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.GELU())


class Flatten(nn.Sequential):  # (D, 7, 7) -> (D, 1, 1)
    def __init__(self):
        super().__init__(nn.AvgPool2d(7), nn.GELU())


class Unflatten(nn.Sequential):  # (D, 1, 1) -> (D, 7, 7)
    def __init__(self, c: int):
        super().__init__(nn.ConvTranspose2d(c, c, 7, 7, 0), nn.BatchNorm2d(c), nn.GELU())


class ConvBlock(nn.Sequential):  # Conv -> Conv: like Conv, with more parameters
    def __init__(self, cin: int, cout: int, residual: bool = False):
        super().__init__(Conv(cin, cout), Conv(cout, cout))
        self.residual = residual and cin == cout  # --arch res: x + Conv(Conv(x)), same weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x) if self.residual else super().forward(x)


class DownBlock(nn.Sequential):  # DownConv -> ConvBlock: like DownConv
    def __init__(self, cin: int, cout: int, residual: bool = False):
        super().__init__(DownConv(cin, cout), ConvBlock(cout, cout, residual))


class UpBlock(nn.Sequential):  # UpConv -> ConvBlock: like UpConv
    def __init__(self, cin: int, cout: int, residual: bool = False):
        super().__init__(UpConv(cin, cout), ConvBlock(cout, cout, residual))


class FCBlock(nn.Sequential):  # (N, Fin) -> (N, Fout): Linear, GELU, Linear
    def __init__(self, fin: int, fout: int):
        super().__init__(nn.Linear(fin, fout), nn.GELU(), nn.Linear(fout, fout))


class UnconditionalUNet(nn.Module):
    """Part 1's UNet: (N, 1, 28, 28) -> (N, 1, 28, 28). Concat is torch.cat along channels."""

    def __init__(self, in_channels: int = 1, num_hiddens: int = 128, residual: bool = False):
        super().__init__()
        D, r = num_hiddens, residual
        self.conv_in, self.down1, self.down2 = ConvBlock(in_channels, D), DownBlock(D, D, r), DownBlock(D, 2 * D, r)
        self.flatten, self.unflatten = Flatten(), Unflatten(2 * D)
        self.up1, self.up2 = UpBlock(4 * D, D, r), UpBlock(2 * D, D, r)
        self.conv_out, self.head = ConvBlock(2 * D, D), nn.Conv2d(D, in_channels, 3, 1, 1)

    def unet(self, x: torch.Tensor, film1=None, film2=None) -> torch.Tensor:
        """The UNet; film = (scale, shift), each (N, F), modulates u0 and u1 as scale * u + shift."""
        e0 = self.conv_in(x)  # (N, D, 28, 28)
        e1 = self.down1(e0)  # (N, D, 14, 14)
        e2 = self.down2(e1)  # (N, 2D, 7, 7)
        u0 = self.unflatten(self.flatten(e2))  # (N, 2D, 1, 1) -> (N, 2D, 7, 7)
        if film1 is not None:
            u0 = film1[0][:, :, None, None] * u0 + film1[1][:, :, None, None]  # (N, 2D) broadcast over H, W
        u1 = self.up1(torch.cat([e2, u0], 1))  # (N, 4D, 7, 7) -> (N, D, 14, 14)
        if film2 is not None:
            u1 = film2[0][:, :, None, None] * u1 + film2[1][:, :, None, None]  # (N, D) broadcast over H, W
        u2 = self.up2(torch.cat([e1, u1], 1))  # (N, 2D, 14, 14) -> (N, D, 28, 28)
        return self.head(self.conv_out(torch.cat([e0, u2], 1)))  # (N, 2D, 28, 28) -> (N, 1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


class ConditionalUNet(UnconditionalUNet):
    """Part 2's UNet: eps_theta(x_t, t, c) with t = t/T in [0, 1] and class c one-hot, through FCBlocks."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, num_hiddens: int = 128, residual: bool = False):
        super().__init__(in_channels, num_hiddens, residual)
        D, self.num_classes = num_hiddens, num_classes
        self.fc1_t, self.fc1_c = FCBlock(1, 2 * D), FCBlock(num_classes, 2 * D)
        self.fc2_t, self.fc2_c = FCBlock(1, D), FCBlock(num_classes, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
        """x (N, 1, 28, 28); c (N,) labels; t (N,) in [0, 1]; mask (N,): 1 keeps c, 0 drops it, None keeps all."""
        c = F.one_hot(c, self.num_classes).to(x.dtype)  # (N, 10)
        if mask is not None:
            c = c * mask.to(x.dtype)[:, None]  # (N, 10): rows with mask 0 become the zero vector
        t = t.to(x.dtype)[:, None]  # (N, 1)
        return self.unet(x, (self.fc1_c(c), self.fc1_t(t)), (self.fc2_c(c), self.fc2_t(t)))


# --------------------------------------------------------------------------- diffusion
def ddpm_schedule(beta1: float, beta2: float, num_ts: int) -> dict:
    """Linear DDPM schedule; index i of every tensor holds timestep t = i + 1 (t = 1..T)."""
    assert 0 < beta1 < beta2 < 1, "need 0 < beta1 < beta2 < 1"
    betas = torch.linspace(beta1, beta2, num_ts, dtype=torch.float64)  # beta_t
    alphas = 1 - betas  # alpha_t = 1 - beta_t
    alpha_bars = torch.cumprod(alphas, 0)  # abar_t = prod_{s<=t} alpha_s
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])  # abar_{t-1}, abar_0 = 1
    beta_tildes = (1 - abar_prev) / (1 - alpha_bars) * betas  # eq. 7; 0 at t = 1
    s = dict(betas=betas, alphas=alphas, alpha_bars=alpha_bars, beta_tildes=beta_tildes)
    return {k: v.float() for k, v in s.items()}


def sample_t(n: int, num_ts: int, device) -> torch.Tensor:
    """t ~ Uniform{1, ..., T}, shape (n,)."""
    return torch.randint(1, num_ts + 1, (n,), device=device)


def add_noise(schedule: dict, x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 5: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    abar = schedule["alpha_bars"][t - 1].view(-1, 1, 1, 1)  # (N, 1, 1, 1) broadcast over pixels
    return abar.sqrt() * x_0 + (1 - abar).sqrt() * eps


def drop_mask(n: int, p_uncond: float, device) -> torch.Tensor:
    """Class-dropout mask (n,): 1 keeps the class, 0 (with probability p_uncond) drops it."""
    return (torch.rand(n, device=device) >= p_uncond).float()


def ddpm_forward(unet: nn.Module, schedule: dict, x_0: torch.Tensor, c: torch.Tensor, p_uncond: float,
                 num_ts: int) -> torch.Tensor:
    """Algorithm 1: the loss ||eps - eps_theta(x_t, t, c)||^2 for one batch x_0 (N, 1, 28, 28), c (N,)."""
    t = sample_t(x_0.shape[0], num_ts, x_0.device)
    eps = torch.randn_like(x_0)
    x_t = add_noise(schedule, x_0, t, eps)
    return F.mse_loss(unet(x_t, c, t / num_ts, drop_mask(x_0.shape[0], p_uncond, x_0.device)), eps)


def flow_forward(unet: nn.Module, x_1: torch.Tensor, c: torch.Tensor, p_uncond: float) -> torch.Tensor:
    """Rectified flow (arXiv 2209.03003): x_t = (1 - t) x_0 + t x_1 runs straight from noise x_0 ~ N(0, I)
    at t = 0 to data x_1 at t = 1, t ~ U[0, 1]; the loss is ||(x_1 - x_0) - v_theta(x_t, t, c)||^2."""
    t = torch.rand(x_1.shape[0], device=x_1.device)  # (N,)
    x_0 = torch.randn_like(x_1)
    t4 = t.view(-1, 1, 1, 1)  # (N, 1, 1, 1) broadcast over pixels
    x_t = (1 - t4) * x_0 + t4 * x_1
    return F.mse_loss(unet(x_t, c, t, drop_mask(x_1.shape[0], p_uncond, x_1.device)), x_1 - x_0)


@torch.no_grad()
def guided_eps(unet: nn.Module, x_t: torch.Tensor, c: torch.Tensor, t_norm: float, gamma: float,
               amp: bool = False) -> torch.Tensor:
    """Classifier-free guidance eps_u + gamma (eps_c - eps_u) at time t_norm in [0, 1], both halves in one
    UNet call of 2N (for flow the same formula guides the velocity)."""
    n, dev = x_t.shape[0], x_t.device
    mask = torch.cat([torch.ones(n, device=dev), torch.zeros(n, device=dev)])  # (2N,): eps_c half, then eps_u half
    tt = torch.full((2 * n,), t_norm, device=dev)
    torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(x_t.device.type, torch.bfloat16, enabled=amp):
        eps = unet(torch.cat([x_t, x_t]), torch.cat([c, c]), tt, mask).float()  # (2N, 1, H, W)
    eps_c, eps_u = eps.chunk(2)  # (N, 1, H, W) each
    return eps_u + gamma * (eps_c - eps_u)


def cached_steps(steps: int) -> set:
    """The steps i (of 0..steps-1) before which caches keep x: all of 30 or fewer, else about 30, denser
    towards the end, where the digits take shape."""
    return set(range(steps)) if steps <= 30 else {steps - 1 - round((steps - 1) * (k / 29) ** 2) for k in range(30)}


@torch.no_grad()
def ddpm_sample(unet: nn.Module, c: torch.Tensor, img_wh: tuple, schedule: dict, num_ts: int,
                guidance_scale: float = 5.0, seed: int = 0, amp: bool = False, clip=None):
    """Algorithm 2 with guidance: images x_0 (N, 1, H, W) for labels c (N,), and the cached x_t.

    The noise comes from a generator on c's device, seeded with `seed` for x_T and shifted by 1 at
    each step. caches holds x_T and about 30 x_t after it (see cached_steps). clip=(lo, hi) clips the predicted
    x_0 (eq. 15 of the paper) and steps to the posterior mean of eq. 7 from it; None is the spec's update.
    """
    was_training = unet.training
    unet.eval()
    dev, shape = c.device, (c.shape[0], 1, *img_wh)
    s = {k: v.tolist() for k, v in schedule.items()}  # python floats: no device sync in the loop
    g = torch.Generator(dev).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=dev)  # x_T ~ N(0, I)
    caches, keep = [], cached_steps(num_ts)
    for t in range(num_ts, 0, -1):
        if num_ts - t in keep:
            caches.append(x)
        g.manual_seed(seed + num_ts - t + 1)  # seed shifted by 1 per step
        z = torch.randn(shape, generator=g, device=dev) if t > 1 else torch.zeros_like(x)
        eps = guided_eps(unet, x, c, t / num_ts, guidance_scale, amp)
        a, abar, beta = s["alphas"][t - 1], s["alpha_bars"][t - 1], s["betas"][t - 1]
        if clip is None:
            mean = (x - (1 - a) / math.sqrt(1 - abar) * eps) / math.sqrt(a)
        else:
            abar_prev = s["alpha_bars"][t - 2] if t > 1 else 1.0  # abar_0 = 1
            x_0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(*clip)
            mean = (math.sqrt(abar_prev) * beta * x_0 + math.sqrt(a) * (1 - abar_prev) * x) / (1 - abar)  # eq. 7
        x = mean + math.sqrt(s["beta_tildes"][t - 1]) * z
    unet.train(was_training)
    return x, caches


@torch.no_grad()
def ddim_sample(unet: nn.Module, c: torch.Tensor, img_wh: tuple, schedule: dict, num_ts: int,
                guidance_scale: float = 5.0, seed: int = 0, amp: bool = False, steps: int = 50, clip=None):
    """Deterministic strided sampler (DDIM with eta 0, arXiv 2010.02502) over `steps` of the T timesteps.

    Same model, same x_T for a seed; caches as in ddpm_sample; clip=(lo, hi) clips the predicted x_0.
    """
    was_training = unet.training
    unet.eval()
    abars = schedule["alpha_bars"].tolist()
    ts = sorted({round(v) for v in torch.linspace(num_ts, 1, steps).tolist()}, reverse=True)  # T, ..., 1
    g = torch.Generator(c.device).manual_seed(seed)
    x = torch.randn((c.shape[0], 1, *img_wh), generator=g, device=c.device)  # x_T ~ N(0, I), as in ddpm_sample
    caches, keep = [], cached_steps(len(ts))
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [0])):
        if i in keep:
            caches.append(x)
        eps = guided_eps(unet, x, c, t / num_ts, guidance_scale, amp)
        abar, abar_prev = abars[t - 1], abars[t_prev - 1] if t_prev > 0 else 1.0  # abar_0 = 1
        x_0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)  # eq. 8
        if clip is not None:
            x_0 = x_0.clamp(*clip)
            eps = (x - math.sqrt(abar) * x_0) / math.sqrt(1 - abar)  # the eps that this x_0 implies
        x = math.sqrt(abar_prev) * x_0 + math.sqrt(1 - abar_prev) * eps  # x_t_prev on the same eps
    unet.train(was_training)
    return x, caches


@torch.no_grad()
def flow_sample(unet: nn.Module, c: torch.Tensor, img_wh: tuple, steps: int, guidance_scale: float = 5.0,
                seed: int = 0, amp: bool = False, clip=None):
    """Euler steps x <- x + v / K along the guided velocity from noise (t = 0) to data (t = 1).

    Same x at t = 0 as ddpm_sample's x_T for a seed; caches as in ddpm_sample; clip=(lo, hi) clips the
    predicted end point x_1 = x_t + (1 - t) v.
    """
    was_training = unet.training
    unet.eval()
    g = torch.Generator(c.device).manual_seed(seed)
    x = torch.randn((c.shape[0], 1, *img_wh), generator=g, device=c.device)  # x_0 ~ N(0, I)
    caches, keep = [], cached_steps(steps)
    for i in range(steps):
        if i in keep:
            caches.append(x)
        t = i / steps
        v = guided_eps(unet, x, c, t, guidance_scale, amp)
        if clip is not None:
            v = ((x + (1 - t) * v).clamp(*clip) - x) / (1 - t)
        x = x + v / steps
    unet.train(was_training)
    return x, caches


def sample(unet: nn.Module, c: torch.Tensor, schedule: dict, args, guidance_scale: float):
    """Samples of --method with --sample-steps (the spec's ancestral sampler when ddpm and K = T), and
    their caches, as pictures in [0, 1]."""
    clip = ((-1.0, 1.0) if args.pm1 else (0.0, 1.0)) if args.clip_x0 else None
    kw = dict(seed=args.seed, amp=args.amp, clip=clip)
    if args.method == "flow":
        x, caches = flow_sample(unet, c, (28, 28), args.sample_steps, guidance_scale, **kw)
    elif args.sample_steps >= args.num_ts:
        x, caches = ddpm_sample(unet, c, (28, 28), schedule, args.num_ts, guidance_scale, **kw)
    else:
        x, caches = ddim_sample(unet, c, (28, 28), schedule, args.num_ts, guidance_scale, steps=args.sample_steps, **kw)
    if args.pm1:
        x, caches = (x + 1) / 2, [(f + 1) / 2 for f in caches]  # [-1, 1] -> [0, 1]
    return x, caches


# --------------------------------------------------------------------------- training
def part1_loss(fast, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 1 with z from eq. 2: ||D(x + sigma eps) - x||^2, fresh noise for every batch."""
    return F.mse_loss(fast(x + sigma * torch.randn_like(x)), x)


def build(args, device: torch.device):
    """The part's model, the callable that runs it, its loss_fn(fast, x, labels), for Part 2 the schedule,
    and with --ema the AveragedModel of the weights (else None).

    The callable is the model itself, or its torch.compile'd wrapper with --compile; checkpoints always
    hold the plain model's weights.
    """
    fmt = torch.channels_last if args.channels_last else torch.preserve_format
    residual, schedule = args.arch == "res", None
    if args.part == 1:
        model = UnconditionalUNet(1, args.hidden, residual).to(device, memory_format=fmt)
        loss_fn = lambda fast, x, y: part1_loss(fast, x, args.sigma)
    else:
        model = ConditionalUNet(1, 10, args.hidden, residual).to(device, memory_format=fmt)
        scaled = lambda x: 2 * x - 1 if args.pm1 else x  # --pm1: [0, 1] -> [-1, 1]
        if args.method == "flow":
            loss_fn = lambda fast, x, y: flow_forward(fast, scaled(x), y, args.p_uncond)
        else:
            schedule = {k: v.to(device) for k, v in ddpm_schedule(args.beta1, args.beta2, args.num_ts).items()}
            loss_fn = lambda fast, x, y: ddpm_forward(fast, schedule, scaled(x), y, args.p_uncond, args.num_ts)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) if args.ema else None  # weights only
    return model, torch.compile(model, mode=args.compile) if args.compile else model, loss_fn, schedule, ema


def load_model(model: nn.Module, ema, path: str, part: int) -> int:
    """Load a checkpoint's weights (and its EMA, when ema is an AveragedModel); return its epoch."""
    ckpt = load_checkpoint(path, part)
    load_weights(model, ckpt["model"], path)
    if ema is not None:
        if "ema" not in ckpt:
            sys.exit(f"error: {path} holds no EMA weights (drop --ema, or pass --ema 0)")
        load_weights(ema, ckpt["ema"], path)
    return ckpt["epoch"]


@torch.no_grad()
def update_bn(net: nn.Module, loss_fn, data, batch_size: int, num_batches: int = 32) -> None:
    """Re-estimate the BatchNorm statistics of averaged weights on training batches, as swa_utils.update_bn
    does (which cannot feed this UNet's inputs): averaged running statistics do not fit averaged weights.
    It draws from a fork of the RNG, so the raw weights of a run are the same with or without --ema."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    was_training, (x, y) = net.training, data
    net.train()
    with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device], device_type=x.device.type):
        for idx in batches(len(x), batch_size, x.device)[:num_batches]:  # the training run's RNG is left as it was
            loss_fn(net, x[idx], y[idx])
    for m in bns:
        m.momentum = 0.1
    net.train(was_training)


def make_optimizer(model: nn.Module, args) -> torch.optim.Adam:
    """Adam, fused on CUDA."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, fused=next(model.parameters()).is_cuda)


def train_step(fast, opt, loss_fn, x: torch.Tensor, y: torch.Tensor, amp: bool) -> torch.Tensor:
    """One optimizer step; returns the loss without waiting for the device."""
    torch.compiler.cudagraph_mark_step_begin()  # with --compile reduce-overhead: a new step's graphs
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        loss = loss_fn(fast, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train(args, model: nn.Module, fast, loss_fn, ema, data, ckpt_path: str, on_epoch_end) -> list:
    """The loop both parts share: shuffled batches, progress lines, the EMA update after each step, and
    on_epoch_end(epoch, losses, net) with net the EMA model (or fast), then a checkpoint, every epoch."""
    train_x, train_y = data
    n, name = len(train_x), f"part {args.part}"
    opt = make_optimizer(model, args)
    start, losses = 1, []
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, args.part)
        load_weights(model, ckpt["model"], ckpt_path)
        if ema is not None and "ema" in ckpt:
            load_weights(ema, ckpt["ema"], ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, losses = ckpt["epoch"] + 1, ckpt["losses"]
        print(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}")
    elif args.resume:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")
    steps = math.ceil(n / args.batch_size)
    t_start, t_last, done, t_other = time.time(), time.time(), 0, 0.0  # t_other: pictures and checkpoints
    for epoch in range(start, args.epochs + 1):
        fast.train()
        for group in opt.param_groups:  # exponential decay: lr at the last epoch is nearly lr_decay * lr
            group["lr"] = args.lr * args.lr_decay ** ((epoch - 1) / args.epochs)
        epoch_losses = []
        for i, idx in enumerate(batches(n, args.batch_size, train_x.device)):
            epoch_losses.append(train_step(fast, opt, loss_fn, train_x[idx], train_y[idx], args.amp))
            if ema is not None:
                ema.update_parameters(model)  # W_ema <- decay W_ema + (1 - decay) W
            done += len(idx)
            if time.time() - t_last > 5 or (i + 1 == steps and epoch == args.epochs):
                t_last, rate = time.time(), done / (time.time() - t_start - t_other)
                eta = ((args.epochs - epoch + 1) * n - min((i + 1) * args.batch_size, n)) / rate
                print(f"{name} | epoch {epoch}/{args.epochs} | step {i + 1}/{steps} | loss "
                      f"{epoch_losses[-1].item():.4f} | {rate:.0f} img/s | ETA {eta / 60:.1f} min", flush=True)
        t_other -= time.time()
        losses += torch.stack(epoch_losses).float().tolist()
        if ema is not None:
            update_bn(ema.module, loss_fn, data, args.batch_size)
        on_epoch_end(epoch, losses, fast if ema is None else ema.module)  # pictures first: an interrupt during
        extra = {} if ema is None else {"ema": ema.state_dict()}  # them repeats this epoch on --resume
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, args=vars(args),
                        rng=rng_state(), losses=losses, **extra)
        t_other += time.time()
    return losses


# --------------------------------------------------------------------------- evaluation
class Classifier(nn.Module):
    """The judge of --eval: a small CNN, (N, 1, 28, 28) -> features (N, 64) -> logits (N, 10)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, 1, 1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def get_classifier(args, device: torch.device) -> Classifier:
    """The judge of --eval: one epoch of Adam on the full training set, seed 0, kept as OUT_DIR/classifier.pt."""
    clf, path = Classifier().to(device), os.path.join(args.out_dir, "classifier.pt")
    try:
        clf.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return clf.eval()
    except FileNotFoundError:
        pass
    except Exception as e:  # a truncated or foreign file: train a new one
        print(f"eval classifier: {path} is unreadable ({type(e).__name__}); training a new one")
    train_x, train_y = load_mnist(args.data_dir, True, device)
    t0, gen = time.time(), torch.Generator(device).manual_seed(0)
    torch.manual_seed(0)
    clf = Classifier().to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    for idx in torch.randperm(len(train_x), generator=gen, device=device).split(128):
        loss = F.cross_entropy(clf(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    test_x, test_y = load_mnist(args.data_dir, False, device)
    with torch.no_grad():
        acc = (clf.eval().head(features(clf, test_x)).argmax(1) == test_y).float().mean().item()
    print(f"eval classifier: 1 epoch in {time.time() - t0:.0f} s, test accuracy {acc:.2%}; saved to {path}")
    torch.save(clf.state_dict(), path)
    return clf


@torch.no_grad()
def features(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The classifier's (N, 64) features of images (N, 1, 28, 28), in chunks of 1000."""
    return torch.cat([clf.features(b) for b in x.split(1000)])


def write_json(path: str, **data) -> str:
    """Write data as indented JSON; return the path."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) between feature sets (N1, F) and (N2, F)."""
    f1, f2 = f1.double().cpu(), f2.double().cpu()
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)  # (F, F)
    w, v = torch.linalg.eigh(s1)
    r1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T  # S1^1/2
    root_trace = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return ((f1.mean(0) - f2.mean(0)) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * root_trace).item()


@torch.no_grad()
def judge(clf: Classifier, x: torch.Tensor, c: torch.Tensor, ref: torch.Tensor) -> dict:
    """The classifier's verdict on images x (N, 1, 28, 28) meant to be digits c (N,); ref: reference features."""
    f = features(clf, x.clamp(0, 1))  # (N, 64)
    p = F.softmax(clf.head(f), 1)  # (N, 10)
    hit = (p.argmax(1) == c).float()
    return dict(accuracy=hit.mean().item(), confidence=p[torch.arange(len(c)), c].mean().item(),
                frechet=frechet_distance(f, ref), per_digit=[hit[c == d].mean().item() for d in range(10)])


def evaluate_part2(net, schedule: dict, args, device: torch.device) -> str:
    """--eval N: judge N samples per digit at each of --gammas, beside N real test digits per digit."""
    clf = get_classifier(args, device)
    test_x, test_y = load_mnist(args.data_dir, False, device)
    ref = features(clf, test_x)  # (10000, 64): the test set's features
    real = torch.cat([torch.nonzero(test_y == d)[:args.eval, 0] for d in range(10)])  # N test digits of each class
    rows = {"real": judge(clf, test_x[real], test_y[real], ref)}
    c = torch.arange(10, device=device).repeat(args.eval)  # (10 N,)
    for gamma in args.gammas:
        t0 = time.time()
        rows[f"gamma={gamma:g}"] = judge(clf, sample(net, c, schedule, args, gamma)[0], c, ref)
        print(f"eval: {len(c)} samples at gamma {gamma:g} in {time.time() - t0:.0f} s", flush=True)
    print(f"{'samples':>12} | accuracy | confidence | frechet | accuracy per digit 0-9")
    for name, r in rows.items():
        print(f"{name:>12} | {r['accuracy']:8.1%} | {r['confidence']:10.3f} | {r['frechet']:7.2f} | "
              + " ".join(f"{v:.0%}" for v in r["per_digit"]))
    return write_json(os.path.join(args.out_dir, "part2_eval.json"), n_per_digit=args.eval, args=vars(args), rows=rows)


# --------------------------------------------------------------------------- part 1
def denoise_pictures(fast, test_x: torch.Tensor, args, files: list, epoch: int, final: bool) -> None:
    """Clean / noisy / denoised rows of test digits; after the last epoch also the sweep over SIGMAS."""
    fast.eval()
    x = test_x[:10]  # (10, 1, 28, 28)
    g = torch.Generator().manual_seed(args.seed)
    eps = torch.randn(x.shape, generator=g).to(x.device)  # the same noise for every sigma
    with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp):
        z = x + args.sigma * eps
        path = os.path.join(args.out_dir, f"part1_denoised_epoch{epoch:02d}.png")
        save_grid(path, torch.cat([x, z, fast(z)]), 10, f"Part 1 after epoch {epoch}: test digits, sigma "
                  f"{args.sigma}", row_labels=["clean", "noisy", "denoised"])
        files.append(path)
        if not final:
            return
        rows = [x[:4] + s * eps[:4] for s in SIGMAS]  # 7 x (4, 1, 28, 28)
        cols = [img for r in rows for img in (r, fast(r))]  # noisy then denoised, per sigma
        grid = torch.stack(cols, 1).flatten(0, 1)  # (4 * 14, 1, 28, 28): one row per digit
        path = os.path.join(args.out_dir, "part1_ood.png")
        save_grid(path, grid, 14, f"Part 1 out of distribution: noisy and denoised at each sigma (trained at "
                  f"{args.sigma})", [f"sigma={s}" if k == 0 else "denoised" for s in SIGMAS for k in (0, 1)])
        files.append(path)


def denoiser_mse(fast, test_x: torch.Tensor, sigma: float, seed: int, amp: bool = False) -> tuple:
    """Mean squared error to the clean test set: (denoised, noisy input), noise fixed by seed."""
    fast.eval()
    g, err, err_noisy = torch.Generator().manual_seed(seed), 0.0, 0.0
    with torch.no_grad(), torch.autocast(test_x.device.type, torch.bfloat16, enabled=amp):
        for x in test_x.split(1000):
            z = x + sigma * torch.randn(x.shape, generator=g).to(x.device)
            err += F.mse_loss(fast(z).float(), x, reduction="sum").item()
            err_noisy += F.mse_loss(z, x, reduction="sum").item()
    return err / test_x.numel(), err_noisy / test_x.numel()


def evaluate_part1(net, test_x: torch.Tensor, args) -> str:
    """--eval: test-set PSNR (peak 1) of the denoiser and of its noisy input at each sigma of SIGMAS."""
    rows = {}
    for s in SIGMAS:
        mse, mse_noisy = denoiser_mse(net, test_x, s, args.seed, args.amp)
        rows[f"sigma={s:g}"] = dict(psnr=-10 * math.log10(mse), psnr_noisy=-10 * math.log10(mse_noisy) if s else None)
    print("   sigma | PSNR denoised | PSNR noisy input")
    for name, r in rows.items():
        print(f"{name[6:]:>8} | {r['psnr']:10.2f} dB | " + (f"{r['psnr_noisy']:.2f} dB" if r["psnr_noisy"] else "-"))
    return write_json(os.path.join(args.out_dir, "part1_eval.json"), trained_sigma=args.sigma, args=vars(args), rows=rows)


def run_part1(args, device: torch.device, ckpt_path: str) -> list:
    """Train the one-step denoiser (or load it) and write Part 1's pictures."""
    test_x, _ = load_mnist(args.data_dir, False, device)
    files = [os.path.join(args.out_dir, "part1_noising.png")]
    x, g = test_x[:8], torch.Generator().manual_seed(args.seed)
    eps = torch.randn(x.shape, generator=g).to(device)
    noised = torch.stack([x + s * eps for s in SIGMAS], 1).flatten(0, 1)  # (8 * 7, 1, 28, 28): digit per row
    save_grid(files[0], noised, 7, "Part 1: z = x + sigma * eps", col_labels=[f"sigma={s}" for s in SIGMAS])
    model, fast, loss_fn, _, ema = build(args, device)
    net = fast if ema is None else ema.module  # what pictures and --eval use
    if args.sample_only:
        epoch = load_model(model, ema, ckpt_path, 1)
        denoise_pictures(net, test_x, args, files, epoch, final=True)
    else:
        data = load_mnist(args.data_dir, True, device, args.limit)

        def on_epoch_end(epoch, losses, net):
            path = os.path.join(args.out_dir, "part1_loss.png")
            save_loss_plot(path, losses, f"Part 1 loss, D={args.hidden}, sigma={args.sigma}, batch "
                           f"{args.batch_size}, lr {args.lr:g}", math.ceil(len(data[0]) / args.batch_size))
            if epoch == 1 or epoch == args.epochs:
                denoise_pictures(net, test_x, args, files, epoch, final=epoch == args.epochs)
            files.append(path)

        train(args, model, fast, loss_fn, ema, data, ckpt_path, on_epoch_end)
    mse, mse_noisy = denoiser_mse(net, test_x, args.sigma, args.seed, args.amp)
    print(f"test MSE at sigma {args.sigma}: denoised {mse:.4f}, noisy input {mse_noisy:.4f}")
    return files + ([evaluate_part1(net, test_x, args)] if args.eval else [])


# --------------------------------------------------------------------------- part 2
def sample_pictures(net, schedule: dict, args, device: torch.device, epoch: int, files: list, final: bool) -> None:
    """The 4 x 10 grid (4 of each digit, one column per digit); after the last epoch also the guidance
    sweep (2 rows per gamma of --gammas, same seed) and the sampling GIF of the grid's first 2 rows."""
    c = torch.arange(10, device=device).repeat(4)  # (40,): row r, column j is digit j
    digits, gamma = [str(j) for j in range(10)], args.guidance_scale
    x, caches = sample(net, c, schedule, args, gamma)
    path = os.path.join(args.out_dir, f"part2_samples_epoch{epoch:02d}.png")
    save_grid(path, x, 10, f"Part 2 samples after epoch {epoch}, gamma {gamma:g}", digits)
    files.append(path)
    if not final:
        return
    xs = [sample(net, c[:20], schedule, args, g)[0] for g in args.gammas]  # len(gammas) x (20, 1, 28, 28)
    path = os.path.join(args.out_dir, "part2_guidance.png")
    labels = [f"gamma={g:g}" if r == 0 else "" for g in args.gammas for r in range(2)]
    save_grid(path, torch.cat(xs), 10, "Part 2: classifier-free guidance scale, same seed", digits, labels)
    path_gif = os.path.join(args.out_dir, "part2_sampling.gif")
    frames = [grid_image(f[:20], 10, f"Part 2 {args.method} sampling, gamma {gamma:g}", digits, scale=2)
              for f in caches + [x]]  # from pure noise to the final digits
    frames = [f.point(lambda v: v // 16 * 17) for f in frames]  # 16 grey levels: a file several times smaller
    frames[0].save(path_gif, save_all=True, append_images=frames[1:], loop=0, optimize=True,
                   duration=[80] * (len(frames) - 1) + [2500])  # 12.5 frames/s, the final digits held 2.5 s
    files += [path, path_gif]


def run_part2(args, device: torch.device, ckpt_path: str) -> list:
    """Train the class-conditioned DDPM or flow (or load it) and write Part 2's pictures."""
    model, fast, loss_fn, schedule, ema = build(args, device)
    net, files = fast if ema is None else ema.module, []  # net: what pictures and --eval use
    if args.sample_only:
        epoch = load_model(model, ema, ckpt_path, 2)
        sample_pictures(net, schedule, args, device, epoch, files, final=True)
    else:
        data = load_mnist(args.data_dir, True, device, args.limit)
        steps_per_epoch = math.ceil(len(data[0]) / args.batch_size)

        def on_epoch_end(epoch, losses, net):
            path = os.path.join(args.out_dir, "part2_loss.png")
            lr = f"lr {args.lr:g}" + (f" decaying to {args.lr * args.lr_decay:g}" if args.lr_decay < 1 else "")
            save_loss_plot(path, losses, f"Part 2 {args.method} loss, D={args.hidden}, batch {args.batch_size}, "
                           f"{lr}", steps_per_epoch)
            files.append(path)
            if epoch in (1, 5, 10, 15, 20, args.epochs):
                sample_pictures(net, schedule, args, device, epoch, files, final=epoch == args.epochs)

        train(args, model, fast, loss_fn, ema, data, ckpt_path, on_epoch_end)
    return files + ([evaluate_part2(net, schedule, args, device)] if args.eval else [])


# --------------------------------------------------------------------------- benchmark
def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock times measure finished work."""
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()


def benchmark(args, device: torch.device) -> None:
    """Time --bench-steps training steps of the part's model on random data and, for Part 2, one 40-digit
    sampling pass; print name=value lines, the projected time of a full run last."""
    model, fast, loss_fn, schedule, _ = build(args, device)
    opt = make_optimizer(model, args)
    x = torch.rand(args.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    t0 = time.time()
    for _ in range(5):  # warm-up: kernels chosen, and compiled with --compile
        train_step(fast, opt, loss_fn, x, y, args.amp)
    sync(device)
    print(f"warmup_s={time.time() - t0:.2f}")
    t0 = time.time()
    for _ in range(args.bench_steps):
        train_step(fast, opt, loss_fn, x, y, args.amp)
    sync(device)
    train_rate = args.bench_steps * args.batch_size / (time.time() - t0)
    print(f"train_img_per_s={train_rate:.1f}")
    projected = args.epochs * 60000 / train_rate
    if args.part == 2:
        c = torch.arange(10, device=device).repeat(4)  # the 40-digit grid
        sample(fast, c, schedule, args, args.guidance_scale)  # warm-up at the sampling batch size
        sync(device)
        t0 = time.time()
        sample(fast, c, schedule, args, args.guidance_scale)
        sync(device)
        sample_s = time.time() - t0
        print(f"sample_img_per_s={40 / sample_s:.1f}")
        print(f"sample_grid_s={sample_s:.2f}")
        projected += (len({1, 5, 10, 15, 20, args.epochs} & set(range(1, args.epochs + 1))) + 2) * sample_s
    print(f"projected_{args.epochs}_epoch_s={projected:.1f}")


# --------------------------------------------------------------------------- main
def main(argv=None) -> list:
    """Run one part with the given flags (a list, as on the command line); return the files written."""
    args = get_args(argv)
    device = get_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    ckpt_path = args.checkpoint or os.path.join(args.out_dir, f"part{args.part}.pt")
    if not args.benchmark and (args.sample_only or (args.resume and os.path.exists(ckpt_path))):
        saved = load_checkpoint(ckpt_path, args.part)["args"]  # the model and schedule of the file
        for k in ("hidden", "num_ts", "beta1", "beta2", "arch", "method", "pm1"):
            setattr(args, k, saved.get(k, getattr(args, k)))
        args.ema = saved.get("ema") if args.ema is None else args.ema  # --ema 0 samples with the raw weights
    args.sample_steps = args.sample_steps or args.num_ts
    if args.method == "ddpm":
        args.sample_steps = min(args.sample_steps, args.num_ts)  # a checkpoint's T may be smaller
    print(f"part {args.part} on {device} | D={args.hidden} epochs={args.epochs} batch={args.batch_size} "
          f"lr={args.lr:g} method={args.method} arch={args.arch} ema={args.ema} pm1={args.pm1} "
          f"clip_x0={args.clip_x0} amp={args.amp} channels_last={args.channels_last} compile={args.compile}")
    if args.benchmark:
        benchmark(args, device)
        return []
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    try:
        files = (run_part1 if args.part == 1 else run_part2)(args, device, ckpt_path)
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {ckpt_path} holds the last finished epoch; add --resume to continue from it")
    files = sorted(set(files))
    print(f"done in {time.time() - t0:.1f} s; wrote {len(files)} files under {args.out_dir}: "
          + ", ".join(os.path.basename(f) for f in files))
    return files


if __name__ == "__main__" and "ipykernel" not in sys.modules:
    main()
