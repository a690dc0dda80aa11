"""The default artifact set: ``make models`` runs ``python -m models.build --out artifacts``.

Trains, exports and evaluates, into ``--out``:

- ``mnist-lenet5-wide.{onnx,json}``: the base model;
- ``mnist-lenet5-wide-parity-k{2,3,4}-sum.{onnx,json}`` and
  ``mnist-lenet5-wide-parity-k{2,4}-concat.{onnx,json}``: parity models;
- ``mnist-lenet5-wide-backup.{onnx,json}``: the cheap backup (a tiny MLP);
- ``evaluation.json``: ``models.evaluate``'s records; ``index.json``: every
  artifact (name, role, arch, k, encoder, files, metrics), the evaluation, the
  settings and the time each step took;
- ``checkpoints/``: the torch checkpoints.

Skipped when up to date: ``index.json`` records a key over the settings and
the source of ``models/`` and ``datasplits/``; the same key and all files present means nothing
to do (``--force`` rebuilds). ``--tiny`` builds the same set with a few
hundred examples and one epoch each (well under a minute): real, small,
inaccurate models for tests of the other components.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import pathlib
import sys
import time

import torch

import datasplits
from models import checkpoint, cli, evaluate, export, train
from models.train import Settings

INDEX = "index.json"
EVALUATION = "evaluation.json"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to build, and how long to train each role."""
    dataset: str = "mnist"
    arch: str = "lenet5-wide"
    backup_arch: str = "tinymlp"
    split_seed: int = 0
    codes: tuple = ((2, "sum"), (3, "sum"), (4, "sum"), (2, "concat"), (4, "concat"))
    base: Settings = Settings(epochs=30)
    parity: Settings = Settings(epochs=40, batch_size=16, augment=False, init_from_base=True)
    backup: Settings = Settings(epochs=20)
    groupings: int = 4


DEFAULT = Plan()
TINY = Plan(base=Settings(epochs=1, max_train=600),
            parity=Settings(epochs=1, max_train=600, augment=False, init_from_base=True, groups_per_epoch=256,
                            val_groupings=1),
            backup=Settings(epochs=1, max_train=600),
            groupings=1)


def build_key(plan):
    """A digest of the plan and of every source file of ``models`` and ``datasplits``."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(plan), sort_keys=True).encode())
    for package in (pathlib.Path(__file__).parent, pathlib.Path(datasplits.__file__).parent):
        for path in sorted(package.glob("*.py")):
            digest.update(f"{package.name}/{path.name}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def up_to_date(out, key):
    """True when ``out/index.json`` has ``key`` and every file it lists exists."""
    index_path = pathlib.Path(out) / INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return False
    if index.get("build_key") != key:
        return False
    files = [EVALUATION] + [f for a in index.get("artifacts", []) for f in (a["onnx"], a["manifest"])]
    return all((pathlib.Path(out) / f).is_file() for f in files)


def _with_progress(settings, progress):
    return dataclasses.replace(settings, progress=progress and settings.progress)


def _init_worker():
    torch.set_num_threads(1)


def _run_tasks(tasks, jobs, log):
    """Runs (name, fn, args, kwargs) tasks, in ``jobs`` processes when jobs > 1; results in task order."""
    if jobs <= 1:
        results = []
        for name, fn, args, kwargs in tasks:
            start = time.perf_counter()
            results.append(fn(*args, **kwargs))
            log(f"  train {name}: {time.perf_counter() - start:.1f} s")
        return results
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(fn, *args, **kwargs): name for name, fn, args, kwargs in tasks}
        for future in concurrent.futures.as_completed(futures):
            meta = future.result()
            log(f"  train {futures[future]}: {meta['metrics']['train_s']:.1f} s (in a worker)")
        return [f.result() for f in futures]


def with_seed(plan, seed):
    """``plan`` with every role's training seed set to ``seed`` (the data split stays ``plan.split_seed``)."""
    return dataclasses.replace(plan, base=dataclasses.replace(plan.base, seed=seed),
                               parity=dataclasses.replace(plan.parity, seed=seed),
                               backup=dataclasses.replace(plan.backup, seed=seed))


def build(out, plan=DEFAULT, force=False, progress=True, threads=1, jobs=1, log=print):
    """Builds the artifact set of ``plan`` into ``out``; returns the index dict."""
    out = pathlib.Path(out)
    key = build_key(plan)
    if not force and up_to_date(out, key):
        log(f"{out}: up to date (build key {key}); --force rebuilds")
        return json.loads((out / INDEX).read_text())
    datasplits.check_dataset(plan.dataset)
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)
    timing, start_all = {}, time.perf_counter()

    def timed(step, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timing[step] = round(time.perf_counter() - start, 2)
        log(f"  {step}: {timing[step]:.1f} s")
        return result

    base_name = f"{plan.dataset}-{plan.arch}"
    log(f"building {base_name} artifacts into {out} (key {key})")
    metas = [timed(f"train {base_name}", train.train_base, plan.dataset, plan.arch, ckpt / f"{base_name}.pt",
                   _with_progress(plan.base, progress), plan.split_seed, name=base_name)]
    # The parity models and the backup depend on the base only: train them in
    # ``jobs`` processes of one thread each (small networks use two cores
    # better as two processes than as two threads of one).
    tasks = []
    for k, encoder in plan.codes:
        name = f"{base_name}-parity-k{k}-{encoder}"
        tasks.append((name, train.train_parity, (ckpt / f"{base_name}.pt", k, encoder, ckpt / f"{name}.pt",
                                                 _with_progress(plan.parity, progress and jobs == 1)),
                      {"name": name}))
    name = f"{base_name}-backup"
    tasks.append((name, train.train_backup, (ckpt / f"{base_name}.pt", plan.backup_arch, ckpt / f"{name}.pt",
                                             _with_progress(plan.backup, progress and jobs == 1)), {"name": name}))
    metas += timed("train parity and backup models", _run_tasks, tasks, jobs, log)

    X_val, _ = datasplits.load_split(plan.dataset, "val", plan.split_seed)
    for meta in metas:
        manifest = timed(f"export {meta['name']}", export.export_checkpoint, ckpt / f"{meta['name']}.pt", out)
        model, _ = checkpoint.load(ckpt / f"{meta['name']}.pt")
        diff, _, _ = export.compare(model, out / manifest.onnx_file, X_val[:64], threads=threads)
        meta["metrics"]["onnx_max_abs_diff"] = diff

    records = timed("evaluate", evaluate.evaluate_dir, out, groupings=plan.groupings, threads=threads,
                    base_name=base_name)
    record = records[0]
    test_metrics = {base_name: {"test_top1": record["base_top1"], "test_top5": record["base_top5"]}}
    if record["backup"]:
        test_metrics[record["backup"]] = {"test_top1": record["backup_top1"]}
    for p in record["parity"]:
        test_metrics[p["name"]] = {key: p[key] for key in ("degraded_top1", "degraded_top5", "agreement")}

    artifacts = []
    for meta in metas:
        metrics = {**meta["metrics"], **test_metrics.get(meta["name"], {})}
        manifest = export.manifest_for(meta, f"{meta['name']}.onnx",
                                       datasplits.split_sizes(plan.dataset, plan.split_seed), metrics)
        manifest.save(out / f"{meta['name']}.json")
        artifacts.append({"name": meta["name"], "role": meta["role"], "arch": meta["arch"], "k": meta["k"],
                          "encoder": meta["encoder"], "onnx": manifest.onnx_file,
                          "manifest": f"{meta['name']}.json", "checkpoint": f"checkpoints/{meta['name']}.pt",
                          "metrics": metrics})
    (out / EVALUATION).write_text(json.dumps(records, indent=2) + "\n")
    timing["total"] = round(time.perf_counter() - start_all, 2)
    index = {"build_key": key, "plan": dataclasses.asdict(plan), "artifacts": artifacts,
             "evaluation_file": EVALUATION, "evaluation": records, "timing_s": timing}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    log(evaluate.format_table(record))
    log(f"built {len(artifacts)} models into {out} in {timing['total']:.0f} s")
    return index


def build_parser():
    parser = cli.ArgumentParser(prog="python -m models.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="artifacts", help="output directory (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny settings: few examples, one epoch (for tests; inaccurate models)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed of every model (initialisation, order, augmentation); the data "
                             "split is fixed (default: the plan's, 0)")
    # One thread: these small networks gain little from a second intra-op
    # thread, and lose badly (2x slower per step, measured) when anything
    # else runs on the cores; the cores are used by --jobs instead.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime CPU threads of the main process, which trains the base "
                             "model (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=cli.default_threads(),
                        help="processes (one thread each) training the parity and backup models "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1 or args.jobs < 1:
        raise ValueError(f"--threads and --jobs must be >= 1, got {args.threads} and {args.jobs}")
    torch.set_num_threads(args.threads)
    plan = TINY if args.tiny else DEFAULT
    if args.seed is not None:
        plan = with_seed(plan, args.seed)
    build(args.out, plan, force=args.force, progress=not args.no_progress,
          threads=args.threads, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:], "python -m models.build"))
