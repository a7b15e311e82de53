"""Many writers: 8 `unipt extract` processes on one store over S3 (a moto server on loopback).

Every writer is a process that runs ``unipt extract`` (``unipt.pipelines.cli.main``, the command's own code)
once per store, behind a start line: all writers have imported the extraction stack and wait for one "go"
file, so they reach the store together. Each writes its summary with ``--summary-json``; its ``written``
list names every part it committed. A part in two lists is a duplicate, a planned part in none is lost.

(a) throughput: 1 writer, then 8 writers, on the same source into fresh stores (wall time from "go" to the
    last writer's exit, examples/s and parts/s, S3 requests per part from the server's request log);
(b) ``--runs`` runs of 8 writers into fresh stores: duplicates and lost parts per run, ``unipt store
    verify`` and claims left over;
(c) the claim protocol at volume: ``--volume-parts`` parts of 2 examples (1 layer) by 8 writers, in a local
    folder, and on S3 at ``--volume-s3-parts`` parts (the largest size that fits the time); claims any
    writer judged stale (each one a take-over) are counted too.

The backbone is a random 32-wide BERT and the source synthetic texts (benchmarks/_standin.py).

    OMP_NUM_THREADS=1 nice python benchmarks/bench_writers.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, publish  # noqa: E402
from _standin import standin_backbone, write_text_source  # noqa: E402

SECTION = "many-writers"
WRITERS = 8

# One writer process: import once, then for each job wait for its "go" file and run the command. Claims
# judged stale are counted by wrapping Claims.is_stale (the protocol itself is untouched).
WRITER = r"""
import json, os, sys, time
import torch, transformers
from transformers import BertModel, BertTokenizerFast
import unipt.extract, unipt.store
from unipt.pipelines.cli import main
from unipt.store import _claims
folder, me = sys.argv[1], int(sys.argv[2])
stale = [0]
is_stale = _claims.Claims.is_stale
def counting(self, document):
    verdict = is_stale(self, document)
    stale[0] += bool(verdict)
    return verdict
_claims.Claims.is_stale = counting
jobs = json.loads(open(os.path.join(folder, "jobs.json")).read())
for k, job in enumerate(jobs):
    open(os.path.join(folder, f"ready-{k}-{me}"), "w").close()
    while not os.path.exists(os.path.join(folder, f"go-{k}")):
        time.sleep(0.005)
    argv = job.get(str(me))
    stale[0], started = 0, time.time()
    rc = main(argv) if argv else None
    with open(os.path.join(folder, f"done-{k}-{me}.json"), "w") as f:
        json.dump({"rc": rc, "stale": stale[0], "finished": time.time(), "started": started}, f)
"""

RECIPE = """\
name = "bench-writers"
[source]
path = "{csv}"
[backbone]
model = "{model}"
device = "cpu"
[extract]
part_size = {part_size}
batch_size = {batch_size}
[train.probe]
method = "linear_probe"
"""


@dataclass
class Job:
    """One store written by ``writers`` writers at once."""

    name: str
    url: str
    recipe: Path
    writers: int
    summaries: list[dict] = field(default_factory=list)
    done: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    requests: int = 0  # S3 requests the server logged while the job ran


# ----------------------------------------------------------------------------- the S3 endpoint
class MotoServer:
    """moto's S3 server in its own process on 127.0.0.1, with the AWS environment pointed at it."""

    def __init__(self, folder: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = folder / "moto.log"
        self._log = open(self.log, "w")
        self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=self._log, stderr=subprocess.STDOUT)
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(name, None)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
                           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
                           "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
                           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        import boto3

        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="bench-writers")
                break
            except Exception:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"the moto server did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.2)

    def requests(self) -> int:
        self._log.flush()
        with open(self.log, "rb") as f:
            return sum(1 for line in f if b" HTTP/1.1\" " in line)

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(30)
        self._log.close()


# ----------------------------------------------------------------------------- the writers
def run_jobs(folder: Path, jobs: list[Job], server: MotoServer | None) -> None:
    """Start 8 writer processes and run ``jobs`` one after another, all writers of a job at once."""
    argvs = []
    for k, job in enumerate(jobs):
        argvs.append({str(i): ["extract", str(job.recipe), "-q", f"store='{job.url}'",
                               f"workdir='{folder / f'work-{k}-{i}'}'",
                               "--summary-json", str(folder / f"summary-{k}-{i}.json")] for i in range(job.writers)})
    (folder / "jobs.json").write_text(json.dumps(argvs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = [open(folder / f"writer-{i}.log", "w") for i in range(WRITERS)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(i)], env=env, stdout=log,
                              stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    finished = False
    try:
        for k, job in enumerate(jobs):
            wait_for(folder, [f"ready-{k}-{i}" for i in range(WRITERS)], procs)
            before = server.requests() if server else 0
            t0 = time.time()
            (folder / f"go-{k}").touch()
            wait_for(folder, [f"done-{k}-{i}.json" for i in range(WRITERS)], procs)
            job.done = [json.loads((folder / f"done-{k}-{i}.json").read_text()) for i in range(job.writers)]
            job.seconds = max(d["finished"] for d in job.done) - t0
            job.requests = (server.requests() - before) if server else 0
            failed = [i for i, d in enumerate(job.done) if d["rc"] != 0]
            if failed:
                tail = (folder / f"writer-{failed[0]}.log").read_text()[-3000:]
                raise RuntimeError(f"{job.name}: writers {failed} failed:\n{tail}")
            job.summaries = [json.loads((folder / f"summary-{k}-{i}.json").read_text()) for i in range(job.writers)]
            print(f"  {job.name}: {job.seconds:.1f}s, {job.requests} requests, parts written per writer "
                  f"{[s['parts_written'] for s in job.summaries]}", flush=True)
        finished = True
    finally:
        for proc in procs:
            if finished:
                proc.wait(60)  # past their last job: they exit on their own
            proc.kill()
            proc.wait()
        for log in logs:
            log.close()


def wait_for(folder: Path, names: list[str], procs: list[subprocess.Popen], timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while not all((folder / name).exists() for name in names):
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tail = (folder / f"writer-{dead[0] if dead else 0}.log").read_text()[-3000:]
            raise RuntimeError(f"writer {dead} exited (or timed out) waiting for {names[0]}:\n{tail}")
        time.sleep(0.02)


@dataclass
class Check:
    planned: int
    committed: int
    duplicates: int
    lost: int
    claims_left: int
    verify_ok: bool
    stale: int
    examples: int


def check(job: Job, verify_store: bool = True) -> Check:
    from unipt.store import FeatureStore, verify

    store = FeatureStore.open(job.url)
    planned = {f"{split}/part-{i:06d}" for split, plan in store.plan.items() for i in range(plan["parts"])}
    committed = {f"{split}/{p.name}" for split in store.splits() for p in store.parts(split)}
    written = [name for summary in job.summaries for name in summary["written"]]
    duplicates = len(written) - len(set(written))
    lost = len(planned - (set(written) & committed))  # no writer wrote it, or it did not commit
    report = verify(store) if verify_store else None
    ok = report is None or report.ok
    if not ok:
        print(f"  verify {job.url}: {report.problems[:5]}", flush=True)
    return Check(len(planned), len(committed), duplicates, lost, len(store.active_claims()), ok,
                 sum(d["stale"] for d in job.done), sum(sum(s["examples"].values()) for s in job.summaries))


# ----------------------------------------------------------------------------- the benchmark
def recipe(folder: Path, name: str, csv: Path, model: Path, part_size: int, batch_size: int) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(RECIPE.format(csv=csv, model=model, part_size=part_size, batch_size=batch_size))
    return path


def s3_url(name: str) -> str:
    """A store in a new bucket: moto lists a prefix by walking every key of the bucket, so stores left by
    earlier jobs in one bucket would slow the later ones."""
    import boto3

    bucket = f"bench-writers-{name}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store.zarr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4096, help="(a): source rows")
    parser.add_argument("--part-size", type=int, default=64, help="(a), (b): examples per part")
    parser.add_argument("--runs", type=int, default=10, help="(b): runs of 8 writers into fresh stores")
    parser.add_argument("--runs-examples", type=int, default=1024, help="(b): source rows")
    parser.add_argument("--volume-parts", type=int, default=10_000, help="(c): parts in the local-folder run")
    parser.add_argument("--volume-s3-parts", type=int, default=1000, help="(c): parts in the S3 run")
    parser.add_argument("--skip", default="", help="comma-separated parts of the benchmark to leave out: a,b,c")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace this benchmark's section in that file")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    folder = Path(tempfile.mkdtemp(prefix="bench-writers-"))
    server = MotoServer(folder)
    lines = ["## Many writers: 8 `unipt extract` processes on one store over S3", "",
             f"Machine: {machine()}.",
             f"Command: `OMP_NUM_THREADS=1 nice python benchmarks/bench_writers.py {' '.join(sys.argv[1:])}`."
             " S3 is moto's server on loopback (one Python process); each writer is a process running the real "
             "`unipt extract` once per store (imports paid once, before the start line); stand-in backbone: a "
             "random BERT, 32 wide (benchmarks/_standin.py), float16, zstd.", ""]
    try:
        model2 = standin_backbone(folder / "bert-2", hidden=32, layers=2)
        model1 = standin_backbone(folder / "bert-1", hidden=32, layers=1)
        if "a" not in skip:
            lines += bench_throughput(folder, server, model2, args.examples, args.part_size)
        if "b" not in skip:
            lines += bench_runs(folder, server, model2, args.runs, args.runs_examples, args.part_size // 4)
        if "c" not in skip:
            lines += bench_volume(folder, server, model1, args.volume_parts, args.volume_s3_parts)
    finally:
        server.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    publish(SECTION, lines, args.write)


def bench_throughput(folder: Path, server: MotoServer, model: Path, n: int, part_size: int) -> list[str]:
    print(f"(a) 1 writer vs {WRITERS} writers, {n} examples, part size {part_size}", flush=True)
    work = folder / "a"
    work.mkdir()
    csv = write_text_source(work / "texts.csv", n, seed=1)
    path = recipe(work, "a", csv, model, part_size, 32)
    jobs = [Job("1 writer", s3_url("a1"), path, 1), Job(f"{WRITERS} writers", s3_url("a8"), path, WRITERS)]
    run_jobs(work, jobs, server)
    rows = ["### (a) Aggregate throughput, 1 vs 8 writers", "",
            f"{n} synthetic texts (0.8/0.1/0.1 splits), 2-layer stand-in (3 hidden states stored), part size "
            f"{part_size}, batch size 32. Wall time from the start line to the last writer's exit.", "",
            "| writers | seconds | examples/s | parts/s | S3 requests | requests/part | parts per writer | dup | lost |",
            "|---|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        c = check(job)
        per_writer = "/".join(str(s["parts_written"]) for s in job.summaries)
        rows.append(f"| {job.writers} | {job.seconds:.1f} | {c.examples / job.seconds:.0f} | "
                    f"{c.planned / job.seconds:.2f} | {job.requests} | {job.requests / c.planned:.0f} | {per_writer} | "
                    f"{c.duplicates} | {c.lost} |")
    one, many = jobs
    speedup = one.seconds / many.seconds
    rows += ["", f"8 writers vs 1: {speedup:.2f}x the aggregate throughput. What limits it: {limits(one, many)}", ""]
    return rows


def limits(one: Job, many: Job) -> str:
    busy = {key: sum(s[key] for s in many.summaries) for key in ("forward_seconds", "tokenize_seconds", "write_seconds")}
    single = {key: one.summaries[0][key] for key in busy}
    return (f"the machine has 2 cores, shared by the 8 writers and the moto server, so 8 writers cannot run more "
            f"than 2 at a time; each writer also reads and plans the whole source and checks every part it does "
            f"not write (claim attempts, commit checks: {many.requests} requests for 8 writers against "
            f"{one.requests} for one). Summed over writers, forward {busy['forward_seconds']:.1f}s (1 writer: "
            f"{single['forward_seconds']:.1f}s), writer thread busy {busy['write_seconds']:.1f}s (1 writer: "
            f"{single['write_seconds']:.1f}s): the time goes to S3 round trips, which on one local moto process "
            f"serialize.")


def bench_runs(folder: Path, server: MotoServer, model: Path, runs: int, n: int, part_size: int) -> list[str]:
    print(f"(b) {runs} runs of {WRITERS} writers, {n} examples, part size {part_size}", flush=True)
    work = folder / "b"
    work.mkdir()
    csv = write_text_source(work / "texts.csv", n, seed=2)
    path = recipe(work, "b", csv, model, part_size, 16)
    jobs = [Job(f"run {r + 1}", s3_url(f"b{r}"), path, WRITERS) for r in range(runs)]
    run_jobs(work, jobs, server)
    rows = [f"### (b) {runs} runs of 8 writers into fresh stores", "",
            f"{n} texts, part size {part_size}: a part in two writers' `written` lists is a duplicate, a planned "
            "part in none (or not committed) is lost; then `verify` and the claims left in the store.", "",
            "| run | parts | seconds | duplicates | lost | verify | claims left | stale claims | parts per writer |",
            "|---|---|---|---|---|---|---|---|---|"]
    total_dup = total_lost = 0
    for job in jobs:
        c = check(job)
        total_dup, total_lost = total_dup + c.duplicates, total_lost + c.lost
        rows.append(f"| {job.name} | {c.planned} | {job.seconds:.1f} | {c.duplicates} | {c.lost} | "
                    f"{'OK' if c.verify_ok else 'FAILED'} | {c.claims_left} | {c.stale} | "
                    f"{'/'.join(str(s['parts_written']) for s in job.summaries)} |")
    rows += ["", f"In all: {total_dup} duplicates, {total_lost} lost parts over {runs} runs.", ""]
    return rows


def bench_volume(folder: Path, server: MotoServer, model: Path, local_parts: int, s3_parts: int) -> list[str]:
    rows = ["### (c) The claim protocol at volume: parts of 2 examples, 8 writers", "",
            "1-layer stand-in, part size 2, batch size 2; 0.8/0.1/0.1 splits, so the split's last part may hold "
            "1 example. Stale claims: claims any writer judged stale (each would be a take-over; the ttl is the "
            "default 120 s).", "",
            "| store | parts | seconds | ms/part | S3 requests/part | duplicates | lost | verify | claims left | "
            "stale claims | parts per writer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for where, parts in (("local folder", local_parts), ("S3 (moto)", s3_parts)):
        if parts <= 0:
            continue
        print(f"(c) {parts} parts of 2 examples, {where}", flush=True)
        work = folder / f"c-{parts}-{where[:2]}"
        work.mkdir()
        csv = write_text_source(work / "texts.parquet", 2 * parts, seed=3)
        path = recipe(work, "c", csv, model, 2, 2)
        url = str(work / "store.zarr") if where == "local folder" else s3_url("c")
        job = Job(where, url, path, WRITERS)
        run_jobs(work, [job], server if where.startswith("S3") else None)
        c = check(job)
        requests = f"{job.requests / c.planned:.0f}" if job.requests else "-"
        rows.append(f"| {where} | {c.planned} | {job.seconds:.1f} | {1000 * job.seconds / c.planned:.1f} | {requests} | "
                    f"{c.duplicates} | {c.lost} | {'OK' if c.verify_ok else 'FAILED'} | {c.claims_left} | {c.stale} | "
                    f"{'/'.join(str(s['parts_written']) for s in job.summaries)} |")
    return rows + [""]


if __name__ == "__main__":
    main()
