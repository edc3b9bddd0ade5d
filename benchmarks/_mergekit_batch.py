"""Run `mergekit-yaml CONFIG OUT [--random-seed S]` for a list of jobs in one process of mergekit's own venv
(the command's click entry point, called as the command line calls it: same options, same defaults), so the
interpreter and mergekit are imported once rather than once per config.

    .bench/mergekit-venv/bin/python benchmarks/_mergekit_batch.py JOBS.json RESULTS.json

JOBS.json: [{"config": PATH, "out": DIR, "seed": INT or null}, ...]. RESULTS.json: one record per job with
"ok", "seconds" and, on failure, "error" (exception type and message, the last 2,000 characters).
Only used by benchmarks/mergekit_corpus.py; never imported by evomerge.
"""

import json
import shutil
import sys
import time
import traceback


def main() -> None:
    jobs = json.load(open(sys.argv[1]))
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    results = []
    for job in jobs:
        shutil.rmtree(job["out"], ignore_errors=True)
        args = [job["config"], job["out"]]
        if job.get("seed") is not None:
            args += ["--random-seed", str(job["seed"])]
        t0 = time.perf_counter()
        rec = {"config": job["config"], "out": job["out"], "seed": job.get("seed")}
        try:
            mergekit_yaml.main(args=args, standalone_mode=False)
            rec["ok"] = True
        except BaseException as e:  # a refused config is a result, not a crash of the batch
            rec["ok"] = False
            msg = "".join(traceback.format_exception_only(type(e), e)).strip()
            rec["error"] = msg[-2000:]
            shutil.rmtree(job["out"], ignore_errors=True)
        rec["seconds"] = time.perf_counter() - t0
        results.append(rec)
        status = "ok  " if rec["ok"] else "ERR "
        print(f"{status}{rec['seconds']:6.1f}s {job['config']}", file=sys.stderr, flush=True)
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
