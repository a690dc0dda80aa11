"""Training: base models, parity models and cheap backup models.

    python -m models.train base   --dataset mnist --arch lenet5 --out ckpt/base.pt
    python -m models.train parity --base ckpt/base.pt --k 2 --encoder sum --out ckpt/p2.pt
    python -m models.train backup --base ckpt/base.pt --arch tinymlp --out ckpt/backup.pt

Base and backup models: cross-entropy on the true labels, random affine
augmentation. Parity models (as in the paper): the parity model has the base
model's architecture; a training example is a group of k training examples (a
fresh random grouping every epoch, optionally each member augmented
independently); the input is the serving encoder applied to the k raw
examples (``models.encoders``, proven equal to ``coding_ext`` by the tests);
the target is the sum of the frozen base model's outputs on the k (unencoded)
examples; the loss is MSE on raw outputs. A parity model starts from the base
model's weights (``--init base``, the default; ``random`` is the other
choice) and trains with batch 16; it is not augmented by default
(``--augment``): the random regrouping every epoch already varies its
queries. All roles: Adam, lr 1e-3, weight decay 1e-5, cosine decay of the
learning rate, and a moving average of the weights (``--ema``, decay 0.995);
the average is what is validated after every epoch, and the checkpoint kept is
the best average on the validation split (top-1 for base and backup,
degraded-mode top-1 for parity). docs/models.md gives the measurements behind
these choices.
"""

import copy
import dataclasses
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import datasplits
from models import archs, checkpoint, cli, degraded, encoders


# Decay of the moving average of the weights (``WeightAverage``) kept by every role.
EMA_DECAY = 0.995


@dataclasses.dataclass(frozen=True)
class Settings:
    """Hyperparameters common to every role."""
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    schedule: str = "cosine"
    augment: bool = True
    max_train: int | None = None
    groups_per_epoch: int | None = None
    val_groupings: int = 2
    ema: float = EMA_DECAY
    init_from_base: bool = False
    seed: int = 0
    progress: bool = True


def _arrays(dataset, split_seed, data_root, max_train):
    X_train, y_train = datasplits.load_split(dataset, "train", split_seed, data_root)
    if max_train is not None:
        X_train, y_train = X_train[:max_train], y_train[:max_train]
    X_val, y_val = datasplits.load_split(dataset, "val", split_seed, data_root)
    return torch.from_numpy(X_train), torch.from_numpy(y_train), X_val, y_val


def augment(x, generator):
    """Random label-preserving distortion of raw examples (N, C, H, W).

    Grayscale digits: a random affine map (rotation within 10 degrees, scale
    0.9..1.1, shift of up to 8% of the side). Colour images: a random crop of
    the image padded by 4 pixels, and a horizontal flip half of the time.
    """
    n, channels, height, width = x.shape
    if channels == 1:
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
        scale = 1.0 / (0.9 + 0.2 * torch.rand(n, generator=generator))
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.16
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None].expand(n, channels, height, width + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :].expand(n, channels, height, width)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _optimizer(model, settings, total_steps):
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    elif settings.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"unknown schedule {settings.schedule!r} (choose from cosine, constant)")
    return opt, sched


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging).

    ``update`` after every optimiser step: avg = d * avg + (1 - d) * w for
    every parameter, with d = min(decay, (1 + n) / (10 + n)) at the n-th
    update (n from 0), so that the average follows the weights closely early in
    training and short runs are not held at their initialisation. Buffers
    (normalisation constants, batch-norm statistics) are copied. ``decay`` 0
    keeps the current weights.
    """

    def __init__(self, model, decay):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the weight average's decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self):
        """The d of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model):
        averaged, current = list(self.model.parameters()), list(model.parameters())
        torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay())
        self.updates += 1
        for a, b in zip(self.model.buffers(), model.buffers()):
            a.copy_(b)


@torch.no_grad()
def predict(model, X, batch_size=1000):
    """Outputs of ``model`` (eval mode) on raw examples X (ndarray or tensor), as float32 ndarray."""
    model.eval()
    X = torch.as_tensor(X)
    return torch.cat([model(X[i:i + batch_size]) for i in range(0, len(X), batch_size)]).numpy()


def _check_settings(settings):
    if settings.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {settings.epochs}")
    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")
    if settings.max_train is not None and settings.max_train < 1:
        raise ValueError(f"--max-train must be >= 1, got {settings.max_train}")
    if not 0.0 <= settings.ema < 1.0:
        raise ValueError(f"--ema must be in [0, 1), got {settings.ema}")


def _fit_classifier(model, X_train, y_train, X_val, y_val, settings, desc):
    """Cross-entropy training; returns (best state dict, its validation top-1)."""
    gen = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(X_train) / settings.batch_size)
    opt, sched = _optimizer(model, settings, settings.epochs * steps_per_epoch)
    best_state, best_acc = None, -1.0
    average = WeightAverage(model, settings.ema)
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc=desc, disable=None if settings.progress else True,
               file=sys.stderr, leave=False)
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(X_train), generator=gen)
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            x = X_train[idx]
            if settings.augment:
                x = augment(x, gen)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            average.update(model)
            bar.update(1)
        acc = float((predict(average.model, X_val).argmax(1) == y_val).mean())
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(average.model.state_dict())
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", val_top1=f"{acc:.4f}", best=f"{best_acc:.4f}")
    bar.close()
    return best_state, best_acc


def train_base(dataset, arch, out, settings, split_seed=0, data_root=None, name=None):
    """Trains a base classifier; saves the best checkpoint at ``out``; returns its meta dict."""
    _check_settings(settings)
    torch.manual_seed(settings.seed)
    shape = datasplits.input_shape(dataset)
    norm = datasplits.normalization(dataset, split_seed, data_root)
    model = archs.Normalized(archs.build(arch, shape, datasplits.NUM_CLASSES), norm["mean"], norm["std"])
    X_train, y_train, X_val, y_val = _arrays(dataset, split_seed, data_root, settings.max_train)
    start = time.perf_counter()
    state, acc = _fit_classifier(model, X_train, y_train, X_val, y_val, settings, f"base {arch}")
    model.load_state_dict(state)
    meta = {"role": "base", "name": name or f"{dataset}-{arch}", "arch": arch, "dataset": dataset,
            "split_seed": split_seed, "input_shape": list(shape), "num_classes": datasplits.NUM_CLASSES,
            "normalization": norm, "k": None, "encoder": None, "base_model": None, "base_checkpoint": None,
            "metrics": {"val_top1": acc, "train_s": round(time.perf_counter() - start, 2)},
            "config": dataclasses.asdict(settings)}
    checkpoint.save(out, model, **meta)
    return meta


def default_backup_arch(input_shape):
    """The cheap backup's arch: a tiny MLP for grayscale digits, MobileNetV2-0.25 for colour images."""
    return "tinymlp" if input_shape[0] == 1 else "mobilenetv2"


def train_backup(base_checkpoint, arch, out, settings, data_root=None, name=None):
    """Trains a cheap backup for the base model at ``base_checkpoint`` (same data, same labels).

    ``arch`` None: ``default_backup_arch`` of the base model's input.
    """
    _check_settings(settings)
    base = checkpoint.load_meta(base_checkpoint)
    if base["role"] != "base":
        raise checkpoint.CheckpointError(f"--base {base_checkpoint} is a {base['role']} model, not a base model")
    torch.manual_seed(settings.seed)
    dataset, split_seed = base["dataset"], base["split_seed"]
    shape = tuple(base["input_shape"])
    arch = arch or default_backup_arch(shape)
    model = archs.Normalized(archs.build(arch, shape, base["num_classes"]),
                             base["normalization"]["mean"], base["normalization"]["std"])
    X_train, y_train, X_val, y_val = _arrays(dataset, split_seed, data_root, settings.max_train)
    start = time.perf_counter()
    state, acc = _fit_classifier(model, X_train, y_train, X_val, y_val, settings, f"backup {arch}")
    model.load_state_dict(state)
    meta = {"role": "backup", "name": name or f"{base['name']}-backup", "arch": arch, "dataset": dataset,
            "split_seed": split_seed, "input_shape": list(shape), "num_classes": base["num_classes"],
            "normalization": base["normalization"], "k": None, "encoder": None,
            "base_model": base["name"], "base_checkpoint": str(base_checkpoint),
            "metrics": {"val_top1": acc, "train_s": round(time.perf_counter() - start, 2)},
            "config": dataclasses.asdict(settings)}
    checkpoint.save(out, model, **meta)
    return meta


def parity_normalization(norm, k, encoder):
    """Per-channel statistics of a parity query, used inside the parity graph.

    A sum of k independent examples has k times the mean and sqrt(k) times
    the std; a concatenation keeps the examples' statistics.
    """
    if encoder == "sum":
        return {"mean": [m * k for m in norm["mean"]], "std": [s * math.sqrt(k) for s in norm["std"]]}
    return {"mean": list(norm["mean"]), "std": list(norm["std"])}


def torch_coder(encoder):
    """(encode, decode) numpy callables over models.encoders, for validation."""
    def encode(inputs):
        return encoders.encode(encoder, torch.from_numpy(inputs)).numpy()

    def decode(parity_output, available):
        return encoders.subtract_decode(torch.from_numpy(parity_output), torch.from_numpy(available)).numpy()

    return encode, decode


def parity_batch(base_model, X, groups, encoder, generator=None, base_outputs=None):
    """One batch of parity training: (queries, targets).

    Args:
        base_model: the frozen base model (raw examples in, outputs out).
        X: tensor of shape (N, *S), raw training examples.
        groups: int tensor of shape (B, k), indices into X; row b is one group.
        encoder: "sum" or "concat".
        generator: augment every member independently with this generator;
            None: no augmentation.
        base_outputs: tensor (N, num_classes), the base model's outputs on X,
            precomputed; only used without augmentation.

    Returns:
        queries: tensor (B, *S), the encoder applied to the k members of each
            group, member i of group b taken from X[groups[b, i]] (same channel
            of every member: (k, B, C, H, W) is what the encoder sees).
        targets: tensor (B, num_classes), the sum over each group of the base
            model's outputs on its (unencoded) members.
    """
    k, batch = groups.shape[1], groups.shape[0]
    members = X[groups.T.reshape(-1)]
    if generator is not None:
        members = augment(members, generator)
    if generator is None and base_outputs is not None:
        targets = base_outputs[groups.T.reshape(-1)].reshape(k, batch, -1).sum(0)
    else:
        with torch.no_grad():
            targets = base_model(members).reshape(k, batch, -1).sum(0)
    queries = encoders.encode(encoder, members.reshape(k, batch, *X.shape[1:]))
    return queries, targets


def train_parity(base_checkpoint, k, encoder, out, settings, data_root=None, name=None):
    """Trains a parity model for the base model at ``base_checkpoint``; returns its meta dict."""
    _check_settings(settings)
    base_model, base = checkpoint.load(base_checkpoint)
    if base["role"] != "base":
        raise checkpoint.CheckpointError(f"--base {base_checkpoint} is a {base['role']} model, not a base model")
    shape = tuple(base["input_shape"])
    encoders.check(encoder, k, shape)
    for p in base_model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    dataset, split_seed = base["dataset"], base["split_seed"]
    norm = parity_normalization(base["normalization"], k, encoder)
    model = archs.Normalized(archs.build(base["arch"], shape, base["num_classes"]), norm["mean"], norm["std"])
    if settings.init_from_base:
        model.net.load_state_dict(base_model.net.state_dict())
    X_train, _, X_val, y_val = _arrays(dataset, split_seed, data_root, settings.max_train)
    if len(X_train) < k or len(y_val) < k:
        raise ValueError(f"too few examples for groups of k={k}")
    base_val = predict(base_model, X_val)
    # Without augmentation every member's target is fixed: compute them once.
    base_train = None if settings.augment else torch.from_numpy(predict(base_model, X_train))
    enc, dec = torch_coder(encoder)

    groups_per_epoch = settings.groups_per_epoch or len(X_train)
    steps_per_epoch = math.ceil(groups_per_epoch / settings.batch_size)
    opt, sched = _optimizer(model, settings, settings.epochs * steps_per_epoch)
    best_state, best_acc = None, -1.0
    average = WeightAverage(model, settings.ema)
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc=f"parity k={k} {encoder}",
               disable=None if settings.progress else True, file=sys.stderr, leave=False)
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        # A fresh grouping every epoch; every example appears about equally often.
        need = groups_per_epoch * k
        order = torch.cat([torch.randperm(len(X_train), generator=gen)
                           for _ in range(math.ceil(need / len(X_train)))])[:need].reshape(-1, k)
        for i in range(0, len(order), settings.batch_size):
            query, target = parity_batch(base_model, X_train, order[i:i + settings.batch_size], encoder,
                                         gen if settings.augment else None, base_train)
            loss = F.mse_loss(model(query), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            average.update(model)
            bar.update(1)
        with torch.no_grad():
            scores = degraded.score(X_val, y_val, base_val, k, enc, lambda q: predict(average.model, q), dec,
                                    groupings=settings.val_groupings, seed=settings.seed + 1)
        acc = scores["degraded_top1"]
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(average.model.state_dict())
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", val_degraded=f"{acc:.4f}",
                        best=f"{best_acc:.4f}")
    bar.close()
    model.load_state_dict(best_state)
    meta = {"role": "parity", "name": name or f"{base['name']}-parity-k{k}-{encoder}", "arch": base["arch"],
            "dataset": dataset, "split_seed": split_seed, "input_shape": list(shape),
            "num_classes": base["num_classes"], "normalization": norm, "k": k, "encoder": encoder,
            "base_model": base["name"], "base_checkpoint": str(base_checkpoint),
            "metrics": {"val_degraded_top1": best_acc, "train_s": round(time.perf_counter() - start, 2)},
            "config": dataclasses.asdict(settings)}
    checkpoint.save(out, model, **meta)
    return meta


def _add_common(p, epochs, batch_size=64, ema=EMA_DECAY):
    p.add_argument("--out", required=True, help="checkpoint path to write (the best on validation)")
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="minibatch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (default: %(default)s)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule (default: %(default)s)")
    p.add_argument("--ema", type=float, default=ema,
                   help="decay of the moving average of the weights that is validated and kept; 0: the "
                        "weights themselves (default: %(default)s)")
    p.add_argument("--max-train", type=int, default=None,
                   help="use only the first N training examples (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and augmentation "
                                                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=cli.default_threads(),
                   help="torch CPU threads (default: %(default)s)")
    p.add_argument("--data-root", default=None,
                   help="directory of torchvision-format datasets (fashion-mnist, mnist-full, cifar10)")
    p.add_argument("--name", default=None, help="model name (default: derived from dataset, arch, k, encoder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser():
    parser = cli.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True, metavar="{base,parity,backup}")
    p = sub.add_parser("base", help="train a base classifier")
    p.add_argument("--dataset", default="mnist", help=f"one of {', '.join(datasplits.DATASETS)} (default: %(default)s)")
    p.add_argument("--arch", default="lenet5-wide", help=f"one of {', '.join(archs.ARCHS)} (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (default: %(default)s)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on the examples as they are")
    _add_common(p, epochs=30)
    p = sub.add_parser("parity", help="train a parity model for a base checkpoint")
    p.add_argument("--base", required=True, help="checkpoint of the base model")
    p.add_argument("--k", type=int, required=True, help="coding group size (>= 2; concat: 2 or 4)")
    p.add_argument("--encoder", default="sum", help="sum or concat (default: %(default)s)")
    p.add_argument("--groups-per-epoch", type=int, default=None,
                   help="parity training examples per epoch (default: the training split's size)")
    p.add_argument("--val-groupings", type=int, default=2,
                   help="random groupings of the validation split scored per epoch (default: %(default)s)")
    p.add_argument("--augment", action="store_true",
                   help="augment every member of a group (default: off; a fresh grouping every epoch "
                        "already varies the queries, and the base outputs are then computed once)")
    p.add_argument("--init", choices=("base", "random"), default="base",
                   help="initial weights: the base model's (same architecture) or random (default: %(default)s)")
    _add_common(p, epochs=40, batch_size=16)
    p = sub.add_parser("backup", help="train a cheap backup model for a base checkpoint")
    p.add_argument("--base", required=True, help="checkpoint of the base model")
    p.add_argument("--arch", default=None, help=f"one of {', '.join(archs.ARCHS)} (default: tinymlp for "
                                                "grayscale inputs, mobilenetv2 for colour images)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on the examples as they are")
    _add_common(p, epochs=30)
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def settings_from(args):
    return Settings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    schedule=args.schedule, augment=args.augment, max_train=args.max_train,
                    groups_per_epoch=getattr(args, "groups_per_epoch", None),
                    val_groupings=getattr(args, "val_groupings", 2), ema=args.ema,
                    init_from_base=getattr(args, "init", "random") == "base",
                    seed=args.seed,
                    progress=not args.no_progress)


def main(argv=None):
    args = parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    if args.role == "base":
        datasplits.check_dataset(args.dataset)
        meta = train_base(args.dataset, args.arch, args.out, settings, args.split_seed, args.data_root, args.name)
    elif args.role == "parity":
        meta = train_parity(args.base, args.k, args.encoder, args.out, settings, args.data_root, args.name)
    else:
        meta = train_backup(args.base, args.arch, args.out, settings, args.data_root, args.name)
    metrics = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in meta["metrics"].items())
    print(f"{meta['name']}: {metrics} -> {pathlib.Path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:], "python -m models.train"))
