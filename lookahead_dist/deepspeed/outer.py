"""Cross-node Lookahead: nodes reduce gradients only inside themselves and meet once every ``k`` steps.

With ``"lookahead": {"outer": {"scope": "nodes", ...}}`` every node is its own DeepSpeed data-parallel
group: gradient reduce-scatters / all-reduces and the ZeRO all-gathers of every step stay inside the node.
The slow weights φ are the same on every node; at a sync each rank reduces the *delta* θ − φ of its own
fp32 ZeRO partition over the ranks that hold the same partition on the other nodes (the ranks with its
local rank), and φ takes one outer step along the mean delta:

* no ``outer.momentum``: ``φ ← φ + lr·mean(θ − φ)`` (Lookahead's own rule; with one node exactly Lookahead);
* ``outer.momentum`` β: ``m ← β·m + mean(θ − φ)``; ``φ ← φ + lr·m``, or with ``nesterov``
  ``φ ← φ + lr·(mean(θ − φ) + β·m)`` (SlowMo, DiLoCo's outer Nesterov on the pseudo-gradient φ − θ);

then ``θ ← φ``. ``lr`` is ``outer.lr``, else α (or a group's ``lookahead_alpha``). Nothing else crosses
nodes: per step no cross-node collective, per sync one all-reduce of this rank's partition size (half the
bytes with ``comm_dtype: "bf16"``). No full weights are gathered. The outer momentum buffer lives beside φ
in the inner optimizer's per-tensor state (``"lookahead_outer_momentum"``), so it is sharded and saved
with it.

The groups must exist before ``deepspeed.initialize`` (they become the engine's data-parallel group through
``mpu=``), which :func:`lookahead_dist.deepspeed.initialize` does; by hand::

    topology = outer.NodeTopology()                 # after torch.distributed is initialised
    outer.broadcast_initial_weights(model, topology)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=topology)
    lookahead_dist.deepspeed.install(engine, settings=settings)   # settings.outer.scope == "nodes"

Ranks are grouped by node as torchrun numbers them: node ``rank // local_world_size``, with
``local_world_size`` from ``outer.local_world_size`` or ``LOCAL_WORLD_SIZE``. Checkpoints go into a
per-node subfolder (``<save_dir>/node<i>``), since each node's fast weights and inner optimizer state
differ mid-cycle and DeepSpeed names its files by the rank inside the data-parallel group.

Caveats: each node's data loader must draw from the global data shard of its ranks (DeepSpeed's own
``training_data`` loader would give every node the same data, since it sees only the node group).
fp16 loss scaling would let nodes skip different steps and lose step; it runs on CPU nowhere and is
refused. ``alpha="adaptive"`` and ``pullback="reset"`` with momentum are refused by the settings.
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor
from torch.optim import Optimizer

from ..core.collectives import all_reduce_sum_, broadcast_
from ..core.keys import GROUP_ALPHA, OUTER_MOMENTUM_KEY, SLOW_KEY
from ..core.optim import Lookahead
from ..core.pull import Due, Kept, Pull
from ..core.settings import LookaheadConfigError, LookaheadSettings, OuterSettings

__all__ = [
    "NodeTopology",
    "NodesPull",
    "OuterLookahead",
    "broadcast_initial_weights",
    "node_checkpoint_dir",
    "per_node_checkpoints",
    "topology_of",
]

#: Attribute set on an engine whose save/load_checkpoint already use per-node folders.
_PER_NODE = "_lookahead_per_node_checkpoints"


# ---------------------------------------------------------------------------------------- groups
def _local_world_size(override: int | None) -> int:
    if override is not None:
        return override
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None:
        raise LookaheadConfigError(
            'Lookahead: outer.scope="nodes" needs the number of ranks per node: launch with torchrun (it sets '
            "LOCAL_WORLD_SIZE) or set lookahead.outer.local_world_size."
        )
    try:
        return int(value)
    except ValueError:
        raise LookaheadConfigError(f"Lookahead: LOCAL_WORLD_SIZE={value!r} is not an int.") from None


class NodeTopology:
    """The node-local data-parallel groups and the cross-node groups, usable as DeepSpeed's ``mpu``.

    DeepSpeed asks an ``mpu`` for its data-parallel group (here: this node's ranks) and its model-parallel
    group (here: this rank alone, so the model-parallel reductions of gradient norms stay local). The
    cross-node group of a rank is every rank with the same local rank, i.e. the ranks holding the same ZeRO
    partition on the other nodes. Must be built on every rank, in the same order (``new_group`` rules).
    """

    def __init__(self, local_world_size: int | None = None) -> None:
        if not tdist.is_available() or not tdist.is_initialized():
            raise RuntimeError(
                "lookahead_dist.deepspeed.outer: torch.distributed is not initialised; call "
                "deepspeed.init_distributed() (or lookahead_dist.deepspeed.initialize) first."
            )
        world, rank = tdist.get_world_size(), tdist.get_rank()
        local = _local_world_size(local_world_size)
        if local < 1 or world % local:
            raise LookaheadConfigError(
                f"Lookahead: local_world_size={local} does not divide the world size {world}; every node must "
                f"run the same number of ranks (set lookahead.outer.local_world_size to the ranks per node)."
            )
        self.world_size = world
        self.rank = rank
        self.local_world_size = local
        self.num_nodes = world // local
        self.node = rank // local
        self.local_rank = rank % local
        self.node_ranks = [self.node * local + i for i in range(local)]
        self.cross_ranks = [n * local + self.local_rank for n in range(self.num_nodes)]
        self.node_group: Any = None
        self.cross_group: Any = None
        for n in range(self.num_nodes):  # every rank creates every group, in the same order
            ranks = [n * local + i for i in range(local)]
            group = tdist.new_group(ranks)
            if n == self.node:
                self.node_group = group
        for i in range(local):
            ranks = [n * local + i for n in range(self.num_nodes)]
            group = tdist.new_group(ranks)
            if i == self.local_rank:
                self.cross_group = group
        # Only this rank takes part in its own group, so only it creates it.
        self.self_group = tdist.new_group([rank], use_local_synchronization=True)

    def __repr__(self) -> str:
        return (
            f"NodeTopology(nodes={self.num_nodes}, local_world_size={self.local_world_size}, "
            f"node={self.node}, local_rank={self.local_rank})"
        )

    def same_node(self, ranks: list[int]) -> bool:
        """Whether all ``ranks`` (global) belong to one node."""
        return len({r // self.local_world_size for r in ranks}) <= 1

    # The mpu interface DeepSpeed 0.19 queries (data and model parallelism only).
    def get_data_parallel_group(self) -> Any:
        return self.node_group

    def get_data_parallel_rank(self) -> int:
        return self.local_rank

    def get_data_parallel_world_size(self) -> int:
        return self.local_world_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.node_ranks)

    def get_model_parallel_group(self) -> Any:
        return self.self_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_src_rank(self) -> int:
        return self.rank


def topology_of(engine: Any) -> NodeTopology | None:
    mpu = getattr(engine, "mpu", None)
    return mpu if isinstance(mpu, NodeTopology) else None


def broadcast_initial_weights(model: torch.nn.Module, topology: NodeTopology) -> None:
    """Make every node start from rank 0's weights (DeepSpeed broadcasts only inside each node's group).

    One-off, before ``deepspeed.initialize``: φ₀ must be the same on every node.
    """
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    if any(hasattr(t, "ds_id") for t in tensors):
        raise LookaheadConfigError(
            'Lookahead: outer.scope="nodes" cannot take a model built under deepspeed.zero.Init (its parameters '
            "are already partitioned over the global group); build the model normally, ZeRO-3 still partitions "
            "it inside each node."
        )
    with torch.no_grad():
        broadcast_([t.data for t in tensors], src=0)  # CPU tensors over NCCL travel through the device


# ---------------------------------------------------------------------------------------- the outer step
class NodesPull(Pull):
    """The cross-node outer step as the core's :class:`~lookahead_dist.core.pull.Pull` (module docstring).

    The core's sync keeps the rest: α per group (here the outer lr), the momentum pullback of the
    node-local inner buffers (with α), ``pullback="reset"`` and the warning for tensors kept. The
    non-finite verdict is taken on the mean delta, so every node keeps the same tensors.
    """

    scope = "nodes"

    def __init__(self, topology: NodeTopology, outer: OuterSettings) -> None:
        self.topology = topology
        self.outer = outer
        #: Elements and bytes this process sent into cross-node all-reduces (information, not persisted).
        self.elements = 0
        self.bytes = 0

    def alpha(self, la: Lookahead, gi: int, params: list[Tensor]) -> float:
        if self.outer.lr is not None:
            return float(self.outer.lr)
        return self._group_alpha(la, gi)

    def pullback_alpha(self, la: Lookahead, gi: int, alpha: float) -> float:
        return self._group_alpha(la, gi)  # the inner buffers are local to each node: Lookahead's α

    @staticmethod
    def _group_alpha(la: Lookahead, gi: int) -> float:
        spec = la.param_groups[gi].get(GROUP_ALPHA, la.alpha)
        if spec == "adaptive":
            raise LookaheadConfigError(
                f"Lookahead: param_group[{GROUP_ALPHA!r}]='adaptive' is not supported with outer.scope=\"nodes\"; "
                f"use a fixed alpha or set outer.lr."
            )
        return float(spec)

    def pull(self, la: Lookahead, due: Due, alphas: dict[int, float], check: bool) -> list[Kept]:
        if self.topology.num_nodes == 1 and self.outer.momentum is None:
            return super().pull(la, due, alphas, check)  # one node, no momentum: exactly Lookahead
        state = la.optimizer.state
        order = [(gi, p) for gi in sorted(due) for p in due[gi]]
        fast = [p for _, p in order]
        slow = [state[p][SLOW_KEY] for p in fast]
        means = self._mean_deltas(fast, slow)
        kept = self._keep_nonfinite(la, order, slow, means)
        if kept:
            bad = {id(k.tensor) for k in kept}
            keep = [i for i, p in enumerate(fast) if id(p) not in bad]
            order = [order[i] for i in keep]
            fast, slow, means = [fast[i] for i in keep], [slow[i] for i in keep], [means[i] for i in keep]
        by_lr: dict[float, list[int]] = defaultdict(list)
        for i, (gi, _) in enumerate(order):
            by_lr[alphas[gi]].append(i)
        for lr, idx in by_lr.items():
            steps = [means[i] for i in idx]
            if self.outer.momentum is not None:
                steps = self._momentum_steps([fast[i] for i in idx], [slow[i] for i in idx], steps, state)
            torch._foreach_add_([slow[i] for i in idx], steps, alpha=lr)  # φ ← φ + lr·step
        if fast:
            torch._foreach_copy_(fast, slow)  # θ ← φ
        return kept

    def _momentum_steps(
        self, fast: list[Tensor], slow: list[Tensor], means: list[Tensor], state: Any
    ) -> list[Tensor]:
        """m ← β·m + mean(θ − φ); the step is m, or mean + β·m with Nesterov."""
        beta = self.outer.momentum
        assert beta is not None
        bufs = []
        for p, phi in zip(fast, slow):
            st = state[p]
            if OUTER_MOMENTUM_KEY not in st:
                st[OUTER_MOMENTUM_KEY] = torch.zeros_like(phi)
            bufs.append(st[OUTER_MOMENTUM_KEY])
        torch._foreach_mul_(bufs, beta)
        torch._foreach_add_(bufs, means)
        return list(torch._foreach_add(means, bufs, alpha=beta)) if self.outer.nesterov else bufs

    def _mean_deltas(self, fast: list[Tensor], slow: list[Tensor]) -> list[Tensor]:
        """mean over nodes of θ − φ, one tensor per ``fast`` tensor (fp32 like the partitions)."""
        nodes = self.topology.num_nodes
        if nodes == 1:
            return list(torch._foreach_sub(fast, slow))
        # θ − φ written straight into one flat buffer: one partition-sized temporary, one all-reduce.
        sizes = [t.numel() for t in fast]
        flat = torch.empty(sum(sizes), dtype=fast[0].dtype, device=fast[0].device)
        views = [v.view_as(t) for v, t in zip(flat.split(sizes), fast)]
        torch._foreach_copy_(views, fast)
        torch._foreach_sub_(views, slow)
        buf = flat.to(torch.bfloat16) if self.outer.comm_dtype == "bf16" else flat
        all_reduce_sum_(buf, self.topology.cross_group)
        self.elements += buf.numel()
        self.bytes += buf.numel() * buf.element_size()
        mean = buf.to(device=flat.device, dtype=flat.dtype).div_(nodes)  # `flat` itself when fp32
        return [v.view_as(t) for v, t in zip(mean.split(sizes), fast)]

    def _keep_nonfinite(
        self, la: Lookahead, order: list[tuple[int, Tensor]], slow: list[Tensor], means: list[Tensor]
    ) -> list[Kept]:
        """The tensors whose mean delta is not finite (the same verdict on every node), with θ ← φ for them."""
        finite = [bool(torch.isfinite(m).all()) for m in means]
        if all(finite):
            return []
        bad = [i for i, ok in enumerate(finite) if not ok]
        if la.settings.nonfinite == "raise":
            raise FloatingPointError(
                f"Lookahead: the outer step found non-finite fast weights on some node in {len(bad)} tensor(s); "
                f'set lookahead.nonfinite="skip" to keep φ for them and continue.'
            )
        # θ ← φ for the kept tensors too: every node restarts their cycle from the same point.
        torch._foreach_copy_([order[i][1] for i in bad], [slow[i] for i in bad])
        return [Kept(order[i][0], order[i][1], 1, 1) for i in bad]


class OuterLookahead(Lookahead):
    """:class:`Lookahead` whose sync pulls θ and φ together with the cross-node outer step (:class:`NodesPull`).

    Everything else is the core's: φ and the per-tensor counters in the inner optimizer's state, the
    sync loop, ``use_slow_weights``, checkpoints. All ranks of a cross-node group hold the same partition
    layout and step in lock-step, so their syncs (one per inner ``step()`` call that completes a cycle:
    per param group under ZeRO-1/2, per sub-group under ZeRO-3) pair up.
    """

    def __init__(self, optimizer: Optimizer, *, settings: LookaheadSettings, topology: NodeTopology,
                 allow_empty: bool = False) -> None:
        rule = NodesPull(topology, settings.outer)
        super().__init__(optimizer, settings=settings, allow_empty=allow_empty, pull=rule)
        self.topology = topology
        self.outer: OuterSettings = settings.outer

    @property
    def outer_elements(self) -> int:
        """Elements this process sent into cross-node all-reduces (information, not persisted)."""
        return self._pull.elements  # type: ignore[attr-defined,no-any-return]

    @property
    def outer_bytes(self) -> int:
        """Bytes this process sent into cross-node all-reduces (information, not persisted)."""
        return self._pull.bytes  # type: ignore[attr-defined,no-any-return]


# ---------------------------------------------------------------------------------------- install helpers
def check_engine(engine: Any) -> NodeTopology:
    """The engine's :class:`NodeTopology`, or a clear error if the engine was built without it."""
    topology = topology_of(engine)
    if topology is None:
        raise LookaheadConfigError(
            'Lookahead: outer.scope="nodes" needs the node-local data-parallel groups to exist before '
            "deepspeed.initialize: use lookahead_dist.deepspeed.initialize (it builds them from the config), "
            "or pass mpu=lookahead_dist.deepspeed.outer.NodeTopology() to deepspeed.initialize."
        )
    if getattr(engine, "data_parallel_group", topology.node_group) is not topology.node_group:
        raise LookaheadConfigError(
            "Lookahead: the engine's data-parallel group is not its node's group; DeepSpeed did not take the "
            "NodeTopology passed as mpu."
        )
    fp16 = getattr(engine, "fp16_enabled", None)
    if callable(fp16) and fp16():
        raise LookaheadConfigError(
            'Lookahead: outer.scope="nodes" does not support fp16 loss scaling (nodes would skip different '
            "steps and their cycles drift apart); use bf16 or fp32."
        )
    return topology


def node_checkpoint_dir(save_dir: Any, topology: NodeTopology) -> str:
    """Where a node's files go: ``<save_dir>/node<i>`` (each node's fast weights differ mid-cycle)."""
    return os.path.join(os.fspath(save_dir), f"node{topology.node}")


def per_node_checkpoints(engine: Any, topology: NodeTopology) -> None:
    """Send ``engine.save_checkpoint`` / ``load_checkpoint`` to a per-node subfolder of the directory given.

    DeepSpeed names checkpoint files by the rank inside the data-parallel group and the model-parallel
    rank, so with one group per node every node would write the same file names (and its own ``latest``)
    into one shared folder. Wrapping the engine's methods (instead of asking callers to pass another
    folder) keeps Lightning's DeepSpeedStrategy and user code, which call them directly, correct.
    """
    if getattr(engine, _PER_NODE, False):
        return
    save, load = engine.save_checkpoint, engine.load_checkpoint

    save_signature = inspect.signature(save)

    def save_checkpoint(save_dir: Any, *args: Any, **kwargs: Any) -> Any:
        folder = node_checkpoint_dir(save_dir, topology)
        bound = save_signature.bind(folder, *args, **kwargs)
        result = save(*bound.args, **bound.kwargs)
        # DeepSpeed writes "latest" on global rank 0 only: the first rank of every other node writes its own.
        if bound.arguments.get("save_latest", True) and topology.node != 0 and topology.local_rank == 0:
            tag = bound.arguments.get("tag")
            tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
            with open(os.path.join(folder, "latest"), "w") as f:
                f.write(tag)
        return result

    load_signature = inspect.signature(load)

    def load_checkpoint(load_dir: Any, *args: Any, **kwargs: Any) -> Any:
        folder = node_checkpoint_dir(load_dir, topology)
        bound = load_signature.bind(folder, *args, **kwargs)
        shared_latest = os.path.join(os.fspath(load_dir), "latest")
        # A saver that writes one "latest" for the whole run (lookahead_dist.deepspeed.checkpoint's
        # save_checkpoint) leaves it beside the node folders.
        if (
            bound.arguments.get("tag") is None
            and not os.path.isfile(os.path.join(folder, "latest"))
            and os.path.isfile(shared_latest)
        ):
            with open(shared_latest) as f:
                bound.arguments["tag"] = f.read().strip()
        return load(*bound.args, **bound.kwargs)

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    setattr(engine, _PER_NODE, True)


def check_ds_config(ds_config: dict[str, Any]) -> None:
    """Adjust/refuse DeepSpeed settings that break the outer step (in place, before deepspeed.initialize)."""
    zero = ds_config.get("zero_optimization") or {}
    if isinstance(zero, dict) and int(zero.get("stage", 0)) == 3:
        threshold = zero.get("stage3_param_persistence_threshold")
        if threshold is None:
            # Persistent (never re-partitioned) parameters keep gathered copies that the outer step's
            # θ ← φ does not reach; with threshold 0 every parameter is gathered afresh from its partition.
            zero["stage3_param_persistence_threshold"] = 0
            ds_config["zero_optimization"] = zero
        elif threshold != 0:
            raise LookaheadConfigError(
                f'Lookahead: outer.scope="nodes" with ZeRO-3 needs zero_optimization.'
                f"stage3_param_persistence_threshold=0, got {threshold!r}; set it to 0 (or leave it out)."
            )
    fp16 = ds_config.get("fp16") or {}
    if isinstance(fp16, dict) and fp16.get("enabled") in (True, "auto"):
        raise LookaheadConfigError(
            'Lookahead: outer.scope="nodes" does not support fp16 (loss-scale skips would differ between nodes '
            'and their cycles drift apart); use "bf16": {"enabled": true} or fp32.'
        )


def build_topology(settings: LookaheadSettings) -> NodeTopology:
    """Initialise torch.distributed the DeepSpeed way if needed, then build the node groups."""
    if not tdist.is_initialized():
        import deepspeed

        deepspeed.init_distributed()
    return NodeTopology(settings.outer.local_world_size)


def prepare_nodes(arguments: dict[str, Any], settings: LookaheadSettings) -> NodeTopology:
    """For ``deepspeed.initialize``'s bound ``arguments``: groups as ``mpu``, same start on every node."""
    if arguments.get("mpu") is not None and not isinstance(arguments["mpu"], NodeTopology):
        raise LookaheadConfigError(
            'Lookahead: outer.scope="nodes" builds its own process groups and passes them as mpu; it cannot be '
            "combined with a model-parallel mpu (tensor/pipeline parallelism)."
        )
    if isinstance(arguments.get("config"), dict):
        check_ds_config(arguments["config"])
    topology = arguments.get("mpu") or build_topology(settings)
    model = arguments.get("model")
    if isinstance(model, torch.nn.Module):
        broadcast_initial_weights(model, topology)
    arguments["mpu"] = topology
    return topology
