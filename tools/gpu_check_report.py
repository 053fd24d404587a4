#!/usr/bin/env python3
"""The report stage of tools/gpu_check.sh: reads what the stages left in $WORK and writes
$OUT/gpu_report.json (per stage: status, seconds, key figures; per gpu test: pass/fail) and
$OUT/validated.json (kernels/validated.json updated for this GPU's architecture), then prints a
summary. Standard library only: it runs under the device machine's python3."""

import datetime
import fnmatch
import json
import os
import sys
import xml.etree.ElementTree as ET

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


def junit_tests(path):
    """ctest --output-junit: [{name, status: pass|fail|skip, seconds}]."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    tests = []
    for case in root.iter("testcase"):
        status = "pass"
        if case.find("failure") is not None or case.find("error") is not None:
            status = "fail"
        elif case.find("skipped") is not None or case.get("status") in ("notrun", "disabled"):
            status = "skip"
        tests.append({"name": case.get("name"), "status": status,
                      "seconds": float(case.get("time") or 0)})
    return tests


def gtest_json_tests(name):
    """gtest --gtest_output=json: [{name, status, seconds}]."""
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


def train_figures():
    out = {}
    for impl in ("torch", "aviary"):
        run = os.path.join(WORK, "train-" + impl)
        rows = []
        try:
            with open(os.path.join(run, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except OSError:
            continue
        train = [r for r in rows if r.get("type") == "train"]
        if not train:
            continue
        timed = [r for r in train if r["step"] > 5] or train
        fig = {"steps": len(train),
               "losses": [round(r["loss"], 5) for r in train],
               "final_loss": train[-1]["loss"],
               "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
               "step_time_s": sum(r["step_time_s"] for r in timed) / len(timed)}
        try:
            with open(os.path.join(run, "wall_ms.txt")) as f:
                fig["wall_s"] = int(f.read().strip()) / 1000.0
        except (OSError, ValueError):
            pass
        out[impl] = fig
    if "torch" in out and "aviary" in out:
        a, t = out["aviary"]["losses"], out["torch"]["losses"]
        out["max_loss_diff"] = max(abs(x - y) for x, y in zip(a, t)) if a and t else None
        out["aviary_over_torch_tokens_per_s"] = (
            out["aviary"]["tokens_per_s"] / out["torch"]["tokens_per_s"])
    return out


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
    gpu_tests = gtest_json_tests("gpu_tests.json")
    if gpu_tests is None:  # the ctest fallback
        gpu_tests = junit_tests(os.path.join(WORK, "gpu_tests.xml"))
    op_tests = gtest_json_tests("op_tests.json")
    nccl = gtest_json_tests("nccl_step.json")
    bench = load_json("bench.json")
    sanitizer = []
    try:
        with open(os.path.join(WORK, "sanitizer.tsv")) as f:
            for line in f:
                kernel, tool, result = line.rstrip("\n").split("\t")
                sanitizer.append({"kernel": kernel, "tool": tool, "status": result})
    except OSError:
        pass
    train = train_figures()

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
    commit = os.environ.get("GPU_CHECK_COMMIT", "unknown")
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
        runs = [s for s in sanitizer if s["kernel"] == name]
        if status.get("sanitizer") == "unavailable":
            decided.append(None)
            reasons.append("compute-sanitizer: not available")
        elif not runs:
            decided.append(None)
            reasons.append("compute-sanitizer: not run")
        for s in runs:
            decided.append(s["status"] == "pass")
            reasons.append(f"compute-sanitizer {s['tool']}: {s['status']}")
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
    for impl in ("torch", "aviary"):
        if impl in train:
            t = train[impl]
            print(f"  train ops.impl={impl}: {t['tokens_per_s']:.0f} tok/s, "
                  f"{t['step_time_s'] * 1e3:.1f} ms/step, final loss {t['final_loss']:.4f}")
    if "max_loss_diff" in train:
        print(f"  train: max |loss(aviary) - loss(torch)| = {train['max_loss_diff']:.3g}, "
              f"tokens/s ratio {train['aviary_over_torch_tokens_per_s']:.3f}")
    for v in validation:
        print(f"  kernel {v['kernel']}: {v['result']} -- " + "; ".join(v["reasons"]))
    print(f"  wrote {OUT}/gpu_report.json and {OUT}/validated.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
