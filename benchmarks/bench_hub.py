"""Hub benchmark on loopback: over-fetch, throughput relative to a local merge, peak local disk.

    python benchmarks/bench_hub.py                    # 0.8 GB bf16 checkpoints (shared with bench_merge.py)
    python benchmarks/bench_hub.py --size-gb 0.8 --max-local-shards 1

The loopback Hub of the tests (tests/hub_server.py) runs as its own process, so it does not share
an interpreter with the merge. Each merge runs as `perta-stream merge -q` in a fresh process
pointed at it with HF_ENDPOINT, HF_TOKEN and HF_HUB_DISABLE_XET=1, the way a user would run it.

Measured per run: wall time, read throughput, peak RSS (GNU time), the bytes of shard content the
server served against the tensor bytes the merge needed (over-fetch ratio; header reads are the
only extra), and the peak size of the push's local staging folder (sampled every 5 ms). The
pushed shards are checked against the local merge's sha256s. Inputs and outputs go through the
page cache and loopback TCP, so the numbers show the protocol and pipeline overheads, not a
network. Writes benchmarks/results/hub.json and hub.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import make_inputs, warm  # noqa: E402
from common import machine_info, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = Path(sys.executable)
TOKEN = "hf_benchmark_write_token"


class LoopbackHub:
    """tests/hub_server.py in a child process, with its control routes."""

    def __init__(self, root: Path):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.process = subprocess.Popen(
            [str(VENV_PYTHON), str(ROOT / "tests" / "hub_server.py"), "--root", str(root), "--token", TOKEN],
            stdout=subprocess.PIPE,
            text=True,
        )
        addresses = json.loads(self.process.stdout.readline())
        self.endpoint, self.control = addresses["endpoint"], addresses["control"]

    def call(self, route: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.control + route, data=data, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def cpu_s(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class DiskSampler:
    """Peak bytes under a folder, sampled every 5 ms from another thread."""

    def __init__(self, folder: Path):
        self.folder, self.peak_bytes = folder, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "DiskSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for path in self.folder.rglob("*"):
                try:
                    total += path.stat().st_size if path.is_file() else 0
                except FileNotFoundError:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            time.sleep(0.005)


def tensor_bytes(paths: list[Path]) -> int:
    from perta_stream.sources.checkpoint import open_local_checkpoint

    return sum(open_local_checkpoint(path, "input").total_bytes for path in paths)


def merge(sources: dict[str, str], out: str, *, env: dict[str, str], extra: list[str] = ()) -> dict:
    """One `perta-stream merge` in its own process: wall time, peak RSS and CPU seconds (GNU time)."""
    command = [
        str(VENV_PYTHON), "-m", "perta_stream.cli", "merge", "-q", "--theta0", sources["theta0"], "--full", sources["full"],
        "--fgt", sources["fgt"], "--out", out, "--overwrite", *extra,
    ]
    started = time.perf_counter()
    completed = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M CPU_S=%U %S", *command], env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    lines = completed.stderr.rstrip("\n").split("\n")
    if completed.returncode != 0 or not lines[-1].startswith("PEAK_RSS_KB="):
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    rss_field, cpu_field = lines[-1].split(" CPU_S=")
    user_s, system_s = (float(x) for x in cpu_field.split())
    return {
        "wall_s": wall_s,
        "peak_rss_bytes": int(rss_field.split("=")[1]) * 1024,
        "cpu_s": user_s + system_s,
        "stderr": "\n".join(lines[:-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.8)
    parser.add_argument("--work", default=str(Path(__file__).parent / "work" / "merge"), help="input cache (shared with bench_merge.py)")
    parser.add_argument("--scratch", default=str(Path(__file__).parent / "work" / "hub"))
    parser.add_argument("--max-local-shards", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the runs of a round are interleaved and the median is kept")
    args = parser.parse_args()
    paths = make_inputs(Path(args.work), args.size_gb)
    inputs = [paths[r] for r in ("theta0", "full", "fgt")]
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    staging = scratch / "tmp"
    staging.mkdir(parents=True)
    hub = LoopbackHub(scratch / "server")
    try:
        for role, path in paths.items():
            if role != "stats":
                hub.call("/publish", {"repo_id": f"bench/{role}", "folder": str(path)})
        warm(inputs)
        needed = tensor_bytes(inputs)
        largest_shard = max(p.stat().st_size for p in paths["full"].glob("*.safetensors"))
        env = {
            **os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TMPDIR": str(staging),
        }
        env.pop("HF_HUB_OFFLINE", None)
        local = {r: str(paths[r]) for r in ("theta0", "full", "fgt")}
        remote = {r: f"hf://bench/{r}" for r in ("theta0", "full", "fgt")}
        runs = {
            "local -> local": (local, str(scratch / "out-local"), []),
            "hub -> local": (remote, str(scratch / "out-from-hub"), []),
            "hub -> hub": (remote, "hf://bench/merged", ["--create-repo", "--max-local-shards", str(args.max_local_shards)]),
        }
        measured: dict[str, list[dict]] = {name: [] for name in runs}
        # Interleaved rounds: a load change on this shared machine hits every run alike.
        for _ in range(args.repeat):
            for name, (sources, out, extra) in runs.items():
                hub.call("/reset", {})
                server_cpu_before = hub.cpu_s()
                with DiskSampler(staging) as disk:
                    result = merge(sources, out, env=env, extra=extra)
                result["server_cpu_s"] = hub.cpu_s() - server_cpu_before
                served = hub.call("/stats")["file_bytes_by_path"]
                result["shard_bytes_served"] = sum(n for label, n in served.items() if label.startswith("blobs/"))
                result["peak_staging_bytes"] = disk.peak_bytes
                measured[name].append(result)
        rows, records = [], []
        baseline_s = statistics.median(r["wall_s"] for r in measured["local -> local"])
        baseline_min_s = min(r["wall_s"] for r in measured["local -> local"])
        for name, results in measured.items():
            sources = runs[name][0]
            wall_s = statistics.median(r["wall_s"] for r in results)
            row = {
                "run": name,
                "wall (s, median)": wall_s,
                "vs local": wall_s / baseline_s,
                "wall (s, best)": min(r["wall_s"] for r in results),
                "best vs local best": min(r["wall_s"] for r in results) / baseline_min_s,
                "read GB/s": needed / 1e9 / wall_s,
                "CPU s (merge)": statistics.median(r["cpu_s"] for r in results),
                "CPU s (server)": statistics.median(r["server_cpu_s"] for r in results),
                "over-fetch": f"{max(r['shard_bytes_served'] for r in results) / needed:.6f}" if sources is remote else "-",
                "peak RSS (MiB)": max(r["peak_rss_bytes"] for r in results) / 2**20,
                "peak local staging (MB)": max(r["peak_staging_bytes"] for r in results) / 1e6,
            }
            rows.append(row)
            records.append({
                **row,
                "wall_s_all": [r["wall_s"] for r in results],
                "cpu_s_all": [r["cpu_s"] for r in results],
                "server_cpu_s_all": [r["server_cpu_s"] for r in results],
                "shard_bytes_served": [r["shard_bytes_served"] for r in results],
                "tensor_bytes_needed": needed,
                "stderr_tail": results[-1]["stderr"][-400:],
            })
        local_record = json.loads((scratch / "out-local" / "perta_merge.json").read_text())
        pushed = hub.call("/listing", {"repo_id": "bench/merged"})
        identical = all(pushed[s["file_name"]]["sha256"] == s["sha256"] for s in local_record["shards"])
        from_hub_record = json.loads((scratch / "out-from-hub" / "perta_merge.json").read_text())
        identical = identical and [s["sha256"] for s in from_hub_record["shards"]] == [s["sha256"] for s in local_record["shards"]]
    finally:
        hub.stop()
    if not identical:
        raise SystemExit("the Hub outputs differ from the local merge")
    record = {
        "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint_bytes": needed // 3,
        "largest_output_shard_bytes": largest_shard,
        "max_local_shards": args.max_local_shards,
        "repeat": args.repeat,
        "load_average_after": os.getloadavg(),
        "disk_bound_bytes": args.max_local_shards * largest_shard,
        "outputs_identical_to_local": identical,
        "rows": records,
    }
    json_path, md_path = write_results(
        "hub",
        record,
        rows,
        title=f"Hub merges on loopback ({needed / 3e9:.2f} GB bf16 checkpoints, page cache warm)",
        notes=[
            "CPU s: user + system seconds of the merge process, and of the loopback server process during the run "
            "(steadier than wall time on a shared machine)",
            "over-fetch = shard bytes the server sent / tensor bytes the merge needed (headers are the only extra)",
            f"peak local staging: the push's temporary folder; bound = --max-local-shards {args.max_local_shards} x "
            f"largest shard ({largest_shard / 1e6:.0f} MB) = {args.max_local_shards * largest_shard / 1e6:.0f} MB",
            "every output's shards have the local merge's sha256 (checked)",
            f"median and best of {args.repeat} interleaved rounds; load average after the runs {os.getloadavg()[0]:.1f} "
            "(the 2-core machine is shared, so absolute times are noisy; compare the ratios)",
            f"machine: {machine_info()['cpu_count']} cores; loopback server in its own process",
        ],
    )
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
