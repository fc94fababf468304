"""The change report: every rewrite and every refusal, printable as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

__all__ = ["Change", "Skip", "Note", "PassReport"]


@dataclass(frozen=True)
class Change:
    """A node or module that was rewritten."""

    node: str
    before: str
    after: str
    detail: str = ""
    kind: str = "change"


@dataclass(frozen=True)
class Skip:
    """A node or module that a pass declined to rewrite, and why."""

    node: str
    op: str
    reason: str
    kind: str = "skip"


@dataclass(frozen=True)
class Note:
    """A remark about the whole pass (fallbacks, verification results, warnings)."""

    message: str
    node: str = ""
    level: str = "info"  # "info" | "warning"
    kind: str = "note"


Entry = Change | Skip | Note


@dataclass
class PassReport:
    """What one or more passes did. Entries keep their order; `key_map` maps old to new keys.

    Attributes:
        title: what the report is about (e.g. ``"swap -> l1"``).
        entries: changes, skips and notes in the order they happened.
        key_map: state_dict keys of the original model mapped to the keys of the rewritten one
            (only keys whose name changed; a value of ``None`` means the key was dropped).
        metrics: free-form numbers (verification errors, timings).
    """

    title: str = ""
    entries: list[Entry] = field(default_factory=list)
    key_map: dict[str, str | None] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # -- building -----------------------------------------------------------------------------
    def change(self, node: str, before: str, after: str, detail: str = "") -> None:
        """Record a rewrite."""
        self.entries.append(Change(node, before, after, detail))

    def skip(self, node: str, op: str, reason: str) -> None:
        """Record a refusal with its reason."""
        self.entries.append(Skip(node, op, reason))

    def note(self, message: str, node: str = "", level: str = "info") -> None:
        """Record a remark about the pass."""
        self.entries.append(Note(message, node, level))

    def warn(self, message: str, node: str = "") -> None:
        """Record a warning."""
        self.note(message, node, "warning")

    def extend(self, other: "PassReport") -> "PassReport":
        """Append another report's entries, key map and metrics to this one; returns self.

        Integer counts present in both (``folded``, ``kalman_layers`` ... of several captured
        regions) are added up; other metrics are replaced.
        """
        self.entries.extend(other.entries)
        self.key_map.update(other.key_map)
        for k, v in other.metrics.items():
            old = self.metrics.get(k)
            if (isinstance(v, int) and isinstance(old, int) and not isinstance(v, bool)
                    and not isinstance(old, bool)):
                self.metrics[k] = old + v
            else:
                self.metrics[k] = v
        return self

    def prefixed(self, prefix: str) -> "PassReport":
        """A copy whose node names and state keys are qualified by ``prefix`` (a captured
        region's path), so that they name modules of the whole model."""
        if not prefix:
            return self
        p = f"{prefix}."

        def q(name: str) -> str:
            return p + name if name and name != "-" and not name.startswith("<") else name

        out = PassReport(title=self.title, metrics=dict(self.metrics))
        for e in self.entries:
            if isinstance(e, Change):
                out.entries.append(Change(q(e.node), e.before, e.after, e.detail))
            elif isinstance(e, Skip):
                out.entries.append(Skip(q(e.node), e.op, e.reason))
            else:
                out.entries.append(Note(e.message, q(e.node), e.level))
        out.key_map = {q(k): (None if v is None else q(v)) for k, v in self.key_map.items()}
        return out

    # -- reading ------------------------------------------------------------------------------
    @property
    def changes(self) -> list[Change]:
        return [e for e in self.entries if isinstance(e, Change)]

    @property
    def skips(self) -> list[Skip]:
        return [e for e in self.entries if isinstance(e, Skip)]

    @property
    def notes(self) -> list[Note]:
        return [e for e in self.entries if isinstance(e, Note)]

    @property
    def warnings(self) -> list[Note]:
        return [e for e in self.notes if e.level == "warning"]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "entries": [asdict(e) for e in self.entries],
            "key_map": dict(self.key_map),
            "metrics": _jsonable(self.metrics),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise the report to JSON."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PassReport":
        kinds = {"change": Change, "skip": Skip, "note": Note}
        rep = cls(title=data.get("title", ""), key_map=dict(data.get("key_map", {})),
                  metrics=dict(data.get("metrics", {})))
        for e in data.get("entries", []):
            e = dict(e)
            rep.entries.append(kinds[e.pop("kind")](**e))
        return rep

    def table(self) -> str:
        """Render the report as a fixed-width text table."""
        rows: list[tuple[str, str, str]] = []
        for e in self.entries:
            if isinstance(e, Change):
                what = f"{e.before} -> {e.after}" + (f" ({e.detail})" if e.detail else "")
                rows.append(("changed", e.node, what))
            elif isinstance(e, Skip):
                rows.append(("skipped", e.node, f"{e.op}: {e.reason}"))
            else:
                rows.append((e.level, e.node or "-", e.message))
        head = ("action", "node", "what")
        w0 = max([len(head[0])] + [len(r[0]) for r in rows])
        w1 = min(48, max([len(head[1])] + [len(r[1]) for r in rows]))
        lines = [f"{self.title}" if self.title else "normswap report"]
        lines.append(f"{head[0]:<{w0}}  {head[1]:<{w1}}  {head[2]}")
        lines.append(f"{'-' * w0}  {'-' * w1}  {'-' * 40}")
        for r in rows:
            lines.append(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")
        lines.append(f"{len(self.changes)} changed, {len(self.skips)} skipped, "
                     f"{len(self.warnings)} warnings")
        if self.key_map:
            lines.append("state_dict keys renamed:")
            for k, v in self.key_map.items():
                lines.append(f"  {k} -> {v if v is not None else '(dropped)'}")
        for k, v in self.metrics.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)
