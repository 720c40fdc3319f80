"""Where a rank sits: world = data parallel x tensor parallel x sequence parallel (experts split
over expert-parallel groups besides), and the layout rules that need no model. Below config.py,
which checks a layout when it loads a config, and parallel.py, which applies it."""

from __future__ import annotations

from dataclasses import dataclass

from bigtrain.errors import UserError


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: world = dp x tp x sp, model-parallel groups on consecutive ranks."""

    world: int
    rank: int = 0
    tp: int = 1
    sp: int = 1
    ep: int = 1  # experts split over ep ranks; every rank still holds its own samples

    @property
    def group(self) -> int:
        """Ranks per model-parallel group (they hold the same samples)."""
        return self.tp * self.sp

    @property
    def dp(self) -> int:
        return self.world // self.group

    @property
    def dp_rank(self) -> int:
        return self.rank // self.group

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    def describe(self) -> str:
        experts = f", expert parallel {self.ep}" if self.ep > 1 else ""
        if self.group == 1:
            return f"world size {self.world}{experts}"
        kind = f"tensor parallel {self.tp}" if self.tp > 1 else f"sequence parallel {self.sp}"
        return f"world size {self.world} = data parallel {self.dp} x {kind}{experts}"


def describe_saved_layout(state: dict) -> str:
    """A checkpoint's layout from its trainer_state.json (older ones have no tp/sp/ep: 1)."""
    return Layout(state["world_size"], 0, state.get("tensor_parallel", 1), state.get("sequence_parallel", 1),
                  state.get("expert_parallel", 1)).describe()


def layout_of(cfg, world: int, rank: int = 0) -> Layout:
    return Layout(world, rank, cfg.deepspeed.tensor_parallel, cfg.deepspeed.sequence_parallel, cfg.deepspeed.expert_parallel)


def data_parallel_size(cfg, world: int, where_of=None) -> int:
    """world / (tp x sp), refusing a world size that the model-parallel groups do not divide."""
    where_of = where_of or (lambda key: "config")
    layout = layout_of(cfg, world)
    if world % layout.group:
        key = "deepspeed.tensor_parallel" if layout.tp > 1 else "deepspeed.sequence_parallel"
        raise UserError(f"{where_of(key)}: the world size {world} does not divide into groups of {layout.group} "
                        f"({key.split('.')[1]}={layout.group}); use a multiple of {layout.group} ranks")
    return layout.dp
