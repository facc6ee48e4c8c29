"""Does the BEV planner use its eyes? Open-loop planning on the embedded scenes where the ego reacts to obstacles.

Trains, on the same data (``BEVDetectionDataModule(planning=True)``, the data of
``configs/bev/bevformer_planning.yaml``) and evaluates on its test split:

- ``planner``: ``BEVFormerPlanner``, detection and planning trained jointly (the config's loss weights), tested
  with its safety brake (``zoo.bev.safety_brake``) and without it (``planner_network``: the network's plan);
- ``detector``: ``BEVFormerDetector`` alone, the same network, schedule and seed (detection mAP without the head);
- ``baselines``: constant velocity (straight on at the current speed), constant velocity and yaw rate, and the
  ego-status MLP (``EgoStatusPlanner``: past ego states and the command, no perception; AD-MLP / Ego-MLP).

Prints L2 and collision rate at 1/2/3 s (UniAD's "at" definition; the ST-P3/VAD averaged one is in the JSON),
on all samples and on the reactive ones, and the detection mAP/NDS with and without the planning head; writes
``benchmarks/results/bev_planning.json``. Each part can run on its own process (``--parts planner``) and merges
its results into the JSON, so the two BEVFormer trainings can run side by side; ``--table`` only prints.

    OMP_NUM_THREADS=1 python benchmarks/bev_planning.py                       # everything, one process
    OMP_NUM_THREADS=1 python benchmarks/bev_planning.py --parts planner       # one part
    python benchmarks/bev_planning.py --table                                 # the table from the JSON

``--plan-l1`` / ``--plan-collision`` / ``--plan-l1-beta`` set the planner's loss (default: the config's 1, 0.5
and 1 m), ``--planning-gradient`` how much of it reaches perception, and ``--results`` another JSON, so other
weightings can be measured without overwriting the figures.
``--perception <root>/detector.ckpt`` (what the detector part keeps) trains the planner on that frozen detector
instead (``planner_frozen`` in the JSON). ``--checkpoint <root>/planner.ckpt`` tests a planner those runs kept,
training nothing (``--brake-margin`` / ``--brake-score-threshold`` then set its brake).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch

from zoo.bev import BEVFormerDetector, BEVFormerPlanner, EgoStatusPlanner, PlanningMetric
from zoo.bev.trajectory import constant_velocity_plan
from zoo.datamodules import BEVDetectionDataModule

RESULTS = Path(__file__).parent / "results" / "bev_planning.json"
PARTS = ("planner", "detector", "baselines")
#: The arguments recorded with the results.
SETUP = (
    "epochs",
    "mlp_epochs",
    "train_scenes",
    "test_scenes",
    "seed",
    "plan_l1",
    "plan_collision",
    "plan_l1_beta",
    "planning_gradient",
)
ROWS = (
    ("const_velocity", "constant velocity"),
    ("const_velocity_yaw_rate", "const. velocity + yaw rate"),
    ("ego_mlp", "ego-status MLP (AD-MLP)"),
    ("planner_network", "BEV planner, network only"),
    ("planner", "BEV planner (ours)"),
    ("planner_frozen_network", "frozen detector, network only"),
    ("planner_frozen", "BEV planner, frozen detector"),
)


def make_data(args) -> BEVDetectionDataModule:
    return BEVDetectionDataModule(
        planning=True, batch_size=4, queue_length=2, train_scenes=args.train_scenes, val_scenes=8,
        test_scenes=args.test_scenes, seed=args.seed,
    )  # fmt: skip


def optimizer(params):
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)


def trainer(args, epochs: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_epochs=epochs, gradient_clip_val=35.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=args.root,
    )  # fmt: skip


def test(args, model, data) -> dict:
    return {k: float(v) for k, v in trainer(args, 1).test(model, data, verbose=False)[0].items()}


def fit_and_test(args, model, data, epochs: int, name: str) -> dict:
    """Train, keep the checkpoint (``<root>/<name>.ckpt``: a detector can be a frozen ``perception``), test."""
    L.seed_everything(args.seed)
    start = time.perf_counter()
    fit = trainer(args, epochs)
    fit.fit(model, data)
    wall = time.perf_counter() - start
    fit.save_checkpoint(Path(args.root) / f"{name}.ckpt")
    return {"steps": fit.global_step, "wall_s": round(wall, 1), "metrics": test(args, model, data)}


def test_planner(args, model: BEVFormerPlanner, data, run: dict, name: str) -> dict:
    """``run`` (the braked plan's test) and ``<name>_network``: the same planner tested without its brake."""
    model.hparams.safety_brake = False
    network = {**{k: v for k, v in run.items() if k != "brake"}, "metrics": test(args, model, data)}
    model.hparams.safety_brake = True
    brake = {k: model.hparams[k] for k in ("brake_margin", "brake_score_threshold")}
    return {name: {**run, "brake": brake}, f"{name}_network": network}


def brake_settings(args) -> dict:
    return {"brake_margin": args.brake_margin, "brake_score_threshold": args.brake_score_threshold}


def bev_kwargs(data: BEVDetectionDataModule) -> dict:
    return {"model_name": "bevformer_cpu", "class_names": data.class_names,
            "point_cloud_range": data.point_cloud_range, "optimizer": optimizer}  # fmt: skip


def run_planner(args, data) -> dict:
    L.seed_everything(args.seed)
    weights = {"detection": 1.0, "plan_l1": args.plan_l1, "plan_collision": args.plan_collision}
    model = BEVFormerPlanner(
        **bev_kwargs(data), loss_weights=weights, plan_l1_beta=args.plan_l1_beta, perception=args.perception,
        planning_gradient=args.planning_gradient, **brake_settings(args),
    )  # fmt: skip
    name = "planner" if args.perception is None else "planner_frozen"
    return test_planner(args, model, data, fit_and_test(args, model, data, args.epochs, name), name)


def test_checkpoint(args, data) -> dict:
    """A planner a run kept, tested with and without its brake; its training figures stay in the JSON."""
    model = BEVFormerPlanner.load_from_checkpoint(args.checkpoint, map_location="cpu", **brake_settings(args))
    name = Path(args.checkpoint).stem
    previous = json.loads(args.results.read_text()).get(name, {}) if args.results.exists() else {}
    run = {**previous, "metrics": test(args, model, data)}
    return test_planner(args, model, data, run, name)


def run_detector(args, data) -> dict:
    L.seed_everything(args.seed)
    return {
        "detector": fit_and_test(args, BEVFormerDetector(**bev_kwargs(data)), data, args.epochs, "detector")
    }


def constant_velocity_metrics(data: BEVDetectionDataModule, yaw_rate: bool) -> dict:
    metric, samples = PlanningMetric(), {"all": 0, "reactive_": 0}
    for batch in data.test_dataloader():
        samples["all"] += len(batch["reactive"])
        samples["reactive_"] += int(batch["reactive"].sum())
        status = batch["ego_status"]
        plan = constant_velocity_plan(status[:, 8], status[:, 9] if yaw_rate else None)
        metric.update(plan, batch["ego_fut"], batch["ego_fut_mask"], batch["agent_fut"], batch["agent_fut_mask"],
                      batch["reactive"])  # fmt: skip
    return {"metrics": {f"test/{k}": float(v) for k, v in metric.compute().items()}, "samples": samples}


def run_baselines(args, data) -> dict:
    L.seed_everything(args.seed)
    mlp = EgoStatusPlanner(
        plan_l1_beta=args.plan_l1_beta, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01)
    )
    return {
        "const_velocity": constant_velocity_metrics(data, yaw_rate=False),
        "const_velocity_yaw_rate": constant_velocity_metrics(data, yaw_rate=True),
        "ego_mlp": fit_and_test(args, mlp, data, args.mlp_epochs, "ego_mlp"),
    }


def fmt(value: float, percent: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def row(name: str, metrics: dict, subset: str) -> str:
    """One planner's line: L2 and collision at 1/2/3 s, and the VAD-averaged L2 at 3 s."""

    def get(key: str) -> float:
        return metrics.get(f"test/plan_{subset}{key}", float("nan"))

    l2 = " ".join(f"{fmt(get(f'L2_{n}s')):>6s}" for n in (1, 2, 3))
    col = " ".join(f"{fmt(get(f'col_{n}s'), True):>6s}" for n in (1, 2, 3))
    return f"{name:30s} {l2}  {col} {fmt(get('L2_avg_3s')):>9s}"


def table(results: dict) -> str:
    """The printed table: planners on all and on reactive samples, then detection with and without the head."""
    lines = []
    for subset, title in (("", "all test samples"), ("reactive_", "reactive test samples")):
        n = results.get("const_velocity", {}).get("samples", {}).get(subset or "all")
        lines.append(f"\n{title}{f' ({n})' if n else ''}: L2 (m) and collision rate (%) at 1 / 2 / 3 s (UniAD"
                     " 'at'); L2 avg 3s: VAD/ST-P3 averaged")  # fmt: skip
        header = " ".join(f"{h:>6s}" for h in ("L2 1s", "2s", "3s", "col 1s", "2s", "3s"))
        lines.append(f"{'planner':30s} {header} {'L2 avg 3s':>9s}")
        for key, name in ROWS:
            if key in results:
                lines.append(row(name, results[key]["metrics"], subset))
    lines.append("\ndetection on the test split: mAP / NDS (steps, wall)")
    for key, name in (("detector", "detection alone"), ("planner", "with the planning head")):
        run = results.get(key)
        if run is not None:
            m = run["metrics"]
            lines.append(f"{name:30s} {m['test/mAP']:.3f} / {m['test/NDS']:.3f} ({run['steps']} steps, "
                         f"{run['wall_s'] / 60:.1f} min)")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    parser.add_argument("--epochs", type=int, default=5, help="BEVFormer epochs (the config trains 10)")
    parser.add_argument("--mlp-epochs", type=int, default=40)
    parser.add_argument("--train-scenes", type=int, default=48)
    parser.add_argument("--test-scenes", type=int, default=24, help="the config's test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan-l1", type=float, default=1.0, help="the planner's L1 loss weight")
    parser.add_argument("--plan-collision", type=float, default=0.5, help="its collision loss weight")
    parser.add_argument(
        "--plan-l1-beta", type=float, default=1.0, help="Huber width (m) of the waypoint L1, 0: L1"
    )
    parser.add_argument(
        "--planning-gradient", type=float, default=0.1, help="share of the planning gradient into perception"
    )
    parser.add_argument(
        "--perception",
        default=None,
        help="a BEVFormerDetector checkpoint (the detector part's): freeze it, train the planner alone",
    )
    parser.add_argument("--brake-margin", type=float, default=2.0, help="metres around each detection")
    parser.add_argument("--brake-score-threshold", type=float, default=0.4, help="detections the brake obeys")
    parser.add_argument(
        "--checkpoint", help="a planner checkpoint (planner.ckpt) to test instead of training"
    )
    parser.add_argument("--root", default="runs/bev_planning")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON the parts merge into")
    parser.add_argument("--table", action="store_true", help="print the table from the JSON, train nothing")
    args = parser.parse_args()
    if not args.table:
        torch.set_num_threads(1)
        data = make_data(args)
        data.setup("fit")
        runners = {
            "planner": run_planner, "detector": run_detector, "baselines": run_baselines, "checkpoint": test_checkpoint
        }  # fmt: skip
        parts = ["checkpoint"] if args.checkpoint else args.parts.split(",")
        for part in parts:
            found = runners[part](args, data)
            results = json.loads(args.results.read_text()) if args.results.exists() else {}
            if part != "checkpoint":  # a tested checkpoint keeps the setup of the run that trained it
                setup = {k: getattr(args, k) for k in SETUP}
                found = {key: {**run, "setup": setup} for key, run in found.items()}
            results.update(found)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=2))
    print(table(json.loads(args.results.read_text())))


if __name__ == "__main__":
    main()
