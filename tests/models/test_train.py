"""Training on real data with tiny settings: it learns, checkpoints round-trip."""

import dataclasses
import getpass
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasplits
from models import checkpoint, train
from models.train import Settings


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("ckpt") / "digits-mlp.pt"
    meta = train.train_base("digits", "mlp", path, Settings(epochs=4, progress=False))
    return path, meta


def test_base_model_learns_digits(digits_base):
    path, meta = digits_base
    model, loaded = checkpoint.load(path, role="base")
    X, y = datasplits.load_split("digits", "val")
    acc = float((train.predict(model, X).argmax(1) == y).mean())
    # Chance is 10%; four epochs of an MLP on the 8x8 digits reach ~90%.
    assert acc > 0.75
    assert acc == pytest.approx(meta["metrics"]["val_top1"])
    assert loaded["name"] == "digits-mlp" and loaded["input_shape"] == [1, 8, 8]
    assert loaded["normalization"] == datasplits.normalization("digits")


def test_parity_model_learns_the_sum_of_base_outputs(digits_base, tmp_path):
    base_path, _ = digits_base
    base, _ = checkpoint.load(base_path)
    settings = Settings(epochs=5, groups_per_epoch=2048, progress=False, val_groupings=1)
    meta = train.train_parity(base_path, 2, "concat", tmp_path / "p.pt", settings)
    parity, loaded = checkpoint.load(tmp_path / "p.pt", role="parity")
    assert (loaded["k"], loaded["encoder"], loaded["base_model"]) == (2, "concat", "digits-mlp")
    assert loaded["arch"] == "mlp"
    # On held-out groups the trained parity model is far closer to the target
    # than an untrained one of the same architecture.
    X, _ = datasplits.load_split("digits", "test")
    groups = torch.arange(2 * (len(X) // 2)).reshape(-1, 2)
    query, target = train.parity_batch(base, torch.from_numpy(X), groups, "concat")
    untrained = checkpoint.build_model(loaded).eval()
    with torch.no_grad():
        trained_mse = torch.mean((parity(query) - target) ** 2).item()
        untrained_mse = torch.mean((untrained(query) - target) ** 2).item()
    assert trained_mse < 0.5 * untrained_mse
    assert meta["metrics"]["val_degraded_top1"] > 0.3


def test_parity_model_starts_from_the_base_weights_when_told(digits_base, tmp_path):
    base_path, _ = digits_base
    base, _ = checkpoint.load(base_path)
    # lr 0: the kept weights are the initial ones.
    frozen = Settings(epochs=1, lr=0.0, groups_per_epoch=64, progress=False, val_groupings=1)
    for init_from_base in (True, False):
        out = tmp_path / f"p-{init_from_base}.pt"
        train.train_parity(base_path, 2, "sum", out, dataclasses.replace(frozen, init_from_base=init_from_base))
        parity, meta = checkpoint.load(out)
        same = [torch.equal(a, b) for a, b in zip(parity.net.state_dict().values(), base.net.state_dict().values())]
        assert all(same) if init_from_base else not any(same)
        # The normalisation stays the parity query's own (a sum of two examples).
        assert meta["normalization"]["mean"] == pytest.approx([2 * m for m in base.mean.flatten().tolist()])


def test_train_cli_defaults_are_the_recipe():
    args = train.parse_args(["parity", "--base", "b.pt", "--k", "2", "--out", "p.pt"])
    settings = train.settings_from(args)
    assert (settings.init_from_base, settings.batch_size, settings.epochs, settings.ema) == (True, 16, 40, 0.995)
    args = train.parse_args(["parity", "--base", "b.pt", "--k", "2", "--out", "p.pt", "--init", "random",
                             "--ema", "0"])
    assert (train.settings_from(args).init_from_base, train.settings_from(args).ema) == (False, 0.0)
    assert train.settings_from(train.parse_args(["base", "--out", "b.pt"])).ema == 0.995


def test_backup_model_is_its_own_arch_for_the_base(digits_base, tmp_path):
    base_path, _ = digits_base
    meta = train.train_backup(base_path, "tinymlp", tmp_path / "b.pt", Settings(epochs=8, progress=False))
    _, loaded = checkpoint.load(tmp_path / "b.pt", role="backup")
    assert loaded["arch"] == "tinymlp" and loaded["base_model"] == "digits-mlp"
    assert meta["metrics"]["val_top1"] > 0.3


def test_augment_preserves_shape_and_range_and_is_seeded():
    X, _ = datasplits.load_split("mnist", "val")
    x = torch.from_numpy(X[:16])
    a = train.augment(x, torch.Generator().manual_seed(3))
    b = train.augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 1.0 + 1e-6
    colour = torch.rand(8, 3, 32, 32)
    c = train.augment(colour, torch.Generator().manual_seed(0))
    assert c.shape == colour.shape
    # A crop with flips moves pixels but keeps their values.
    assert set(np.unique(c.numpy())) <= set(np.unique(colour.numpy())) | {0.0}


def test_weight_average_is_an_exponential_moving_average_with_a_warm_up():
    model = torch.nn.Linear(3, 2)
    average = train.WeightAverage(model, 0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    # d_n = min(0.9, (1 + n) / (10 + n)): 0.1, 0.1818..., then 0.9 from n = 80 on.
    for n in range(100):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))
        assert average.current_decay() == pytest.approx(d)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        average.update(model)
    for avg, e in zip(average.model.parameters(), expected):
        torch.testing.assert_close(avg, e)
    assert average.current_decay() == pytest.approx(0.9)
    assert not any(p.requires_grad for p in average.model.parameters())
    # Decay 0: the average is the current weights.
    plain = train.WeightAverage(model, 0.0)
    with torch.no_grad():
        model.weight.mul_(3)
    plain.update(model)
    torch.testing.assert_close(plain.model.weight, model.weight)
    with pytest.raises(ValueError, match="decay"):
        train.WeightAverage(model, 1.0)


def test_weight_average_copies_buffers():
    model = torch.nn.BatchNorm1d(4)
    average = train.WeightAverage(model, 0.99)
    model.train()
    model(torch.randn(8, 4) + 5)
    average.update(model)
    torch.testing.assert_close(average.model.running_mean, model.running_mean)


def test_sum_parity_normalization_scales_with_k():
    norm = train.parity_normalization({"mean": [0.1], "std": [0.3]}, 4, "sum")
    assert norm["mean"] == pytest.approx([0.4]) and norm["std"] == pytest.approx([0.6])
    assert train.parity_normalization({"mean": [0.1], "std": [0.3]}, 4, "concat") == {"mean": [0.1], "std": [0.3]}


def test_parity_training_refuses_a_non_base_checkpoint(digits_base, tmp_path):
    base_path, _ = digits_base
    train.train_backup(base_path, "tinymlp", tmp_path / "b.pt", Settings(epochs=1, progress=False))
    with pytest.raises(checkpoint.CheckpointError, match="not a base model"):
        train.train_parity(tmp_path / "b.pt", 2, "sum", tmp_path / "p.pt", Settings(epochs=1, progress=False))


def test_a_training_step_leaves_nothing_in_the_temporary_directory(tmp_path):
    """Torch's first optimizer step imports torch._dynamo, which makes its cache directory;
    importing ``models`` puts it in the checkout's .cache/, not in $TMPDIR."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    code = ("import os, models, torch\n"
            "p = torch.nn.Parameter(torch.ones(2))\n"
            "opt = torch.optim.SGD([p], lr=0.1); p.sum().backward(); opt.step()\n"
            "import torch._dynamo\n"
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == os.path.join(repo, ".cache", "torchinductor")
    assert list(tmp_path.iterdir()) == []
    # Without the import, torch's own default lands in $TMPDIR: the test above can fail.
    subprocess.run([sys.executable, "-c", "import torch._dynamo"], cwd=repo, env=env, timeout=120, check=True)
    assert [p.name for p in tmp_path.iterdir()] == [f"torchinductor_{getpass.getuser()}"]
