"""docs/measure.py: the yardsticks behind docs/results.md, for runs of ddpm_mnist.py.

    python docs/measure.py --part 2 --out-dir out --eval 20      # a judge on 20 samples per digit
    python docs/measure.py --part 1 --out-dir out --eval         # test MSE and PSNR at each sigma
    python docs/measure.py --part 2 --benchmark                  # 20 training steps: img/s, TFLOP/s

--eval reads OUT_DIR/partN.pt as `ddpm_mnist.py --sample-only` does; --gammas are the guidance
scales it judges; every other flag is ddpm_mnist.py's (--sample-steps, --precision, --device,
--hidden for --benchmark, ...). Faults are reported as ddpm_mnist.py reports them: in one line.
"""

import argparse
import functools
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm_mnist as dm  # noqa: E402  (the file one folder up)


def step(net, opt, loss):
    """One plain optimizer step (ddpm_mnist.py's, without its fp16 loss scaling)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def get_classifier(args, test):
    """The judge: a CNN trained once (3 epochs, seed 0, 99.47%), kept as OUT_DIR/classifier.pt."""
    path, device = os.path.join(args.out_dir, "classifier.pt"), test[0].device
    torch.manual_seed(0)

    def conv(cin, cout):  # a convolution with BatchNorm and ReLU
        return [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU()]

    clf = nn.Sequential(*conv(1, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), *conv(64, 64),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128),
                        nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))
    clf = clf.to(device)  # clf[:-2]: the (N, 128) features
    try:
        clf.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return clf.eval().requires_grad_(False)
    except Exception as e:  # none yet, or a truncated or foreign file: train one
        print(f"eval classifier: no usable {path} ({type(e).__name__}), training one "
              "(about 3 minutes on 2 CPU cores, seconds on a GPU)")
    train_x, train_y = dm.load_mnist(args.data_dir, True, device)
    opt, g = torch.optim.Adam(clf.parameters()), torch.Generator(device).manual_seed(0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, 3 * math.ceil(len(train_x) / 128))

    def shift(x):  # the batch moved by up to 2 px down and right
        by = torch.randint(-2, 3, (2,), generator=g, device=device).tolist()  # rows, columns
        return torch.roll(x, by, (2, 3))

    for _ in range(3):
        for idx in torch.randperm(len(train_x), generator=g, device=device).split(128):
            step(clf, opt, F.cross_entropy(clf(shift(train_x[idx])), train_y[idx]))
            lr.step()
    dm.save(args, {"classifier.pt": clf.state_dict()})
    return clf.eval().requires_grad_(False)


def write(path, text):
    """text to path by way of path.tmp, as ddpm_mnist.py writes its files."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) of feature sets (N1, F), (N2, F)."""
    f1, f2 = f1.cpu().double(), f2.cpu().double()  # on the CPU first: MPS has no float64
    if not (f1.isfinite().all() and f2.isfinite().all()):
        return math.nan  # not finite; oneMKL's eigvals would crash the process on NaN
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)  # (F, F)
    root = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()  # tr (S1 S2)^1/2
    return (((f1.mean(0) - f2.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * root).item()


def evaluate_part2(run, args, gammas, test, n):
    """The judge on n samples per digit at each of gammas, and on n real test digits of each."""
    (test_x, test_y), clf = test, get_classifier(args, test)

    def features(x):  # (N, 128): the judge's last hidden layer
        return torch.cat([clf[:-2](b) for b in x.clamp(0, 1).split(1000)])

    ref = features(test_x)  # the whole test set's
    clf_acc, rows = (clf[-1](ref).argmax(1) == test_y).float().mean().item(), {}
    real = torch.cat([torch.nonzero(test_y == d)[:n, 0] for d in range(10)])  # n per digit
    c = torch.arange(10, device=test_x.device).repeat(n)  # (10 n,)
    print(f"judge's test accuracy {clf_acc:.2%}\n"
          f"{'samples':>12} | accuracy | frechet | not finite | per digit")
    for name, gamma in [("real", None)] + [(f"gamma={g:g}", g) for g in gammas]:
        if gamma is None:
            x, y = test_x[real], test_y[real]
        else:
            with run.autocast:
                x, y = run.method.sample(run.model, c, gamma)[0], c
        f = features(x)  # the judge sees x clamped to [0, 1]: +-inf would pass as 1 or 0
        finite = x.flatten(1).isfinite().all(1)  # (N, 784) -> (N,): no NaN or inf pixel
        hit = ((clf[-1](f).argmax(1) == y) & finite).float()  # (N,): 1 where the judge reads y
        fd = frechet_distance(f, ref) if finite.all() else math.nan  # of a set with NaN or inf
        rows[name] = r = dict(accuracy=hit.mean().item(), frechet=None if math.isnan(fd) else fd,
                              not_finite=int((~finite).sum()),
                              per_digit=[hit[y == d].mean().item() for d in range(10)])
        shown = f"{fd:7.2f}" if math.isfinite(fd) else "    n/a"
        print(f"{name:>12} | {r['accuracy']:8.1%} | {shown} | {r['not_finite']:10} |",
              " ".join(f"{v:.0%}" for v in r["per_digit"]), flush=True)
    return dict(n_per_digit=n, classifier_accuracy=clf_acc, rows=rows, args=vars(args))


@torch.no_grad()
def evaluate_part1(net, args, test_x):
    """Test MSE and PSNR (peak 1) of the denoised digits and of the noisy input at each sigma."""
    net.eval()
    rows = {}
    for sigma in dm.SIGMAS:
        g, mse = torch.Generator().manual_seed(args.seed), [0.0, 0.0]  # denoised, noisy input
        for x in test_x.split(1000):
            z = x + sigma * torch.randn(x.shape, generator=g).to(x.device)
            mse[0] += F.mse_loss(net(z), x, reduction="sum").item() / test_x.numel()
            mse[1] += F.mse_loss(z, x, reduction="sum").item() / test_x.numel()
        psnr = -10 * math.log10(mse[0]) if mse[0] != 0 else math.inf  # NaN stays NaN
        rows[f"sigma={sigma:g}"] = dict(denoised=mse[0], noisy_input=mse[1], psnr=psnr)
        print(f"test MSE at sigma {sigma:g}: denoised {mse[0]:.4f}, noisy input {mse[1]:.4f}; "
              f"denoised PSNR {psnr:.2f} dB")
    return dict(rows=rows, args=vars(args))


def benchmark(args):
    """20 training steps on random data after 3 warm-up steps, and what they imply for a run."""
    run = dm.build(args)  # args settled: dm.settle(cli)
    x = torch.rand(args.batch_size, 1, 28, 28, device=args.device)
    y = (10 * x[:, 0, 0, 0]).long()  # labels 0-9

    def steps(k):  # ddpm_mnist.py's training step, k times; .item() waits for the device
        for _ in range(k):
            with run.autocast:
                loss = run.method.loss(run.model, x, y)
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        return loss.item()

    with FlopCounterMode(display=False) as flops:  # one step, counted once
        steps(1)
    steps(3)  # warm-up: kernels chosen
    t0 = time.time()
    steps(20)
    step_s = (time.time() - t0) / 20
    images = min(args.limit, 60000)  # what a run with these flags trains on
    out = {"train_img_per_s": args.batch_size / step_s,
           "achieved_tflop_per_s": flops.get_total_flops() / step_s / 1e12,
           f"projected_{args.epochs}_epoch_s": args.epochs * math.ceil(images / args.batch_size)
           * step_s}
    print(f"benchmark: part {args.part}, D={args.hidden}, batch {args.batch_size}, "
          f"{args.precision} on {args.device}")
    for k, v in out.items():
        print(f"{k}={v:.4g}")
    return out


def measure(own, cli):
    """--eval or --benchmark with ddpm_mnist.py's parsed flags cli."""
    if own.benchmark:
        return benchmark(dm.settle(cli, {}))
    args, run, _ = dm.open_run(cli)  # the checkpoint's flags and weights, as --sample-only
    probe = os.path.join(cli.out_dir, "measure.probe")  # a folder that cannot be written fails
    write(probe, "")  # here, before the judge trains
    os.remove(probe)
    test = dm.load_mnist(args.data_dir, False, args.device)
    if args.part == 1:
        return evaluate_part1(run.model, args, test[0])
    report = evaluate_part2(run, args, own.gammas, test, own.eval)
    write(os.path.join(args.out_dir, "part2_eval.json"), json.dumps(report, indent=1))
    print(f"wrote {os.path.join(args.out_dir, 'part2_eval.json')}")
    return report


def main(argv=None):
    """--eval [N] or --benchmark, with ddpm_mnist.py's flags; returns what it printed."""
    prog = "docs/measure.py"
    p = argparse.ArgumentParser(prog, description="Score or time ddpm_mnist.py",
                                epilog="Other flags: python ddpm_mnist.py --help.")
    p.error = functools.partial(dm.usage_error, prog=prog)  # one line
    p.add_argument("--eval", type=dm.number(int, 1), nargs="?", const=20, metavar="N",
                   help="Part 1: test PSNR at each sigma; Part 2: a judge on N samples per digit "
                        "(N: 20 if not given)")
    p.add_argument("--gammas", type=dm.number(float, -1e6, 1e6), nargs="+", metavar="G",
                   default=[0, 1, 3, 5, 10], help="Part 2: the guidance scales --eval judges "
                                                  "(default: 0 1 3 5 10)")
    p.add_argument("--benchmark", action="store_true",
                   help="time 20 training steps; the projection counts training steps only")
    own, rest = p.parse_known_args(argv)
    if bool(own.eval) == own.benchmark:
        p.error("give one of --eval [N] or --benchmark")
    cli = dm.get_args(rest + (["--sample-only"] if own.eval else []), prog)
    with dm.one_line_faults(cli):  # faults in one line, as ddpm_mnist.py reports them
        return measure(own, cli)


if __name__ == "__main__":
    main(sys.argv[1:])
