"""Mutation testing of difflab's core with mutmut 3: run it, collect the results, write
benchmarks/results/mutation.json.

    python benchmarks/mutation.py                      # every module in pyproject's [tool.mutmut] (`make mutate`)
    python benchmarks/mutation.py --module ema         # one module (or several) with the tests that matter for it
    python benchmarks/mutation.py --module ema --report-only   # re-read the last run's results, run nothing
    python benchmarks/mutation.py --module samplers --recheck  # after adding tests: only what mutation.json left alive

Why a wrapper: mutmut works in the folder it is started from (it copies src/ and tests/ into
mutants/ there). Runs go in build/mutation/<name>/ (ignored by git), whose pyproject.toml is the
repo's [tool.mutmut] narrowed to the chosen modules and their tests; mutmut's cache there makes a
rerun test only the functions that changed.

Results, per module: killed, survived, timeout, no tests (mutated code that no selected test
calls), the equivalent mutants, each with its one-line reason from benchmarks/mutation_equivalent.toml,
every remaining survivor with its change, and score = killed / (total - equivalent).
--recheck is for a fresh workspace after tests were added: it runs only the mutants that
mutation.json lists as alive for the module, and every mutant of a source file changed since
that run (mutant numbers move when code does), and counts the others as the earlier run found
them (killed: the test selection only grows, so a killed mutant stays killed). An
equivalent entry names the mutant and the line the mutant writes; if the code moved on and that
mutant now writes something else, the entry is reported as stale and the mutant counts again.

mutmut 3 leaves decorated functions alone (other than @staticmethod/@classmethod), which would
spare every sampler loop and EMA.update: they run under @torch.no_grad(). So the workspace holds
a copy of src/ in which `@torch.no_grad() def f(...): body` reads `def f(...): with
torch.no_grad(): body`, the same function for everything but generators (left as they are).
@property getters stay unmutated.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutation.json"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"
WORK = ROOT / "build" / "mutation"

# module name -> (the file(s) mutated, the tests that exercise them); the union is pyproject's selection
MODULES = {
    "schedules": ("src/difflab/schedules.py", ["test_schedules", "test_samplers_timesteps", "test_process"]),
    "process": (
        "src/difflab/process.py",
        ["test_process", "test_process_mutants", "test_losses", "test_losses_mutants", "test_samplers_steps"],
    ),
    "losses": ("src/difflab/losses.py", ["test_losses", "test_losses_mutants"]),
    "denoiser": (
        "src/difflab/denoiser.py",
        ["test_denoiser", "test_denoiser_mutants", "test_guidance", "test_samplers_known_bugs"],
    ),
    "guidance": ("src/difflab/guidance.py", ["test_guidance", "test_guidance_mutants"]),
    "samplers": (
        "src/difflab/samplers/*",
        [
            "test_samplers",
            "test_samplers_steps",
            "test_samplers_known_bugs",
            "test_samplers_timesteps",
            "test_sde",
            "test_samplers_solvers",
            "test_samplers_heun",
            "test_consistency",
            "test_samplers_mutants",
        ],
    ),
    "ema": ("src/difflab/train/ema.py", ["test_train_batches"]),
    "checkpoint": (
        "src/difflab/train/checkpoint.py",
        ["test_train_checkpoint", "test_checkpoint_mutants", "test_hostile_checkpoints"],
    ),
}


def toml_value(value) -> str:
    """Strings, numbers, booleans and lists of them (all [tool.mutmut] and pytest need)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as TOML here")


def workspace(modules: list[str] | None) -> Path:
    """build/mutation/<name>/ with src, tests and configs linked and a pyproject.toml holding
    pytest's settings and [tool.mutmut], narrowed to `modules` when given."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mutmut = dict(project["tool"]["mutmut"])
    if modules:
        mutmut["only_mutate"] = [MODULES[m][0] for m in modules]
        tests = dict.fromkeys(f"tests/{t}.py" for m in modules for t in MODULES[m][1])
        mutmut["pytest_add_cli_args_test_selection"] = list(tests)
    ws = WORK / ("-".join(modules) if modules else "all")
    ws.mkdir(parents=True, exist_ok=True)
    for name in ("tests", "configs"):
        link = ws / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    mirror_source(ROOT / "src", ws / "src", mutmut["only_mutate"])
    lines = []
    pytest_options = project["tool"]["pytest"]["ini_options"]
    for section, table in (("tool.pytest.ini_options", pytest_options), ("tool.mutmut", mutmut)):
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    text = "\n".join(lines)
    if not (ws / "pyproject.toml").is_file() or (ws / "pyproject.toml").read_text() != text:
        (ws / "pyproject.toml").write_text(text)
    return ws


def without_no_grad_decorators(source: str) -> str:
    """`@torch.no_grad()` on a function -> `with torch.no_grad():` around its body (not for generators)."""
    import libcst as cst
    import libcst.matchers as m

    class Undecorate(cst.CSTTransformer):
        def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
            decorators = updated.decorators
            if len(decorators) != 1 or m.findall(original.body, m.Yield()):
                return updated
            dec = decorators[0].decorator
            if not (isinstance(dec, cst.Call) and not dec.args and m.matches(dec.func, m.Attribute(
                    value=m.Name("torch"), attr=m.Name("no_grad")))):  # fmt: skip
                return updated
            statements = list(updated.body.body)
            docstring = statements[:1] if m.matches(
                statements[0], m.SimpleStatementLine(body=[m.Expr(value=m.SimpleString() | m.ConcatenatedString())])
            ) else []  # fmt: skip
            block = cst.With(items=[cst.WithItem(item=dec)], body=cst.IndentedBlock(body=statements[len(docstring) :]))
            return updated.with_changes(decorators=[], body=cst.IndentedBlock(body=[*docstring, block]))

    return cst.parse_module(source).visit(Undecorate()).code


def mirror_source(src: Path, dst: Path, mutated: list[str]) -> None:
    """dst = src, with `without_no_grad_decorators` applied to the files to be mutated (globs relative
    to the repo). Files are rewritten only when their content changes, so mutmut's cache (keyed on
    modification times) holds."""
    import fnmatch
    import shutil

    if dst.is_symlink():
        dst.unlink()
    for path in sorted(src.rglob("*")):
        if "__pycache__" in path.parts or ".egg-info" in str(path) or not path.is_file():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            text = path.read_text(encoding="utf-8")
            if any(fnmatch.fnmatch(str(path.relative_to(src.parent)), pattern) for pattern in mutated):
                text = without_no_grad_decorators(text)
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                target.write_text(text, encoding="utf-8")
        elif not target.is_file() or target.stat().st_size != path.stat().st_size:
            shutil.copy2(path, target)


def run_mutmut(ws: Path, workers: int, only: list[str] | None = None) -> float:
    """`mutmut run`, then once more on the mutants still alive (survived, timed out or reached by no
    test), by name: mutmut keeps a result as long as the mutated function is unchanged, even when the
    tests changed; named mutants are rerun. With `only`, just those mutants, once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    # which tests reach which function: recollected each run, as edited tests change it too
    (ws / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(workers)]
    if only is not None:
        done = subprocess.run(command + only, cwd=ws, env=env)
    else:
        done = subprocess.run(command, cwd=ws, env=env)
        # "no tests" too: a test added since may reach the function now
        alive = [n for r in read_results(ws).values() for n, s in r.items() if s in ("survived", "timeout", "no tests")]
        if done.returncode == 0 and alive:
            done = subprocess.run(command + alive, cwd=ws, env=env)
    if done.returncode != 0:
        raise SystemExit(f"mutmut run failed (exit {done.returncode}); see its output above")
    return time.perf_counter() - start


def module_of(path: str) -> str:
    for name, (pattern, _) in MODULES.items():
        if Path(path).match(pattern) or path == pattern:
            return name
    return path


def read_results(ws: Path) -> dict[str, dict[str, str]]:
    """{source file: {mutant: status}} from mutmut's .meta files (its own exit-code meanings)."""
    from mutmut.stats import status_by_exit_code

    found = {}
    for meta in sorted((ws / "mutants").rglob("*.py.meta")):
        source = str(meta.relative_to(ws / "mutants"))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        found[source] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return found


def changes(ws: Path, names: list[str]) -> dict[str, list[str]]:
    """The changed lines ('-' original, '+' mutant) of each named mutant, from mutmut's diff."""
    if not names:
        return {}
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = Path.cwd()
    os.chdir(ws)  # mutmut reads its config and mutants/ from the working directory
    try:
        out = {}
        for name in names:
            diff = get_diff_for_mutant(name).splitlines()
            out[name] = [
                line[0] + " " + line[1:].strip()
                for line in diff
                if line[:1] in "+-" and not line.startswith(("+++", "---"))
            ]
        return out
    finally:
        os.chdir(here)


def load_equivalents() -> dict[str, dict]:
    if not EQUIVALENT.is_file():
        return {}
    entries = tomllib.loads(EQUIVALENT.read_text(encoding="utf-8")).get("equivalent", [])
    for entry in entries:
        missing = {"mutant", "line", "reason"} - set(entry)
        if missing:
            raise SystemExit(f"{EQUIVALENT}: entry {entry} lacks {sorted(missing)}")
    return {entry["mutant"]: entry for entry in entries}


def previously_alive(report: dict, modules: list[str]) -> tuple[list[str], str]:
    """What --recheck runs: the mutants the last run of `modules` left alive, and every mutant of a
    source file changed since that run (its mutant numbers may have moved), as mutmut name
    patterns; and the time that run finished."""
    names, finished = [], []
    for module in modules:
        entry = report.get("modules", {}).get(module)
        if not entry or "run" not in entry:
            raise SystemExit(f"--recheck: {RESULTS.name} has no earlier run of {module!r}; run it in full first")
        pattern = MODULES[module][0].replace("*", "")
        since = ["git", "log", f"--since={entry['run']['finished']}", "--name-only", "--format=", "--", pattern]
        dirty = ["git", "status", "--porcelain", "--untracked-files=no", "--", pattern]
        changed = {line.split()[-1] for command in (since, dirty) for line in git(command).splitlines() if line.strip()}
        rerun = [mutant_prefix(path) for path in sorted(changed) if path.endswith(".py")]
        names += [n for n in [s["mutant"] for s in entry["survivors"]] + [e["mutant"] for e in entry["equivalent"]]
                  if not any(fnmatch.fnmatch(n, p) for p in rerun)] + rerun  # fmt: skip
        finished.append(entry["run"]["finished"])
    return names, min(finished)


def git(command: list[str]) -> str:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def mutant_prefix(path: str) -> str:
    """The mutmut name pattern of every mutant of a source file: src/difflab/samplers/loop.py ->
    difflab.samplers.loop.x* (mutant names are module.x_function or module.xǁClassǁmethod)."""
    module = Path(path).relative_to("src").with_suffix("").as_posix().replace("/", ".")
    return module.removesuffix(".__init__") + ".x*"


def summarise(ws: Path, carried: set[str] | None = None) -> dict[str, dict]:
    """Per-module counts from the workspace; with `carried` (--recheck), a mutant not run here and
    not among the earlier run's alive `carried` ones counts as the killed mutant that run found."""
    results = read_results(ws)
    if carried is not None:
        results = {
            source: {n: ("killed" if s == "not checked" and n not in carried else s) for n, s in statuses.items()}
            for source, statuses in results.items()
        }
    equivalents = load_equivalents()
    open_names = [n for r in results.values() for n, s in r.items() if s != "killed"]
    diff = changes(ws, open_names)
    modules: dict[str, dict] = {}
    for source, statuses in results.items():
        entry = modules.setdefault(
            module_of(source),
            {"files": [], "total": 0, "killed": 0, "survived": 0, "timeout": 0, "no_tests": 0, "other": 0,
             "equivalent": [], "survivors": [], "stale_equivalents": []},
        )  # fmt: skip
        entry["files"].append(source)
        for name, status in sorted(statuses.items()):
            entry["total"] += 1
            key = {"killed": "killed", "timeout": "timeout", "no tests": "no_tests"}.get(status)
            if key:
                entry[key] += 1
            if status == "killed":
                continue
            lines = diff.get(name, [])
            known = equivalents.get(name)
            if known is not None and status in ("survived", "no tests"):
                if any(line[1:].strip() == known["line"].strip() for line in lines if line.startswith("+")):
                    entry["equivalent"].append({"mutant": name, "change": lines, "reason": known["reason"]})
                    if status == "no tests":
                        entry["no_tests"] -= 1
                    continue
                entry["stale_equivalents"].append({"mutant": name, "recorded_line": known["line"], "now": lines})
            if status == "survived":
                entry["survived"] += 1
            elif status not in ("timeout", "no tests"):
                entry["other"] += 1
            if status != "timeout":
                entry["survivors"].append({"mutant": name, "status": status, "change": lines})
    for entry in modules.values():
        counted = entry["total"] - len(entry["equivalent"])
        entry["score"] = round(entry["killed"] / counted, 4) if counted else None
    return modules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="only this module (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="parallel mutmut workers (default 1)")
    parser.add_argument("--report-only", action="store_true", help="collect the last run's results, run nothing")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="run only the mutants the last run left alive, and all of any source file changed since",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.recheck and not args.module:
        parser.error("--recheck needs --module")

    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report.setdefault("modules", {})
    alive, since = previously_alive(report, args.module) if args.recheck else (None, None)
    ws = workspace(args.module)
    incremental = any((ws / "mutants").rglob("*.py.meta"))  # mutmut reruns only what changed since then
    seconds = None if args.report_only else run_mutmut(ws, args.workers, alive)
    modules = summarise(ws, None if alive is None else set(alive))
    if not modules:
        raise SystemExit(f"no mutmut results in {ws / 'mutants'}: run without --report-only first")

    import mutmut

    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    run = {"modules": sorted(modules), "workers": args.workers, "seconds": None if seconds is None else round(seconds),
           "incremental": incremental, "finished": stamp,
           **({"rechecked": {"after_run_of": since, "alive_then": sum("*" not in n for n in alive),
                              "files_rerun": [n for n in alive if "*" in n]}} if alive else {}),
           "tests": tomllib.loads((ws / "pyproject.toml").read_text())["tool"]["mutmut"][
               "pytest_add_cli_args_test_selection"]}  # fmt: skip
    for name, entry in modules.items():
        previous = report["modules"].get(name, {}).get("run")
        report["modules"][name] = {**entry, "run": previous if seconds is None and previous else run}
    totals = {k: sum(m[k] for m in report["modules"].values()) for k in ("total", "killed", "survived", "timeout")}
    equivalent = sum(len(m["equivalent"]) for m in report["modules"].values())
    report.update(
        tool=f"mutmut {mutmut.__version__}",
        score_definition="killed / (total - equivalent); timeouts and mutants that no selected test reaches "
        "count as not killed",
        not_mutated="@property getters (mutmut 3 skips decorated functions; @torch.no_grad() functions are "
        "mutated through a copy of src/ that writes the decorator as a with-block)",
        overall={**totals, "equivalent": equivalent,
                 "score": round(totals["killed"] / (totals["total"] - equivalent), 4) if totals["total"] else None},
    )  # fmt: skip
    report["modules"] = dict(sorted(report["modules"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, entry in modules.items():
        print(
            f"{name:<11} score {entry['score']:.1%}  killed {entry['killed']}  survived {entry['survived']}  "
            f"timeout {entry['timeout']}  no tests {entry['no_tests']}  equivalent {len(entry['equivalent'])}  "
            f"of {entry['total']}"
        )
        for survivor in entry["survivors"]:
            print(f"    {survivor['status']:<9} {survivor['mutant']}: {' | '.join(survivor['change'])}")
        for stale in entry["stale_equivalents"]:
            print(f"    STALE equivalent entry {stale['mutant']}: now {' | '.join(stale['now'])}")
    print(f"wrote {args.out}" + ("" if seconds is None else f" ({seconds:.0f} s of mutmut)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
