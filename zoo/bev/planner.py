"""The planning head on BEVFormer (VAD's design, hand-written: neither VAD nor UniAD is an installable library)
and its losses.

An ego query, made of a learned embedding, the ego status and the driving command, attends to the agents (the
detection decoder's last-layer queries with their predicted centres and scores) and then to the BEV, as VAD's
ego query attends to agent and map queries. It predicts one trajectory per command (VAD) and the command picks
one. Each trajectory is a residual on the constant-velocity-and-yaw-rate plan of the current ego status, so an
untrained head already drives on, and what it learns is when and how much to deviate from that: exactly what
the ego status alone cannot tell (``zoo.bev.ego_mlp`` is the same head without perception).
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.bev.geometry import reference_points_2d
from zoo.bev.trajectory import EGO_SIZE, EGO_STATUS_DIMS, constant_velocity_plan

__all__ = ["EgoEncoder", "PlanningHead", "collision_loss", "pad_agents", "planning_losses"]

#: Scale of each ``ego_status`` entry (metres for past positions, m/s, rad/s, m/s^2) so the MLP sees O(1) inputs.
STATUS_SCALE = (10.0,) * 8 + (5.0, 0.5, 2.0)


class EgoEncoder(nn.Module):
    """Ego status and command -> one query; and (query -> per-command residual waypoints) -> the plan."""

    def __init__(self, embed_dims: int, steps: int = 6, commands: int = 3, dt: float = 0.5) -> None:
        super().__init__()
        self.steps, self.commands, self.dt = steps, commands, dt
        self.register_buffer("status_scale", torch.tensor(STATUS_SCALE), persistent=False)
        self.status = nn.Sequential(
            nn.Linear(EGO_STATUS_DIMS, embed_dims), nn.ReLU(inplace=True), nn.Linear(embed_dims, embed_dims)
        )
        self.command = nn.Embedding(commands, embed_dims)
        self.trajectory = nn.Sequential(
            nn.Linear(embed_dims, embed_dims),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dims, commands * steps * 2),
        )
        nn.init.zeros_(self.trajectory[-1].weight)  # start from the constant-velocity plan
        nn.init.zeros_(self.trajectory[-1].bias)

    def query(self, ego_status: torch.Tensor, command: torch.Tensor) -> torch.Tensor:
        """(B, C)."""
        return self.status(ego_status / self.status_scale) + self.command(command)

    def plan(self, query: torch.Tensor, ego_status: torch.Tensor, command: torch.Tensor) -> torch.Tensor:
        """(B, steps, 2): the commanded trajectory; the residual is per-step displacement, summed up."""
        batch = query.shape[0]
        steps = self.trajectory(query).view(batch, self.commands, self.steps, 2)
        chosen = steps[torch.arange(batch, device=query.device), command].cumsum(dim=1)
        prior = constant_velocity_plan(ego_status[:, 8], ego_status[:, 9], self.steps, self.dt)
        return prior.to(chosen.dtype) + chosen


class _PlannerLayer(nn.Module):
    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.agents = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)
        self.bev = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dims, 2 * embed_dims),
            nn.ReLU(inplace=True),
            nn.Linear(2 * embed_dims, embed_dims),
        )
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query, agents, bev) -> torch.Tensor:
        query = self.norms[0](query + self.agents(query, agents, agents, need_weights=False)[0])
        query = self.norms[1](query + self.bev(query, bev, bev, need_weights=False)[0])
        return self.norms[2](query + self.ffn(query))


class PlanningHead(nn.Module):
    """Ego query -> agents -> BEV attention, ``layers`` times; then the command's trajectory.

    Args:
        embed_dims: the BEV's and the detection queries' width.
        bev_shape: (H, W) of the BEV grid; its positional embedding is learnt from the cell centres.
        point_cloud_range: the BEV range, to normalise the agents' centres.
    """

    def __init__(
        self, embed_dims: int, bev_shape: tuple[int, int], point_cloud_range: tuple[float, ...],
        num_heads: int = 4, layers: int = 2, steps: int = 6, commands: int = 3, dt: float = 0.5,
    ) -> None:  # fmt: skip
        super().__init__()
        self.bev_shape = tuple(bev_shape)
        self.ego = EgoEncoder(embed_dims, steps, commands, dt)
        self.ego_embedding = nn.Parameter(torch.zeros(1, embed_dims))
        self.agent_in = nn.Linear(embed_dims + 3, embed_dims)
        self.position = nn.Sequential(
            nn.Linear(2, embed_dims), nn.ReLU(inplace=True), nn.Linear(embed_dims, embed_dims)
        )
        self.layers = nn.ModuleList(_PlannerLayer(embed_dims, num_heads) for _ in range(layers))
        # BEV cells and agents share one positional embedding, both in the range normalised to [-1, 1]
        self.register_buffer("cells", reference_points_2d(*self.bev_shape) * 2 - 1, persistent=False)
        low, high = torch.tensor(point_cloud_range[:2]), torch.tensor(point_cloud_range[3:5])
        self.register_buffer("range_centre", (low + high) / 2, persistent=False)
        self.register_buffer("range_half", (high - low) / 2, persistent=False)

    def forward(
        self, bev: torch.Tensor, agent_queries: torch.Tensor, agent_centres: torch.Tensor,
        agent_scores: torch.Tensor, ego_status: torch.Tensor, command: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """``bev`` (B, H*W, C), ``agent_queries`` (B, Q, C), ``agent_centres`` (B, Q, 2) metres,
        ``agent_scores`` (B, Q) best class probability, ``ego_status`` (B, 11), ``command`` (B,) -> (B, 6, 2)."""
        bev = bev + self.position(self.cells.to(bev.dtype))
        where = (agent_centres - self.range_centre) / self.range_half
        agents = self.agent_in(torch.cat([agent_queries, where, agent_scores[..., None]], dim=-1))
        agents = agents + self.position(where)
        query = (self.ego.query(ego_status, command) + self.ego_embedding)[:, None]
        for layer in self.layers:
            query = layer(query, agents, bev)
        return self.ego.plan(query[:, 0], ego_status, command)


def pad_agents(
    agent_fut: list[torch.Tensor], agent_mask: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (K_b, H, 5) boxes and (K_b, H) masks -> (B, K, H, 5), (B, K, H) with zero-mask padding."""
    steps = agent_fut[0].shape[1]
    count = max(1, max(len(a) for a in agent_fut))
    boxes = agent_fut[0].new_zeros(len(agent_fut), count, steps, 5)
    masks = agent_fut[0].new_zeros(len(agent_fut), count, steps)
    for b, (fut, mask) in enumerate(zip(agent_fut, agent_mask)):
        boxes[b, : len(fut)], masks[b, : len(fut)] = fut, mask
    return boxes, masks


def collision_loss(waypoints: torch.Tensor, agents: torch.Tensor, masks: torch.Tensor, margin: float = 0.5):
    """Mean over samples of the summed penetration of the ego into each agent's future box, step by step.

    The ego is a disc of radius half its length plus ``margin`` (it may point anywhere while planning); the
    penetration of its centre into the agent box grown by that radius is a hinge, zero when clear, so it only
    pushes waypoints that come too close (VAD's ego-agent collision constraint, with boxes instead of
    distance thresholds). ``waypoints`` (B, H, 2), ``agents`` (B, K, H, 5), ``masks`` (B, K, H)."""
    radius = EGO_SIZE[1] / 2 + margin
    offset = waypoints[:, None] - agents[..., :2]
    cos, sin = torch.cos(agents[..., 4]), torch.sin(agents[..., 4])
    along = (offset[..., 0] * cos + offset[..., 1] * sin).abs()
    across = (-offset[..., 0] * sin + offset[..., 1] * cos).abs()
    depth = torch.minimum(agents[..., 3] / 2 + radius - along, agents[..., 2] / 2 + radius - across)
    return (depth.clamp(min=0) * masks).sum() / waypoints.shape[0]


def planning_losses(
    waypoints: torch.Tensor, batch: dict, collision_margin: float = 0.5
) -> dict[str, torch.Tensor]:
    """``loss_plan_l1``: L1 on the valid waypoints (mean over them); ``loss_plan_col``: ``collision_loss``."""
    mask = batch["ego_fut_mask"].to(waypoints.dtype)
    l1 = ((waypoints - batch["ego_fut"]).abs().sum(-1) * mask).sum() / mask.sum().clamp(min=1)
    agents, masks = pad_agents(batch["agent_fut"], batch["agent_fut_mask"])
    return {"loss_plan_l1": l1, "loss_plan_col": collision_loss(waypoints, agents, masks, collision_margin)}
