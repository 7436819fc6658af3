"""What a LoRA adapter set is: the adapted projections, rank, alpha and dropout.

Apart from wake2vec.models.lora so that the model (which reads a spec's fields to add the
update) and the adapter machinery (which builds on the model) import it without importing
each other.
"""

from __future__ import annotations

import dataclasses

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The study adapts attention's q/k/v and the whole MLP, not the attention output.
STUDY_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")

@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections are adapted and how: static (hashable), so it selects the compiled program.

    `targets` are kept in PROJECTIONS order, so two specs naming the same projections are
    equal (and hash alike) whatever order they were written in.
    """

    targets: tuple[str, ...] = STUDY_TARGETS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {self.targets!r}: need one or more of {PROJECTIONS}")
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA rank {self.rank} must be >= 1 and dropout {self.dropout} in [0, 1)")
        object.__setattr__(self, "targets", tuple(p for p in PROJECTIONS if p in self.targets))

    @property
    def scale(self) -> float:
        """PEFT's scaling without rsLoRA: alpha / r."""
        return self.alpha / self.rank
