"""Survey: run every zoo model through the sweep's checks, record every failure, write the
table of docs/zoo.md and ``benchmarks/results/zoo_survey.json``.

One failure never stops the survey: the checks catch and record (see ``_harness.run_case``),
and the models run in a worker process that is restarted, with the rest of the list, when a
model crashes it or runs past ``--timeout``::

    nice python -m tests.zoo.survey                       # every zoo, all checks
    nice python -m tests.zoo.survey --zoo timm --only resnet --no-markdown
    python -m tests.zoo.survey --render                   # docs/zoo.md from the saved JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from ._harness import zoo_threads

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "zoo_survey.json"
KNOWN = Path(__file__).with_name("known_failures.json")
DOC = ROOT / "docs" / "zoo.md"
BEGIN, END = "<!-- survey:begin -->", "<!-- survey:end -->"
MODELS_BEGIN, MODELS_END = "<!-- models:begin -->", "<!-- models:end -->"


def _worker(ids: list[str], out: Path, *, all_exports: bool = False) -> None:
    """Run the cases one by one, appending one JSON line per case (a 'start' line first)."""
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import torch

    from ._harness import run_case
    from .cases import all_cases

    torch.set_num_threads(zoo_threads())

    by_id = {c.id: c for c in all_cases(sorted({i.split(":", 1)[0] for i in ids}))}
    with out.open("a") as f:
        for cid in ids:
            f.write(json.dumps({"start": cid}) + "\n")
            f.flush()
            case = by_id[cid]
            checks = ("swap:l1", "swap:linf", "swap:kalman", "swap:bwn", "kalman-priors", "fold") + (
                ("export",) if case.export is None or all_exports else ())
            t0 = time.perf_counter()
            res = run_case(case, checks=checks).as_dict()
            res["total_seconds"] = round(time.perf_counter() - t0, 2)
            res["export_excluded"] = case.export
            res["note"] = case.note
            f.write(json.dumps({"result": res}) + "\n")
            f.flush()
            gc.collect()


def _run_all(ids: list[str], timeout: float, log: Path, *, all_exports: bool = False,
             on_result: Any = None) -> dict[str, dict[str, Any]]:
    """Run ``ids`` in worker processes; a crash or time-out is recorded and the rest go on.
    ``on_result(results)`` is called after each model (to save progress)."""
    results: dict[str, dict[str, Any]] = {}
    todo = list(ids)
    with tempfile.TemporaryDirectory(prefix="zoo-survey-") as tmp:
        while todo:
            ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "out.jsonl"
            ids_file.write_text(json.dumps(todo))
            out.write_text("")
            with log.open("a") as logf:
                proc = subprocess.Popen([sys.executable, "-m", "tests.zoo.survey", "--worker",
                                         str(ids_file), str(out)]
                                        + (["--all-exports"] if all_exports else []),
                                        cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
                current, started, seen = None, time.monotonic(), 0
                while True:
                    rc = proc.poll()
                    lines = out.read_text().splitlines()
                    for line in lines[seen:]:
                        rec = json.loads(line)
                        if "start" in rec:
                            current, started = rec["start"], time.monotonic()
                        else:
                            results[rec["result"]["case"]] = rec["result"]
                            _progress(rec["result"], len(results), len(ids))
                            current = None
                            if on_result is not None:
                                on_result(results)
                    seen = len(lines)
                    if rc is not None:
                        break
                    if current and time.monotonic() - started > timeout:
                        proc.kill()
                        proc.wait()
                        rc = "timeout"
                        break
                    time.sleep(0.5)
            if current is not None:  # the worker died or hung on this case
                why = (f"timed out after {timeout:.0f} s" if rc == "timeout"
                       else f"worker died (exit code {rc})")
                results[current] = {"case": current, "error": why, "checks": {}}
                _progress(results[current], len(results), len(ids))
            todo = [i for i in todo if i not in results]
            if rc == 0 and todo:  # finished without reporting them: should not happen
                for i in todo:
                    results[i] = {"case": i, "error": "not run", "checks": {}}
                todo = []
    return results


def _progress(res: dict[str, Any], done: int, total: int) -> None:
    bad = [k for k, v in res.get("checks", {}).items() if not v["ok"]]
    state = res.get("error") or ("ok" if not bad else "FAIL " + ",".join(bad))
    print(f"[{done}/{total}] {res['case']}: {state} ({res.get('total_seconds', '?')} s)",
          flush=True)


def _machine() -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in ("torch", "torchvision", "timm", "transformers", "ultralytics",
                "segmentation_models_pytorch", "onnx", "onnxruntime"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent package
            versions[pkg] = None
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "versions": versions}


def _commit() -> str:
    try:
        # the last commit that changed the library (the tests' own commits do not count)
        return subprocess.run(["git", "log", "-1", "--format=%h", "--", "normswap"], cwd=ROOT,
                              text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# -- markdown ----------------------------------------------------------------------------------
_CHECK_COLS = ("swap:l1", "swap:linf", "swap:kalman", "swap:bwn", "kalman-priors", "fold",
               "export")


def _cell(res: dict[str, Any], check: str) -> str:
    c = res.get("checks", {}).get(check)
    if c is None:
        if check == "export" and res.get("export_excluded"):
            return "excl."
        return "–"
    return "ok" if c["ok"] else "**FAIL**"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(data: dict[str, Any]) -> str:
    """The survey section of docs/zoo.md."""
    results: dict[str, dict[str, Any]] = data["results"]
    lines = [BEGIN, "",
             f"Survey of the library at commit `{data['commit']}` ({data['date']}, "
             f"{data['machine']['cpus']} CPUs, torch {data['machine']['versions']['torch']}); "
             f"total wall time {data['wall_seconds'] / 60:.1f} min for {len(results)} models. Generated by "
             "`python -m tests.zoo.survey`; raw data in `benchmarks/results/zoo_survey.json`.",
             ""]
    per_zoo: dict[str, float] = {}
    for k, r in results.items():
        z = k.split(":", 1)[0]
        per_zoo[z] = per_zoo.get(z, 0.0) + float(r.get("total_seconds") or 0.0)
    lines += [f"Sum of the per-model times (build + every check; what the sweep runs): "
              f"{sum(per_zoo.values()) / 60:.1f} min (" + ", ".join(
                  f"{z} {t / 60:.1f}" for z, t in sorted(per_zoo.items())) + "), one torch "
              "thread per model, two models at a time on this 2-core machine.", ""]
    # pass counts per zoo and check
    zoos = sorted({k.split(":", 1)[0] for k in results})
    lines += ["### Pass counts", "", "| zoo | models | " + " | ".join(_CHECK_COLS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in _CHECK_COLS) + " |"]
    for z in zoos + ["all"]:
        rs = [r for k, r in results.items() if z == "all" or k.startswith(z + ":")]
        cells = []
        for ch in _CHECK_COLS:
            ran = [r["checks"][ch] for r in rs if ch in r.get("checks", {})]
            cells.append(f"{sum(c['ok'] for c in ran)}/{len(ran)}")
        lines.append(f"| {z} | {len(rs)} | " + " | ".join(cells) + " |")
    lines.append("")
    # capture strategies: which one captured each model (the l1 swap's report)
    strategies = sorted({r.get("checks", {}).get("swap:l1", {}).get("info", {}).get(
        "strategy", "–") for r in results.values()})
    lines += ["### Capture strategies", "",
              "Which capture strategy took each model (the l1 swap's "
              "`metrics['capture']['strategy']`; `regions`: the whole model could not be "
              "captured, its parts were).", "",
              "| zoo | " + " | ".join(f"`{st}`" for st in strategies) + " |",
              "| --- | " + " | ".join("---" for _ in strategies) + " |"]
    for z in zoos + ["all"]:
        rs = [r for k, r in results.items() if z == "all" or k.startswith(z + ":")]
        counts = [sum(r.get("checks", {}).get("swap:l1", {}).get("info", {}).get(
            "strategy", "–") == st for r in rs) for st in strategies]
        lines.append(f"| {z} | " + " | ".join(str(c) for c in counts) + " |")
    lines.append("")
    # failure classes, counted in models (a class seen in l1, linf and kalman counts once)
    classes: dict[str, set[str]] = {}
    example: dict[str, str] = {}
    for k, r in results.items():
        for ch, c in r.get("checks", {}).items():
            if not c["ok"]:
                cls = _failure_class(ch, c["error"])
                classes.setdefault(cls, set()).add(k)
                example.setdefault(cls, f"{k} ({ch}): {c['error']}")
        if r.get("error") and not r.get("checks"):
            cls = "model not run: " + r["error"].split(":")[0]
            classes.setdefault(cls, set()).add(k)
            example.setdefault(cls, f"{k}: {r['error']}")
    lines += ["### Failure classes", "",
              "Counted in models; `not run: ...` means an earlier check it builds on failed.", "",
              "| models | class | example |", "| --- | --- | --- |"]
    for cls, models in sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"| {len(models)} | {_md_escape(cls)} | {_md_escape(example[cls][:300])} |")
    lines.append("")
    # the per-model table
    lines += ["### Per model", "",
              ("Capture: `metrics['capture']['strategy']` of the l1 swap report. Times in "
               "seconds: build, l1 swap (capture + swap + verify), fold, export."), "",
              "| model | params | BN | capture | " + " | ".join(_CHECK_COLS)
              + " | build/l1/fold/export s | first error |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in _CHECK_COLS)
              + " | --- | --- |"]
    for k in sorted(results, key=lambda s: (s.split(":", 1)[0], s)):
        r = results[k]
        checks = r.get("checks", {})
        l1 = checks.get("swap:l1", {}).get("info", {})
        fold = checks.get("fold", {}).get("info", {})
        export = checks.get("export", {}).get("info", {})
        times = "/".join(_num(v) for v in (r.get("build_seconds"), l1.get("swap_seconds"),
                                            fold.get("fold_seconds"),
                                            export.get("export_seconds")))
        first = next((f"{ch}: {c['error']}" for ch, c in checks.items() if not c["ok"]),
                     r.get("error", ""))
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "–"
        lines.append(f"| {k} | {params} | {r.get('bn_modules', '–')} | "
                     f"{l1.get('strategy', '–')} | "
                     + " | ".join(_cell(r, ch) for ch in _CHECK_COLS)
                     + f" | {times} | {_md_escape(first[:240])} |")
    lines += ["", END]
    return "\n".join(lines)


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.2g}" if v < 10 else f"{v:.0f}"


def _failure_class(check: str, error: str) -> str:
    """A coarse class for a failure: the check family and the error with names and numbers
    taken out (``Node stem_bn_drop target stem.bn.drop ...`` -> ``Node X target X ...``)."""
    family = check.split(":")[0]
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error)
    text = re.sub(r"\[[^\]]*\]|\{[^}]*\}|\([^)]*\)", "(…)", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", text)
    text = re.sub(r"\b[\w]+[._][\w.]+\b|\b[A-Za-z_]+\d+\w*\b", "X", text)
    return f"{family}: {' '.join(text.split()[:14])}"


def render_models() -> str:
    """The list of models per zoo and the exclusions with their reasons, from the case modules."""
    from .cases import load_cases

    lines = [MODELS_BEGIN, ""]
    for zoo in ("timm", "torchvision", "ultralytics", "hf", "smp"):
        cases = load_cases(zoo)
        lines.append(f"- **{zoo}** ({len(cases)}): " + ", ".join(
            f"`{c.name}`" + ("\\*" if c.smoke else "") for c in cases))
    lines.append("")
    lines.append("\\* also in the default (not slow) test run.")
    lines.append("")
    try:
        from .cases_timm import NO_BATCHNORM as TIMM_NO_BN
        from .cases_torchvision import EXCLUDED as TV_EXCLUDED
        from .cases_torchvision import EXPORT_EXCLUDED
        from .cases_torchvision import NO_BATCHNORM as TV_NO_BN
    except ImportError:  # a zoo package missing: the lists need it
        TIMM_NO_BN, TV_NO_BN, TV_EXCLUDED, EXPORT_EXCLUDED = {}, {}, {}, {}
    lines.append(f"timm families without BatchNorm ({len(TIMM_NO_BN)}; their norm in brackets): "
                 + ", ".join(f"`{k}` ({v})" for k, v in sorted(TIMM_NO_BN.items())) + ".")
    lines.append("")
    lines.append(f"torchvision models without BatchNorm ({len(TV_NO_BN)}): " + ", ".join(
        f"`{k}` ({v})" for k, v in sorted(TV_NO_BN.items())) + ".")
    lines.append("")
    lines.append("torchvision models with BatchNorm left out: " + ("; ".join(
        f"`{k}`: {v}" for k, v in TV_EXCLUDED.items()) or "none") + ".")
    lines.append("")
    excluded = {f"torchvision:{k}": v for k, v in EXPORT_EXCLUDED.items()}
    excluded.update({c.id: c.export for z in ("timm", "ultralytics", "hf", "smp")
                     for c in load_cases(z) if c.export})
    by_reason: dict[str, list[str]] = {}
    for k, v in excluded.items():
        by_reason.setdefault(v, []).append(f"`{k}`")
    lines.append("Check 4 (export) left out of the sweep (`python -m tests.zoo.survey "
                 "--all-exports` runs it on all):")
    lines.append("")
    lines += [f"- {', '.join(ms)}: {why}" for why, ms in by_reason.items()]
    lines += ["", MODELS_END]
    return "\n".join(lines)


def _replace_section(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text:
        return text + f"\n{body}\n"
    pre, rest = text.split(begin, 1)
    return pre + body + rest.split(end, 1)[1]


def write_markdown(data: dict[str, Any], doc: Path = DOC) -> None:
    """Replace the generated sections of ``doc`` (between their markers) with fresh renders."""
    text = doc.read_text() if doc.exists() else "# Model zoo\n"
    text = _replace_section(text, MODELS_BEGIN, MODELS_END, render_models())
    text = _replace_section(text, BEGIN, END, render(data))
    doc.write_text(text)


def write_known(data: dict[str, Any], path: Path = KNOWN) -> None:
    """The failing checks of a survey, as the sweep's list of known failures."""
    failures = {k: {ch: c["error"] for ch, c in r.get("checks", {}).items() if not c["ok"]}
                for k, r in sorted(data["results"].items())}
    path.write_text(json.dumps({
        "about": "checks failing on the survey of this commit; tests/zoo/test_zoo.py xfails "
                 "them and fails when one passes (regenerate: python -m tests.zoo.survey, then "
                 "--write-known)",
        "commit": data["commit"], "date": data["date"],
        "failures": {k: v for k, v in failures.items() if v}}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", action="append", help="zoo(s) to run (default: all)")
    p.add_argument("--only", action="append", help="run only cases whose id contains this")
    p.add_argument("--ids", type=Path,
                   help="a JSON list of exact case ids to run (e.g. to split the survey over "
                        "processes, then combine with --merge)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--merge", action="store_true",
                   help="update the existing JSON with these results instead of replacing it")
    p.add_argument("--skip-done", action="store_true",
                   help="with --merge: skip the models --out already has")
    p.add_argument("--all-exports", action="store_true",
                   help="run check 4 on the models the sweep leaves it out for, too")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--render", action="store_true", help="only render docs/zoo.md from --out")
    p.add_argument("--write-known", action="store_true",
                   help=f"write the failing checks of --out to {KNOWN.name} (the sweep's xfails)")
    p.add_argument("--worker", nargs=2, metavar=("IDS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(json.loads(Path(args.worker[0]).read_text()), Path(args.worker[1]),
                all_exports=args.all_exports)
        return
    if args.render or args.write_known:
        data = json.loads(args.out.read_text())
        if args.render:
            write_markdown(data)
        if args.write_known:
            write_known(data)
        return
    from .cases import all_cases

    done = (set(json.loads(args.out.read_text())["results"])
            if args.merge and args.skip_done and args.out.exists() else set())
    ids = [c.id for c in all_cases(args.zoo)
           if (not args.only or any(s in c.id for s in args.only)) and c.id not in done]
    if args.ids:
        wanted = set(json.loads(args.ids.read_text()))
        ids = [i for i in ids if i in wanted]
    t0 = time.perf_counter()
    log = Path(tempfile.gettempdir()) / "zoo_survey.log"  # the workers' stderr
    log.unlink(missing_ok=True)
    old = json.loads(args.out.read_text()) if args.merge and args.out.exists() else None
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        data = {"commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": _machine(), "wall_seconds": round(time.perf_counter() - t0, 1),
                "results": dict(results)}
        if old is not None:
            data["results"] = {**old["results"], **results}
            data["wall_seconds"] = round(old.get("wall_seconds", 0) + data["wall_seconds"], 1)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(args.out)
        return data

    data = save(_run_all(ids, args.timeout, log, all_exports=args.all_exports, on_result=save))
    if not args.no_markdown:
        write_markdown(data)


if __name__ == "__main__":
    main()
