"""Push and pull throughput of orchestrator.objectstore against the reference tool, on the same S3 server.

    python3 bench/s3_throughput.py                      # 1 GiB as 1 file and as 10,000 files (several minutes)
    python3 bench/s3_throughput.py --mib 64 --files 1000 --results /tmp/s3.md   # a quick look

Not run by CI. The server is PIPE_TEST_S3_ENDPOINT with PIPE_TEST_S3_ACCESS_KEY/_SECRET_KEY, or the radosgw that
scripts/s3.sh starts (or finds running). The reference is `rclone copy` (Debian's rclone) or, where rclone is
missing, `aws s3 cp --recursive`; both get the same concurrency as pipe (--workers files at once). pipe's side is
ObjectStore.put_many/get_many in this process: put_file per file (multipart from 64 MiB), get_file per file with
its blake3 check (the digests are computed before the clock starts, as a manifest carries them). Each
(tool, direction) is timed in turns, a b a b, -n times; the median is reported, and the ratio is pipe's time over
the reference's (below 1: pipe is faster). Objects are deleted after every step so memstore stays small.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.hashing import hash_file
from orchestrator.objectstore import ObjectStore

MiB = 1 << 20


def server() -> tuple[str, str, str]:
    if not os.environ.get("PIPE_TEST_S3_ENDPOINT"):
        out = subprocess.run(["bash", str(ROOT / "scripts" / "s3.sh")], check=True, capture_output=True, text=True)
        os.environ.update(dict(line.split("=", 1) for line in out.stdout.split()))
    return (os.environ["PIPE_TEST_S3_ENDPOINT"], os.environ["PIPE_TEST_S3_ACCESS_KEY"],
            os.environ["PIPE_TEST_S3_SECRET_KEY"])


def make_data(folder: Path, total: int, files: int) -> list[Path]:
    """`files` random files of total/files bytes each under folder (reused when already there with those sizes)."""
    size = total // files
    paths = [folder / f"{i // 100:03d}" / f"f{i:05d}.bin" for i in range(files)] if files > 1 else [folder / "one.bin"]
    if all(p.is_file() and p.stat().st_size == size for p in paths) and sum(1 for _ in folder.rglob("*.bin")) == files:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    return paths


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def reference(endpoint: str, access: str, secret: str, workers: int) -> tuple[str, Callable[[str, str], list[str]]]:
    env_prefix = "RCLONE_CONFIG_BENCH_"
    if shutil.which("rclone"):
        os.environ.update({
            env_prefix + "TYPE": "s3", env_prefix + "PROVIDER": "Ceph", env_prefix + "ENDPOINT": endpoint,
            env_prefix + "ACCESS_KEY_ID": access, env_prefix + "SECRET_ACCESS_KEY": secret,
        })
        return "rclone copy", lambda src, dst: ["rclone", "copy", "--transfers", str(workers), src, dst]
    if shutil.which("aws"):
        return "aws s3 cp", lambda src, dst: [
            "aws", "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint, src, dst,
        ]
    sys.exit("neither rclone nor the AWS CLI is installed (apt-get install rclone)")


def remote_path(tool: str, bucket: str, prefix: str) -> str:
    return f"bench:{bucket}/{prefix}" if tool.startswith("rclone") else f"s3://{bucket}/{prefix}"


def run_shape(
    args: argparse.Namespace, endpoint: str, access: str, secret: str, files: int
) -> tuple[str, dict[str, float]]:
    data = make_data(args.work / f"data-{args.mib}m-{files}", args.mib * MiB, files)
    base = data[0].parent if files == 1 else data[0].parent.parent
    digests = {p: hash_file(p) for p in data}
    keys = {p: p.relative_to(base).as_posix() for p in data}
    bucket = f"pipe-bench-{secrets.token_hex(4)}"
    store = ObjectStore(f"s3://{bucket}/pipe/", endpoint)
    whole = ObjectStore(f"s3://{bucket}/", endpoint)  # pipe's prefix and the reference's
    store._client.create_bucket(Bucket=bucket)
    tool, command = reference(endpoint, access, secret, args.workers)
    tool_env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # plain http: the bundle gets in the way
    tool_env.update(AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret, AWS_EC2_METADATA_DISABLED="true")
    times: dict[str, list[float]] = {"pipe push": [], "pipe pull": [], "ref push": [], "ref pull": []}
    pulled = args.work / "pulled"
    src, dst = str(base), remote_path(tool, bucket, "ref/")  # src: a folder holding just the data
    try:
        for _ in range(args.n):
            times["pipe push"].append(timed(lambda: store.put_many([(keys[p], p) for p in data], args.workers)))
            shutil.rmtree(pulled, ignore_errors=True)
            times["pipe pull"].append(timed(lambda: store.get_many(
                [(keys[p], pulled / keys[p], digests[p]) for p in data], args.workers)))
            assert sum(f.stat().st_size for f in pulled.rglob("*.bin")) == args.mib * MiB // files * files
            store.delete(o.key for o in store.list())
            times["ref push"].append(timed(lambda: subprocess.run(command(src, dst), check=True, env=tool_env)))
            shutil.rmtree(pulled, ignore_errors=True)
            times["ref pull"].append(
                timed(lambda: subprocess.run(command(dst, str(pulled)), check=True, env=tool_env))
            )
            assert sum(f.stat().st_size for f in pulled.rglob("*.bin")) == args.mib * MiB // files * files
            whole.delete(o.key for o in whole.list())
    finally:
        whole.delete(o.key for o in whole.list())
        store._client.delete_bucket(Bucket=bucket)
        shutil.rmtree(pulled, ignore_errors=True)
    return tool, {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="total size of each shape, MiB (default 1024)")
    parser.add_argument("--files", type=int, default=10_000, help="file count of the many-files shape")
    parser.add_argument("--only-one-file", action="store_true", help="measure the 1-file shape alone")
    parser.add_argument("--workers", type=int, default=8, help="files in flight at once, pipe and reference")
    parser.add_argument("-n", type=int, default=1, help="repetitions (the median is reported)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "s3")
    parser.add_argument("--results", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    endpoint, access, secret = server()
    os.environ.update(AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret, AWS_EC2_METADATA_DISABLED="true")
    os.environ.pop("AWS_PROFILE", None)
    load = os.getloadavg()[0]
    lines = [
        (
            f"S3 throughput against {endpoint} ({args.mib} MiB per shape, {args.workers} files in flight, "
            f"-n {args.n}; load average {load:.2f} before)"
        ),
        "",
        "| shape | direction | pipe s | pipe MB/s | reference | ref s | ref MB/s | ratio (pipe/ref time) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for files in (1,) if args.only_one_file else (1, args.files):
        tool, result = run_shape(args, endpoint, access, secret, files)
        mb = args.mib * MiB / 1e6
        for direction in ("push", "pull"):
            ours, ref = result[f"pipe {direction}"], result[f"ref {direction}"]
            lines.append(
                f"| {files} file{'s' if files > 1 else ''} | {direction} | {ours:.2f} | {mb / ours:.1f} | "
                f"{tool} | {ref:.2f} | {mb / ref:.1f} | {ours / ref:.2f} |"
            )
        print("\n".join(lines[-2:]), flush=True)
    lines.append("")
    lines.append(f"load average {os.getloadavg()[0]:.2f} after")
    text = "\n".join(lines)
    print("\n" + text)
    if args.results:
        args.results.write_text(text + "\n")


if __name__ == "__main__":
    main()
