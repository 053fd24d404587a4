#!/usr/bin/env python3
"""The report stage of tools/gpu_check.sh: reads what the stages left in $WORK and writes
$OUT/gpu_report.json (per stage: status, seconds, key figures; per gpu test: pass/fail) and
$OUT/validated.json (kernels/validated.json updated for this GPU's architecture), then prints a
summary. Standard library only: it runs under the device machine's python3."""

import datetime
import fnmatch
import glob
import json
import os
import sys
import traceback

OUT = os.environ["OUT"]
WORK = os.environ["WORK"]
ROOT = os.environ["ROOT"]


def load_json(name, default=None):
    path = os.path.join(WORK, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def gtest_match(name, pattern):
    """gtest's --gtest_filter semantics: POS1:POS2[-NEG1:NEG2], with * and ?."""
    positive, _, negative = pattern.partition("-")
    pos = positive.split(":") if positive else ["*"]
    neg = negative.split(":") if negative else []
    return any(fnmatch.fnmatchcase(name, p) for p in pos) and not any(
        fnmatch.fnmatchcase(name, n) for n in neg)


def gtest_json_tests(name, data=None):
    """gtest --gtest_output=json: [{name, status, seconds}]."""
    if data is None:
        data = load_json(name)
    if data is None:
        return None
    tests = []
    for suite in data.get("testsuites", []):
        for t in suite.get("testsuite", []):
            if t.get("result") == "SKIPPED" or t.get("status") == "NOTRUN":
                status = "skip"
            else:
                status = "fail" if t.get("failures") else "pass"
            tests.append({"name": suite["name"] + "." + t["name"], "status": status,
                          "seconds": float(str(t.get("time", "0s")).rstrip("s") or 0)})
    return tests


def counts(tests):
    if tests is None:
        return {"ran": False}
    c = {"ran": True, "passed": 0, "failed": 0, "skipped": 0}
    for t in tests:
        c[{"pass": "passed", "fail": "failed", "skip": "skipped"}[t["status"]]] += 1
    c["failures"] = [t["name"] for t in tests if t["status"] == "fail"]
    return c


def verdict(tests, pattern, what):
    """(ok, reason) for the tests matching a gtest filter: True when every one ran and passed,
    False when one failed, None (undetermined) when none matched or some were skipped."""
    if tests is None:
        return None, f"{what}: not run"
    chosen = [t for t in tests if gtest_match(t["name"], pattern)]
    failed = [t["name"] for t in chosen if t["status"] == "fail"]
    passed = [t for t in chosen if t["status"] == "pass"]
    skipped = [t for t in chosen if t["status"] == "skip"]
    if failed:
        return False, f"{what}: {len(failed)} failed ({', '.join(failed[:5])})"
    if not passed:
        return None, f"{what}: none of '{pattern}' ran (all skipped or none matched)"
    if skipped:
        return None, f"{what}: {len(passed)} passed but {len(skipped)} skipped"
    return True, f"{what}: {len(passed)} passed"


def suite_tests():
    """The fallback's per-suite runs (gpu_suite_N.json), merged; None if there are none."""
    tests = None
    for path in sorted(glob.glob(os.path.join(WORK, "gpu_suite_*.json"))):
        part = gtest_json_tests(os.path.basename(path))
        if part is not None:
            tests = (tests or []) + part
    return tests


def suite_fallback_gaps():
    """Synthetic results for the suites the per-suite fallback did not report: a suite that
    crashed (no JSON, a non-timeout exit) fails; one that timed out or was never reached is
    skipped, so the kernels it covers stay undetermined rather than validated."""
    try:
        with open(os.path.join(WORK, "gpu_suites.txt")) as f:
            suites = [line.strip() for line in f if line.strip()]
    except OSError:
        return []
    ran = {}
    try:
        with open(os.path.join(WORK, "gpu_suites.tsv")) as f:
            for line in f:
                n, suite, rc = line.rstrip("\n").split("\t")
                ran[suite] = (n, int(rc))
    except (OSError, ValueError):
        pass
    gaps = []
    for suite in suites:
        n, rc = ran.get(suite, (None, None))
        if n is not None and os.path.exists(os.path.join(WORK, f"gpu_suite_{n}.json")):
            continue
        crashed = rc is not None and rc not in (124, 137)
        reason = f"crashed (rc {rc})" if crashed else ("timed out" if rc else "not reached")
        gaps.append({"name": f"{suite}{reason.replace(' ', '_')}",
                     "status": "fail" if crashed else "skip", "seconds": 0.0})
    return gaps


def mean(values):
    return sum(values) / len(values) if values else None


def train_figures():
    out = {}
    for impl in ("torch", "aviary"):
        run = os.path.join(WORK, "train-" + impl)
        rows = []
        try:
            with open(os.path.join(run, "metrics.jsonl")) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass  # a line cut short by a killed run
        except OSError:
            continue
        train = [r for r in rows if isinstance(r, dict) and r.get("type") == "train"]
        if not train:
            continue
        # A diverged step logs its loss as null: keep it visible, out of the means.
        timed = [r for r in train if (r.get("step") or 0) > 5] or train
        losses = [r.get("loss") for r in train]
        fig = {"steps": len(train),
               "losses": [round(x, 5) if isinstance(x, (int, float)) else None for x in losses],
               "final_loss": losses[-1],
               "non_finite_losses": sum(not isinstance(x, (int, float)) for x in losses),
               "tokens_per_s": mean([r["tokens_per_s"] for r in timed
                                     if isinstance(r.get("tokens_per_s"), (int, float))]),
               "step_time_s": mean([r["step_time_s"] for r in timed
                                    if isinstance(r.get("step_time_s"), (int, float))])}
        try:
            with open(os.path.join(run, "wall_ms.txt")) as f:
                fig["wall_s"] = int(f.read().strip()) / 1000.0
        except (OSError, ValueError):
            pass
        out[impl] = fig
    if "torch" in out and "aviary" in out:
        pairs = list(zip(out["aviary"]["losses"], out["torch"]["losses"]))
        if pairs and all(x is not None and y is not None for x, y in pairs):
            out["max_loss_diff"] = max(abs(x - y) for x, y in pairs)
        else:
            out["max_loss_diff"] = None  # a run had fewer steps or a non-finite loss
        a, t = out["aviary"]["tokens_per_s"], out["torch"]["tokens_per_s"]
        out["aviary_over_torch_tokens_per_s"] = a / t if a and t else None
    return out


def guarded(what, compute, default):
    """compute(), or `default` with the error printed: one bad input must not cost the report."""
    try:
        return compute()
    except Exception:  # noqa: BLE001 -- the report must be written whatever went wrong
        print(f"gpu_check_report: {what} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return default


def tree_state():
    """tools/gpu_prepare.sh's record of the tree it ran in: HEAD and `git status --short`."""
    try:
        with open(os.path.join(ROOT, os.environ.get("DEBS", ".gpu"), "tree.txt")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    head = lines[0].strip() if lines else ""
    changes = [line for line in lines[1:] if line.strip()]
    return {"head": head, "changes": changes}


def main():
    stages = []
    try:
        with open(os.path.join(WORK, "stages.tsv")) as f:
            for line in f:
                name, status, secs, rc = line.rstrip("\n").split("\t")
                stages.append({"name": name, "status": status, "seconds": int(secs),
                               "rc": int(rc)})
    except OSError:
        pass
    status = {s["name"]: s["status"] for s in stages}
    env = load_json("env.json", {})
    registry = load_json("registry.json", [])
    gpu_tests = guarded("gpu tests", lambda: gtest_json_tests("gpu_tests.json"), None)
    if gpu_tests is None:  # the per-suite fallback
        gpu_tests = guarded("gpu tests, per suite", suite_tests, None)
        gaps = guarded("gpu tests, missing suites", suite_fallback_gaps, [])
        if gaps:
            gpu_tests = (gpu_tests or []) + gaps
    op_tests = guarded("op tests", lambda: gtest_json_tests("op_tests.json"), None)
    nccl = guarded("nccl step", lambda: gtest_json_tests("nccl_step.json"), None)
    bench = load_json("bench.json")
    if not (isinstance(bench, dict) and "ceilings" in bench and "rows" in bench):
        bench = None
    sanitizer = []
    try:
        with open(os.path.join(WORK, "sanitizer.tsv")) as f:
            for line in f:
                kernel, tool, result = line.rstrip("\n").split("\t")
                sanitizer.append({"kernel": kernel, "tool": tool, "status": result})
    except OSError:
        pass
    train = guarded("train figures", train_figures, {})
    commit = os.environ.get("GPU_CHECK_COMMIT", "unknown")
    tree = guarded("tree state", tree_state, None)
    tree_warning = None  # set when the tree checked is not the commit recorded
    same_commit = tree is not None and len(commit) >= 7 and tree["head"].startswith(commit)
    if tree is not None and (tree["changes"] or not same_commit):
        tree_warning = (f"the tree was prepared at {tree['head'] or '?'} with "
                        f"{len(tree['changes'])} uncommitted change(s), checked as {commit}: "
                        "commit first, then run tools/gpu_prepare.sh and the check")

    figures = {
        "env": env,
        "gpu_tests": counts(gpu_tests),
        "op_tests": counts(op_tests),
        "nccl_step": counts(nccl),
        "sanitizer": sanitizer,
        "bench": ({"ceilings": bench["ceilings"], "rows": len(bench["rows"])} if bench else None),
        "train": {k: ({kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict)
                      else v) for k, v in train.items()},
    }
    for s in stages:
        if s["name"] in figures:
            s["figures"] = figures[s["name"]]

    # ---- the validation record
    record_path = os.path.join(ROOT, "kernels", "validated.json")
    with open(record_path) as f:
        record = json.load(f)
    kernels = record.setdefault("kernels", {})
    sm = env.get("sm")
    gpu = env.get("gpu")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    validation = []
    for k in registry:
        name = k["kernel"]
        reasons = []
        decided = []
        if not sm:
            decided.append(None)
            reasons.append("no GPU: nothing validated")
        if not k.get("built"):
            decided.append(None)
            reasons.append("this build has no CUDA kernels")
        for ok, why in (verdict(gpu_tests, k["gpu_tests"], "gpu tests"),
                        verdict(op_tests, k["op_tests"], "op tests")):
            decided.append(ok)
            reasons.append(why)
        # Both tools must have run and passed; a run that timed out or could not use the device
        # decides nothing (an interrupted stage leaves some runs missing).
        runs = {s["tool"]: s["status"] for s in sanitizer if s["kernel"] == name}
        if status.get("sanitizer") == "unavailable":
            decided.append(None)
            reasons.append("compute-sanitizer: not available")
        else:
            for tool in ("memcheck", "racecheck"):
                result = runs.get(tool, "not run")
                decided.append({"pass": True, "fail": False}.get(result))
                reasons.append(f"compute-sanitizer {tool}: {result}")
        if tree_warning:
            decided.append(None)
            reasons.append(tree_warning)
        entries = kernels.get(name, [])
        if sm and False in decided:
            result = "removed" if any(e.get("sm") == sm for e in entries) else "failed"
            kernels[name] = [e for e in entries if e.get("sm") != sm]
        elif sm and all(d is True for d in decided):
            result = "validated"
            entry = {"gpu": gpu, "sm": sm, "date": today, "commit": commit,
                     "test": f"aviary_gpu_tests --gtest_filter='{k['gpu_tests']}'; "
                             f"aviary_unit_tests --gtest_filter='{k['op_tests']}'; "
                             "compute-sanitizer memcheck + racecheck"}
            kernels[name] = [e for e in entries if e.get("sm") != sm] + [entry]
        else:
            result = "undetermined (record unchanged)"
        if name in kernels and not kernels[name]:
            del kernels[name]
        validation.append({"kernel": name, "result": result, "reasons": reasons})
    record["kernels"] = dict(sorted(kernels.items()))
    with open(os.path.join(OUT, "validated.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")

    report = {
        "commit": commit,
        "tree": tree,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "stages": stages,
        "gpu_tests": gpu_tests,
        "op_tests": op_tests,
        "nccl_step": nccl,
        "sanitizer": sanitizer,
        "bench": bench,
        "train": train,
        "validation": validation,
    }
    with open(os.path.join(OUT, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")

    # ---- summary (the last thing printed: the device tool returns the end of the output)
    print(f"\n==== gpu_check summary: {gpu or 'no GPU'} (sm_{sm}), commit {commit}")
    for s in stages:
        extra = ""
        f = s.get("figures")
        if isinstance(f, dict) and f.get("ran"):
            extra = f"  passed {f['passed']} failed {f['failed']} skipped {f['skipped']}"
            if f["failures"]:
                extra += "  FAILED: " + ", ".join(f["failures"][:8])
        print(f"  {s['name']:10} {s['status']:13} {s['seconds']:4}s{extra}")
    if bench:
        c = bench["ceilings"]
        print(f"  ceilings: copy {c['copy_gbs']:.0f} GB/s; GEMM " +
              ", ".join(f"{d} {v:.1f} TFLOP/s" for d, v in c["gemm_tflops"].items()))
        for r in bench["rows"]:
            fig = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbs']:.0f} GB/s"
            print(f"  bench {r['op']} {r['pass']} {r['shape']} {r['dtype']}: {r['ms']:.3f} ms, "
                  f"{fig}, {r['pct_of_ceiling']:.0f}% of {r['ceiling']}, {r['speedup']:.2f}x vs "
                  f"{r['baseline']}")
    def fmt(value, spec, scale=1.0):
        return format(value * scale, spec) if isinstance(value, (int, float)) else "n/a"

    for impl in ("torch", "aviary"):
        if impl in train:
            t = train[impl]
            print(f"  train ops.impl={impl}: {fmt(t['tokens_per_s'], '.0f')} tok/s, "
                  f"{fmt(t['step_time_s'], '.1f', 1e3)} ms/step, "
                  f"final loss {fmt(t['final_loss'], '.4f')}, "
                  f"{t['non_finite_losses']} non-finite loss(es)")
    if "max_loss_diff" in train:
        print(f"  train: max |loss(aviary) - loss(torch)| = {fmt(train['max_loss_diff'], '.3g')}, "
              f"tokens/s ratio {fmt(train['aviary_over_torch_tokens_per_s'], '.3f')}")
    if tree_warning:
        print(f"  WARNING: {tree_warning}")
    for v in validation:
        print(f"  kernel {v['kernel']}: {v['result']} -- " + "; ".join(v["reasons"]))
    print(f"  wrote {OUT}/gpu_report.json and {OUT}/validated.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
