"""`--alpha-unit`: what the α values of `sweep` and `unlearn` count in, declared once for both.

PerTA's W < 1 shortens the task vector: at the same α, a grad or fisher merge subtracts a shorter
vector than task arithmetic and forgets less. The matched α of a method is the α at which
‖α·W⊙TV‖ = ‖TV‖ over the model (the inverse of `inspect`'s effective scale): the merge then moves
the model as far as task arithmetic at α = 1, with W deciding where. `--alpha-unit matched`
counts the given α values in it (α = 2 means twice the matched α), so one grid of α values
brackets tv's forgetting for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

from perta_stream.config.options import option

ABSOLUTE, MATCHED = "absolute", "matched"
ALPHA_UNITS = (ABSOLUTE, MATCHED)
ALPHA_UNIT_HELP = (
    "what --alpha counts in: absolute (default), or matched: multiples of each method's matched alpha, at which "
    "‖alpha·W⊙TV‖ = ‖TV‖ over the model (tv's is 1; `perta-stream inspect` shows it)"
)


@dataclass(frozen=True, kw_only=True)
class AlphaUnitOptions:
    """The unit of α, shared by `sweep` and `unlearn`.

    Attributes:
        alpha_unit: `absolute` (α as given) or `matched` (α as multiples of each method's
            matched α, measured from the statistics and the task vector before merging).
    """

    alpha_unit: str = option(ABSOLUTE, choices=ALPHA_UNITS, help=ALPHA_UNIT_HELP)

    @property
    def alphas_are_matched(self) -> bool:
        return self.alpha_unit == MATCHED

    def alpha_unit_problems(self) -> list[str]:
        if self.alpha_unit not in ALPHA_UNITS:
            return [f"--alpha-unit {self.alpha_unit!r} is not one of {', '.join(ALPHA_UNITS)}"]
        return []
