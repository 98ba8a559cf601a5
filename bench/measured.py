"""Run a command as a child of this small process and write the child's own CPU time and peak RSS (wait4) to
the file named first: `python bench/measured.py OUT.json command args…`; the command's exit code is ours.

Why not wait4 in the benchmark itself: a child's peak RSS (ru_maxrss) counts the memory of the process it was
forked from until it execs, so every contender started from the benchmark, which by then holds 100,000
Observations' worth of Flags, reported the benchmark's own peak instead (185 MB at 100k, whatever the
contender). Forked from this process (about 10 MB), it reports its own."""

import json
import os
import sys

out, command = sys.argv[1], sys.argv[2:]
pid = os.posix_spawnp(command[0], command, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as sink:
    json.dump({"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}, sink)
sys.exit(os.waitstatus_to_exitcode(status))
