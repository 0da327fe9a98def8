"""What a user sees on the console, through a pipe: runs one command with stdout and stderr into
one pipe (as `cmd 2>&1 | tee log` does), stamps each line with the seconds since the start, and
prints the lines and a summary: how many lines (selfsup's own, Ray's, others), the first line's
delay, the longest silence after it (the end of the command counted), and the command's time.

    python -m benchmarks.usability.console_timing -- selfsup demo --workdir /tmp/demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def kind(line: str) -> str:
    """Whose line it is: selfsup's log, the final JSON line, Ray's, or other."""
    if line.startswith("[selfsup]") or line.startswith("selfsup "):
        return "selfsup"
    if line.startswith("{") and line.rstrip().endswith("}"):
        return "json"
    if "ray" in line.lower() or "core_worker" in line or "raylet" in line:
        return "ray"
    return "other"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="the summary only, not the stamped lines")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stamps, counts = [], {"selfsup": 0, "json": 0, "ray": 0, "other": 0}
    for line in process.stdout:
        stamps.append(time.monotonic() - start)
        counts[kind(line)] += 1
        if not args.quiet:
            print(f"{stamps[-1]:7.1f}s  {line.rstrip()[:160]}", flush=True)
    code = process.wait()
    total = time.monotonic() - start
    silences = [b - a for a, b in zip(stamps, stamps[1:] + [total])]
    print(f"command: {' '.join(command)}", file=sys.stderr)
    print(f"exit {code}; {len(stamps)} lines: {counts['selfsup']} selfsup, {counts['json']} JSON, {counts['ray']} Ray, "
          f"{counts['other']} other; first line after {stamps[0] if stamps else total:.1f} s; longest silence after it "
          f"{max(silences, default=0.0):.1f} s; {total:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
