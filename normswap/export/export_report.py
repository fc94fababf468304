"""The report of an ONNX export: what changed, what stayed fp32 and why, what was validated.

:class:`ExportReport` is a :class:`~normswap.report.PassReport` with the export's figures: op
counts and size of the fp32 export and of the final model, the fold entries of a model folded
by :func:`normswap.fold`, the fp16 plan (every node kept in fp32 and why, every node's measured
range), the ``fp16="auto"`` search, and the validation table per output and evaluator.
``report.write("r.md" | "r.html" | "r.json")`` writes it; ``report.plot_ranges("r.png")`` draws
the measured ranges against the fp16 limits (needs matplotlib).
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import atomic_write_bytes, atomic_write_text
from ..errors import ExportError
from ..report import PassReport, _jsonable
from .fp16 import FP16_MAX, FP16_MIN_NORMAL
from .validate import ValidationResult

__all__ = ["ExportReport"]

log = logging.getLogger(__name__)


@dataclass
class ExportReport(PassReport):
    """What :func:`~normswap.export.export_onnx` produced.

    Every node kept in fp32 appears as a ``skip`` entry (node, op type, reason); ``fp32_nodes``
    holds the same as a dict.

    Attributes:
        path: the written file ("" when nothing was written).
        exporter: ``"dynamo"`` or ``"torchscript"``.
        opset: the default-domain opset of the model.
        fp16: whether the model was converted to fp16 (``"auto"`` counts as True).
        fp32_nodes: node name -> reason, for nodes kept in fp32.
        fp16_initializer_fraction: fp16 float initialisers / all float initialisers.
        initializer_counts: counts and bytes of fp16/fp32 initialisers.
        file_size_bytes: size of the final model (the ``.onnx`` plus its external data).
        size_before_bytes: size of the fp32 export.
        ops_before: op type -> count in the fp32 export.
        ops_after: op type -> count in the final model.
        external_data_path: the external data file ("" when the weights are inside the model).
        fold_entries: the entries of the ``normswap_report`` a folded model carries.
        node_ranges: node name -> (max |x|, min non-zero |x|) of its outputs on the
            calibration inputs, in graph order.
        node_ops: node name -> op type (for ``node_ranges``).
        overflow_limit: activations above this were kept fp32 by the range plan.
        auto: the ``fp16="auto"`` search (None when it did not run).
        cpu_fp16_fallback_ops: fp16 op types without a CPU fp16 kernel (run through casts).
        validation: the runtime comparison (None when ``validate=False``).
        timings: step -> seconds.
    """

    path: str = ""
    exporter: str = ""
    opset: int | None = None
    fp16: bool = False
    fp32_nodes: dict[str, str] = field(default_factory=dict)
    fp16_initializer_fraction: float | None = None
    initializer_counts: dict[str, int] = field(default_factory=dict)
    file_size_bytes: int = 0
    size_before_bytes: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    external_data_path: str = ""
    fold_entries: list[dict[str, Any]] = field(default_factory=list)
    node_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    node_ops: dict[str, str] = field(default_factory=dict)
    overflow_limit: float | None = None
    auto: dict[str, Any] | None = None
    cpu_fp16_fallback_ops: list[str] = field(default_factory=list)
    validation: ValidationResult | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """The validation verdict (None when not validated)."""
        return None if self.validation is None else self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict including the export fields."""
        data = super().to_dict()
        data.update(_jsonable({
            "path": self.path, "exporter": self.exporter, "opset": self.opset,
            "fp16": self.fp16, "fp32_nodes": dict(self.fp32_nodes),
            "fp16_initializer_fraction": self.fp16_initializer_fraction,
            "initializer_counts": dict(self.initializer_counts),
            "file_size_bytes": self.file_size_bytes, "size_before_bytes": self.size_before_bytes,
            "ops_before": dict(self.ops_before), "ops_after": dict(self.ops_after),
            "external_data_path": self.external_data_path,
            "fold_entries": list(self.fold_entries),
            "node_ranges": {k: list(v) for k, v in self.node_ranges.items()},
            "node_ops": dict(self.node_ops), "overflow_limit": self.overflow_limit,
            "auto": self.auto, "cpu_fp16_fallback_ops": list(self.cpu_fp16_fallback_ops),
            "timings": dict(self.timings),
        }))
        data["validation"] = None if self.validation is None else _jsonable(
            self.validation.to_dict())
        return data

    def op_table(self) -> list[tuple[str, int, int]]:
        """``(op type, count before, count after)`` for every op type, as onnx-simplifier prints."""
        ops = sorted(set(self.ops_before) | set(self.ops_after))
        return [(op, self.ops_before.get(op, 0), self.ops_after.get(op, 0)) for op in ops]

    def table(self) -> str:
        """The entry table followed by the export summary and the validation lines."""
        lines = [super().table(), f"file: {self.path or '(not written)'} "
                 f"({self.file_size_bytes / 1e6:.2f} MB; fp32 export "
                 f"{self.size_before_bytes / 1e6:.2f} MB), exporter={self.exporter}, "
                 f"opset={self.opset}, fp16={self.fp16}"]
        if self.external_data_path:
            lines.append(f"external data: {self.external_data_path}")
        if self.fp16_initializer_fraction is not None:
            lines.append(f"fp16 float initialisers: {self.fp16_initializer_fraction:.1%}")
        if self.auto is not None:
            lines.append(f"fp16 auto: {len(self.auto['nodes'])} nodes kept fp32 "
                         f"({', '.join(self.auto['nodes']) or '-'}) in "
                         f"{self.auto['iterations']} iterations, {self.auto['seconds']:.2f} s, "
                         f"{self.auto['stopped_by']}")
        if self.validation is not None:
            lines.append(self.validation.summary())
        return "\n".join(lines)

    # -- files ----------------------------------------------------------------------------------
    def _sections(self) -> list[tuple[str, list[str], list[list[str]] | None]]:
        """(heading, paragraphs, table rows with the header first) for the md/html writers."""
        out: list[tuple[str, list[str], list[list[str]] | None]] = []
        facts = [f"file: {self.path or '(not written)'}",
                 f"exporter: {self.exporter}, opset {self.opset}, fp16: {self.fp16}",
                 f"size: {self.size_before_bytes / 1e6:.3f} MB (fp32 export) -> "
                 f"{self.file_size_bytes / 1e6:.3f} MB (final)"]
        if self.external_data_path:
            facts.append(f"external data: {self.external_data_path}")
        if self.fp16_initializer_fraction is not None:
            facts.append(f"fp16 float initialisers: {self.fp16_initializer_fraction:.1%}")
        if self.validation is not None:
            facts.append(self.validation.verdict())
        out.append(("Summary", facts, None))
        out.append(("Operators", [], [["op", "fp32 export", "final"]]
                    + [[op, str(a), str(b)] for op, a, b in self.op_table()]))
        if self.fold_entries:
            rows = [["kind", "node", "what"]]
            for e in self.fold_entries:
                what = (f"{e.get('before')} -> {e.get('after')} {e.get('detail', '')}"
                        if e.get("kind") == "change" else e.get("reason") or e.get("message", ""))
                rows.append([str(e.get("kind")), str(e.get("node", "")), str(what).strip()])
            out.append(("Fold", [], rows))
        if self.fp16:
            plan = [["node", "op", "reason"]] + [
                [n, self.node_ops.get(n, ""), r] for n, r in self.fp32_nodes.items()]
            out.append(("fp16 plan: nodes kept in fp32", [
                f"range plan limit: |x| > {self.overflow_limit:g}" if self.overflow_limit
                else ""], plan))
        if self.auto is not None:
            rows = [["iteration", "added", "score", "passed"]] + [
                [str(h["iteration"]), ", ".join(h["added"]), f"{h['score']:.3g}",
                 str(h["passed"])] for h in self.auto["history"]]
            out.append(("fp16 auto search", [
                f"{len(self.auto['nodes'])} nodes, {self.auto['iterations']} iterations, "
                f"{self.auto['seconds']:.2f} s, stopped: {self.auto['stopped_by']}"], rows))
        if self.validation is not None:
            v = self.validation
            rows = [["evaluator", "output", "max abs", "rel", "cos min", "top-1", "inf/NaN",
                     "passed", "failures"]]
            for r in v.rows():
                rows.append([r["evaluator"], r["output"], f"{r['max_abs']:.3g}",
                             f"{r['rel']:.3g}", f"{r['cosine_min']:.6f}",
                             "-" if r["top1"] is None else f"{r['top1']:.3f}",
                             str(r["nonfinite"]), str(r["passed"]), r["failures"]])
            texts = [f"{e.name}: {e.description}, {e.seconds:.2f} s"
                     + (f"; {'; '.join(e.errors)}" if e.errors else "") for e in v.evaluators]
            out.append(("Validation", texts + [f"FAIL: {r}" for r in v.reasons], rows))
        if self.entries:
            out.append(("Entries", [], [["kind", "node", "what"]] + [
                [e.kind, getattr(e, "node", ""), getattr(e, "reason", "") or getattr(
                    e, "message", "") or f"{getattr(e, 'before', '')} -> "
                 f"{getattr(e, 'after', '')}"] for e in self.entries]))
        return out

    def to_markdown(self) -> str:
        """The report as Markdown."""
        def cell(x: str) -> str:
            return x.replace("|", "\\|").replace("\n", " ")

        lines = [f"# {self.title or 'normswap export'}", ""]
        for heading, paras, rows in self._sections():
            lines += [f"## {heading}", ""]
            lines += [f"- {p}" for p in paras if p]
            if paras:
                lines.append("")
            if rows:
                lines.append("| " + " | ".join(cell(c) for c in rows[0]) + " |")
                lines.append("| " + " | ".join("---" for _ in rows[0]) + " |")
                lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows[1:]]
                lines.append("")
        return "\n".join(lines)

    def to_html(self) -> str:
        """The report as a standalone HTML page."""
        e = html.escape
        parts = ["<!doctype html><html><head><meta charset='utf-8'>",
                 f"<title>{e(self.title or 'normswap export')}</title><style>"
                 "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}"
                 ".False{background:#fdd}</style></head><body>",
                 f"<h1>{e(self.title or 'normswap export')}</h1>"]
        for heading, paras, rows in self._sections():
            parts.append(f"<h2>{e(heading)}</h2>")
            parts += [f"<p>{e(p)}</p>" for p in paras if p]
            if rows:
                parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0])
                             + "</tr>")
                parts += ["<tr>" + "".join(f"<td class='{e(c)}'>{e(c)}</td>" for c in r)
                          + "</tr>" for r in rows[1:]]
                parts.append("</table>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the report as ``.json``, ``.md`` or ``.html`` (chosen by the suffix).

        Args:
            path: the destination.
            force: replace an existing file.

        Returns:
            The path written.

        Raises:
            ExportError: unknown suffix. OutputPathError: the path exists without ``force``.
        """
        suffix = Path(path).suffix.lower()
        render = {".json": lambda: json.dumps(self.to_dict(), indent=2),
                  ".md": self.to_markdown, ".markdown": self.to_markdown,
                  ".html": self.to_html, ".htm": self.to_html}.get(suffix)
        if render is None:
            raise ExportError(f"report '{path}': unknown suffix '{suffix}'; use .json, .md or "
                              ".html")
        return atomic_write_text(path, render(), force=force, what="report")

    save = write

    def plot_ranges(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Draw every node's measured range against the fp16 limits as a PNG.

        Per node (graph order): max |x| and min non-zero |x| of its outputs on a log scale,
        lines at 65504 (fp16 max), 6.1e-5 (smallest normal fp16) and the overflow limit, and the
        nodes kept in fp32 marked.

        Raises:
            ExportError: matplotlib is not installed, or no range was measured.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ExportError("plot_ranges needs matplotlib: pip install matplotlib") from exc
        if not self.node_ranges:
            raise ExportError("plot_ranges: no node range was measured (fp16=False or no "
                              "calibration input)")
        names = list(self.node_ranges)
        xs = range(len(names))
        big = [max(self.node_ranges[n][0], 1e-30) for n in names]
        small = [self.node_ranges[n][1] for n in names]
        kept = [i for i, n in enumerate(names) if n in self.fp32_nodes]
        fig, ax = plt.subplots(figsize=(max(8.0, min(40.0, len(names) * 0.12)), 4.5))
        ax.semilogy(xs, big, ".", color="tab:blue", label="max |x|")
        ax.semilogy([i for i in xs if 0 < small[i] < float("inf")],
                    [s for s in small if 0 < s < float("inf")], ".", color="tab:green",
                    label="min non-zero |x|")
        if kept:
            ax.semilogy(kept, [big[i] for i in kept], "o", mfc="none", color="tab:red", ms=8,
                        label="kept in fp32")
        ax.axhline(FP16_MAX, color="red", lw=1, label="fp16 max 65504")
        ax.axhline(FP16_MIN_NORMAL, color="orange", lw=1, label="fp16 min normal 6.1e-5")
        if self.overflow_limit:
            ax.axhline(self.overflow_limit, color="purple", lw=1, ls="--",
                       label=f"overflow limit {self.overflow_limit:g}")
        ax.set_xlabel("node (graph order)")
        ax.set_ylabel("|activation|")
        ax.set_title(self.title or "measured activation ranges")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return atomic_write_bytes(path, buf.getvalue(), force=force, what="plot")
