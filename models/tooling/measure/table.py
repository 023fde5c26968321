"""What a measurement returns: a title and labelled figures as text, for people, and the raw figures, for tools."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    """The numbers behind the rows, for tools that read the JSON (scripts/gpu-check)."""

    def add(self, label: str, value: str, **figures: Any) -> None:
        self.rows.append((label, value))
        self.figures.update(figures)

    def text(self) -> str:
        width = max((len(label) for label, _ in self.rows), default=0)
        return "\n".join([self.title, *(f"{label:<{width}}  {value}" for label, value in self.rows)])

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "rows": [list(row) for row in self.rows], "figures": self.figures}
