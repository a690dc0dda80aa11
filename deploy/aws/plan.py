"""The fleet a sweep needs, and what it costs.

Fleet = 1 frontend + the largest number of model instances any run of the
sweep deploys (``RunSpec.num_instances``: data + parity + backup, e.g.
N + N/k for ``equal``/``coded``) as workers + the largest ``num_clients``
as clients. The ``"clipper"`` background deployment is co-located on the
workers, so it adds none.

Duration: per run, (warm-up + measured queries) / send rate + a fixed
overhead (``AwsSettings.run_overhead_s``); the sweep is the sum over runs.
"""

from dataclasses import dataclass

from deploy.aws.prices import PRICES_RECORDED, hourly_usd

ROLES = ("frontend", "worker", "client")


class PlanError(ValueError):
    """The config cannot be planned on AWS (e.g. instance type "local")."""


@dataclass(frozen=True)
class RoleGroup:
    role: str
    instance_type: str
    count: int


@dataclass(frozen=True)
class FleetPlan:
    experiment_id: str
    groups: tuple            # RoleGroup per role, in ROLES order
    num_runs: int
    sweep_s: float

    def group(self, role):
        return next(g for g in self.groups if g.role == role)

    @property
    def instance_types(self):
        return sorted({g.instance_type for g in self.groups})

    def cost(self, *, spot=False, spot_discount=0.0):
        """(USD per hour, USD for the sweep) or (None, None) when a type is unpriced."""
        per_hour = 0.0
        for g in self.groups:
            price = hourly_usd(g.instance_type, spot=spot, spot_discount=spot_discount)
            if price is None:
                return None, None
            per_hour += price * g.count
        return per_hour, per_hour * self.sweep_s / 3600.0


def run_duration_s(run, overhead_s):
    return (run.warmup_queries + run.num_queries) / run.send_rate + overhead_s


def plan_fleet(cfg, settings):
    """``FleetPlan`` for a ``SweepConfig`` under ``AwsSettings`` (type overrides)."""
    runs = cfg.runs()
    if not runs:
        raise PlanError(f"config {cfg.experiment_id!r} expands to no runs")
    types = {
        "frontend": settings.frontend_type or cfg.frontend_type,
        "worker": settings.worker_type or cfg.worker_type,
        "client": settings.client_type or cfg.client_type,
    }
    for role, itype in types.items():
        if not itype or itype == "local":
            raise PlanError(
                f"{role}_type is {itype!r} in config {cfg.experiment_id!r}; "
                f"give an EC2 instance type with --{role}-type"
            )
    counts = {
        "frontend": 1,
        "worker": max(sum(r.num_instances) for r in runs),
        "client": max(r.num_clients for r in runs),
    }
    groups = tuple(RoleGroup(role, types[role], counts[role]) for role in ROLES)
    sweep_s = sum(run_duration_s(r, settings.run_overhead_s) for r in runs)
    return FleetPlan(cfg.experiment_id, groups, len(runs), sweep_s)


def format_plan(plan, settings, *, reuse=None, notes=()):
    """The dry-run report: instances by role and type, reuse, cost."""
    reuse = reuse or {}
    lines = [f"experiment {plan.experiment_id}: {plan.num_runs} runs, "
             f"estimated sweep {plan.sweep_s / 3600:.2f} h ({plan.sweep_s:.0f} s)",
             f"market: {settings.market}, region {settings.region}",
             "",
             f"{'ROLE':<9} {'TYPE':<13} {'COUNT':>5} {'REUSE':>5} {'LAUNCH':>6} {'USD/H EACH':>10}"]
    for g in plan.groups:
        reused = reuse.get(g.role, [])
        price = hourly_usd(g.instance_type, spot=settings.spot, spot_discount=settings.spot_discount)
        price_s = f"{price:.3f}" if price is not None else "unknown"
        lines.append(f"{g.role:<9} {g.instance_type:<13} {g.count:>5} {len(reused):>5} "
                     f"{max(0, g.count - len(reused)):>6} {price_s:>10}")
    for g in plan.groups:
        for inst in reuse.get(g.role, []):
            lines.append(f"  reuse {g.role} {inst['InstanceId']} ({inst['State']['Name']})")
    per_hour, sweep = plan.cost(spot=settings.spot, spot_discount=settings.spot_discount)
    lines.append("")
    if per_hour is None:
        unknown = [t for t in plan.instance_types if hourly_usd(t) is None]
        lines.append(f"estimated cost: unknown (no price recorded for {', '.join(unknown)})")
    else:
        basis = f"spot at {settings.spot_discount:.0%} off on-demand" if settings.spot else "on-demand"
        lines.append(f"estimated cost: {per_hour:.2f} USD/h, {sweep:.2f} USD for the sweep "
                     f"({basis}; prices of {PRICES_RECORDED})")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)
